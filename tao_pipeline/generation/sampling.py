"""Next-token choice for the decode loop: greedy, or temperature + exact top-p without sorting the vocabulary.

transformers' ``TopPLogitsWarper`` sorts the whole vocabulary every step and ``torch.multinomial`` then draws
over all of it: on a CPU those two cost more than the model. The nucleus is almost always a few dozen tokens, so
here ``torch.topk`` prefilters find it: when a prefilter's tokens already hold ``top_p`` of the probability
(normalised over the full vocabulary), nothing outside them can be in the nucleus, and the draw is made among
them. A row whose nucleus is larger moves on to a wider prefilter, and in the end to a full sort. Either way the
nucleus is transformers' own: a token is kept when the tokens more probable than it hold less than ``top_p``,
and the most probable token is always kept (``min_tokens_to_keep=1``); which of several tokens tied at the
boundary is kept follows the sort's order, as in transformers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Measured with the embedded model at temperature 0.8, top_p 0.95 (16 demo prompts x 8 samples, 2,517 steps):
# 93% of nuclei fit in 64 tokens, and nearly all of the rest (the largest was 1,211) in 1,024.
PREFILTERS = (64, 1024)


def choose_tokens(
    logits: torch.Tensor,
    *,
    greedy: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    prefilters: tuple[int, ...] = PREFILTERS,
) -> torch.Tensor:
    """One token id per row of ``logits`` (rows x vocabulary)."""
    if greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature  # transformers' TemperatureLogitsWarper, in float32 as generate() does
    if top_p >= 1.0:
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for rows, indices, probs, keep in _nucleus_stages(scores, top_p, prefilters):
        draws = torch.multinomial(probs * keep, 1, generator=generator)
        tokens[rows] = indices.gather(1, draws).squeeze(1)
    return tokens


def top_p_keep_mask(scores: torch.Tensor, top_p: float, prefilters: tuple[int, ...] = PREFILTERS) -> torch.Tensor:
    """The nucleus of each row of ``scores`` as a boolean mask, found as ``choose_tokens`` finds it."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for rows, indices, _, keep in _nucleus_stages(scores, top_p, prefilters):
        kept_rows, kept_columns = keep.nonzero(as_tuple=True)
        mask[rows[kept_rows], indices[kept_rows, kept_columns]] = True
    return mask


def _nucleus_stages(
    scores: torch.Tensor, top_p: float, prefilters: tuple[int, ...]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, their candidate token ids, probabilities, kept) for rows whose nucleus is settled at each stage:
    the prefilters narrowest first, then a full sort for the rest."""
    vocabulary = scores.shape[-1]
    log_total = _log_total(scores)
    pending = torch.arange(scores.shape[0], device=scores.device)
    for width in [w for w in prefilters if w < vocabulary]:
        candidates = scores if len(pending) == len(scores) else scores[pending]
        values, indices = candidates.topk(width, dim=-1)
        probs, keep, held = _nucleus(values, log_total[pending], top_p)
        settled = held >= top_p  # else the first token outside the prefilter is in the nucleus too
        yield pending[settled], indices[settled], probs[settled], keep[settled]
        pending = pending[~settled]
        if not len(pending):
            return
    values, indices = scores[pending].sort(dim=-1, descending=True)
    probs, keep, _ = _nucleus(values, log_total[pending], top_p)
    width = int(keep.sum(dim=-1).max())  # the draw need not look past the widest nucleus
    yield pending, indices[:, :width], probs[:, :width], keep[:, :width]


def _log_total(scores: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(scores))) per row, kept in float64: as a float32 it would be off by up to ~1e-6 in
    probability, enough to move the nucleus boundary where transformers' float32 softmax does not."""
    peak = scores.amax(dim=-1, keepdim=True)
    return peak.double() + (scores - peak).exp_().sum(dim=-1, keepdim=True).double().log()


def _nucleus(
    sorted_values: torch.Tensor, log_total: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities of descending-sorted scores, which of them the nucleus keeps, and what they hold in all.

    transformers removes a token when the ascending cumulative probability up to and including it is
    ``<= 1 - top_p``, that is when the tokens ranked above it hold ``>= top_p``.
    """
    probs = (sorted_values.double() - log_total).exp()
    held = probs.cumsum(dim=-1)
    keep = (held - probs) < top_p
    keep[:, 0] = True
    return probs, keep, held[:, -1]


def choose_tokens_per_row(
    logits: torch.Tensor,
    *,
    temperatures: torch.Tensor,
    top_ps: torch.Tensor,
    generators: list[torch.Generator],
    prefilters: tuple[int, ...] = PREFILTERS,
) -> torch.Tensor:
    """One token id per row of ``logits``, each row with its own temperature (0: greedy), top-p and generator.

    Requests with different sampling settings share one batch (the serving engine's continuous batching),
    and a row's draw uses only its own generator and its own logits, so a seeded request gets the same
    draws whatever it is batched with. The nucleus is the one ``choose_tokens`` keeps."""
    temperatures, top_ps = temperatures.to(logits.device), top_ps.to(logits.device)
    tokens = logits.argmax(dim=-1)
    sampled = (temperatures > 0).nonzero().squeeze(1)
    if not len(sampled):
        return tokens
    scores = logits[sampled].float() / temperatures[sampled, None].float()
    top_p = top_ps[sampled].double()
    whole = top_p >= 1.0
    whole_rows = whole.nonzero().squeeze(1)
    if len(whole_rows):
        for row, probs in zip(whole_rows.tolist(), scores[whole_rows].softmax(dim=-1), strict=True):
            batch_row = int(sampled[row])
            tokens[batch_row] = torch.multinomial(probs, 1, generator=generators[batch_row])[0]
    nucleus_rows = (~whole).nonzero().squeeze(1)
    if len(nucleus_rows):
        stages = _nucleus_stages_per_row(scores[nucleus_rows], top_p[nucleus_rows], prefilters)
        for rows, indices, probs, keep in stages:
            for row, candidates, p, kept in zip(rows.tolist(), indices, probs, keep, strict=True):
                batch_row = int(sampled[nucleus_rows[row]])
                draw = torch.multinomial(p * kept, 1, generator=generators[batch_row])
                tokens[batch_row] = candidates[draw[0]]
    return tokens


def _nucleus_stages_per_row(
    scores: torch.Tensor, top_p: torch.Tensor, prefilters: tuple[int, ...]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``_nucleus_stages`` with one top-p per row (``top_p``: float64, one per row of ``scores``)."""
    vocabulary = scores.shape[-1]
    log_total = _log_total(scores)
    pending = torch.arange(scores.shape[0], device=scores.device)
    for width in [w for w in prefilters if w < vocabulary]:
        values, indices = scores[pending].topk(width, dim=-1)
        probs, keep, held = _nucleus(values, log_total[pending], top_p[pending, None])
        settled = held >= top_p[pending]
        yield pending[settled], indices[settled], probs[settled], keep[settled]
        pending = pending[~settled]
        if not len(pending):
            return
    values, indices = scores[pending].sort(dim=-1, descending=True)
    probs, keep, _ = _nucleus(values, log_total[pending], top_p[pending, None])
    width = int(keep.sum(dim=-1).max())
    yield pending, indices[:, :width], probs[:, :width], keep[:, :width]
