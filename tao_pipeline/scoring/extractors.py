"""Answer extractors: response text -> a normalised answer that votes can be counted over.

An extractor returns None when the response holds no answer; such a response never agrees
with anything.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from tao_pipeline.settings.vocabulary import parse_extractor_spec

Extractor = Callable[[str, str], "str | None"]  # (response, prompt) -> answer

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_COPULA = re.compile(r"\s(?:is|are|was|were|equals)\s|=|:", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)\]\*\"'])[.!?](?:\s|$)|\n", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOPWORDS = frozenset(
    "a an the of in on at to for by with and or it its this that these those be is are was were "
    "called known as answer word words one few just only final number reply simply".split()
)


def normalize_number(text: str) -> str | None:
    """'1,000' / '1000.0' / '1000' -> '1000'; keeps real decimals ('2.5')."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def last_number(response: str, prompt: str = "") -> str | None:
    """The last number anywhere in the response (the usual rule for worked solutions)."""
    numbers = _NUMBER.findall(response)
    return normalize_number(numbers[-1]) if numbers else None


def first_line_number(response: str, prompt: str = "") -> str | None:
    """The last number of the first non-empty line: the answer of a direct reply like '7 + 5 = 12'."""
    return last_number(_first_line(response))


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def short_phrase(response: str, prompt: str = "", max_words: int = 3) -> str | None:
    """A short answer phrase with case, punctuation, articles and words echoed from the prompt folded away.

    'The chemical symbol for sodium is **Na**.' asked as 'What is the chemical symbol for
    sodium?' -> 'na'. Takes the first sentence, the part after its last 'is'/'='/':' and
    keeps the last ``max_words`` content words.
    """
    sentence = _first_sentence(response)
    parts = _COPULA.split(sentence)
    tail = parts[-1] if parts[-1].strip() else sentence
    echoed = set(words(prompt))
    kept = [w for w in words(tail) if w not in _STOPWORDS and w not in echoed]
    return " ".join(kept[-max_words:]) or None


def final_line(response: str, prompt: str = "") -> str | None:
    """The last non-empty line, case and punctuation folded (for 'Final answer: ...' style replies)."""
    lines = [line for line in response.splitlines() if line.strip()]
    if not lines:
        return None
    tail = lines[-1].split(":", 1)[-1] if lines[-1].lower().startswith(("final answer", "answer")) else lines[-1]
    return " ".join(words(tail)) or None


def boxed(response: str, prompt: str = "") -> str | None:
    r"""The content of the last \boxed{...} (balanced braces), numbers normalised."""
    start = response.rfind("\\boxed{")
    if start < 0:
        return None
    depth, chars = 1, []
    for char in response[start + len("\\boxed{") :]:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            content = "".join(chars).strip()
            return normalize_number(content) or " ".join(content.split()) or None
        chars.append(char)
    return None  # unbalanced: no answer


MATH_DIGITS = 6  # numbers that agree to 6 decimal places (6 significant digits below 1) are one answer
MATH_EXACT_BELOW = 10**25  # larger magnitudes are compared on 12 significant digits


def math_answer(response: str, prompt: str = "") -> str | None:
    r"""The final mathematical answer, parsed by math-verify (as TRL's and open-r1's accuracy rewards parse it), in
    one canonical form: '\frac12', '$\frac{1}{2}$', '1/2', '0.5', '$50\%$' and '\boxed{0.50}' all give '0.5'.

    Numbers are evaluated to :data:`MATH_DIGITS` decimal places (math-verify compares numbers at that precision),
    'x = 3' is its right-hand side, other expressions (sets, intervals, symbols) keep SymPy's canonical printing.
    None when it finds no mathematical answer (or only an undefined one, like 0/0).
    """
    from math_verify import parse

    # math-verify's own time limit is an alarm signal, which only the main thread may set.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = parse(response, fallback_mode="no_fallback", parsing_timeout=limit)
    text = response.strip()
    if not parsed and "\\" in text and "\n" not in text:  # bare LaTeX without $...$, e.g. a label '\frac12'
        parsed = parse(f"${text}$", fallback_mode="no_fallback", parsing_timeout=limit)
    return _canonical_math(parsed[0]) if parsed else None


