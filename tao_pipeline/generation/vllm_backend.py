"""Sampling with vLLM's offline engine (GPU): one ``LLM.generate`` call, ``n`` samples per prompt.

vllm is imported lazily (it pins its own torch and transformers and needs CUDA), so this module imports
anywhere; constructing :class:`VLLMGenerator` is what needs the ``gpu`` extra and a GPU.

The table is the transformers backend's, row for row: the same chat-template tokens (built with the model's
own tokenizer and truncated to ``max_prompt_tokens``), the same response ids for the same
(prompt, model version, sampling parameters, sample index), the same stop tokens, token counts and
finish reasons. Only the sampled text differs, since the engines draw different random numbers.
"""

from __future__ import annotations

import functools
import gc
import time
from pathlib import Path

import pandas as pd

from tao_pipeline.common.hashing import content_hash
from tao_pipeline.generation.base import (
    RESPONSE_COLUMNS,
    GenerationStats,
    SamplingParams,
    account,
    encode_chat_prompts,
    eos_token_ids,
    response_row,
    sampling_json,
    split_at_stop,
)
from tao_pipeline.registry.loading import load_tokenizer


@functools.cache
def vllm_available() -> bool:
    """True when a CUDA GPU is visible and vllm imports (the ``gpu`` extra is installed)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import vllm  # noqa: F401
    except Exception:  # an import that fails half-way (wrong torch, missing CUDA libs) is "not available" too
        return False
    return True


class VLLMGenerator:
    def __init__(
        self,
        model_path: Path | str,
        model_version: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        dtype: str = "auto",
        max_prompt_tokens: int = 512,
        trust_remote_code: bool = False,
        enforce_eager: bool = False,
    ):
        """``dtype`` is vLLM's: "auto" takes the checkpoint's (fp32 checkpoints run in half precision), or
        "bfloat16", "float16", "float32". ``enforce_eager`` skips CUDA-graph capture: faster start, slower decoding.
        """
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "the vLLM backend needs the 'gpu' extra (pip install -e '.[gpu]') on a machine with a CUDA GPU"
            ) from error
        from transformers import GenerationConfig

        self.model_version = model_version
        # The same tokenizer load as the transformers backend, so prompts tokenize identically on both.
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code, padding_side="left")
        try:
            generation_eos = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
        except (OSError, ValueError):  # no (readable) generation_config.json: the tokenizer's EOS alone
            generation_eos = None
        self.eos_ids = eos_token_ids(generation_eos, self.tokenizer.eos_token_id)
        engine_args = {
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "enforce_eager": enforce_eager,
            "seed": 0,
        }
        if max_model_len is not None:
            engine_args["max_model_len"] = max_model_len
        self.llm = LLM(model=str(model_path), tokenizer=str(model_path), **engine_args)
        # vLLM rejects a prompt as long as the context; keep one position free for the first new token.
        self.max_prompt_tokens = min(max_prompt_tokens, self.llm.model_config.max_model_len - 1)
        self.stats = GenerationStats()

    def generate(self, prompts: pd.DataFrame, params: SamplingParams, progress: bool = True) -> pd.DataFrame:
        if prompts.empty:
            return pd.DataFrame([], columns=RESPONSE_COLUMNS)
        from vllm import TokensPrompt

        encoded = encode_chat_prompts(self.tokenizer, prompts, self.max_prompt_tokens, self.stats)
        prompt_ids = prompts["prompt_id"].tolist()
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in encoded]
        per_request = [self._engine_params(params, prompt_id) for prompt_id in prompt_ids]
        started = time.perf_counter()
        # One call for everything: vLLM's scheduler batches continuously across prompts and samples.
        outputs = self.llm.generate(requests, per_request, use_tqdm=progress)
        sampling = sampling_json(params)
        rows: list[dict] = []
        for prompt_id, ids, output in zip(prompt_ids, encoded, outputs):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                if completion.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM did not finish prompt {prompt_id!r}: {completion.finish_reason!r}")
                kept, stopped = split_at_stop(completion.token_ids, self.eos_ids)
                # A stop the engine reports without the token in token_ids still counts as one generated token.
                stopped = stopped or completion.finish_reason == "stop"
                rows.append(
                    response_row(
                        prompt_id=prompt_id,
                        model_version=self.model_version,
                        sampling=sampling,
                        sample_index=completion.index,
                        text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        prompt_tokens=len(ids),
                        kept_tokens=len(kept),
                        stopped=stopped,
                    )
                )
        account(self.stats, len(prompt_ids), rows, time.perf_counter() - started)
        frame = pd.DataFrame(rows, columns=RESPONSE_COLUMNS)
        return frame.sort_values(["prompt_id", "sample_index"]).reset_index(drop=True)

    def _engine_params(self, params: SamplingParams, prompt_id: str):
        """vLLM's SamplingParams for one prompt: greedy = temperature 0 and one sample."""
        from vllm import SamplingParams as EngineSamplingParams

        common = {
            "max_tokens": params.max_new_tokens,
            "stop_token_ids": sorted(self.eos_ids),
            "detokenize": False,  # the text is decoded here, with the same call as the transformers backend
        }
        if params.greedy:
            return EngineSamplingParams(n=1, temperature=0.0, **common)
        return EngineSamplingParams(
            n=params.num_samples,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            seed=request_seed(params.seed, prompt_id),
            **common,
        )

    def close(self) -> None:
        """Shuts the engine down and frees its GPU memory (before training in the same process, say)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def request_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed from the run's seed and the prompt id: a prompt's samples do not depend on which other
    prompts share the call or their order. vLLM gives sample ``i`` of a request the seed ``seed + i``."""
    return int(content_hash(str(seed), prompt_id), 16) % (2**31 - 2**16)
