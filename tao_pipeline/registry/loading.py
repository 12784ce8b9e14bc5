"""Loading models and tokenizers the same way everywhere: safetensors only, no remote code by default.

torch and transformers are imported where a model is loaded, not with this module: the code location
imports it (through training), and every process that loads the code location would pay for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tao_pipeline.registry.errors import ModelNotFoundError

if TYPE_CHECKING:
    import torch


def resolve_dtype(dtype: str) -> torch.dtype:
    """'auto' is bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    import torch

    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return torch.float32
    return torch.bfloat16 if bf16_supported() else torch.float32


def bf16_supported() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(path: Path | str, *, trust_remote_code: bool = False, padding_side: str = "left"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load the tokenizer of model {str(path)!r}: {error}") from error
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path | str, *, dtype: str = "auto", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight load is noise next to the stage bars

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=resolve_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"cannot load model {str(path)!r} (safetensors only): {error}") from error
    return model.to(device)