def _canonical_math(value) -> str | None:
    import sympy

    if isinstance(value, sympy.Eq) and isinstance(value.lhs, sympy.Symbol):
        value = value.rhs
    number = _math_number(value) if getattr(value, "is_number", False) else None
    text = number if number is not None else str(value)
    return None if text == "nan" else text


def _math_number(value) -> str | None:
    """A real number's canonical text; None for a complex or infinite one (then printed as SymPy prints it)."""
    import sympy

    try:
        approximate = _evaluated(value)
    except (TypeError, ValueError, ArithmeticError):
        return None
    if not approximate.is_Number or not approximate.is_finite:
        return None
    if abs(approximate) >= MATH_EXACT_BELOW:
        return sympy.sstr(sympy.Float(approximate, 12))  # e.g. '4.28124773176e+369693099'
    exact = Decimal(sympy.sstr(sympy.Float(approximate, 40), full_prec=True))
    places = MATH_DIGITS if abs(exact) >= 1 or not exact else MATH_DIGITS - 1 - exact.adjusted()
    return normalize_number(format(exact.quantize(Decimal(1).scaleb(-places)), "f"))


def _evaluated(value):
    r"""A floating-point value of a parsed expression, leaves first: math-verify leaves some products unevaluated
    ('$50\%$' is 50*(1/100)), and evaluating exactly could take forever ('9^{9^{9}}')."""
    import sympy

    if isinstance(value, sympy.UnevaluatedExpr):
        return _evaluated(value.args[0])
    if not value.args:
        return value.evalf(40)
    return value.func(*(_evaluated(argument) for argument in value.args)).evalf(40)


def regex_extractor(pattern: str) -> Extractor:
    """First match of ``pattern``: its 'answer' group, else group 1, else the whole match."""
    compiled = re.compile(pattern, re.IGNORECASE | re.DOTALL)

    def extract(response: str, prompt: str = "") -> str | None:
        match = compiled.search(response)
        if match is None:
            return None
        groups = match.groupdict()
        value = groups.get("answer") if "answer" in groups else (match.group(1) if compiled.groups else match.group(0))
        return " ".join(str(value).lower().split()) if value is not None else None

    return extract


def json_field_extractor(field: str) -> Extractor:
    """A field of the first JSON object in the response (dotted path), as canonical JSON text."""

    def extract(response: str, prompt: str = "") -> str | None:
        value = first_json_value(response)
        for key in field.split("."):
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value.strip().lower()

    return extract


def first_json_value(text: str):
    """The first JSON object or array in the text (code fences allowed), or None."""
    decoder = json.JSONDecoder()
    for index, char in enumerate(text):
        if char in "{[":
            try:
                return decoder.raw_decode(text[index:])[0]
            except json.JSONDecodeError:
                continue
    return None


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def _first_sentence(text: str) -> str:
    line = _first_line(text)
    return _SENTENCE_END.split(line, maxsplit=1)[0]


EXTRACTORS: dict[str, Extractor] = {
    "last_number": last_number,
    "first_line_number": first_line_number,
    "short_phrase": short_phrase,
    "final_line": final_line,
    "boxed": boxed,
    "math_verify": math_answer,
}
PARAMETERISED_EXTRACTORS: dict[str, Callable[[str], Extractor]] = {
    "regex": regex_extractor,
    "json_field": json_field_extractor,
}


def get_extractor(spec: str) -> Extractor:
    """'last_number', or a parameterised one: 'regex:<pattern>', 'json_field:<dotted.path>'."""
    name, argument = parse_extractor_spec(spec)
    return EXTRACTORS[name] if argument is None else PARAMETERISED_EXTRACTORS[name](argument)


def answer_matches(extracted: str | None, accepted: list[str], extractor: Extractor, prompt: str = "") -> bool:
    """Does an extracted answer agree with any accepted label? Labels are normalised the same way."""
    if extracted is None:
        return False
    for label in accepted:
        reference = extractor(label, prompt) or normalize_number(label) or " ".join(words(label))
        if reference and (_phrase_in(reference, extracted) or _phrase_in(extracted, reference)):
            return True
    return False


def _phrase_in(needle: str, haystack: str) -> bool:
    return f" {needle} " in f" {haystack} "
