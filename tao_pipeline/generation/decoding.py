"""A decode loop for sampling several continuations of each prompt with a transformers causal LM.

What it does that ``model.generate(num_return_sequences=n)`` does not, and why it is several times faster on a CPU:

- each prompt is prefilled once, and its KV cache is then repeated for its samples (generate prefills n copies);
- a row leaves the batch the step it ends (EOS), so no compute goes to finished rows;
- the next token is chosen by ``choose`` (see sampling.py), which does not sort the vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from contextlib import nullcontext
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

ChooseTokens = Callable[[torch.Tensor], torch.Tensor]  # logits (rows x vocabulary) -> one token id per row


@torch.inference_mode()
def decode(
    model,
    prompts: list[list[int]],
    *,
    samples: int,
    max_new_tokens: int,
    choose: ChooseTokens,
    eos_ids: Collection[int],
    pad_id: int,
) -> torch.Tensor:
    """New tokens, one row per (prompt, sample) in prompt-major order, padded with ``pad_id`` after EOS."""
    device = model.device
    input_ids, mask = _left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = _preallocated_cache(model, input_ids.shape[1] + max_new_tokens)
    forward = _forward_with(model)
    logits = forward(input_ids, mask, positions, cache)
    if cache.get_seq_length() != input_ids.shape[1]:  # a forward that ignored the cache would decode garbage
        raise RuntimeError(f"{type(model).__name__}.forward did not fill the KV cache it was given")
    if samples > 1:
        cache.batch_repeat_interleave(samples)
        logits, mask = logits.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)
    next_position = positions[:, -1].repeat_interleave(samples) + 1

    stops = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    out = torch.full((len(prompts) * samples, max_new_tokens), pad_id, dtype=torch.long, device=device)
    rows = torch.arange(out.shape[0], device=device)  # the output row of each row still in the batch
    for step in range(max_new_tokens):
        tokens = choose(logits)
        out[rows, step] = tokens
        running = ~torch.isin(tokens, stops)
        if step == max_new_tokens - 1 or not running.any():
            break
        if not running.all():
            kept = running.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            rows, tokens, mask, next_position = rows[kept], tokens[kept], mask[kept], next_position[kept]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = forward(tokens[:, None], mask, next_position[:, None], cache)
        next_position = next_position + 1
    return out


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def _forward_with(model) -> Callable[..., torch.Tensor]:
    """model(input_ids, mask, positions, cache) -> the last position's logits; the cache grows by input_ids."""
    # transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``; the gpu extra pins an older 5.x.
    cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return partial(_forward, model, cache_keyword)


def _forward(model, cache_keyword: str, input_ids, mask, positions, cache) -> torch.Tensor:
    with _attention_kernels(input_ids.device):
        output = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_keyword: cache},
        )
    return output.logits[:, -1]


# Measured on an H200 (README, "GPU check"): cuDNN's attention, which torch picks first there, builds a plan for
# every new shape, and a decode step's keys are one longer every step: 85 ms a step at lengths not seen before
# against 28 ms with flash or memory-efficient attention (24.7 and 30.6 once cuDNN has seen them all).
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attention_kernels(device: torch.device):
    """The attention kernels a decode step may use on ``device``: all but cuDNN's on a GPU."""
    if device.type != "cuda":
        return nullcontext()
    return sdpa_kernel(DECODE_ATTENTION, set_priority=True)


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer's keys and values in buffers sized for prompt and answer: a step writes one
    position, where transformers' DynamicLayer concatenates, copying the whole cache every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty((rows, heads, self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((rows, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        return self._views()

    def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer = _select_rows(self.key_buffer, indices, self.length)
        self.value_buffer = _select_rows(self.value_buffer, indices, self.length)
        self._views()


