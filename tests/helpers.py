"""Test helpers: a tiny random llama (no download), usage-log files, small-round settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

FUZZ_CASES = "fuzz_cases"  # a test's user property: (kind, cases tried); tests/conftest.py sums them up
FUZZ_SMALL = 100  # cases per property on every run (the default hypothesis profile)
FUZZ_FULL = 1000  # the most cases a property runs under TAO_FUZZ=full (`make test-full`)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "What is 2 + 3? Reply with just the number. 5",
    "The capital of France is Paris.",
    "What is the chemical symbol for gold? Au",
    "Answer with one word. Blue. Red. Green. 0 1 2 3 4 5 6 7 8 9",
    "You are a concise assistant.",
    "system user assistant",
]


def build_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer llama with a 300-token byte-level BPE tokenizer and a chat template, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def fuzz_scale() -> float:
    """TAO_FUZZ_SCALE: a multiplier for the number of cases (10 for a long soak), 1 when unset."""
    text = os.environ.get("TAO_FUZZ_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = -1.0
    if not 0 < scale < float("inf"):
        raise ValueError(f"TAO_FUZZ_SCALE={text!r}: give a positive number (10 runs ten times as many cases)")
    return scale


def fuzz_examples(full: int) -> int:
    """Cases for a property whose full size is ``full``: all of them under TAO_FUZZ=full, the loaded
    hypothesis profile's (smaller) count otherwise, either times TAO_FUZZ_SCALE."""
    from hypothesis import settings

    return max(1, min(round(full * fuzz_scale()), settings().max_examples))


def write_logs(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_logs(count: int = 24) -> list[dict]:
    rows = []
    for i in range(count):
        if i % 2:
            rows.append(
                {
                    "id": f"log-{i}",
                    "prompt": f"What is {i} + {i + 1}? Reply with just the number.",
                    "task": "arithmetic",
                }
            )
        else:
            rows.append(
                {"id": f"log-{i}", "prompt": f"Name colour number {i}. Answer with one word.", "task": "short_answer"}
            )
    return rows


def write_flywheel_config(tmp_path: Path, tiny_model_dir: Path, min_new_prompts: int, extra: str = "") -> Path:
    """Settings for the flywheel's automation: an isolated home with an inbox, no static log files, a round
    threshold of ``min_new_prompts`` and no settling wait; ``extra`` appends TOML sections."""
    config = tmp_path / "tao.toml"
    config.write_text(f"""
home = "{tmp_path / "home"}"
[data]
logs = []
[model]
base = "{tiny_model_dir}"
[flywheel]
min_new_prompts = {min_new_prompts}
settle_seconds = 0
{extra}""")
    return config


def write_tiny_config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    logs = write_logs(tmp_path / "logs.jsonl", sample_logs() + ["{not json", {"prompt": ""}])
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": "7"}) + "\n" for r in sample_logs()))
    config = tmp_path / "tao.toml"
    config.write_text(f"""
home = "{tmp_path / "home"}"

[data]
logs = ["{logs}"]
labels = "{labels}"
heldout_fraction = 0.25

[model]
base = "{tiny_model_dir}"
dtype = "float32"

[generation]
num_samples = 4
max_new_tokens = 8
batch_size = 8

[pairs]
min_margin = 0.0

[training]
max_steps = 2
batch_size = 2
bf16 = false

[evaluation]
pool_samples = 2
max_new_tokens = 8
test_time_k = 4

[flywheel]
settle_seconds = 0  # files the tests drop into the inbox are complete; tests/test_inbox.py covers settling
""")
    return config


def three_prompts():
    """Three prompts for generation tests: with a system prompt, without one, and with a NaN one."""
    import numpy as np
    import pandas as pd

    return pd.DataFrame(
        {
            "prompt_id": ["p-a", "p-b", "p-c"],
            "prompt": [
                "What is 2 + 3? Reply with just the number.",
                "Name a colour.",
                "What is the capital of France? Answer with one word.",
            ],
            "system": [np.nan, "You are a concise assistant.", None],
        }
    )


def code_location():
    """The code location as Dagster loads it (everything under tao_pipeline/defs), in an instance's context
    as Dagster's own processes load it."""
    from tao_pipeline.cli.runner import code_location as load

    return load()


def group_assets(group: str) -> list:
    """The code location's assets in one group: "tao_round" (the round's stages) or "ingestion"."""
    return [asset for asset in code_location().assets if group in asset.group_names_by_key.values()]


def round_assets() -> list:
    return group_assets("tao_round")


def ingest_assets() -> list:
    return group_assets("ingestion")


def evaluation_checks() -> list:
    return list(code_location().asset_checks)


def inbox_settings(tmp_path: Path, monkeypatch, **sections: str):
    """Settings for a home under ``tmp_path`` with an empty inbox and no configured log files, made the
    code location's ($TAO_CONFIG). ``sections`` adds TOML lines per section, e.g. flywheel="settle_seconds = 1.0"."""
    from tao_pipeline.settings import load_settings

    body = {"data": "logs = []", **{name: text for name, text in sections.items() if name != "data"}}
    if "data" in sections:
        body["data"] += "\n" + sections["data"]
    config = tmp_path / "tao.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n' + "".join(f"[{n}]\n{t}\n" for n, t in body.items()))
    monkeypatch.setenv("TAO_CONFIG", str(config))
    settings = load_settings()
    settings.inbox_dir.mkdir(parents=True)
    return settings
