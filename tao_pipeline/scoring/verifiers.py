"""Format verifiers: programmatic checks that need no labels and no model."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Annotated, Any

import jsonschema
from pydantic import Field

from tao_pipeline.scoring.base import Failed, PromptContext, Score, score_each, scorer_options
from tao_pipeline.scoring.extractors import first_line_number, last_number, words

WordCount = Annotated[int, Field(ge=1, le=1_000_000)]


class ConciseFormatVerifier:
    """Rewards a one-line reply of at most ``max_words`` words; longer ones score in proportion."""

    name = "concise_format"

    @scorer_options
    def __init__(self, max_words: WordCount = 8):
        self.max_words = max_words

    def score_one(self, response: str) -> float:
        count = len(words(response))
        if count == 0:
            return 0.0
        one_line = len([line for line in response.splitlines() if line.strip()]) == 1
        return min(1.0, self.max_words / count) * (1.0 if one_line else 0.5)

    def score_group(self, context: PromptContext, responses: list[str]) -> list[float]:
        return [self.score_one(r) for r in responses]


class NumberFormatVerifier:
    """1 when the first line states a number concisely, 0.5 when a number appears later, else 0."""

    name = "number_format"

    @scorer_options
    def __init__(self, max_words: WordCount = 8):
        self.concise = ConciseFormatVerifier(max_words)

    def score_one(self, response: str) -> float:
        if first_line_number(response) is not None:
            return 0.5 + 0.5 * self.concise.score_one(response)
        return 0.5 if last_number(response) is not None else 0.0

    def score_group(self, context: PromptContext, responses: list[str]) -> list[float]:
        return [self.score_one(r) for r in responses]


# -- shared helpers ---------------------------------------------------------------------

# Unicode-aware: "don't", "well-known" and "naïve" are one word each; punctuation is not a word.
_WORD_TOKEN = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def count_words(text: str) -> int:
    return len(_WORD_TOKEN.findall(text))


def _all_failed(responses: list[str], reason: str) -> list[Score]:
    return [Failed(reason)] * len(responses)


# -- JSON -------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[\w-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)


def strip_code_fence(text: str) -> str:
    """The content of a response that is one fenced code block, else the stripped response."""
    stripped = text.strip()
    match = _FENCE.match(stripped)
    return match.group(1).strip() if match else stripped


def json_values(text: str):
    """Every top-level JSON object or array in the text, in order (code fences allowed)."""
    decoder = json.JSONDecoder()
    index = 0
    while (index := _next_bracket(text, index)) >= 0:
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            index += 1
            continue
        except RecursionError:
            return  # nesting deeper than Python's stack: no usable JSON, and retrying is slow
        yield value
        index = end


def _next_bracket(text: str, start: int) -> int:
    positions = [p for p in (text.find("{", start), text.find("[", start)) if p >= 0]
    return min(positions, default=-1)


def _schema_validator(schema: Any):
    """A jsonschema validator for the schema's own draft; ValueError for a bad schema."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ValueError(error.message) from None
    return validator_class(schema)


class JsonVerifier:
    """Checks that a response holds valid JSON that conforms to a JSON schema.

    Scores 1.0 when the response contains a JSON object or array (code fences allowed) that
    conforms to the schema (or any JSON object/array when no schema is given), 0.5 when it
    holds valid JSON but none conforms, and 0.0 when it holds no valid JSON object/array.
    Without a schema any bracketed JSON counts, even a citation like "[1]": give a schema or
    ``require_whole_response`` for a stricter check.

    Needs: nothing beyond the ``jsonschema`` package.
    Options:
      schema: a JSON schema (dict) for every prompt of the task; None checks validity only.
      require_whole_response: when True the whole stripped response, one surrounding code
        fence removed, must be the JSON value; prose around it scores 0.
    Per prompt: ``constraints["json_schema"]`` replaces ``schema``.
    """

    name = "json_valid"

    @scorer_options
    def __init__(self, *, schema: Any = None, require_whole_response: bool = False):
        try:
            self.validator = _schema_validator(schema) if schema is not None else None
        except ValueError as error:
            raise ValueError(f"json_valid: invalid schema: {error}") from None
        self.require_whole_response = require_whole_response

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        validator = self.validator
        if "json_schema" in context.constraints:
            try:
                validator = _schema_validator(context.constraints["json_schema"])
            except ValueError as error:
                return _all_failed(responses, f"json_valid: invalid json_schema: {error}")
        return score_each(self.name, responses, lambda response: self._score_one(validator, response))

    def _score_one(self, validator, response: str) -> float:
        values = self._candidates(response)
        if not values:
            return 0.0
        if validator is None or any(validator.is_valid(value) for value in values):
            return 1.0
        return 0.5

    def _candidates(self, response: str) -> list:
        if not self.require_whole_response:
            return list(json_values(response))
        try:
            value = json.loads(strip_code_fence(response))
        except json.JSONDecodeError:
            return []
        return [value] if isinstance(value, (dict, list)) else []


# -- regular expression ------------------------------------------------------------------

_REGEX_MODES = ("search", "fullmatch")