def _select_rows(buffer: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    """``buffer[indices]``, copying only the positions written so far."""
    selected = buffer.new_empty((len(indices), *buffer.shape[1:]))
    torch.index_select(buffer[:, :, :length], 0, indices, out=selected[:, :, :length])
    return selected


def _preallocated_cache(model, capacity: int) -> DynamicCache:
    """transformers' cache for this model, its plain full-attention layers preallocated (sliding-window and
    other special layers are kept as transformers makes them)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class ElasticLayer(PreallocatedLayer):
    """A preallocated layer whose rows can be merged with another's and whose buffers grow when full:
    the running batch of a serving engine, where rows join and leave between steps."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.is_initialized and self.length + key_states.shape[-2] > self.capacity:
            self._grow(max(self.length + key_states.shape[-2], 2 * self.capacity))
        return super().update(key_states, value_states, *args, **kwargs)

    def _grow(self, capacity: int) -> None:
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity
        self._views()

    def join(self, other: ElasticLayer, width: int) -> None:
        """This layer's rows, then ``other``'s, both right-aligned to ``width`` columns (zeros on the left:
        masked, but finite, since a masked value still multiplies a zero attention weight)."""
        capacity = max(self.capacity, other.capacity, width)
        for name in ("key_buffer", "value_buffer"):
            mine, theirs = getattr(self, name), getattr(other, name)
            merged = mine.new_empty((mine.shape[0] + theirs.shape[0], mine.shape[1], capacity, mine.shape[3]))
            for rows, source, length in (
                (slice(0, mine.shape[0]), mine, self.length),
                (slice(mine.shape[0], None), theirs, other.length),
            ):
                merged[rows, :, : width - length] = 0
                merged[rows, :, width - length : width] = source[:, :, :length]
            setattr(self, name, merged)
        self.capacity, self.length = capacity, width
        self._views()

    def take(self, rows: torch.Tensor) -> ElasticLayer:
        """A new layer holding only these rows (copied)."""
        layer = ElasticLayer(self.capacity)
        layer.device, layer.is_initialized, layer.length = self.device, True, self.length
        layer.key_buffer = _select_rows(self.key_buffer, rows, self.length)
        layer.value_buffer = _select_rows(self.value_buffer, rows, self.length)
        layer._views()
        return layer

    def drop_left(self, columns: int) -> None:
        """Forget the first ``columns`` positions (no row uses them any more): a view, nothing is copied."""
        self.key_buffer = self.key_buffer[:, :, columns:]
        self.value_buffer = self.value_buffer[:, :, columns:]
        self.capacity -= columns
        self.length -= columns
        self._views()


class RunningBatch:
    """Rows that decode together one token per step, joining and leaving between steps (continuous batching).

    A group of new prompts is prefilled on its own (a long prompt in chunks, with ``extend``) and then
    merged into the running batch with ``join``; a row leaves with ``keep`` the step it ends, and the
    positions no remaining row uses are dropped. Rows are left-padded: each row's tokens fill the last
    columns of the cache and ``mask`` marks them; positions are per row, so padding changes nothing.
    ``logits`` are each row's scores for its next token."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self._forward = _forward_with(model)
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.logits = None

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @classmethod
    @torch.inference_mode()
    def prefill(cls, model, pad_id: int, prompts: list[list[int]], headroom: int = 64) -> RunningBatch:
        batch = cls(model, pad_id)
        input_ids, mask = _left_padded(prompts, pad_id, model.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        batch.cache = elastic_cache(model, input_ids.shape[1] + headroom)
        batch.logits = batch._forward(input_ids, mask, positions, batch.cache)
        if batch.cache.get_seq_length() != input_ids.shape[1]:
            raise RuntimeError(f"{type(model).__name__}.forward did not fill the KV cache it was given")
        batch.mask, batch.positions = mask, positions[:, -1] + 1
        return batch

    @torch.inference_mode()
    def extend(self, ids: list[int]) -> None:
        """More prompt tokens for a batch of one row: a long prompt prefilled a chunk at a time."""
        if len(self) != 1:
            raise ValueError("extend() takes the next chunk of one prompt")
        device = self.mask.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((1, len(ids)))], dim=1)
        positions = self.positions[:, None] + torch.arange(len(ids), device=device)
        self.logits = self._forward(torch.tensor([ids], device=device), self.mask, positions, self.cache)
        self.positions = self.positions + len(ids)

    def repeat(self, counts: list[int]) -> None:
        """Row i becomes ``counts[i]`` rows: the samples of one prompt share its prefill."""
        if any(count != 1 for count in counts):
            self._select(torch.arange(len(counts)).repeat_interleave(torch.tensor(counts)).to(self.mask.device))

    def join(self, other: RunningBatch) -> None:
        """``other``'s rows come after this batch's."""
        if not len(self):
            self.cache, self.mask, self.positions, self.logits = other.cache, other.mask, other.positions, other.logits
            return
        width = max(self.columns, other.columns)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.join(theirs, width)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])

    def keep(self, rows: list[int]) -> None:
        """Only these rows (indices, in order) go on; positions no row uses any more are dropped."""
        if len(rows) == len(self):
            return
        if not rows:
            self.cache, self.mask, self.positions, self.logits = None, None, None, None
            return
        self._select(torch.tensor(rows, device=self.mask.device))
        self._drop_unused_columns()

    def split(self, rows: list[int]) -> RunningBatch:
        """These rows (indices, in order) leave into a batch of their own, returned; the others stay. A long row
        in a batch of short ones makes every row attend over its width: alone, it costs only itself."""
        index = torch.tensor(rows, device=self.mask.device)
        other = RunningBatch(self.model, self.pad_id)
        other.cache = DynamicCache(config=self.model.config)
        other.cache.layers = [layer.take(index) for layer in self.cache.layers]
        other.mask, other.positions, other.logits = self.mask[index], self.positions[index], self.logits[index]
        other._drop_unused_columns()
        leaving = set(rows)
        self.keep([i for i in range(len(self)) if i not in leaving])
        return other

    def _drop_unused_columns(self) -> None:
        unused = int(self.mask.any(dim=0).long().argmax())  # the first column some row still uses
        if unused:
            for layer in self.cache.layers:
                layer.drop_left(unused)
            self.mask = self.mask[:, unused:]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> None:
        """Each row takes its chosen token; ``logits`` become the next step's."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.logits = self._forward(tokens[:, None], self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1

    def _select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.positions, self.logits = self.mask[rows], self.positions[rows], self.logits[rows]


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask], dim=1)


def elastic_cache(model, capacity: int) -> DynamicCache:
    """A cache whose rows can join and leave; only models whose layers all use full attention have one."""
    cache = DynamicCache(config=model.config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise NotImplementedError(
            f"continuous batching needs full-attention layers; this model's cache has {', '.join(kinds)}: "
            "serve it with serve.engine='proxy' in front of vLLM"
        )
    cache.layers = [ElasticLayer(capacity) for _ in cache.layers]
    return cache
