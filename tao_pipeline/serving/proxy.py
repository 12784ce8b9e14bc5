"""The proxy engine: `tao serve` in front of an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp).

Requests go to the upstream through the official ``openai`` client under the champion's name
there (``serve.upstream_model_names`` maps a version id to it; by default the version id itself).
A swap makes the new champion answer in one of two ways:

- the upstream already serves it under its name (``/v1/models`` lists it): requests are routed there;
- else, if ``serve.load_lora_adapters`` is on and the champion is a LoRA adapter on the model the
  upstream serves (its parent is ``serve.upstream_base_version``), it is loaded at run time with
  vLLM's ``POST /v1/load_lora_adapter`` (vLLM started with ``--enable-lora`` and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; the adapter folder must be readable by the server).

Otherwise the swap fails with the reason, and the current champion keeps answering.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
from openai import AsyncOpenAI

from tao_pipeline.registry import ModelVersion
from tao_pipeline.serving.engine import Choice, Completion, Delta, EngineError, GenerationRequest, Stream, SwapError


class ProxyEngine:
    name = "proxy"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model_names: dict[str, str] | None = None,
        load_lora_adapters: bool = False,
        upstream_base_version: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 2,
    ):
        self.base_url = base_url.rstrip("/")
        self.model_names = dict(model_names or {})
        self.load_lora_adapters, self.upstream_base_version = load_lora_adapters, upstream_base_version
        self.client = AsyncOpenAI(
            base_url=self.base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=max_retries
        )
        self._version = ""

    @property
    def version(self) -> str:
        return self._version

    def served_name(self, version_id: str) -> str:
        return self.model_names.get(version_id, version_id)

    async def start(self, champion: ModelVersion) -> None:
        await self.switch_to(champion)

    async def switch_to(self, champion: ModelVersion) -> None:
        name = self.served_name(champion.version_id)
        if name not in await self._upstream_models():
            await self._load_adapter(champion, name)
        self._version = champion.version_id

    async def _upstream_models(self) -> set[str]:
        try:
            return {model.id async for model in self.client.models.list()}
        except openai.OpenAIError as error:
            raise SwapError(f"cannot list the models of {self.base_url}: {_reason(error)}") from error

    async def _load_adapter(self, champion: ModelVersion, name: str) -> None:
        adapter = Path(str(champion.path)) / "adapter"
        if not self.load_lora_adapters:
            raise SwapError(
                f"{self.base_url} does not serve {name!r}: serve it there (vLLM: --served-model-name, or "
                "--lora-modules NAME=PATH), map it in serve.upstream_model_names, or set serve.load_lora_adapters"
            )
        if champion.parent_version != self.upstream_base_version or not adapter.is_dir():
            raise SwapError(
                f"{champion.version_id} is not a LoRA adapter on {self.upstream_base_version} (its parent is "
                f"{champion.parent_version}): export its merged weights (tao export) and serve them as {name!r}"
            )
        try:
            await self.client.post(
                "/load_lora_adapter", body={"lora_name": name, "lora_path": str(adapter)}, cast_to=object
            )
        except openai.OpenAIError as error:
            raise SwapError(f"{self.base_url} did not load the adapter {adapter}: {_reason(error)}") from error
        if name not in await self._upstream_models():
            raise SwapError(f"{self.base_url} accepted the adapter {name!r} but does not list it")

    async def complete(self, request: GenerationRequest) -> Completion:
        version = self._version
        try:
            if request.messages is not None:
                answer = await self.client.chat.completions.create(**self._arguments(request, version))
                choices = [Choice(c.message.content or "", c.finish_reason) for c in answer.choices]
            else:
                answer = await self.client.completions.create(**self._arguments(request, version))
                choices = [Choice(c.text, c.finish_reason) for c in answer.choices]
        except openai.OpenAIError as error:
            raise EngineError(f"upstream {self.base_url}: {_reason(error)}") from error
        usage = answer.usage
        if usage is not None and choices:
            for choice in choices:  # the upstream reports the total; share it out
                choice.completion_tokens = usage.completion_tokens // len(choices)
            choices[0].completion_tokens += usage.completion_tokens % len(choices)
        return Completion(version, choices, usage.prompt_tokens if usage else 0)

    async def stream(self, request: GenerationRequest) -> Stream:
        version = self._version
        arguments = {**self._arguments(request, version), "stream": True, "stream_options": {"include_usage": True}}
        create = self.client.chat.completions.create if request.messages is not None else self.client.completions.create
        try:
            chunks = await create(**arguments)
        except openai.OpenAIError as error:
            raise EngineError(f"upstream {self.base_url}: {_reason(error)}") from error
        completion = Completion(version, [Choice() for _ in range(request.n)])
        return Stream(version, self._deltas(chunks, completion, chat=request.messages is not None), completion)

    async def _deltas(self, chunks, completion: Completion, chat: bool) -> AsyncIterator[Delta]:
        try:
            async for chunk in chunks:
                if chunk.usage is not None:
                    completion.prompt_tokens = chunk.usage.prompt_tokens
                    completion.choices[0].completion_tokens = chunk.usage.completion_tokens
                for part in chunk.choices:
                    text = (part.delta.content or "") if chat else (part.text or "")
                    choice = completion.choices[part.index]
                    choice.text += text
                    choice.finish_reason = part.finish_reason or choice.finish_reason
                    yield Delta(part.index, text, part.finish_reason)
        except openai.OpenAIError as error:
            raise EngineError(f"upstream {self.base_url}: {_reason(error)}") from error

    def _arguments(self, request: GenerationRequest, version: str) -> dict:
        arguments = {
            "model": self.served_name(version),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
        }
        if request.seed is not None:
            arguments["seed"] = request.seed
        if request.stop:
            arguments["stop"] = list(request.stop)
        if request.messages is not None:
            return {**arguments, "messages": request.messages}
        return {**arguments, "prompt": request.prompt}

    async def close(self) -> None:
        await self.client.close()


def _reason(error: openai.OpenAIError) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error.message)[:200]}"
    return f"{type(error).__name__}: {str(error)[:200]}"
