"""A prompt is a conversation: an optional system message, then turns, ending with a user turn.

The pipeline keeps a conversation as three parts, so that a single-turn prompt is stored (and
hashed) exactly as before conversations existed:

* ``prompt``: the last user turn, the one the candidates answer;
* ``system``: the system message (``developer`` messages count as system messages);
* ``history``: the turns before the last one, as canonical JSON (``None`` when there are none).

Messages come in the OpenAI Chat Completions shape. What a text model cannot take is left out and
counted, never silently: non-text content parts (images, audio, files), tool and function messages,
and assistant tool calls. The row itself is kept as long as a user turn with text remains.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from tao_pipeline.settings import DataSettings

SYSTEM_ROLES = frozenset({"system", "developer"})
TURN_ROLES = frozenset({"user", "assistant"})
LEFT_OUT_ROLES = frozenset({"tool", "function"})  # a tool's output: a text model's chat template has no place for it
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal"})


class ConversationRejected(ValueError):
    """Why a conversation cannot be a prompt (the row is quarantined with this reason)."""


@dataclass(frozen=True)
class Conversation:
    prompt: str
    system: str | None
    history: tuple[dict[str, str], ...]  # {"role": "user"|"assistant", "content": ...}, oldest first
    left_out: tuple[tuple[str, int], ...] = ()  # ("image_url part", 2): what the model cannot take, counted

    @property
    def history_json(self) -> str | None:
        return history_json(self.history)

    def left_out_text(self) -> str | None:
        """What was left out, for the usage_logs ``left_out`` column: ``"image_url part: 1; tool message: 2"``."""
        return "; ".join(f"{what}: {count}" for what, count in self.left_out) or None

    def messages(self) -> list[dict[str, str]]:
        return build_chat(self.prompt, self.system, self.history)


def history_json(history: Sequence[dict[str, str]]) -> str | None:
    """Earlier turns as canonical JSON (hashed into the prompt id), or None for a single-turn prompt."""
    if not history:
        return None
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in history]
    return json.dumps(turns, ensure_ascii=False, separators=(",", ":"))


def history_turns(history: Any) -> list[dict[str, str]]:
    """The ``history`` column's turns: from its JSON, a list, or nothing (None, NaN, empty)."""
    if isinstance(history, str) and history:
        return json.loads(history)
    if isinstance(history, (list, tuple)):
        return list(history)
    return []


def build_chat(prompt: str, system: str | None = None, history: Any = None) -> list[dict[str, str]]:
    """A prompt (with its system message and earlier turns, if any) as chat messages for a chat template."""
    # pandas hands missing values over as NaN, hence the isinstance checks.
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    return [*messages, *history_turns(history), {"role": "user", "content": prompt}]


def row_chat(row: Any) -> list[dict[str, str]]:
    """A prompts-table row (a namedtuple, a dict or a Series) as chat messages; ``history`` may be absent."""
    get = row.get if hasattr(row, "get") else partial(getattr, row)
    return build_chat(get("prompt"), get("system", None), get("history", None))


def fit_chat(
    messages: list[dict[str, str]], count_tokens: Callable[[list[dict[str, str]]], int], budget: int
) -> tuple[list[dict[str, str]], int]:
    """The conversation cut from the front until ``count_tokens`` says it fits ``budget``, and how many turns were cut.

    The system message and the last user turn always stay; earlier turns go oldest first, a user
    turn together with the assistant answer after it, so what is left still alternates. When even
    the system message and the last turn do not fit, that is what is returned (the caller's own
    truncation then applies).
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    starts = [0]  # where what is kept may start, oldest first: dropping a user turn with its answer
    while len(turns) - starts[-1] > 1:
        at = starts[-1]
        pair = len(turns) - at > 2 and turns[at]["role"] == "user" and turns[at + 1]["role"] == "assistant"
        starts.append(at + (2 if pair else 1))
    # Fewer turns never need more tokens: a binary search counts log(turns) times, not once per turn.
    low, high = 0, len(starts) - 1
    while low < high:
        middle = (low + high) // 2
        if count_tokens([*system, *turns[starts[middle] :]]) <= budget:
            high = middle
        else:
            low = middle + 1
    return [*system, *turns[starts[low] :]], starts[low]


def chat_token_counter(tokenizer, add_generation_prompt: bool = True) -> Callable[[list[dict[str, str]]], int]:
    """Tokens of messages through a tokenizer's chat template (for ``fit_chat``)."""

    def count(messages: list[dict[str, str]]) -> int:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return len(ids)

    return count


def fit_chat_to_tokens(tokenizer, messages: list[dict[str, str]], budget: int) -> tuple[list[dict[str, str]], int]:
    """``fit_chat`` counting with the tokenizer's chat template; a single-turn prompt is never counted."""
    if len(messages) <= 2:
        return messages, 0
    count = chat_token_counter(tokenizer)
    return fit_chat(messages, count, budget) if count(messages) > budget else (messages, 0)


