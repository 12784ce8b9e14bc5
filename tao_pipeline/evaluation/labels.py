"""The optional labels file: read by evaluation only, never by scoring, pairing or training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tao_pipeline.data.conversation import ConversationRejected, from_messages
from tao_pipeline.settings import DataSettings


def label_key(prompt: str, history: Any = None) -> str:
    """What a label is looked up by: the prompt's text, and for a conversation its earlier turns too
    (a follow-up such as "Now add 3 to that." has a different answer in every conversation)."""
    text = prompt.strip()
    return f"{history}\x1f{text}" if isinstance(history, str) and history else text


def load_labels(path: Path | None) -> dict[str, list[str]]:
    """Labels file (JSONL: ``prompt`` or a conversation's ``messages``, ``answer``, ``aliases``) ->
    label key -> accepted answers. Evaluation only."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} (setting data.labels) does not exist")
    labels: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answers = [str(record["answer"]), *map(str, record.get("aliases") or [])]
                labels[_record_key(record)] = answers
            except (json.JSONDecodeError, KeyError, TypeError, ConversationRejected) as error:
                raise ValueError(f"labels file {path}:{line_number} is malformed: {error}") from error
    return labels


def _record_key(record: dict[str, Any]) -> str:
    if "messages" in record:
        conversation = from_messages(record["messages"], DataSettings())
        return label_key(conversation.prompt, conversation.history_json)
    return label_key(str(record["prompt"]))
