"""Candidates from an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, or `tao serve`).

This is how a team beyond one machine generates: ``generation.backend = "openai"`` and
``generation.endpoint.base_url`` pointing at its deployment. One request per prompt asks for
``n`` samples with the round's seed; requests run ``endpoint.concurrency`` at a time, each under a
total deadline (``endpoint.timeout_s``, retries included). The response cache in front of every
backend keeps finished shards, so a round that fails on an outage resumes where it stopped.

The server must serve exactly the model the round starts from: its ``/v1/models`` must list the
version's served name (``endpoint.model_names`` maps a version id to it; by default the id itself),
or the backend refuses to start; versions are never mixed. With ``endpoint.load_lora_adapters``
a LoRA challenger is loaded on a vLLM server at run time, but only if the server's base model is
the adapter's own base model.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from openai import OpenAI
from tqdm.auto import tqdm

from tao_pipeline.common.endpoints import (
    CallFailed,
    EndpointFailure,
    RetryableCallFailed,
    classify,
    read_api_key,
    request_before,
    retry_before_deadline,
    token_count,
)
from tao_pipeline.data.conversation import row_chat
from tao_pipeline.generation.base import RESPONSE_COLUMNS, GenerationStats, SamplingParams, account, response_row
from tao_pipeline.generation.base import sampling_json as sampling_text
from tao_pipeline.registry.loading import load_tokenizer

SETTING = "generation.endpoint"
logger = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """The server cannot generate for this round (wrong model, down past every retry): one clear line.

    Its message holds a classified failure (kind, status, a fixed message), never text the server
    sent: it ends up in the Dagster event log and on the terminal.
    """


class OpenAIGenerator:
    def __init__(
        self,
        model_path: Path | str,
        model_version: str,
        *,
        base_url: str,
        api_key_env: str | None = None,
        served_name: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        max_retries: int = 2,
        load_lora_adapters: bool = False,
    ):
        self.model_version = model_version
        self.base_url = base_url.rstrip("/")
        self.served_name = served_name or model_version
        self.concurrency, self.timeout_s, self.max_retries = max(1, concurrency), timeout_s, max_retries
        self._api_key = read_api_key(api_key_env, f"{SETTING}.api_key_env")
        self.stats = GenerationStats()
        self._tokenizer = _tokenizer_or_none(model_path)
        served = self._served_models()
        if self.served_name not in served and load_lora_adapters:
            self._load_adapter(Path(str(model_path)), served)
            served = self._served_models()
        if self.served_name not in served:
            raise EndpointError(
                f"{self.base_url} serves {sorted(served)}, not {self.served_name!r} (the model this round starts "
                f"from, {model_version}): serve it there, or map it in {SETTING}.model_names; versions are never mixed"
            )

    def generate(self, prompts: pd.DataFrame, params: SamplingParams, progress: bool = True) -> pd.DataFrame:
        started = time.perf_counter()
        bar = tqdm(total=len(prompts), desc=f"generate x{params.num_samples} ({self.base_url})", unit="prompt",
                   disable=not progress)  # fmt: skip
        rows: list[dict] = []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(prompts)))) as pool:
            for prompt_rows in pool.map(lambda row: self._sample(row, params), prompts.itertuples()):
                rows.extend(prompt_rows)
                bar.update(1)
        bar.close()
        account(self.stats, len(prompts), rows, time.perf_counter() - started)
        frame = pd.DataFrame(rows, columns=RESPONSE_COLUMNS)
        return frame.sort_values(["prompt_id", "sample_index"]).reset_index(drop=True)

    def close(self) -> None:
        pass

    # -- one prompt ------------------------------------------------------------------

    def _sample(self, row, params: SamplingParams) -> list[dict]:
        wanted = 1 if params.greedy else params.num_samples
        rows, attempt_seed = [], params.seed
        while len(rows) < wanted:  # a server that ignores n (llama.cpp) gets one request per sample
            answer = self._with_retries(row, params, wanted - len(rows), attempt_seed)
            choices = _choices(answer, self.base_url, row.prompt_id)[: wanted - len(rows)]
            usage = getattr(answer, "usage", None)
            prompt_tokens = token_count(getattr(usage, "prompt_tokens", None))
            completion_tokens = getattr(usage, "completion_tokens", None)
            for text, stopped in choices:
                only = usage is not None and len(answer.choices) == 1 and token_count(completion_tokens) > 0
                exact = token_count(completion_tokens) - int(stopped) if only else None
                tokens = self._count(text, stopped, params, exact)
                rows.append(self._row(row, params, len(rows), text, stopped, prompt_tokens, tokens))
            attempt_seed += 1000
        return rows

    def _count(self, text: str, stopped: bool, params: SamplingParams, exact: int | None) -> int:
        """A sample's tokens: exact from the usage when it is the only one, else re-tokenized (the
        server reports only the sum over n); a sample cut at the limit has exactly the limit."""
        if not stopped:
            return params.max_new_tokens
        if exact is not None:
            return exact
        if self._tokenizer is not None:
            return min(len(self._tokenizer(text, add_special_tokens=False)["input_ids"]), params.max_new_tokens - 1)
        return min(len(text.split()), params.max_new_tokens - 1)

    def _row(
        self, row, params: SamplingParams, index: int, text: str, stopped: bool, prompt_tokens: int, tokens: int
    ) -> dict:
        return response_row(
            prompt_id=row.prompt_id,
            model_version=self.model_version,
            sampling=sampling_text(params),
            sample_index=index,
            text=text,
            prompt_tokens=prompt_tokens,
            kept_tokens=tokens,
            stopped=stopped,
        )

    def _with_retries(self, row, params: SamplingParams, n: int, seed: int):
        try:
            return retry_before_deadline(
                lambda deadline: self._request(row, params, n, seed, deadline),
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
            )
        except RetryableCallFailed as last:
            raise EndpointError(
                f"{self.base_url} gave no answer for prompt {row.prompt_id} within {self.timeout_s:g}s and "
                f"{self.max_retries} retries: {last.failure}"
            ) from None
        except CallFailed as refused:
            raise EndpointError(f"{self.base_url} refused prompt {row.prompt_id}: {refused.failure}") from None

    def _request(self, row, params: SamplingParams, n: int, seed: int, deadline: float):
        client = self._client(timeout=max(deadline - time.monotonic(), 0.001))
        arguments = {
            "model": self.served_name,
            "messages": row_chat(row),
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "n": n,
            "seed": seed,
        }
        if not params.greedy:
            arguments["top_p"] = params.top_p
        try:
            return request_before(deadline, self.timeout_s, lambda: client.chat.completions.create(**arguments),
                                  client.close)  # fmt: skip
        finally:
            client.close()

    # -- the server's models -------------------------------------------------------------

    def _served_models(self) -> dict[str, dict]:
        client = self._client(timeout=min(self.timeout_s, 30.0))
        failure = None
        try:
            return {model.id: model.model_dump() for model in client.models.list()}
        except Exception as error:  # noqa: BLE001 - classified: nothing the server sent is repeated
            failure = classify(error, min(self.timeout_s, 30.0))
        finally:
            client.close()
        raise EndpointError(f"cannot list the models of {self.base_url}: {failure}")

    def _load_adapter(self, model_path: Path, served: dict[str, dict]) -> None:
        config_file = model_path / "adapter" / "adapter_config.json"
        if not config_file.is_file():
            return  # not an adapter: the mismatch error follows
        adapter_base = json.loads(config_file.read_text()).get("base_model_name_or_path")
        bases = {str(model.get("root")) for model in served.values() if not model.get("parent")}
        if adapter_base not in bases:
            raise EndpointError(
                f"{self.model_version} is a LoRA adapter on {adapter_base}, but {self.base_url} serves "
                f"{sorted(bases)}: loading it there would answer with another model; serve its merged weights"
            )
        client = self._client(timeout=min(self.timeout_s, 120.0))
        failure = None
        try:
            body = {"lora_name": self.served_name, "lora_path": str(config_file.parent)}
            client.post("/load_lora_adapter", body=body, cast_to=object)
        except Exception as error:  # noqa: BLE001 - classified: nothing the server sent is repeated
            failure = classify(error, min(self.timeout_s, 120.0))
        finally:
            client.close()
        if failure is not None:
            raise EndpointError(f"{self.base_url} did not load {config_file.parent}: {failure}")

    def _client(self, timeout: float) -> OpenAI:
        key = self._api_key.reveal() if self._api_key else "none"
        return OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)


def _choices(answer, base_url: str, prompt_id: str) -> list[tuple[str, bool]]:
    """(text, stopped) per choice of a chat completion; an answer of any other shape is an invalid answer.

    The client does not validate what a server sends, so a hostile or broken one could put anything
    where the text goes; only a string (or null, as no text) is taken.
    """
    try:
        choices = [(choice.message.content, choice.finish_reason) for choice in answer.choices]
    except (AttributeError, TypeError):
        choices = None
    if not choices or not all(text is None or isinstance(text, str) for text, _ in choices):
        raise EndpointError(f"{base_url} answered prompt {prompt_id} with {EndpointFailure('invalid')}")
    return [((text or "").strip(), finish_reason == "stop") for text, finish_reason in choices]


def _tokenizer_or_none(model_path: Path | str):
    """The model's tokenizer, to count each sample's tokens (the server reports only the sum over n)."""
    try:
        return load_tokenizer(model_path)
    except Exception as error:  # noqa: BLE001 - a hub id not cached here: counts fall back to words
        logger.warning("openai backend: no tokenizer at %s (%s); token counts are word counts", model_path, error)
        return None
