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

import openai
import pandas as pd
from openai import OpenAI

from tao_pipeline.common.atomic import atomic_path
from tao_pipeline.common.endpoints import (
    RETRYABLE_STATUS,
    DeadlinePassed,
    call_before,
    read_api_key,
    retry_before_deadline,
)
from tao_pipeline.common.hashing import text_digest
from tao_pipeline.common.profiling import record_usage
from tao_pipeline.data.prompts import build_chat
from tao_pipeline.generation.base import SamplingParams
from tao_pipeline.registry.errors import ModelNotFoundError
from tao_pipeline.scoring.base import Failed, PromptContext, Score

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


class JudgeError(Exception):
    """One judge call failed; the message is safe to record (it never holds the API key)."""


class RetryableJudgeError(JudgeError):
    """A failure worth another attempt: timeout, connection error, 429, 5xx."""


class LLMJudgeScorer:
    """Asks a judge model to rate responses against a rubric; scores map 1..10 onto [0, 1].

    Needs a judge: ``backend="transformers"`` with ``model`` a local model directory (greedy
    generation with the project's generator), or ``backend="openai"`` with ``base_url`` of an
    OpenAI-compatible server (e.g. vLLM; POST {base_url}/chat/completions) and ``model`` the
    served model's name. ``api_key_env`` names an environment variable holding the server's key;
    the key itself is never an option, and is kept out of logs, Failed reasons and the cache.

    ``mode="pointwise"``: one call per response, the judge ends with "Score: N" (the last integer
    in 1..10 is taken). ``mode="group"``: one call shows all candidates, numbered, and the judge
    answers {"scores": [...]}; a missing, unparsable or wrong-length answer fails the whole group.

    Options: backend, model, mode, rubric, max_new_tokens (256), cache_dir (None disables the
    on-disk cache of judge outputs; the registry defaults it to <home>/cache/judge), base_url,
    api_key_env, timeout_s (60, a total deadline per judge call, retries included), max_retries (2),
    max_concurrency (8 parallel requests),
    batch_size (8), dtype ("auto"), max_prompt_tokens (4096; longer judge prompts fail rather than
    being cut), trust_remote_code (False); the last four apply to the transformers backend.
    """

    name = "llm_judge"

    def __init__(
        self,
        *,
        backend: str = "transformers",
        model: str | None = None,
        mode: str = "pointwise",
        rubric: str = DEFAULT_RUBRIC,
        max_new_tokens: int = 256,
        cache_dir: str | Path | None = None,
        base_url: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        max_concurrency: int = 8,
        batch_size: int = 8,
        dtype: str = "auto",
        max_prompt_tokens: int = 4096,
        trust_remote_code: bool = False,
    ):
        _check_choice("backend", backend, BACKENDS)
        _check_choice("mode", mode, MODES)
        if not model:
            raise ValueError(f"{OPTION}.model is required (a local model directory, or the served model's name)")
        if max_new_tokens < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"{OPTION}: max_new_tokens must be >= 1, max_retries >= 0 and timeout_s > 0")
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
            output = self._judge([group_call(context, responses, self.rubric)])[0]
            return [output] * len(responses) if isinstance(output, Failed) else parse_group(output, len(responses))
        outputs = self._judge([pointwise_call(context, response, self.rubric) for response in responses])
        return [output if isinstance(output, Failed) else parse_pointwise(output) for output in outputs]

    def _judge(self, calls: list[JudgeCall]) -> list[str | Failed]:
        """The judge's raw output per call: from the cache when there, else from the backend (then cached)."""
        keys = [self._cache_key(call) for call in calls]
        outputs: list[str | Failed | None] = [self.cache.get(key) if self.cache else None for key in keys]
        missing = [i for i, output in enumerate(outputs) if output is None]
        for i, output in zip(missing, self.backend.complete_all([calls[i] for i in missing])):
            if self.cache and isinstance(output, str):
                self.cache.put(keys[i], output)
            outputs[i] = output
        return outputs

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
    parts.append(f"[User prompt]\n{context.prompt}")
    if context.constraints:
        parts.append(f"[Constraints declared for this prompt]\n{json.dumps(context.constraints, sort_keys=True)}")
    return "\n\n".join(parts)


def pointwise_call(context: PromptContext, response: str, rubric: str) -> JudgeCall:
    system = (
        "You are an impartial judge of an AI assistant's response.\n\n"
        f"Rubric: {rubric}\n\n"
        f"Give a one-sentence justification, then a final line 'Score: N', where N is an integer from "
        f"{LOWEST} (worst) to {HIGHEST} (best)."
    )
    return JudgeCall(system, f"{_context_block(context)}\n\n[Assistant response]\n{response}")


def group_call(context: PromptContext, responses: list[str], rubric: str) -> JudgeCall:
    count = len(responses)
    system = (
        f"You are an impartial judge. You will see {count} candidate responses to the same prompt, "
        f"numbered 1 to {count}.\n\n"
        f"Rubric: {rubric}\n\n"
        f"Rate every candidate on the rubric with an integer from {LOWEST} (worst) to {HIGHEST} (best), "
        "comparing them where it helps. Answer with JSON only, one score per candidate in order: "
        '{"scores": [' + ", ".join(f"<score {i}>" for i in range(1, count + 1)) + "]}"
    )
    candidates = "\n\n".join(f"[Candidate {i}]\n{response}" for i, response in enumerate(responses, start=1))
    return JudgeCall(system, f"{_context_block(context)}\n\n{candidates}")


