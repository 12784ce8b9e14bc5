"""Every TRL option, reachable from settings: ``training.dpo_args`` and ``training.grpo_args``.

Each table is passed to TRL's ``DPOConfig`` / ``GRPOConfig`` as keyword arguments. It is checked when the
settings load, against the dataclass itself: a name it does not have is a one-line error with the closest
names, and a value of the wrong type too where the dataclass declares one. TRL is imported only when a table
is given.

tao's own settings win where both name one option: such a key is dropped with a warning naming it and the
setting to use. A few options tao must decide itself (where training writes) are an error.
"""

from __future__ import annotations

import difflib
import enum
import logging
import math
import re
import types
import typing
from functools import cache
from typing import Any

logger = logging.getLogger("tao_pipeline.settings")

METHODS = ("dpo", "grpo")
_SHARED = {
    "learning_rate": "training.learning_rate",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "num_train_epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "bf16": "training.bf16",
    "seed": "training.seed",
}
# The TRL options tao sets from its own settings (training/dpo.py, grpo.py and trainer.py pass exactly these).
FROM_SETTINGS: dict[str, dict[str, str]] = {
    "dpo": {
        **_SHARED,
        "beta": "training.beta",
        "max_length": "training.max_length",
        "precompute_ref_log_probs": "training.precompute_ref_log_probs",
    },
    "grpo": {
        **_SHARED,
        "num_generations": "training.grpo.num_generations",
        "max_completion_length": "training.grpo.max_completion_length",
        "temperature": "training.grpo.temperature",
        "beta": "training.grpo.beta",
        "use_vllm": "training.grpo.use_vllm",
    },
}
# The TRL options tao cannot leave to a table: why not.
TAO_DECIDES: dict[str, dict[str, str]] = {
    "dpo": {"output_dir": "training runs in a scratch folder and tao saves the checkpoint itself"},
    "grpo": {
        "output_dir": "training runs in a scratch folder and tao saves the checkpoint itself",
        "remove_unused_columns": "the reward needs each prompt's prompt_id column",
    },
}
# Options whose values TRL only checks when training starts (an unknown loss fails at the first step): their
# choices are read from the option's own help text ("Possible values are: 'sigmoid', 'hinge', ...").
CHOICES_FROM_HELP = ("loss_type",)
# Names older TRL and transformers releases had: where the option went.
RENAMED = {
    "warmup_ratio": "warmup_steps (a value below 1 is a share of the training steps)",
    "evaluation_strategy": "eval_strategy",
    "max_prompt_length": "max_length (prompt plus completion; training.max_length sets it)",
}


def check_trl_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against TRL's config for ``method``, without the keys tao's settings set (each warned).

    Raises ValueError naming the first key that the config does not have, that tao decides, or whose value has
    the wrong type.
    """
    if not options:
        return {}
    table = f"training.{method}_args"
    fields = config_fields(method)
    kept = {}
    for key, value in options.items():
        where = f"{table}.{key}"
        if key in TAO_DECIDES[method]:
            raise ValueError(f"{where}: tao sets it ({TAO_DECIDES[method][key]}); remove it")
        if key in FROM_SETTINGS[method]:
            logger.warning("%s is ignored: tao sets it from %s; set that instead", where, FROM_SETTINGS[method][key])
            continue
        if key not in fields:
            raise ValueError(f"{where}: {_config_name(method)} has no option {key!r}{_suggestion(key, fields)}")
        _check_value(where, value, fields[key])
        _check_choice(where, value, documented_choices(method).get(key))
        kept[key] = value
    return kept


@cache
def config_fields(method: str) -> dict[str, Any]:
    """TRL's config for ``method``: option name -> its declared type (``Any`` where it cannot be resolved)."""
    import dataclasses

    config = _config_class(method)
    try:
        hints = typing.get_type_hints(config)
    except Exception:  # noqa: BLE001 - an unresolvable annotation only loses the type check
        hints = {}
    return {field.name: hints.get(field.name, Any) for field in dataclasses.fields(config) if field.init}


@cache
def documented_choices(method: str) -> dict[str, list[str]]:
    """The values TRL's help text lists for the options in CHOICES_FROM_HELP (none where it lists fewer than two)."""
    import dataclasses

    found = {}
    for field in dataclasses.fields(_config_class(method)):
        if field.name in CHOICES_FROM_HELP:
            listed = re.search(r"(?:Possible|Supported) values are:?(.*?)\.(?:\s|$)", field.metadata.get("help", ""))
            choices = re.findall(r"'([A-Za-z0-9_]+)'", listed.group(1)) if listed else []
            if len(choices) >= 2:
                found[field.name] = choices
    return found


def _check_choice(where: str, value: Any, choices: list[str] | None) -> None:
    """Each string in ``value`` (one, or a list) is one of ``choices`` (None: anything goes)."""
    for item in value if isinstance(value, list) else [value]:
        if choices is not None and isinstance(item, str) and item not in choices:
            close = difflib.get_close_matches(item, choices, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"one of {', '.join(choices)}"
            raise ValueError(f"{where}: {item!r} is not a choice; {hint}")


def _config_class(method: str):
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    if method == "grpo":
        from trl import GRPOConfig

        return GRPOConfig
    raise ValueError(f"no TRL options for training method {method!r}; known: {', '.join(METHODS)}")


def _config_name(method: str) -> str:
    return {"dpo": "DPOConfig", "grpo": "GRPOConfig"}[method]


def _suggestion(key: str, fields: dict[str, Any]) -> str:
    if key in RENAMED:
        return f"; it is now {RENAMED[key]}"
    close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(name) for name in close)}?" if close else ""


def _check_value(where: str, value: Any, declared: Any) -> None:
    """The value fits the declared type (a single value where a list is declared is one item, as TRL takes it);
    an enum's value where an enum or a string is declared; numbers finite."""
    from pydantic import TypeAdapter, ValidationError

    _check_finite(where, value)
    if declared is Any:
        return
    choices = _enum_choices(declared)
    if choices is not None and isinstance(value, str):
        _check_choice(where, value, choices)
        return
    try:
        adapter = TypeAdapter(declared)
    except Exception:  # noqa: BLE001 - a type pydantic cannot check is left to TRL
        return
    for candidate in (value, [value]) if _declares_list(declared) and not isinstance(value, list) else (value,):
        try:
            adapter.validate_python(candidate, strict=True)
            return
        except ValidationError:
            continue
    raise ValueError(f"{where}: {value!r} is not a {_type_name(declared)}")


def _check_finite(where: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: must be a finite number, got {value}")
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        _check_finite(where, item)


def _members(declared: Any) -> tuple[Any, ...]:
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        return typing.get_args(declared)
    return (declared,)


def _enum_choices(declared: Any) -> list[str] | None:
    """The values of the enum in ``declared`` (transformers types e.g. lr_scheduler_type as 'SchedulerType | str',
    and turns a string into the enum, so only its values work)."""
    for member in _members(declared):
        if isinstance(member, type) and issubclass(member, enum.Enum):
            return [str(item.value) for item in member]
    return None


def _declares_list(declared: Any) -> bool:
    return any(typing.get_origin(member) is list or member is list for member in _members(declared))


def _type_name(declared: Any) -> str:
    return " or ".join(getattr(member, "__name__", None) or str(member) for member in _members(declared))