def _compile_regex(pattern: Any, mode: Any) -> Callable[[str], bool] | None:
    """A predicate for the pattern in the mode (None without a pattern); ValueError naming a bad one."""
    if mode not in _REGEX_MODES:
        raise ValueError(f"regex mode must be one of {list(_REGEX_MODES)}, got {mode!r}")
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"regex pattern must be a string, got {pattern!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"bad regular expression {pattern!r}: {error}") from None
    if mode == "search":
        return lambda response: compiled.search(response) is not None
    return lambda response: compiled.fullmatch(response.strip()) is not None


class RegexVerifier:
    """1.0 when the response matches a regular expression, else 0.0.

    Needs: a pattern, from the options or the prompt; with neither, nothing is declared
    and every response scores 1.0.
    Options:
      pattern: a Python regular expression (inline flags such as ``(?i)`` work); a bad
        pattern raises ValueError naming it.
      mode: "search" (anywhere in the response) or "fullmatch" (the whole stripped response).
    Per prompt: ``constraints["regex"]`` replaces ``pattern`` and ``constraints["regex_mode"]``
    replaces ``mode``; a bad per-prompt pattern gives Failed for that prompt's responses.
    """

    name = "regex_format"

    @scorer_options
    def __init__(self, *, pattern: str | None = None, mode: str = "search"):
        self.pattern = pattern
        self.mode = mode
        try:
            self.matches = _compile_regex(pattern, mode)
        except ValueError as error:
            raise ValueError(f"regex_format: {error}") from None

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        try:
            matches = self._matcher(context.constraints)
        except ValueError as error:
            return _all_failed(responses, f"regex_format: {error}")
        if matches is None:
            return [1.0] * len(responses)
        return score_each(self.name, responses, matches)

    def _matcher(self, constraints: dict[str, Any]) -> Callable[[str], bool] | None:
        if "regex" not in constraints and "regex_mode" not in constraints:
            return self.matches
        return _compile_regex(constraints.get("regex", self.pattern), constraints.get("regex_mode", self.mode))


# -- length -------------------------------------------------------------------------------

_LENGTH_KEYS = ("min_words", "max_words", "min_chars", "max_chars")


def _validated_limits(limits: dict[str, Any]) -> dict[str, int]:
    """The declared limits as ints; ValueError for a negative, non-integer or inverted limit."""
    checked = {}
    for key, value in limits.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        checked[key] = value
    for unit in ("words", "chars"):
        low, high = checked.get(f"min_{unit}"), checked.get(f"max_{unit}")
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_{unit} ({low}) is above max_{unit} ({high})")
    return checked


def _above_max_score(count: int, limit: int) -> float:
    if count <= limit:
        return 1.0
    return max(0.0, 1.0 - (count - limit) / limit) if limit else 0.0


def _below_min_score(count: int, limit: int) -> float:
    if count >= limit:
        return 1.0
    return max(0.0, 1.0 - 2.0 * (limit - count) / limit)


class LengthVerifier:
    """Scores how well a response keeps to word and character limits.

    Rule: 1.0 inside every limit. Outside a limit the score falls linearly and reaches 0 when
    the response is off by a factor of two: at twice a maximum (max_words=100: 150 words
    score 0.5, 200 or more score 0) and at half a minimum (min_words=100: 75 words score 0.5,
    50 or fewer score 0). A maximum of 0 allows only an empty response. With several limits
    the lowest of their scores counts. Words are runs of letters/digits ("don't" and
    "well-known" count once); characters are counted in the stripped response.

    Needs: at least one limit, from the options or the prompt; with none every response scores 1.0.
    Options: min_words, max_words, min_chars, max_chars (non-negative ints, or None for no limit).
    Per prompt: the same keys in ``context.constraints`` replace the options one by one
    (null removes a task-level limit); a bad per-prompt value gives Failed for that prompt.
    """

    name = "length_limit"

    @scorer_options
    def __init__(
        self,
        *,
        min_words: Any = None,  # checked, with the same message as a per-prompt limit, by _validated_limits
        max_words: Any = None,
        min_chars: Any = None,
        max_chars: Any = None,
    ):
        limits = {"min_words": min_words, "max_words": max_words, "min_chars": min_chars, "max_chars": max_chars}
        try:
            self.limits = _validated_limits(limits)
        except ValueError as error:
            raise ValueError(f"length_limit: {error}") from None

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        declared = {key: context.constraints[key] for key in _LENGTH_KEYS if key in context.constraints}
        try:
            limits = _validated_limits({**self.limits, **declared})
        except ValueError as error:
            return _all_failed(responses, f"length_limit: {error}")
        return score_each(self.name, responses, lambda response: self.score_one(limits, response))

    @staticmethod
    def score_one(limits: dict[str, int], response: str) -> float:
        counts = {"words": count_words(response), "chars": len(response.strip())}
        scores = [1.0]
        for key, limit in limits.items():
            bound, unit = key.split("_")
            score = _above_max_score if bound == "max" else _below_min_score
            scores.append(score(counts[unit], limit))
        return min(scores)


