"""Instruction following: IFEval-style checks declared per prompt or per task, scored without labels."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tao_pipeline.scoring.base import Failed, PromptContext, Score, score_each, scorer_options
from tao_pipeline.scoring.verifiers import count_words

Check = Callable[[str], bool]

_BULLET_LINE = re.compile(r"^[ \t]*(?:[-*•]|\d+[.)])[ \t]+\S", re.MULTILINE)
_SENTENCE_BREAK = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)|\n")
# Abbreviations whose dot must not end a sentence.
_ABBREVIATION = re.compile(r"\b(?:e\.g|i\.e|etc|vs|mr|mrs|ms|dr|prof|st)\.", re.IGNORECASE)
_TITLE_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_CASES = ("lower", "upper", "title")
_MIN_MAX_PAIRS = (("min_words", "max_words"), ("min_bullets", "max_bullets"), ("min_sentences", "max_sentences"))


def count_bullets(text: str) -> int:
    """Lines that start (after indentation) with '-', '*', '•', '1.' or '1)' and a space; nested ones count."""
    return len(_BULLET_LINE.findall(text))


def count_sentences(text: str) -> int:
    """Pieces of text ended by . ! ? (not in e.g./Dr./3.14) or by a line break; a bullet line is one."""
    masked = _ABBREVIATION.sub(lambda match: match.group(0)[:-1], text)
    return sum(1 for piece in _SENTENCE_BREAK.split(masked) if re.search(r"\w", piece))


def _is_title_case(text: str) -> bool:
    return all(word[0].isupper() for word in _TITLE_WORD.findall(text))


def _flat(text: str) -> str:
    return " ".join(text.split()).lower()


def _phrase_finder(phrase: str) -> re.Pattern:
    """Case-insensitive whole-word match of a word or phrase, any whitespace between its words."""
    body = r"\s+".join(re.escape(part) for part in phrase.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


# -- value checking: each raises ValueError naming the key --------------------------------


def _count_value(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _phrases_value(key: str, value: Any) -> list[str]:
    phrases = [value] if isinstance(value, str) else value
    if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
        raise ValueError(f"{key} must be a list of non-empty strings, got {value!r}")
    return phrases


def _text_value(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    return value


# -- check builders: (key, declared value) -> a predicate on the response, or None for no check


def _minimum(measure: Callable[[str], int]):
    def build(key: str, value: Any) -> Check:
        limit = _count_value(key, value)
        return lambda response: measure(response) >= limit

    return build


def _maximum(measure: Callable[[str], int]):
    def build(key: str, value: Any) -> Check:
        limit = _count_value(key, value)
        return lambda response: measure(response) <= limit

    return build


def _exactly(measure: Callable[[str], int]):
    def build(key: str, value: Any) -> Check:
        count = _count_value(key, value)
        return lambda response: measure(response) == count

    return build


def _required_keywords(key: str, value: Any) -> Check | None:
    finders = [_phrase_finder(phrase) for phrase in _phrases_value(key, value)]
    return (lambda response: all(f.search(response) for f in finders)) if finders else None


def _forbidden_words(key: str, value: Any) -> Check | None:
    finders = [_phrase_finder(phrase) for phrase in _phrases_value(key, value)]
    return (lambda response: not any(f.search(response) for f in finders)) if finders else None


def _case(key: str, value: Any) -> Check:
    if value not in _CASES:
        raise ValueError(f"{key} must be one of {list(_CASES)}, got {value!r}")
    return {
        "lower": lambda response: response == response.lower(),
        "upper": lambda response: response == response.upper(),
        "title": _is_title_case,
    }[value]


def _starts_with(key: str, value: Any) -> Check:
    start = _flat(_text_value(key, value))
    return lambda response: _flat(response).startswith(start)


def _ends_with(key: str, value: Any) -> Check:
    end = _flat(_text_value(key, value))
    return lambda response: _flat(response).endswith(end)


def _no_commas(key: str, value: Any) -> Check | None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return (lambda response: "," not in response and "，" not in response) if value else None


_BUILDERS: dict[str, Callable[[str, Any], Check | None]] = {
    "min_words": _minimum(count_words),
    "max_words": _maximum(count_words),
    "required_keywords": _required_keywords,
    "forbidden_words": _forbidden_words,
    "min_bullets": _minimum(count_bullets),
    "max_bullets": _maximum(count_bullets),
    "bullets": _exactly(count_bullets),
    "case": _case,
    "starts_with": _starts_with,
    "ends_with": _ends_with,
    "no_commas": _no_commas,
    "min_sentences": _minimum(count_sentences),
    "max_sentences": _maximum(count_sentences),
}
SUPPORTED_KEYS = frozenset(_BUILDERS)


def compile_checks(constraints: dict[str, Any]) -> dict[str, Check]:
    """The checks the supported keys declare (a null value declares none); ValueError for a bad value."""
    declared = {key: value for key, value in constraints.items() if key in _BUILDERS and value is not None}
    for low, high in _MIN_MAX_PAIRS:
        if low in declared and high in declared:
            if _count_value(low, declared[low]) > _count_value(high, declared[high]):
                raise ValueError(f"{low} ({declared[low]}) is above {high} ({declared[high]})")
    checks = {key: _BUILDERS[key](key, value) for key, value in declared.items()}
    return {key: check for key, check in checks.items() if check is not None}


class InstructionVerifier:
    """The share of declared instructions (IFEval style) a response follows.

    Supported keys, per prompt in ``context.constraints`` or per task in the ``constraints`` option:
      min_words, max_words: word count bounds (words as in ``count_words``).
      required_keywords: words or phrases that must all appear (case-insensitive, whole words).
      forbidden_words: words or phrases none of which may appear (same matching).
      min_bullets, max_bullets, bullets (exact): lines starting with "-", "*", "•", "1." or "1)".
      case: "lower" | "upper" (the whole response) or "title" (every word starts uppercase).
      starts_with, ends_with: the stripped response starts/ends with the text (case and
        runs of whitespace ignored).
      no_commas: true forbids commas (false declares nothing).
      min_sentences, max_sentences: sentences end with . ! ? or a line break.
    Each declared key is one check, passed or failed; the score is the share passed, and
    1.0 when nothing is declared. Prompt-level keys override task-level ones; a prompt can
    drop a task-level check by declaring it null. Unknown keys are ignored (other verifiers
    read them, e.g. "regex", "json_schema"); ``unknown_keys`` lists them so callers can warn.

    Needs: nothing.
    Options:
      constraints: declarations for every task (dict); a bad value raises ValueError at
        construction, a bad per-prompt value gives Failed for that prompt's responses.
      by_task: {task: declarations}, layered between ``constraints`` and the prompt's own.
    """

    name = "instruction_following"

    @scorer_options
    def __init__(self, *, constraints: dict[str, Any] | None = None, by_task: dict[str, dict[str, Any]] | None = None):
        self.constraints = dict(constraints or {})
        self.by_task = {task: dict(declared) for task, declared in (by_task or {}).items()}
        try:
            compile_checks(self.constraints)
            for declared in self.by_task.values():
                compile_checks({**self.constraints, **declared})
        except ValueError as error:
            raise ValueError(f"instruction_following: {error}") from None

    def unknown_keys(self, constraints: dict[str, Any]) -> list[str]:
        """The keys of ``constraints`` this verifier does not check, sorted."""
        return sorted(set(constraints) - SUPPORTED_KEYS)

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        try:
            checks = compile_checks({**self.constraints, **self.by_task.get(context.task, {}), **context.constraints})
        except ValueError as error:
            return [Failed(f"instruction_following: {error}")] * len(responses)
        if not checks:
            return [1.0] * len(responses)
        return score_each(self.name, responses, lambda response: self.share_passed(checks, response))

    @staticmethod
    def share_passed(checks: dict[str, Check], response: str) -> float:
        return sum(check(response) for check in checks.values()) / len(checks)
