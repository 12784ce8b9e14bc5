"""The settings' sections and their defaults: one typed object, ``TaoSettings``, for the whole pipeline.

Each section is checked when it is built, so a bad value fails at load time with its name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tao_pipeline.settings.trl_options import check_trl_options
from tao_pipeline.settings.vocabulary import check_scoring_names

EMBEDDED_MODEL = "embedded"
_DAY_S = 86_400.0  # the longest wait or timeout any setting may ask for
# Run tags tao sets on a round itself (defs/jobs.py, defs/orphans.py); flywheel.round_run_tags may not replace them.
RESERVED_ROUND_TAGS = ("dagster/max_retries", "dagster/retry_strategy", "dagster/partition")


class _Section(BaseModel):
    # Every number finite: inf and nan pass a `gt=0` bound and break later (a wait that never ends).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LogMapping(_Section):
    """Where a row's parts are, for logs in a shape tao does not recognise (``[data.mapping]``).

    Each value is a column name or a dotted path into nested objects and JSON strings
    (``"payload.input.messages"``, ``"meta.user_rating"``); a number indexes a list
    (``"output.choices.0.message.content"``). When set, every row is read through it.
    """

    messages: str | None = Field(None, description="The conversation: a list of OpenAI chat messages (or its JSON).")
    prompt: str | None = Field(None, description="The prompt text, when the logs hold one string, not messages.")
    system: str | None = Field(None, description="The system message, with prompt.")
    task: str | None = Field(None, description="The task name, which picks the scorers.")
    id: str | None = Field(None, description="The row's id (default: a hash of file and line).")
    response: str | None = Field(None, description="The answer given: its text, or a chat completion object.")
    response_id: str | None = Field(None, description="The answer's id, which feedback rows refer to.")
    model: str | None = Field(None, description="The model version that answered.")
    rating: str | None = Field(None, description="The user's rating of the answer ('up', 'down' or -1..1).")
    comment: str | None = Field(None, description="The user's comment on the answer.")
    correction: str | None = Field(None, description="The answer the user says it should have been.")

    @field_validator("*", mode="before")
    @classmethod
    def _number_is_a_column(cls, path: Any) -> Any:
        """``--set data.mapping.id=0`` arrives as the number 0: the column named '0'."""
        return str(path) if isinstance(path, int) and not isinstance(path, bool) else path

    @field_validator("*")
    @classmethod
    def _is_a_path(cls, path: str | None) -> str | None:
        if path is None:
            return None
        if not path.strip():
            raise ValueError("is empty: give a column name or a dotted path such as 'payload.input.messages'")
        if path != path.strip():
            raise ValueError(f"{path!r} has spaces at its ends")
        if len(path) > 256 or path.count(".") >= 16:
            raise ValueError("is too long: at most 256 characters and 16 parts")
        if any(not part for part in path.split(".")):
            raise ValueError(
                f"{path!r} has an empty part: write keys separated by single dots, e.g. 'payload.input.messages'"
            )
        if any(ord(char) < 32 for char in path):
            raise ValueError(f"{path!r} holds a control character")
        return path

    @model_validator(mode="after")
    def _has_a_prompt(self) -> LogMapping:
        if self.messages is None and self.prompt is None:
            raise ValueError(
                "data.mapping needs messages or prompt: the path to the row's chat messages, or to its prompt text"
            )
        return self

    def paths(self) -> dict[str, str]:
        """The fields that are set, and their paths."""
        return {name: path for name, path in self.model_dump().items() if path is not None}


class DataSettings(_Section):
    logs: list[Path] = Field(default_factory=list, description="Usage-log files read where they are (and the inbox).")
    labels: Path | None = Field(None, description="Optional labels file, read only by evaluation.")
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many train prompts per round.")
    max_heldout: int | None = Field(None, ge=1, description="Evaluate on at most this many held-out prompts.")
    min_prompt_chars: int = Field(1, ge=1)
    max_prompt_chars: int = Field(8000, ge=1, description="A longer prompt is quarantined.")
    max_system_chars: int = Field(32_000, ge=1, description="A longer system message is quarantined.")
    max_line_bytes: int = Field(
        4 * 2**20,
        ge=1024,
        le=2**30,
        description="A longer JSONL line (or CSV line, in characters) is quarantined unparsed and skipped in "
        "linear time, so one huge line never stalls ingestion.",
    )
    max_turns: int = Field(
        256, ge=1, le=100_000, description="A conversation with more messages than this is quarantined."
    )
    max_conversation_chars: int = Field(
        200_000, ge=1, description="A conversation whose turns hold more characters in all is quarantined."
    )
    split_salt: str = "tao"
    mapping: LogMapping | None = Field(
        None,
        description="Where each part of a row is, for logs in a shape tao does not recognise by content; when "
        "set, every row is read through it (docs/logs.md).",
    )

    @field_validator("logs")
    @classmethod
    def _logs_are_files(cls, logs: list[Path]) -> list[Path]:
        """Each named log file exists now and is a file (a missing one would be skipped without a word)."""
        resolved = []
        for path in logs:
            found = path.expanduser().resolve()
            if not found.exists():
                raise ValueError(f"{str(path)!r} does not exist")
            if not found.is_file():
                raise ValueError(f"{str(path)!r} is not a file")
            resolved.append(found)
        return resolved

    @field_validator("labels")
    @classmethod
    def _labels_is_a_file(cls, labels: Path | None) -> Path | None:
        if labels is None:
            return None
        found = labels.expanduser().resolve()
        if not found.is_file():
            raise ValueError(f"{str(labels)!r} is {'a folder' if found.is_dir() else 'missing'}, not a labels file")
        return found

    @model_validator(mode="after")
    def _prompt_bounds(self) -> DataSettings:
        if self.min_prompt_chars > self.max_prompt_chars:
            raise ValueError(
                f"min_prompt_chars={self.min_prompt_chars} is above max_prompt_chars={self.max_prompt_chars}"
            )
        return self


class ModelSettings(_Section):
    base: str = Field(EMBEDDED_MODEL, description="'embedded', a local model directory or a hub id.")
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    trust_remote_code: bool = False


class EndpointSettings(_Section):
    """An OpenAI-compatible server to generate with (generation.backend = 'openai')."""

    base_url: str | None = Field(None, description="e.g. 'http://vllm-host:8000/v1' or a `tao serve` address.")
    api_key_env: str | None = Field(None, description="Environment variable holding the server's API key.")
    model_names: dict[str, str] = Field(
        default_factory=dict, description="Version id -> the name the server serves it under (default: the id)."
    )
    concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight at once.")
    timeout_s: float = Field(
        300.0, gt=0.0, le=_DAY_S, description="Total time for one prompt's request, retries included."
    )
    max_retries: int = Field(2, ge=0, le=100)
    load_lora_adapters: bool = Field(
        False, description="vLLM: load a LoRA checkpoint at run time (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING)."
    )


class GenerationSettings(_Section):
    backend: Literal["auto", "transformers", "vllm", "openai"] = Field(
        "auto",
        description="auto: vLLM when a CUDA GPU and the gpu extra are present, else transformers; "
        "openai: an OpenAI-compatible server (generation.endpoint), for candidates and evaluation alike.",
    )
    endpoint: EndpointSettings = Field(default_factory=EndpointSettings)
    tensor_parallel_size: int = Field(1, ge=1, le=256, description="vLLM: GPUs one model is split across.")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="vLLM: share of GPU memory to use.")
    max_model_len: int | None = Field(None, ge=16, le=2**22, description="vLLM: context length (default: the model's).")
    num_samples: int = Field(8, ge=1, le=64)
    max_new_tokens: int = Field(512, ge=1, le=4096)
    temperature: float = Field(0.8, gt=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    batch_size: int = Field(
        16,
        ge=1,
        le=4096,
        description="transformers backend: prompts decoded together, each with num_samples rows; a pass with "
        "fewer samples per prompt (greedy evaluation) takes more prompts, up to batch_size x num_samples rows.",
    )
    decoder: Literal["loop", "generate"] = Field(
        "loop",
        description="transformers backend. loop: tao's decode loop (one prefill per prompt, finished rows leave "
        "the batch, exact top-p without sorting the vocabulary; ~4x faster on a CPU); generate: transformers' "
        "generate(), for a model whose cache the loop does not handle. Both draw from the same distribution.",
    )
    max_prompt_tokens: int = Field(512, ge=8, le=2**20)
    shard_prompts: int = Field(
        64, ge=1, le=1_000_000, description="Prompts per crash-safe shard; a killed run resumes by shard."
    )
    seed: int = Field(0, ge=0, lt=2**32)
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="transformers backend: torch's CPU threads. None: the CPUs this process may use (affinity "
        "mask, cgroup quota) that other processes leave free, measured again as the load changes; a thread whose "
        "core another process holds stalls every step (README: speed on a busy machine).",
    )

    @model_validator(mode="after")
    def _openai_needs_endpoint(self) -> GenerationSettings:
        if self.backend == "openai" and not self.endpoint.base_url:
            raise ValueError(
                "generation.backend='openai' needs generation.endpoint.base_url, e.g. 'http://host:8000/v1'"
            )
        return self


DEFAULT_SCORERS = {"default": {"self_consistency": 1.0}}
DEFAULT_EXTRACTORS = {"default": "final_line", "arithmetic": "last_number", "math": "last_number"}


class ScoringSettings(_Section):
    scorers: dict[str, dict[str, float]] = Field(
        default_factory=lambda: dict(DEFAULT_SCORERS),
        description="Per task: scorer name -> weight. 'default' is used for tasks not listed. "
        "Tasks given in a config are added to these (or replace one of the same name).",
    )
    extractors: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_EXTRACTORS),
        description="Per task: the answer extractor self-consistency votes over; merged over these defaults.",
    )
    gates: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per task: scorers a response must pass before the weighted ones rank it.",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per scorer: its options, e.g. options.sql_execution.database.",
    )
    gate_threshold: float = Field(1.0, ge=0.0, le=1.0)
    length_penalty: float = Field(0.0, ge=0.0, description="> 0 discounts responses longer than their group's median.")
    concise_max_words: int = Field(8, ge=1)
    min_agreement: float = Field(0.25, ge=0.0, le=1.0, description="Below this top vote share a prompt gives no pair.")
    max_unscored_share: float = Field(
        0.5, ge=0.0, le=1.0, description="A round stops, untrained, when more responses than this have no score."
    )

    @field_validator("scorers", "extractors", mode="before")
    @classmethod
    def _merged_over_defaults(cls, value: Any, info) -> Any:
        """A config naming its own tasks keeps the built-in ones (and 'default') unless it redefines them."""
        defaults = DEFAULT_SCORERS if info.field_name == "scorers" else DEFAULT_EXTRACTORS
        return {**defaults, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _known_names(self) -> ScoringSettings:
        check_scoring_names(self.scorers, self.extractors, self.gates, self.options)
        return self


class PairSettings(_Section):
    min_margin: float = Field(
        0.25, ge=0.0, le=1.0, description="Minimum chosen-minus-rejected score (scores are in [0, 1])."
    )


class GrpoSettings(_Section):
    num_generations: int = Field(4, ge=2, le=1024, description="Completions per prompt; the batch must divide by it.")
    max_completion_length: int = Field(256, ge=1, le=2**20)
    temperature: float = Field(0.8, gt=0.0, le=2.0)
    beta: float = Field(0.04, ge=0.0, le=100.0, description="KL penalty towards the starting model.")
    use_vllm: bool = Field(False, description="Generate with vLLM (colocated) during training; GPU only.")


class TrainingSettings(_Section):
    method: Literal["dpo", "grpo"] = Field("dpo", description="dpo on the round's pairs, or grpo on its prompts.")
    use_lora: bool = True
    lora_r: int = Field(16, ge=1, le=4096)
    lora_alpha: int = Field(32, ge=1, le=65536)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    beta: float = Field(0.1, gt=0.0, le=100.0)
    batch_size: int = Field(4, ge=1, le=65536)
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    epochs: float = Field(2.0, gt=0.0, le=10_000.0)
    max_steps: int | None = Field(None, ge=1, le=100_000_000, description="Overrides epochs when set.")
    max_length: int = Field(
        1024, ge=16, le=2**22, description="Prompt plus response tokens a training example may hold."
    )
    bf16: bool | None = Field(None, description="None: bf16 when the hardware supports it.")
    precompute_ref_log_probs: bool = Field(
        True,
        description="DPO: the reference model's log-probs of every pair in one pass before training, instead of a "
        "reference forward in every step. The same loss up to rounding; a pass over the pairs once instead of once "
        "per epoch.",
    )
    bf16_frozen_weights: bool = Field(
        True,
        description="DPO with LoRA under bf16 autocast: hold the frozen base weights of the adapted layers in bf16, "
        "as autocast computes with them anyway, instead of casting them in every forward. The same forward; the "
        "adapter trains in fp32 and is merged into the parent's fp32 weights.",
    )
    score_completions_only: bool = Field(
        True,
        description="DPO on a CPU: TRL's fused LM head projects only the completion tokens, as it does on GPUs, "
        "instead of every position (prompt and padding too, zeroed afterwards). The same log-probs.",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**32,
        description="Seeds training: the adapter's initial weights and the order of the examples.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch's CPU threads while training. None: the CPUs this process may use that other processes "
        "leave free, measured again as the load changes (see generation.threads).",
    )
    grpo: GrpoSettings = Field(default_factory=GrpoSettings)
    dpo_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other TRL DPOConfig option (e.g. loss_type, weight_decay, lr_scheduler_type, warmup_steps), "
        "checked at load against DPOConfig; an option tao has a setting for comes from that setting (a warning says "
        "so). tao sets gradient_checkpointing=false, lr_scheduler_type='constant_with_warmup', warmup_steps=0.",
    )
    grpo_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other TRL GRPOConfig option, checked the same way. tao sets loss_type='dapo', "
        "scale_rewards='group', top_p=1.0 and the dpo_args defaults.",
    )
    accelerate_config: Path | None = Field(
        None,
        description="Train under `accelerate launch --config_file` (configs/accelerate/*.yaml); None: in-process.",
    )

    @field_validator("dpo_args", "grpo_args")
    @classmethod
    def _trl_options(cls, options: dict[str, Any], info) -> dict[str, Any]:
        return check_trl_options(info.field_name.removesuffix("_args"), options)


class EvaluationSettings(_Section):
    backend: Literal["transformers", "vllm", "openai"] | None = Field(
        None,
        description="The generation backend for held-out answers; default: generation.backend. With 'openai' the "
        "server must serve the challenger too (vLLM: generation.endpoint.load_lora_adapters).",
    )
    pool_samples: int = Field(4, ge=1, le=32, description="Samples per model pooled as the consensus reference.")
    max_new_tokens: int = Field(512, ge=1)
    min_win_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="The bar: the lower end of the challenger's win-rate interval must exceed it to be promoted "
        "(ties count half). Below 0.5 accepts a challenger that is not proven better, and drops the sign test.",
    )
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1.0,
        description="Confidence of the intervals the verdict and the report give. 0.95: the interval's lower end is "
        "a one-sided 97.5% bound, so a challenger no better than the champion is promoted in at most ~2.5% of rounds "
        "(a promotion changes what every user gets; a missed one costs a round, whose held-out prompts are pooled).",
    )
    auto_rollback: bool = Field(
        True,
        description="When the collapse guard fires on the champion a round started from (its own-sample reward "
        "rose over its parent's while held-out accuracy fell), roll back to the parent and record why; that "
        "round's challenger is not promoted. Needs labels: without them the guard never fires.",
    )
    pool_heldout: bool = Field(
        True,
        description="Every verdict also evaluates on earlier rounds' held-out prompts (held out by hash, so never "
        "trained on; the champion's answers come from the cache), this round's own first, then newest first: "
        "the evidence grows with traffic. Off: each round's own held-out prompts only.",
    )
    max_heldout_prompts: int | None = Field(
        512,
        ge=1,
        description="At most this many held-out prompts per verdict, pooled or not (None: all). Each costs the "
        "challenger a greedy answer and evaluation.pool_samples samples.",
    )
    max_accuracy_drop: float = Field(0.0, ge=0.0, le=1.0, description="Allowed labeled-accuracy regression.")
    max_length_ratio: float = Field(2.0, gt=0.0, description="Guard: challenger's mean length / champion's.")
    test_time_k: int = Field(8, ge=0, le=64, description="Base-model samples for maj@k and best-of-k (0: skip).")
    control_arm: bool = Field(False, description="Also train on shuffled preference directions, as a control.")
    control_margin: float = Field(
        0.02, ge=0.0, le=1.0, description="Alarm when the control's gain comes within this of the real gain."
    )


class PreflightSettings(_Section):
    """`tao preflight` and the check before generation: is there label-free signal in each task at all?"""

    prompts_per_task: int = Field(
        300,
        ge=1,
        description="Train prompts sampled per task, with the round's own sampling (so the round reuses the "
        "samples); 300 measures a share to about +-6 points.",
    )
    check_before_generation: bool = Field(
        True,
        description="Run the preflight as a non-blocking check on raw_prompts before candidate generation. It adds "
        "no generation (the round reuses every sample), only one more load of the starting model and the scoring.",
    )
    min_clear_majority_share: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Without labels, self-consistency needs this share of prompts whose top answer holds more than "
        "half the samples: below it, most pairs rank one minority answer over another.",
    )
    min_pairable_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of prompts whose scores spread by pairs.min_margin (each gives a preference pair); "
        "below it a round has too little to train on.",
    )
    min_accuracy_gain: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="With labels: the scorer's pick among the samples (best-of-k) must be right this much more often "
        "than one sample; a smaller gain is within the noise of a few hundred prompts.",
    )
    min_labeled_prompts: int = Field(
        30, ge=1, description="Fewer labeled prompts in a task than this: its verdict rests on the label-free signals."
    )


_CRON_MACROS = {"@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"}


def is_valid_cron(value: str) -> bool:
    """Whether Dagster's scheduler accepts the cron string: 5 fields (or a macro), every value in
    range, no day-of-month that February never has, no 'W' (nearest weekday), which it cannot run."""
    value = value.strip()
    if value.startswith("@"):
        return value in _CRON_MACROS
    fields = value.split()
    if len(fields) != 5 or "W" in fields[2].upper() or not croniter.is_valid(value):
        return False
    days, months = croniter.expand(value)[0][2:4]
    return not (months == [2] and set(days) <= {30, 31})


class TableSourceSettings(_Section):
    """A DuckDB table the app appends usage logs to (same columns as a log file: prompt, task, ...)."""

    database: Path
    table: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$")
    order_column: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="A column that only grows: an autoincrement id or insert timestamp.",
    )


class FlywheelSettings(_Section):
    inbox: Path | None = Field(None, description="Folder the app drops usage-log files into; default <home>/inbox.")
    min_new_prompts: int = Field(100, ge=1, description="Open a round once this many unused prompts arrived.")
    schedule_cron: str = Field("0 3 * * 1", description="Periodic round (if anything is new); default weekly.")
    replay_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Share of already-used prompts a round re-takes.")
    start_from: Literal["champion", "challenger", "base"] = Field(
        "champion",
        description="The model a round tunes. champion: the one serving. challenger: the newest challenger built "
        "on the champion that its gate did not find worse (its win rate's interval on the held-out pool reaches "
        "0.5), so rounds whose steps are too small to prove one at a time stack up until one is proven better than "
        "the champion. base: the champion answers the round's prompts, and training starts again from the base "
        "model's weights (as STaR does), so with replay_fraction = 1 each round learns from all traffic so far "
        "without stacking one round's drift on the last's. Every gate compares with the champion, and only a "
        "proven winner serves.",
    )
    sensor_interval_s: int = Field(30, ge=5, le=int(_DAY_S))
    settle_seconds: float = Field(
        10.0, ge=0.0, le=_DAY_S, description="An inbox file is read once unchanged this long (see the inbox contract)."
    )
    run_start_timeout_s: float = Field(
        180.0,
        gt=0.0,
        le=_DAY_S,
        description="A round or ingest run still starting this long after its launch, with no process of its own "
        "yet, is failed by Dagster's run monitoring (its launch was interrupted, e.g. the daemon was killed) and "
        "retried: the round by Dagster's run retries, the file by the usage-log sensor.",
    )
    max_concurrent_ingest_runs: int = Field(
        2,
        ge=1,
        le=1024,
        description="Ingest runs in progress at once; more wait in Dagster's run queue. Each starts a process: many at "
        "once on a small machine thrash until they time out at start. While this many are in flight, the usage-log "
        "sensor holds new files back, and the next run takes all of them (up to max_files_per_ingest_run).",
    )
    max_files_per_ingest_run: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Inbox files one ingest run takes: each stays its own log_batches partition (the run covers "
        "their range), but a run's process starts once for all of them, so ingestion catches up after a burst "
        "instead of queueing a run per file. 1: a run per file.",
    )
    round_run_tags: dict[str, Any] = Field(
        default_factory=dict,
        description="Tags on every round run (the sensors', the schedule's and one launched in the UI), e.g. "
        '{"dagster-k8s/config" = {container_config = {resources = {limits = {"nvidia.com/gpu" = "1"}}}}} to give '
        "the run's pod a GPU under the K8sRunLauncher; a table is passed as JSON, as Dagster's run tags are.",
    )
    table_source: TableSourceSettings | None = None

    @field_validator("round_run_tags")
    @classmethod
    def _round_run_tags(cls, tags: dict[str, Any]) -> dict[str, Any]:
        for key, value in tags.items():
            if key in RESERVED_ROUND_TAGS or key.startswith("tao/"):
                raise ValueError(f"{key!r} is set by tao itself on every round run; it cannot be replaced")
            if not isinstance(value, str | int | float | bool | dict | list):
                raise ValueError(f"{key!r}: a tag is a string or a table, not {type(value).__name__}")
        return tags

    @field_validator("schedule_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if is_valid_cron(value):
            return value.strip()
        raise ValueError(f"{value!r} is not a cron expression Dagster can schedule, like '0 3 * * 1' or '@daily'")


class ServeSettings(_Section):
    """`tao serve`: the champion behind an OpenAI-compatible API, its traffic logged into the inbox."""

    host: str = Field("127.0.0.1", description="Loopback by default; any other address needs api_keys_env set.")
    port: int = Field(8000, ge=1, le=65535)
    engine: Literal["local", "proxy"] = Field(
        "local", description="local: transformers in this process; proxy: in front of upstream_url."
    )
    model_alias: str = Field("tao", min_length=1, description="The model name that always means the champion.")
    api_keys_env: str = Field(
        "TAO_SERVE_API_KEYS", description="Environment variable with the bearer keys clients send (comma-separated)."
    )
    default_task: str = Field("general", min_length=1, description="Task of a request without metadata.task.")
    default_max_tokens: int = Field(
        512, ge=1, description="max_tokens of a request that sets none (shortened to fit the model's context)."
    )
    max_tokens_limit: int = Field(4096, ge=1, description="Larger max_tokens in a request are refused (HTTP 400).")
    max_batch_rows: int = Field(
        16, ge=1, le=1024, description="Rows (requests x n) decoded together (local) or in flight upstream (proxy)."
    )
    max_queued_rows: int = Field(
        64, ge=0, description="Rows waiting beyond max_batch_rows; past them a request gets 429 with Retry-After."
    )
    batch_window_ms: float = Field(
        20.0, ge=0.0, le=10_000.0, description="local: how long the first request on an idle server waits for company."
    )
    prefill_chunk_tokens: int = Field(
        512, ge=16, description="local: prompt tokens read per decoding step; a longer prompt is read in chunks."
    )
    long_row_tokens: int = Field(
        512, ge=16, description="local: a row past this many tokens decodes in a batch of long rows of its own."
    )
    long_rows_share: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="local: while short rows decode, the share of decoding steps the long rows take (1: every step).",
    )
    max_context_tokens: int | None = Field(
        None, ge=2, description="local: prompt + answer tokens at most (default: the model's own context length)."
    )
    threads: int | None = Field(
        None, ge=1, description="local: torch threads (default: half the usable CPUs; one thread wins on a busy one)."
    )
    max_body_bytes: int = Field(
        2**20, ge=1024, le=2**30, description="A larger request body is refused (HTTP 413) before it is read."
    )
    body_timeout_s: float = Field(30.0, gt=0.0, le=3600.0, description="Time to receive a request body (HTTP 408).")
    max_messages: int = Field(256, ge=1, description="Messages (conversation turns) in one chat request at most.")
    max_prompts_per_request: int = Field(
        32, ge=1, le=1024, description="Prompts in one /v1/completions request (a list, as OpenAI allows) at most."
    )
    swap_poll_seconds: float = Field(2.0, gt=0.0, description="How often the registry is asked for a new champion.")
    log_requests: bool = Field(True, description="Write every answered request into the inbox.")
    log_responses: bool = Field(
        True, description="Keep the answer's text in the logged rows (false: ids, model and usage only)."
    )
    drop_fields: list[str] = Field(
        default_factory=list,
        description="Left out of logged rows: 'system' (the system and developer messages), 'response' (as "
        "log_responses = false), a field of the request (e.g. 'metadata', 'user') or of the row (e.g. 'latency_ms').",
    )
    log_roll_rows: int = Field(1000, ge=1, description="A log file is handed to the inbox at this many rows...")
    log_roll_seconds: float = Field(60.0, gt=0.0, description="...or at this age, whichever comes first.")
    upstream_url: str | None = Field(
        None, description="proxy: the OpenAI-compatible base URL, e.g. http://vllm:8000/v1."
    )
    upstream_api_key_env: str | None = None
    upstream_model_names: dict[str, str] = Field(
        default_factory=dict, description="proxy: version id -> the name the upstream serves it under."
    )
    load_lora_adapters: bool = Field(False, description="proxy: load a new champion's adapter on the upstream (vLLM).")
    request_timeout_s: float = Field(
        300.0, gt=0.0, le=86_400.0,
        description="Deadline of one request, queue and retries included (HTTP 504, or an error event in a stream).",
    )  # fmt: skip
    upstream_stall_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="proxy: an upstream silent this long (no token) is stuck: tried again."
    )
    upstream_probe_seconds: float = Field(
        5.0, gt=0.0, le=3600.0, description="proxy: how often /health asks the upstream for its models."
    )
    breaker_failures: int = Field(
        5, ge=1, description="proxy: consecutive upstream failures that open the circuit (503 at once)..."
    )
    breaker_cooldown_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="...for this long; then a request is let through to try it again."
    )

    @model_validator(mode="after")
    def _proxy_needs_upstream(self) -> ServeSettings:
        if self.engine == "proxy" and not self.upstream_url:
            raise ValueError("serve.engine='proxy' needs serve.upstream_url, e.g. 'http://localhost:8001/v1'")
        return self


class LiveSettings(_Section):
    """Promotion on live traffic: a challenger shadowed or canaried beside the champion, decided by an
    always-valid sequential test on its answers (tao_pipeline/live/)."""

    enabled: bool = Field(
        False,
        description="A challenger that passes the offline gate goes on live traffic (as live.mode) instead of "
        "straight to every user; the live decision then promotes it or rolls it back.",
    )
    stages: list[Literal["shadow", "canary"]] = Field(
        default_factory=lambda: ["canary"],
        description="The stages a challenger goes through on live traffic, in order: each one it passes starts "
        "the next, and passing the last promotes it; failing any rolls it back. ['shadow', 'canary'] shadows "
        "it first (no user sees it) and canaries it once its answers hold up. live.enabled starts the first.",
    )
    share: float = Field(0.1, gt=0.0, le=1.0, description="Share of conversations a canary answers (`tao canary`).")
    metric: Literal["score", "feedback"] = Field(
        "score",
        description="What one live answer is worth: 'score', the task's scorers on it (shadow: both versions' "
        "answers to the same request, scored together); 'feedback', its user's rating (canary only). A shadow "
        "scored by self-consistency alone cannot tell two versions apart (two answers to one request agree "
        "alike): it guards errors, latency and format, and the canary's ratings decide quality.",
    )
    margin: float = Field(
        0.02, ge=0.0, le=1.0, description="Promote once the challenger is proven no worse than the champion by this."
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Of the always-valid interval behind each decision.")
    min_pairs: int = Field(50, ge=1, description="Paired live answers before any decision is taken.")
    max_pairs: int | None = Field(
        20_000,
        ge=1,
        description="Paired live answers after which an undecided experiment ends: rolled back as not proven no "
        "worse, the champion stays (never a promotion without proof). A challenger whose true difference is near "
        "-margin can keep the always-valid test undecided for very long. None: no bound.",
    )
    max_hours: float | None = Field(
        72.0,
        gt=0.0,
        description="Hours a stage (shadow or canary) may run undecided, however little traffic came: then it ends "
        "rolled back as not proven no worse, the champion stays. None: no bound.",
    )
    max_latency_ratio: float = Field(
        2.0, gt=1.0, description="Guard: roll back when the challenger's p95 latency exceeds the champion's by this."
    )
    min_latency_answers: int = Field(20, ge=1, description="Answers of each version before the latency guard applies.")
    max_error_rate: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Guard, in `tao serve` at once: roll back when the share of the challenger's requests that fail "
        "with a server error is proven (always-valid interval at live.confidence) above the champion's by this.",
    )

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, stages: list[str]) -> list[str]:
        if not stages or len(set(stages)) < len(stages) or stages not in (["shadow"], ["canary"], ["shadow", "canary"]):
            raise ValueError(f"{stages}: give ['canary'], ['shadow'] or ['shadow', 'canary'] (shadow before canary)")
        return stages


class StorageSettings(_Section):
    """Where state lives beyond the home folder, for deployments: the Dagster instance and object storage."""

    postgres_url_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding a postgresql:// URL: the Dagster instance (runs, events, "
        "schedules, sensor cursors) lives in that database instead of SQLite files under <home>/dagster, so "
        "`tao ui`, `tao round`, the daemon, the runs and `tao serve` share it across machines.",
    )
    platform_instance: bool = Field(
        False,
        description="The Dagster instance belongs to the platform: every process opens $DAGSTER_HOME as it is (the "
        "Dagster Helm chart mounts its instance there: Postgres, the K8sRunLauncher, run monitoring) and tao writes "
        "no dagster.yaml of its own. Off: the instance is <home>/dagster, written from these settings.",
    )
    lake_mirror_url: str | None = Field(
        None,
        pattern=r"^s3://[^/]+/.+",
        description="s3://bucket/prefix: after each round the lake's Parquet files that changed are uploaded "
        "there (credentials and endpoint from the standard AWS environment); query them with DuckDB's httpfs.",
    )

    @model_validator(mode="after")
    def _one_instance(self) -> StorageSettings:
        if self.platform_instance and self.postgres_url_env:
            raise ValueError(
                "postgres_url_env and platform_instance are both set: the platform's dagster.yaml names the database, "
                "so unset postgres_url_env"
            )
        return self


class CostSettings(_Section):
    """Prices that turn a round's measured cost into money; an unset price leaves its part out (none set: no money)."""

    currency: str = Field("USD", min_length=1, description="Label shown beside money; prices are in this currency.")
    per_1k_generated_tokens: float | None = Field(
        None, ge=0.0, description="Price of 1,000 tokens the pipeline's models generate (candidates, evaluation)."
    )
    per_1k_judge_prompt_tokens: float | None = Field(
        None, ge=0.0, description="Price of 1,000 prompt tokens sent to an LLM judge (cache hits cost nothing)."
    )
    per_1k_judge_completion_tokens: float | None = Field(
        None, ge=0.0, description="Price of 1,000 tokens an LLM judge answers with."
    )
    per_cpu_hour: float | None = Field(None, ge=0.0, description="Price of one CPU core busy for an hour.")
    per_gpu_hour: float | None = Field(None, ge=0.0, description="Price of one GPU held for an hour.")