@dataclass
class HistoryCuts:
    """What cutting histories to a token budget left out, for a stage's metadata."""

    turns: int = 0  # earlier turns (messages) left out
    conversations: int = 0  # conversations that lost any

    def fit(self, tokenizer, messages: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
        fitted, cut = fit_chat_to_tokens(tokenizer, messages, budget)
        if cut:
            self.turns += cut
            self.conversations += 1
        return fitted


def from_messages(messages: Any, limits: DataSettings) -> Conversation:
    """OpenAI-style chat messages as a Conversation, or ConversationRejected naming the first problem."""
    if not isinstance(messages, list):
        raise ConversationRejected(f"field 'messages' must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ConversationRejected("field 'messages' is empty")
    if len(messages) > limits.max_turns:
        raise ConversationRejected(
            f"conversation too long: {len(messages)} messages > data.max_turns={limits.max_turns}"
        )
    left_out: Counter[str] = Counter()
    systems: list[str] = []
    turns: list[dict[str, str]] = []
    for number, message in enumerate(messages, start=1):
        role, text = _message(message, number, left_out, limits)
        if role in SYSTEM_ROLES:
            if turns:  # a chat template has one system message, before the turns
                left_out["system message after the first turn"] += 1
            elif text:
                systems.append(text)
        elif role in TURN_ROLES and text:
            if turns and turns[-1]["role"] == role:  # two turns in a row once a tool exchange is left out
                turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{text}"}
            else:
                turns.append({"role": role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        last = "no user turn with text" if not turns else "an assistant turn"
        raise ConversationRejected(f"conversation ends with {last}; the last message must be the user's")
    system = "\n\n".join(systems) or None
    conversation = Conversation(turns[-1]["content"], system, tuple(turns[:-1]), tuple(sorted(left_out.items())))
    _check_size(conversation, limits)
    return conversation


def _message(message: Any, number: int, left_out: Counter[str], limits: DataSettings) -> tuple[str, str]:
    """One message's role and text (text parts joined); what cannot be taken is counted in ``left_out``."""
    if not isinstance(message, dict):
        raise ConversationRejected(f"message {number} must be a JSON object, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or role not in SYSTEM_ROLES | TURN_ROLES | LEFT_OUT_ROLES:
        raise ConversationRejected(
            f"message {number} has unknown role {role!r}; expected one of system, developer, user, assistant, tool"
        )
    if role in LEFT_OUT_ROLES:
        left_out[f"{role} message"] += 1
        return role, ""
    parts_left_out = sum(left_out.values())
    if message.get("tool_calls") or message.get("function_call"):
        left_out["tool call"] += len(message.get("tool_calls") or [1])
    text = _content_text(message.get("content"), number, role, left_out, limits)
    only_left_out = sum(left_out.values()) > parts_left_out  # a tool call or an image and no text: not empty
    if not text.strip() and not only_left_out:
        raise ConversationRejected(f"message {number} ({role}) is empty")
    return role, text.strip()


def _content_text(content: Any, number: int, role: str, left_out: Counter[str], limits: DataSettings) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        _check_text(content, number, limits)
        return content
    if not isinstance(content, list):
        raise ConversationRejected(
            f"message {number} ({role}): content must be a string or a list of parts, got {type(content).__name__}"
        )
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PART_TYPES:
            text = part.get(kind) if kind == "refusal" else part.get("text")
            if not isinstance(text, str):
                raise ConversationRejected(f"message {number} ({role}): a {kind} part has no text")
            _check_text(text, number, limits)
            texts.append(text)
        else:
            left_out[f"{kind if isinstance(kind, str) else 'unknown'} part"[:60]] += 1
    return "\n".join(texts)


def _check_text(text: str, number: int, limits: DataSettings) -> None:
    if len(text) > limits.max_prompt_chars and len(text) > limits.max_system_chars:
        longest = max(limits.max_prompt_chars, limits.max_system_chars)
        raise ConversationRejected(f"message {number} too long: {len(text)} chars > {longest}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConversationRejected(f"message {number} is not valid Unicode: {error.reason}") from None


def _check_size(conversation: Conversation, limits: DataSettings) -> None:
    for number, turn in enumerate(conversation.history, start=1):
        if len(turn["content"]) > limits.max_prompt_chars:
            raise ConversationRejected(
                f"turn {number} ({turn['role']}) too long: {len(turn['content'])} chars > "
                f"data.max_prompt_chars={limits.max_prompt_chars}"
            )
    total = sum(len(turn["content"]) for turn in conversation.history) + len(conversation.prompt)
    if total > limits.max_conversation_chars:
        raise ConversationRejected(
            f"conversation too long: {total} chars of turns > "
            f"data.max_conversation_chars={limits.max_conversation_chars}"
        )