DENOMINATOR = re.compile(r"\s*(?:/|out\s+of)\s*\d+", re.IGNORECASE)  # "8/10", "7 out of 10"
WHOLE_INTEGER = re.compile(r"(?<![\d.])\d+(?!\d|\.\d)")  # not part of a decimal such as 7.5


def parse_pointwise(output: str) -> Score:
    """The last integer in 1..10 of the judge's output, mapped to [0, 1]; Failed when there is none."""
    numbers = [int(n) for n in WHOLE_INTEGER.findall(DENOMINATOR.sub(" ", output))]
    in_range = [n for n in numbers if LOWEST <= n <= HIGHEST]
    if not in_range:
        return Failed(f"llm_judge: unparsable judge output (no score {LOWEST}-{HIGHEST}): {output[:80]!r}")
    return _unit(in_range[-1])


def parse_group(output: str, count: int) -> list[Score]:
    """One score per candidate from {"scores": [...]} (a bare list is accepted); else Failed for all."""
    scores = _find_score_list(output)
    if scores is None:
        return [Failed(f"llm_judge: unparsable judge output (no scores JSON): {output[:80]!r}")] * count
    if len(scores) != count:
        return [Failed(f"llm_judge: judge gave {len(scores)} scores for {count} responses")] * count
    numbers = [_number(s) for s in scores]
    if any(n is None or not LOWEST <= n <= HIGHEST for n in numbers):
        return [Failed(f"llm_judge: judge scores outside {LOWEST}-{HIGHEST}: {str(scores)[:80]}")] * count
    return [_unit(n) for n in numbers]


def _find_score_list(output: str) -> list | None:
    """The last {"scores": [...]} object in the text (fences and prose around it are fine), else the last list."""
    decoder = json.JSONDecoder()
    found_object, found_list = None, None
    for match in re.finditer(r"[{\[]", output):
        try:
            value, _ = decoder.raw_decode(output, match.start())
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("scores"), list):
            found_object = value["scores"]
        elif isinstance(value, list):
            found_list = value
    return found_object if found_object is not None else found_list


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _unit(score: float) -> float:
    return (score - LOWEST) / (HIGHEST - LOWEST)


# -- cache ----------------------------------------------------------------------------------


class JudgeCache:
    """Judge outputs on disk, one JSON file per content hash; written atomically (temp file + rename)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            output = json.loads(self.path(key).read_text(encoding="utf-8"))["output"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return output if isinstance(output, str) else None

    def put(self, key: str, output: str) -> None:
        path = self.path(key)
        try:
            with atomic_path(path) as staging:
                staging.write_text(json.dumps({"output": output}), encoding="utf-8")
        except OSError as error:  # a cache that cannot be written costs a repeat call, not the score
            logger.warning("llm_judge: cannot write cache entry %s: %s", path, error)


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
            return self._redact(self._complete(call))
        except JudgeError as error:  # its message was redacted before anything cut it short
            return Failed(f"llm_judge: {self._redact(str(error))}"[:300])

    def _complete(self, call: JudgeCall) -> str:
        return retry_before_deadline(
            lambda deadline: self._request(call, deadline),
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            retryable=RetryableJudgeError,
        )

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
            completion = call_before(deadline, request, client.close)
        except DeadlinePassed:
            raise RetryableJudgeError(f"timeout: no complete answer within {self.timeout_s}s from {self.url}") from None
        except Exception as error:  # noqa: BLE001 - classified into retryable or not
            raise self._judge_error(error) from None
        finally:
            client.close()
        content = self._message_content(completion)
        usage = getattr(completion, "usage", None)  # a server may leave it out: the call still counts
        record_usage(
            judge_calls=1,
            judge_prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
            judge_completion_tokens=getattr(usage, "completion_tokens", None) or 0,
        )
        return content

    def _judge_error(self, error: Exception) -> JudgeError:
        if isinstance(error, openai.APITimeoutError):
            return RetryableJudgeError(f"timeout after {self.timeout_s}s waiting for {self.url}")
        if isinstance(error, openai.APIStatusError):
            # Servers echo the Authorization header back in error bodies: redact, then cut short, so the
            # cut can never leave a piece of the key behind.
            kind = RetryableJudgeError if error.status_code in RETRYABLE_STATUS else JudgeError
            return kind(f"HTTP {error.status_code} from {self.url}: {self._excerpt(_body_text(error))}")
        if isinstance(error, openai.APIConnectionError):
            return RetryableJudgeError(f"request to {self.url} failed: {type(error).__name__}")
        body = error.doc if isinstance(error, json.JSONDecodeError) else str(error)  # a 200 that is not JSON
        return JudgeError(f"not an OpenAI chat completion: {self._excerpt(body)}")

    def _message_content(self, completion) -> str:
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise JudgeError(f"not an OpenAI chat completion: {self._excerpt(str(completion))}") from None
        if not isinstance(content, str):
            raise JudgeError(f"not an OpenAI chat completion: content is {type(content).__name__}")
        return content

    def _excerpt(self, text: str) -> str:
        return repr(self._redact(text)[:120])

    def _redact(self, text: str) -> str:
        return self._api_key.redact(text) if self._api_key else text


def _body_text(error: openai.APIStatusError) -> str:
    try:
        return error.response.text
    except Exception:  # noqa: BLE001 - a body that cannot be read: the client's own message
        return str(error.message)


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
