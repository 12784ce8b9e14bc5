"""Batched sampling with transformers: length-bucketed batches, then tao's decode loop (decoding.py: one prefill per
prompt, finished rows leave the batch, top-p without sorting the vocabulary) or transformers' own ``generate()``."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from tao_pipeline.common.threads import use_torch_threads
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
from tao_pipeline.generation.decoding import decode
from tao_pipeline.generation.sampling import choose_tokens
from tao_pipeline.registry.loading import load_model, load_tokenizer

DECODERS = ("loop", "generate")


class TransformersGenerator:
    def __init__(
        self,
        model_path: Path | str,
        model_version: str,
        *,
        dtype: str = "auto",
        batch_size: int = 16,
        max_prompt_tokens: int = 512,
        trust_remote_code: bool = False,
        decoder: str = "loop",
        batch_rows: int | None = None,
        threads: int | None = None,
    ):
        """``batch_size`` prompts per call; with ``batch_rows``, a call drawing fewer samples per prompt takes
        more prompts, up to ``batch_rows`` rows (prompts x samples): a greedy pass is not 16 rows at a time.
        ``threads``: torch's CPU threads (``generation.threads``); None sizes the pool before each batch from the
        CPUs other processes leave free (:func:`tao_pipeline.common.threads.use_torch_threads`)."""
        if decoder not in DECODERS:
            raise ValueError(f"generation.decoder: {decoder!r} is not one of {', '.join(DECODERS)}")
        self.decoder = decoder
        self.threads = threads
        self.model_version = model_version
        self.batch_size = batch_size
        self.batch_rows = batch_rows
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code, padding_side="left")
        self.model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.eval()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.stats = GenerationStats()

    def generate(self, prompts: pd.DataFrame, params: SamplingParams, progress: bool = True) -> pd.DataFrame:
        encoded = encode_chat_prompts(self.tokenizer, prompts, self.max_prompt_tokens, self.stats)
        # Length bucketing: similar lengths share a batch, so little compute goes to padding.
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), prompts.iloc[i]["prompt_id"]))
        size = self._prompts_per_batch(params)
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        rows: list[dict] = []
        bar = tqdm(total=len(order), desc=f"generate x{params.num_samples}", unit="prompt", disable=not progress)
        for batch_number, batch in enumerate(batches):
            threads = use_torch_threads(self.threads, "generation.threads")
            started = time.perf_counter()
            new_rows = self._generate_batch(prompts, encoded, batch, params, seed=params.seed + batch_number)
            account(self.stats, len(batch), new_rows, time.perf_counter() - started, threads)
            rows.extend(new_rows)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{self.stats.tokens_per_second:.0f}", threads=threads.threads)
        bar.close()
        frame = pd.DataFrame(rows, columns=RESPONSE_COLUMNS)
        return frame.sort_values(["prompt_id", "sample_index"]).reset_index(drop=True)

    def _prompts_per_batch(self, params: SamplingParams) -> int:
        return max(self.batch_size, (self.batch_rows or 0) // _samples_per_prompt(params))

    def _generate_batch(
        self, prompts: pd.DataFrame, encoded: list[list[int]], batch: list[int], params: SamplingParams, seed: int
    ) -> list[dict]:
        n = _samples_per_prompt(params)
        draw = self._decode_loop if self.decoder == "loop" else self._hf_generate
        completions = draw([encoded[i] for i in batch], n, params, seed).cpu()
        return [
            self._row(prompts.iloc[batch[k // n]], encoded[batch[k // n]], k % n, completions[k], params)
            for k in range(completions.shape[0])
        ]

    def _decode_loop(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        choose = partial(
            choose_tokens, greedy=params.greedy, temperature=params.temperature, top_p=params.top_p, generator=generator
        )
        return decode(
            self.model,
            prompts,
            samples=n,
            max_new_tokens=params.max_new_tokens,
            choose=choose,
            eos_ids=self.eos_ids,
            pad_id=self.tokenizer.pad_token_id,
        )

    @torch.inference_mode()
    def _hf_generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int) -> torch.Tensor:
        """transformers' ``generate(num_return_sequences=n)``: n prefills per prompt, the vocabulary sorted per step."""
        inputs = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        torch.manual_seed(seed)
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        )
        output = self.model.generate(
            input_ids=inputs["input_ids"].to(self.model.device),
            attention_mask=inputs["attention_mask"].to(self.model.device),
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=n,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )
        return output[:, inputs["input_ids"].shape[1] :]

    def _row(
        self, prompt: pd.Series, prompt_ids: list[int], sample_index: int, tokens: torch.Tensor, params: SamplingParams
    ) -> dict:
        kept, stopped = split_at_stop(tokens.tolist(), self.eos_ids)
        return response_row(
            prompt_id=prompt["prompt_id"],
            model_version=self.model_version,
            sampling=sampling_json(params),
            sample_index=sample_index,
            text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
            prompt_tokens=len(prompt_ids),
            kept_tokens=len(kept),
            stopped=stopped,
        )


def _samples_per_prompt(params: SamplingParams) -> int:
    return 1 if params.greedy else params.num_samples


def _eos_ids(model, tokenizer) -> set[int]:
    return eos_token_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id)