# -- arithmetic --------------------------------------------------------------------------

_OPERATORS = "+\\-*/x×÷−"
_NUMBER_TEXT = r"[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# A claim must start an expression: not inside a number and not after an operator or "^"
# (nor after "x" that follows a number). The text is scanned with whitespace collapsed, so
# fixed-width lookbehinds cover every spacing. The lookahead lets running chains
# ("5 + 3 = 8 + 2 = 10") yield overlapping claims.
_CLAIM = re.compile(
    r"(?<![\w.,$])(?<![+\-*/×÷−^])(?<![+\-*/×÷−^] )(?<!\dx)(?<!\d x)(?<!\dx )(?<!\d x )"
    rf"(?=(?P<claim>{_NUMBER_TEXT}(?:\s*[{_OPERATORS}]\s*{_NUMBER_TEXT})+\s*=\s*{_NUMBER_TEXT})(?![.,]?\w))",
    re.IGNORECASE,
)
_TOKEN = re.compile(rf"\$?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?|[{_OPERATORS}=]", re.IGNORECASE)


def arithmetic_claims(text: str) -> list[str]:
    """Every 'a op b [op c ...] = result' statement in the text, e.g. ['2 + 3 = 5', '12 × 4 = 48']."""
    return [match.group("claim") for match in _CLAIM.finditer(" ".join(text.split()))]


def _claim_tokens(claim: str) -> list[str]:
    """Numbers and operators, a minus where an operand is expected joined to its number: '5--3=8' -> 5 - -3 = 8."""
    tokens: list[str] = []
    sign = ""
    for token in _TOKEN.findall(claim):
        expecting_operand = not tokens or not tokens[-1][-1].isdigit()
        if expecting_operand and token in "-−":
            sign = "" if sign else "-"
        elif token[-1].isdigit():
            tokens.append(sign + token)
            sign = ""
        else:
            tokens.append(token)
    return tokens


def _to_fraction(number: str) -> Fraction:
    return Fraction(number.replace(",", "").replace("$", "").replace("−", "-"))


def _evaluate(tokens: list[str]) -> Fraction:
    """Numbers and operators with the usual precedence (* and / before + and -); exact fractions."""
    terms: list[Fraction] = [_to_fraction(tokens[0])]
    for operator, number in zip(tokens[1::2], tokens[2::2]):
        value = _to_fraction(number)
        if operator in "*x×X":
            terms[-1] *= value
        elif operator in "/÷":
            terms[-1] /= value  # ZeroDivisionError: the caller counts the claim as false
        else:
            terms.append(value if operator == "+" else -value)
    return sum(terms, Fraction(0))


class ArithmeticConsistencyVerifier:
    """The share of the arithmetic a response states ("3 × 4 = 12", "$1,200 / 4 = $300") that is true.

    Finds every statement "a op b = c" (op one of + - * x × / ÷, integers or decimals,
    thousands commas and a leading $ allowed), also inside sentences, longer chains such as
    "2 + 3 * 4 = 14" (usual precedence) and running totals ("5 + 3 = 8 + 2 = 10" is two true
    claims). Expressions with parentheses or exponents are not read. Claims without
    division must be exact; with division the result may differ by 1e-6 relative.
    Division by zero makes a claim false.

    Needs: nothing.
    Options:
      no_claims_score: the score of a response that states no equation (default 0.5).
      accept_rounded_division: also accept a division result written with d >= 1 decimals
        that equals the true value rounded to d decimals ("10 / 3 = 3.33"); default False.
    """

    name = "arithmetic_consistency"

    @scorer_options
    def __init__(self, *, no_claims_score: float = 0.5, accept_rounded_division: bool = False):
        if not 0.0 <= no_claims_score <= 1.0:
            raise ValueError(f"arithmetic_consistency: no_claims_score must be in [0, 1], got {no_claims_score}")
        self.no_claims_score = no_claims_score
        self.accept_rounded_division = accept_rounded_division

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        return score_each(self.name, responses, self.score_one)

    def score_one(self, response: str) -> float:
        claims = arithmetic_claims(response)
        if not claims:
            return self.no_claims_score
        return sum(self.is_true(claim) for claim in claims) / len(claims)

    def is_true(self, claim: str) -> bool:
        tokens = _claim_tokens(claim)
        stated_text = tokens[-1]
        try:
            actual = _evaluate(tokens[:-2])
        except ZeroDivisionError:
            return False
        stated = _to_fraction(stated_text)
        if not any(op in "/÷" for op in tokens[1:-2:2]):
            return actual == stated
        return abs(actual - stated) <= Fraction(1, 10**6) * max(abs(actual), abs(stated)) or (
            self.accept_rounded_division and _rounds_to(actual, stated_text)
        )


def _rounds_to(actual: Fraction, stated_text: str) -> bool:
    decimals = len(stated_text.partition(".")[2])
    if not decimals:
        return False
    # Within half a unit of the last written digit, either rounding direction.
    return abs(actual - _to_fraction(stated_text)) <= Fraction(1, 2 * 10**decimals)