def _section_dict(section: Any) -> dict:
    """A section given as a dict or a built model, as a dict to adjust."""
    if isinstance(section, BaseModel):
        return section.model_dump(exclude_unset=True)
    return dict(section or {})


class TaoSettings(_Section):
    home: Path = Field(default_factory=lambda: Path(os.environ.get("TAO_HOME", "~/.tao")), validate_default=True)
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    pairs: PairSettings = Field(default_factory=PairSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    preflight: PreflightSettings = Field(default_factory=PreflightSettings)
    flywheel: FlywheelSettings = Field(default_factory=FlywheelSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    live: LiveSettings = Field(default_factory=LiveSettings)
    costs: CostSettings = Field(default_factory=CostSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    compute_scale: float = Field(
        1.0,
        gt=0.0,
        le=16.0,
        description="One knob for tuning compute: multiplies generation.num_samples (at least 2) and the training "
        "length (training.max_steps when set, else training.epochs). 0.5 halves a round's tuning compute, 2 doubles "
        "it; `make bench-compute` measures what each setting buys.",
    )
    compute_scale_applied: bool = Field(
        False, description="Set once compute_scale has been applied, so settings saved and loaded again scale once."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_compute_scale(cls, values: Any) -> Any:
        if not isinstance(values, dict) or values.get("compute_scale_applied"):
            return values
        scale = values.get("compute_scale", 1.0)
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not 0 < scale <= 16 or scale == 1.0:
            return values  # field validation names a bad value (inf and nan included)
        values = dict(values)
        generation = _section_dict(values.get("generation"))
        samples = generation.get("num_samples", GenerationSettings.model_fields["num_samples"].default)
        generation["num_samples"] = max(2, round(samples * scale))
        training = _section_dict(values.get("training"))
        if training.get("max_steps") is not None:
            training["max_steps"] = max(1, round(training["max_steps"] * scale))
        else:
            training["epochs"] = training.get("epochs", TrainingSettings.model_fields["epochs"].default) * scale
        values.update(generation=generation, training=training, compute_scale_applied=True)
        return values

    @model_validator(mode="after")
    def _openai_evaluation_needs_endpoint(self) -> TaoSettings:
        if self.evaluation.backend == "openai" and not self.generation.endpoint.base_url:
            raise ValueError(
                "evaluation.backend='openai' needs generation.endpoint.base_url, e.g. 'http://host:8000/v1'"
            )
        return self

    @model_validator(mode="after")
    def _inputs_outside_the_pipelines_data(self) -> TaoSettings:
        """The inbox and data.logs are read (and inbox files moved): never inside the lake, the models or the
        other folders the pipeline writes, or ingestion would move and re-read its own data."""
        named = [("flywheel.inbox", self.inbox_dir)] if self.flywheel.inbox is not None else []
        named += [("data.logs", path) for path in self.data.logs]
        for setting, path in named:
            if path.resolve() == self.home:
                raise ValueError(f"{setting} {str(path)!r} is the home folder itself; give a folder of its own")
            for folder in self.pipeline_data_dirs:
                if path.resolve().is_relative_to(folder):
                    raise ValueError(
                        f"{setting} {str(path)!r} is inside the pipeline's own data ({folder}); "
                        f"give a place outside it, e.g. the default inbox {self.home / 'inbox'}"
                    )
        return self

    @model_validator(mode="after")
    def _control_needs_pairs(self) -> TaoSettings:
        if self.evaluation.control_arm and self.training.method != "dpo":
            raise ValueError("evaluation.control_arm shuffles preference pairs, so it needs training.method='dpo'")
        return self

    @field_validator("home", mode="before")
    @classmethod
    def _not_empty(cls, home: Any) -> Any:
        if isinstance(home, str) and not home.strip():
            raise ValueError("home is empty: give the folder everything lives in, e.g. '~/.tao'")
        return home

    @field_validator("home")
    @classmethod
    def _expand_home(cls, home: Path) -> Path:
        home = home.expanduser().resolve()
        if home.exists() and not home.is_dir():
            raise ValueError(f"{home} is a file, not a folder: home is the folder everything lives in")
        return home

    @property
    def lake_dir(self) -> Path:
        return self.home / "lake"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def inbox_dir(self) -> Path:
        return (self.flywheel.inbox or self.home / "inbox").expanduser().resolve()

    @property
    def table_exports_dir(self) -> Path:
        """Where rows pulled from flywheel.table_source land as Parquet before ingestion."""
        return self.inbox_dir / "from_table"

    @property
    def log_folders(self) -> list[Path]:
        return [self.inbox_dir, self.table_exports_dir]

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def dagster_home(self) -> Path:
        """The Dagster instance's folder: the platform's $DAGSTER_HOME (storage.platform_instance) or <home>/dagster."""
        if self.storage.platform_instance:  # unset: the Dagster chart's default (cli/instance.py says it is unset)
            return Path(os.environ.get("DAGSTER_HOME") or "/opt/dagster/dagster_home")
        return self.home / "dagster"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def pipeline_data_dirs(self) -> list[Path]:
        """The folders of the home the pipeline writes and manages; no input may come from inside them."""
        return [self.lake_dir, self.models_dir, self.cache_dir, self.dagster_home, self.reports_dir]

    @property
    def controls_dir(self) -> Path:
        """Control-arm checkpoints: kept out of the registry, so they can never be promoted."""
        return self.models_dir / "controls"
