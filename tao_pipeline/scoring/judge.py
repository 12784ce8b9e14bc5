"""LLM-as-judge scorer: a local or served model rates each response, or the whole group at once."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pandas as pd
from openai import OpenAI
from pydantic import Field

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.common.endpoints import (
    CallFailed,
    EndpointFailure,
    read_api_key,
    request_before,
    retry_before_deadline,
    token_count,
)
from tao_pipeline.common.hashing import text_digest
from tao_pipeline.common.profiling import record_usage
from tao_pipeline.data.conversation import build_chat
from tao_pipeline.generation.base import SamplingParams
from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.scoring.base import (
    BatchSize,
    Failed,
    PromptContext,
    Score,
    TimeoutSeconds,
    TokenCount,
    scorer_options,
)

OPTION = "scoring.options.llm_judge"
BACKENDS = ("transformers", "openai")
MODES = ("pointwise", "group")
LOWEST, HIGHEST = 1, 10
DEFAULT_RUBRIC = (
    "Judge how well the response answers the user's prompt. Correctness matters most, then following "
    "every instruction in the prompt (format, length, constraints), then clarity. Do not reward length, "
    "confidence or politeness for their own sake."
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeCall:
    """One request to the judge: a system message (rubric and answer format) and a user message."""

    system: str
    user: str

    def messages(self) -> list[dict[str, str]]:
        return build_chat(self.user, self.system)


class LLMJudgeScorer:
    """Asks a judge model to rate responses against a rubric; scores map 1..10 onto [0, 1].

    Needs a judge: ``backend="transformers"`` with ``model`` a local model directory (greedy
    generation with the project's generator), or ``backend="openai"`` with ``base_url`` of an
    OpenAI-compatible server (e.g. vLLM; POST {base_url}/chat/completions) and ``model`` the
    served model's name. ``api_key_env`` names an environment variable holding the server's key;
    the key itself is never an option. What is recorded of a judge is its verdict (scores, or why there
    is none, from a fixed set) and, for a failed call, the classified failure: never text the server sent.

    Only a verdict in the required format counts; any other answer is unknown (Failed), never a
    score. ``mode="pointwise"``: one call per response, and the answer's last non-blank line is
    exactly ``Score: N`` (N an integer 1..10), the only line that gives a score. ``mode="group"``:
    one call shows all candidates, numbered, and the answer is the JSON object
    ``{"scores": [...]}`` and nothing else (one ```json fence around it is allowed), with one
    integer 1..10 per candidate; any other answer leaves the whole group unknown.

    Options: backend, model, mode, rubric, max_new_tokens (256), cache_dir (None disables the
    on-disk cache of judge verdicts; the registry defaults it to <home>/cache/judge), base_url,
    api_key_env, timeout_s (60, a total deadline per judge call, retries included), max_retries (2),
    max_concurrency (8 parallel requests),
    batch_size (8), dtype ("auto"), max_prompt_tokens (4096; longer judge prompts fail rather than
    being cut), trust_remote_code (False); the last four apply to the transformers backend.
    """

    name = "llm_judge"

    @scorer_options
    def __init__(
        self,
        *,
        backend: str = "transformers",
        model: str | None = None,
        mode: str = "pointwise",
        rubric: Annotated[str, Field(min_length=1)] = DEFAULT_RUBRIC,
        max_new_tokens: TokenCount = 256,
        cache_dir: str | Path | None = None,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout_s: TimeoutSeconds = 60.0,
        max_retries: Annotated[int, Field(ge=0, le=20)] = 2,
        max_concurrency: Annotated[int, Field(ge=1, le=256)] = 8,
        batch_size: BatchSize = 8,
        dtype: str = "auto",
        max_prompt_tokens: TokenCount = 4096,
        trust_remote_code: bool = False,
    ):
        _check_choice("backend", backend, BACKENDS)
        _check_choice("mode", mode, MODES)
        if not model:
            raise ValueError(f"{OPTION}.model is required (a local model directory, or the served model's name)")
        self.mode = mode
        self.rubric = rubric
        self.max_new_tokens = max_new_tokens
        self.cache = JudgeCache(Path(cache_dir)) if cache_dir else None
        if backend == "openai":
            self.backend = OpenAIBackend(
                base_url,
                model,
                api_key_env,
                max_new_tokens=max_new_tokens,
                timeout_s=timeout_s,
                max_retries=max_retries,
                max_concurrency=max_concurrency,
            )
        else:
            self.backend = TransformersBackend(
                _existing_model_dir(model),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                dtype=dtype,
                max_prompt_tokens=max_prompt_tokens,
                trust_remote_code=trust_remote_code,
            )

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        if not responses:
            return []
        if self.mode == "group":
            count = len(responses)
            [verdict] = self._verdicts([group_call(context, responses, self.rubric)], lambda o: parse_group(o, count))
            return [verdict] * count if isinstance(verdict, Failed) else verdict
        calls = [pointwise_call(context, response, self.rubric) for response in responses]
        verdicts = self._verdicts(calls, lambda output: [parse_pointwise(output)])
        return [verdict if isinstance(verdict, Failed) else verdict[0] for verdict in verdicts]

    def _verdicts(self, calls: list[JudgeCall], parse) -> list[list[Score] | Failed]:
        """Per call, the parsed verdict (from the cache when there, else asked, parsed and cached) or, when
        the call itself failed, its classified failure (not cached: the judge may be back next time)."""
        keys = [self._cache_key(call) for call in calls]
        verdicts: list[list[Score] | Failed | None] = [self.cache.get(key) if self.cache else None for key in keys]
        missing = [i for i, verdict in enumerate(verdicts) if verdict is None]
        for i, output in zip(missing, self.backend.complete_all([calls[i] for i in missing])):
            if isinstance(output, Failed):
                verdicts[i] = output
                continue
            verdicts[i] = parse(output)
            if self.cache:
                self.cache.put(keys[i], verdicts[i])
        return verdicts

    def _cache_key(self, call: JudgeCall) -> str:
        # The messages hold the rubric, prompt, system and response(s): everything the output depends on.
        identity = {
            "backend": self.backend.name,
            "model": self.backend.model,
            "mode": self.mode,
            "max_new_tokens": self.max_new_tokens,
            "system": call.system,
            "user": call.user,
        }
        return text_digest(json.dumps(identity, sort_keys=True))


# -- prompts and parsing ------------------------------------------------------------------


def _context_block(context: PromptContext) -> str:
    parts = []
    if isinstance(context.system, str) and context.system:
        parts.append(f"[System message the assistant was given]\n{context.system}")
    if context.history:
        turns = "\n\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in context.history)
        parts.append(f"[Earlier turns of the conversation]\n{turns}")
    parts.append(f"[User prompt]\n{context.prompt}")
    if context.constraints:
        parts.append(f"[Constraints declared for this prompt]\n{json.dumps(context.constraints, sort_keys=True)}")
    return "\n\n".join(parts)


def pointwise_call(context: PromptContext, response: str, rubric: str) -> JudgeCall:
    system = (
        "You are an impartial judge of an AI assistant's response.\n\n"
        f"Rubric: {rubric}\n\n"
        "Write a one-sentence justification. Then end your answer with one line of exactly this form, "
        f"and nothing after it:\nScore: N\nwhere N is an integer from {LOWEST} (worst) to {HIGHEST} (best). "
        "Write 'Score:' only on that last line. An answer in any other form is discarded."
    )
    return JudgeCall(system, f"{_context_block(context)}\n\n[Assistant response]\n{response}")


def group_call(context: PromptContext, responses: list[str], rubric: str) -> JudgeCall:
    count = len(responses)
    system = (
        f"You are an impartial judge. You will see {count} candidate responses to the same prompt, "
        f"numbered 1 to {count}.\n\n"
        f"Rubric: {rubric}\n\n"
        f"Rate every candidate on the rubric with an integer from {LOWEST} (worst) to {HIGHEST} (best), "
        "comparing them where it helps. Answer with this JSON object and nothing else, one integer per "
        "candidate in order:\n"
        '{"scores": [' + ", ".join(f"<score {i}>" for i in range(1, count + 1)) + "]}\n"
        "An answer in any other form is discarded."
    )
    candidates = "\n\n".join(f"[Candidate {i}]\n{response}" for i, response in enumerate(responses, start=1))
    return JudgeCall(system, f"{_context_block(context)}\n\n{candidates}")


# Why an answer gives no verdict: a fixed set, so nothing the judge wrote is ever recorded.
NO_SCORE_LINE = f"llm_judge: no verdict: the answer does not end with a line 'Score: N', N from {LOWEST} to {HIGHEST}"
SEVERAL_SCORES = "llm_judge: no verdict: the answer states a score more than once"
NOT_SCORES_JSON = 'llm_judge: no verdict: the answer is not the JSON object {"scores": [...]} alone'
NOT_INTEGER_SCORES = f"llm_judge: no verdict: a score is not an integer from {LOWEST} to {HIGHEST}"

# ASCII: with Unicode case folding, "\u017fcore" (a long s) would be "score".
VERDICT_LINE = re.compile(r"Score:[ \t]*(10|[1-9])", re.IGNORECASE | re.ASCII)  # the whole last line, nothing else
# A line that states a score in any decoration ("**Score:** 7", "score = 3", "Score 8 of 10", "final score: 2").
SCORE_MENTION = re.compile(r"^[\W_]*score\b|\bscore[\W_]*[:=]", re.IGNORECASE | re.ASCII)
JSON_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*)\n[ \t]*```", re.IGNORECASE | re.DOTALL)


def parse_pointwise(output: str) -> Score:
    """The score of the answer's last non-blank line, exactly 'Score: N' (N an integer 1..10), mapped to [0, 1].

    Anything else is no verdict (Failed): no such line, a score in prose, markdown or another
    form ("Score: 7/10", "7.5", "-3", "11"), or a score stated on another line as well.
    """
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    verdict = VERDICT_LINE.fullmatch(lines[-1]) if lines else None
    if verdict is None:
        return Failed(NO_SCORE_LINE)
    if any(SCORE_MENTION.search(line) for line in lines[:-1]):
        return Failed(SEVERAL_SCORES)
    return _unit(int(verdict.group(1)))


def parse_group(output: str, count: int) -> list[Score]:
    """One score per candidate from an answer that is exactly {"scores": [...]} (in one ```json fence at
    most), ``count`` integers 1..10; anything else is no verdict for the whole group."""
    text = output.strip()
    fenced = JSON_FENCE.fullmatch(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # not JSON, a repeated key, nesting deeper than the parser goes
        return [Failed(NOT_SCORES_JSON)] * count
    if not isinstance(value, dict) or list(value) != ["scores"] or not isinstance(value["scores"], list):
        return [Failed(NOT_SCORES_JSON)] * count
    scores = value["scores"]
    if len(scores) != count:
        return [Failed(f"llm_judge: no verdict: {len(scores)} scores for {count} responses")] * count
    if not all(type(score) is int and LOWEST <= score <= HIGHEST for score in scores):  # not bool, not 7.0
        return [Failed(NOT_INTEGER_SCORES)] * count
    return [_unit(score) for score in scores]


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key is repeated")  # {"scores": [1], "scores": [9]}: which one?
    return dict(pairs)


def _unit(score: int) -> float:
    return (score - LOWEST) / (HIGHEST - LOWEST)


# -- cache ----------------------------------------------------------------------------------


class JudgeCache:
    """Judge verdicts on disk, one JSON file per content hash; written atomically (temp file + rename).

    A verdict is a list with, per response, its score in [0, 1] or why there is none (a fixed text):
    the judge's own words are never stored.
    """

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[Score] | None:
        try:
            verdict = json.loads(self.path(key).read_text(encoding="utf-8"))["verdict"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, unreadable, or an entry of an older format: ask again
        if not isinstance(verdict, list) or not verdict or not all(map(_cacheable, verdict)):
            return None
        return [Failed(item) if isinstance(item, str) else float(item) for item in verdict]

    def put(self, key: str, verdict: list[Score]) -> None:
        path = self.path(key)
        entries = [item.reason if isinstance(item, Failed) else item for item in verdict]
        try:
            with atomic_path(path) as staging:
                staging.write_text(json.dumps({"verdict": entries}), encoding="utf-8")
        except OSError as error:  # a cache that cannot be written costs a repeat call, not the score
            logger.warning("llm_judge: cannot write cache entry %s: %s", path, error)


def _cacheable(item) -> bool:
    if isinstance(item, str):
        return True
    return isinstance(item, (int, float)) and not isinstance(item, bool) and 0.0 <= item <= 1.0


# -- backends -------------------------------------------------------------------------------


class OpenAIBackend:
    """Chat completions from an OpenAI-compatible server through the official ``openai`` client, greedy.

    ``timeout_s`` is a total deadline for a judge call: the first attempt and every retry (after
    408/409/429/5xx, a timeout or a dropped connection) share it, and a server that trickles its
    answer byte by byte is abandoned at the deadline, not kept waiting per byte.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None,
        model: str,
        api_key_env: str | None,
        *,
        max_new_tokens: int,
        timeout_s: float,
        max_retries: int,
        max_concurrency: int,
    ):
        if not base_url:
            raise ValueError(f"{OPTION}.base_url is required for backend 'openai'")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_concurrency = max(1, max_concurrency)
        self._api_key = read_api_key(api_key_env, f"{OPTION}.api_key_env")  # an ApiKey: repr and str never show it

    def __repr__(self) -> str:
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

    def complete_all(self, calls: list[JudgeCall]) -> list[str | Failed]:
        if len(calls) <= 1:
            return [self._complete_or_fail(call) for call in calls]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(calls))) as pool:
            # Each call runs in a copy of this context, so the stage's meter (if any) counts it.
            futures = [pool.submit(contextvars.copy_context().run, self._complete_or_fail, call) for call in calls]
            return [future.result() for future in futures]

    def _complete_or_fail(self, call: JudgeCall) -> str | Failed:
        try:
            return retry_before_deadline(
                lambda deadline: self._request(call, deadline), timeout_s=self.timeout_s, max_retries=self.max_retries
            )
        except CallFailed as failed:  # classified: a kind, a status and a fixed message
            return Failed(f"llm_judge: {failed.failure}")

    def _request(self, call: JudgeCall, deadline: float) -> str:
        """One attempt, abandoned (its client closed) at the deadline if the server is too slow."""
        client = OpenAI(
            base_url=self.base_url, api_key=self._api_key.reveal() if self._api_key else "none",
            max_retries=0, timeout=max(deadline - time.monotonic(), 0.001),
        )  # fmt: skip
        request = lambda: client.chat.completions.create(  # noqa: E731
            model=self.model, messages=call.messages(), max_tokens=self.max_new_tokens, temperature=0.0
        )
        try:
            completion = request_before(deadline, self.timeout_s, request, client.close)
        finally:
            client.close()
        content = _message_content(completion)
        usage = getattr(completion, "usage", None)  # a server may leave it out: the call still counts
        record_usage(
            judge_calls=1,
            judge_prompt_tokens=token_count(getattr(usage, "prompt_tokens", None)),
            judge_completion_tokens=token_count(getattr(usage, "completion_tokens", None)),
        )
        return content


def _message_content(completion) -> str:
    """The answer's text; a body the client accepted but that is no chat completion is an invalid answer."""
    try:
        content = completion.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        content = None
    if not isinstance(content, str):
        raise CallFailed(EndpointFailure("invalid"))
    return content


class TransformersBackend:
    """Greedy generation with a local model through the project's TransformersGenerator, loaded on first use."""

    name = "transformers"

    def __init__(
        self,
        model_path: Path,
        *,
        max_new_tokens: int,
        batch_size: int,
        dtype: str,
        max_prompt_tokens: int,
        trust_remote_code: bool,
    ):
        self.model = str(model_path)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.max_prompt_tokens = max_prompt_tokens
        self.trust_remote_code = trust_remote_code
        self._generator = None

    def complete_all(self, calls: list[JudgeCall]) -> list[str | Failed]:
        if not calls:
            return []
        generator = self._load()
        results: list[str | Failed | None] = [self._too_long(generator, call) for call in calls]
        fitting = [i for i, result in enumerate(results) if result is None]
        for i, output in zip(fitting, self._generate(generator, [calls[i] for i in fitting])):
            results[i] = output
        return results

    def _load(self):
        if self._generator is None:
            from tao_pipeline.generation.transformers_backend import TransformersGenerator

            self._generator = TransformersGenerator(
                self.model,
                "llm-judge",
                dtype=self.dtype,
                batch_size=self.batch_size,
                max_prompt_tokens=self.max_prompt_tokens,
                trust_remote_code=self.trust_remote_code,
            )
        return self._generator

    def _too_long(self, generator, call: JudgeCall) -> Failed | None:
        # The generator cuts long prompts at the end, which would drop the answer format: fail instead.
        length = len(
            generator.tokenizer.apply_chat_template(
                call.messages(), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        if length <= self.max_prompt_tokens:
            return None
        return Failed(f"llm_judge: judge prompt has {length} tokens > max_prompt_tokens={self.max_prompt_tokens}")

    def _generate(self, generator, calls: list[JudgeCall]) -> list[str | Failed]:
        if not calls:
            return []
        ids = [f"{i:08d}" for i in range(len(calls))]
        prompts = pd.DataFrame(
            {"prompt_id": ids, "prompt": [c.user for c in calls], "system": [c.system for c in calls]}
        )
        params = SamplingParams(num_samples=1, max_new_tokens=self.max_new_tokens, greedy=True)
        try:
            frame = generator.generate(prompts, params, progress=False)
        except Exception as error:  # noqa: BLE001 - a failed batch fails its responses, not the round
            return [Failed(f"llm_judge: generation failed: {type(error).__name__}: {error}"[:300])] * len(calls)
        record_usage(
            judge_calls=len(calls),
            judge_prompt_tokens=int(frame["prompt_tokens"].sum()),
            judge_completion_tokens=int(frame["completion_tokens"].sum()),
        )
        outputs = dict(zip(frame["prompt_id"], frame["response"]))
        return [outputs[i] for i in ids]


def _existing_model_dir(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"{OPTION}.model: judge model directory {str(path)!r} does not exist")
    return path


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{OPTION}.{option}: expected one of {list(choices)}, got {value!r}")
