"""TRL's fused LM head scoring only the completion tokens on a CPU, as it already does on Triton devices.

TRL computes a training batch's per-token log-probs through the LM head in tiles. On a device without Triton it
projects every position, prompt and padding included, and zeroes the ones without a label afterwards, so that a
compiling backend (Neuron, XLA) sees one tile shape per batch shape. A CPU runs eagerly, so that is work thrown
away, and a lot of it: the projection onto the vocabulary is the model's largest matmul, and in a DPO batch of
short answers most positions are prompt or padding. Each position's log-prob does not depend on the others, so
scoring only the labelled ones gives the same log-probs, up to rounding.

TRL makes that choice with one private helper in ``trl.trainer.utils``; :func:`completions_only_on_cpu` widens it
to CPUs, and only while its block runs in this thread. If TRL no longer makes the choice that way, it leaves TRL
alone (the result is the same, only slower).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ON_CPU: ContextVar[bool] = ContextVar("tao_score_completions_on_cpu", default=False)
_CHOICE = "compact = _use_triton(hidden_states.device)"  # TRL 1.16's fused forward: score the labelled positions only


@contextmanager
def completions_only_on_cpu(enabled: bool = True) -> Iterator[bool]:
    """Within the block, in this thread, TRL's fused LM head scores only the labelled positions on a CPU too.

    Yields whether it does (False with a TRL that chooses some other way).
    """
    active = enabled and _widen_trl_choice()
    token = _ON_CPU.set(active)
    try:
        yield active
    finally:
        _ON_CPU.reset(token)


def _widen_trl_choice() -> bool:
    """Route TRL's choice through :data:`_ON_CPU` (once per process); False when TRL's code is not the one known."""
    from trl.trainer import utils as fused_head

    choose = getattr(fused_head, "_use_triton", None)
    if choose is None:
        return False
    if getattr(choose, "widened_to_cpu", False):
        return True
    source = inspect.getsource(fused_head)
    if source.count("_use_triton(") != 1 or _CHOICE not in source:
        return False  # used for more than that choice, or not at all

    def compact(device) -> bool:
        return choose(device) or (device.type == "cpu" and _ON_CPU.get())

    compact.widened_to_cpu = True
    fused_head._use_triton = compact
    return True
