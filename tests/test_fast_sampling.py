"""The fast sampler (generation/sampling.py) and decode loop (generation/decoding.py) against transformers' own.

The nucleus is compared with transformers' TopPLogitsWarper, draws with the distribution transformers samples
from, and the decode loop's logits and greedy answers with the model run without a cache and with generate().
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from tao_pipeline.generation import RESPONSE_COLUMNS, SamplingParams
from tao_pipeline.generation.base import response_id, sampling_json
from tao_pipeline.generation.decoding import decode
from tao_pipeline.generation.sampling import choose_tokens, top_p_keep_mask
from tao_pipeline.generation.transformers_backend import TransformersGenerator
from tests.helpers import three_prompts

PREFILTERS = (16, 64)  # small, so that flat rows overflow both and take the full-sort path


def transformers_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    return TopPLogitsWarper(top_p)(None, scores.clone()) != -float("inf")


def near_boundary(scores: torch.Tensor, top_p: float, within: float = 1e-6) -> torch.Tensor:
    """Rows where, in exact (float64) arithmetic, some token's mass-above lies within ``within`` of top_p: there
    float32 rounding, in transformers as anywhere, decides the boundary."""
    probs = scores.double().softmax(dim=-1).sort(dim=-1, descending=True).values
    mass_above = probs.cumsum(dim=-1) - probs
    return ((mass_above - top_p).abs() < within).any(dim=-1)


def random_rows(generator: torch.Generator) -> torch.Tensor:
    """Flat, medium, and peaked rows over a 1,000-token vocabulary."""
    scales = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]).repeat_interleave(60)
    return torch.randn(len(scales), 1000, generator=generator) * scales[:, None]


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.99])
def test_nucleus_is_transformers_nucleus(top_p):
    scores = random_rows(torch.Generator().manual_seed(1))
    ours, theirs = top_p_keep_mask(scores, top_p, PREFILTERS), transformers_nucleus(scores, top_p)
    sizes = theirs.sum(dim=-1)
    # Every stage is taken: the first prefilter, the second, and the full sort.
    assert (sizes <= 16).any() and ((sizes > 16) & (sizes <= 64)).any() and (sizes > 64).any()
    differ = (ours != theirs).any(dim=-1)
    assert not (differ & ~near_boundary(scores, top_p)).any()
    assert differ.float().mean() < 0.01


def test_nucleus_with_ties():
    generator = torch.Generator().manual_seed(2)
    few_values = torch.randint(0, 6, (300, 200), generator=generator).float()
    flat = torch.zeros(2, 1000)
    for scores, top_p in ((few_values, 0.9), (few_values, 0.6), (flat, 0.9505)):
        ours, theirs = top_p_keep_mask(scores, top_p, PREFILTERS), transformers_nucleus(scores, top_p)
        clear = ~near_boundary(scores, top_p)
        assert clear.float().mean() > 0.9
        # Which of several tied tokens at the boundary is kept follows the sort's order, in transformers as here:
        # the same number of tokens, with the same scores, is kept.
        assert torch.equal(ours.sum(-1)[clear], theirs.sum(-1)[clear])
        kept_scores = [sorted(row[mask].tolist()) for row, mask in zip(scores[clear], ours[clear])]
        assert kept_scores == [sorted(row[mask].tolist()) for row, mask in zip(scores[clear], theirs[clear])]
    assert top_p_keep_mask(flat, 0.9505, PREFILTERS).sum(-1).tolist() == [951, 951]


def test_peaked_row_keeps_only_the_top_token():
    scores = torch.zeros(1, 500)
    scores[0, 123] = 40.0
    assert top_p_keep_mask(scores, 0.95, PREFILTERS).nonzero()[:, 1].tolist() == [123]
    draws = choose_tokens(scores.repeat(50, 1), greedy=False, temperature=0.8, top_p=0.95, generator=None)
    assert (draws == 123).all()


# The nucleus has 7 tokens: it overflows (4,) into the full sort, (4, 8) into the second prefilter; (64,) holds it.
@pytest.mark.parametrize("prefilters", [(4,), (4, 8), (64,)])
def test_draws_follow_transformers_distribution(prefilters):
    logits = torch.tensor([[3.0, 2.5, 2.2, 2.0, 1.0, 0.9, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0]])
    temperature, top_p = 0.8, 0.95
    reference = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits)).softmax(-1)[0]
    generator = torch.Generator().manual_seed(3)
    draws = torch.cat(
        [
            choose_tokens(
                logits.repeat(20_000, 1),
                greedy=False,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                prefilters=prefilters,
            )
            for _ in range(10)
        ]
    )
    counts = torch.bincount(draws, minlength=logits.shape[-1]).double()
    kept = reference > 0
    assert 1 < int(kept.sum()) < logits.shape[-1]
    assert counts[~kept].sum() == 0  # nothing outside the nucleus is ever drawn
    expected = reference[kept].double() / reference[kept].double().sum() * counts.sum()
    assert chisquare(counts[kept].numpy(), expected.numpy()).pvalue > 1e-3


def test_top_p_one_samples_the_whole_vocabulary():
    logits = torch.zeros(40_000, 5)
    draws = choose_tokens(logits, greedy=False, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(4))
    counts = torch.bincount(draws, minlength=5).numpy()
    assert chisquare(counts).pvalue > 1e-3


def test_greedy_is_argmax():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(5))
    chosen = choose_tokens(logits, greedy=True, temperature=0.8, top_p=0.95, generator=None)
    assert torch.equal(chosen, logits.argmax(-1))


# The decode loop on the tiny random llama.


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2)


@pytest.fixture(scope="module")
def encoded(generator):
    from tao_pipeline.generation.base import encode_chat_prompts

    return encode_chat_prompts(generator.tokenizer, three_prompts(), 512)  # three different lengths: padding


def sampler(seed: int):
    return partial(
        choose_tokens, greedy=False, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed)
    )


def test_each_step_sees_the_logits_of_the_uncached_model(generator, encoded):
    """Prefix sharing, rows leaving the batch, padding and positions leave each row's logits the model's own."""
    model = generator.model
    first = decode(model, encoded, samples=3, max_new_tokens=8, choose=sampler(6), eos_ids=set(), pad_id=0)
    # A token drawn mid-answer: with the same seed, the first row to draw it draws it again, and leaves early.
    stop = torch.mode(first[:, 1:6].flatten()).values.item()
    seen, draw = [], sampler(6)

    def recording(logits):
        seen.append(logits.clone())
        return draw(logits)

    out = decode(model, encoded, samples=3, max_new_tokens=8, choose=recording, eos_ids={stop}, pad_id=0)
    lengths = [row.index(stop) + 1 if stop in row else len(row) for row in out.tolist()]
    assert min(lengths) < 8 and max(lengths) > min(lengths)
    for row, length in enumerate(lengths):
        prompt = encoded[row // 3]
        with torch.inference_mode():
            expected = model(torch.tensor([prompt + out[row, :length].tolist()])).logits[0, len(prompt) - 1 :]
        # A row leaves the batch right after it ends, and the others keep their order.
        places = [sum(1 for other in range(row) if lengths[other] > step) for step in range(length)]
        got = torch.stack([seen[step][place] for step, place in enumerate(places)])
        torch.testing.assert_close(got, expected[:length], atol=1e-4, rtol=1e-4)


def test_rows_stop_at_eos_and_the_others_do_not_change(generator, encoded):
    greedy = partial(choose_tokens, greedy=True, temperature=1.0, top_p=1.0, generator=None)
    run = partial(decode, generator.model, encoded, samples=2, max_new_tokens=10, choose=greedy, pad_id=0)
    free = run(eos_ids=set())
    stop = free[0, 3].item()  # the token the first prompt's answer has at step 3
    stopped = run(eos_ids={stop})
    for row in range(free.shape[0]):
        tokens = free[row].tolist()
        cut = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert stopped[row].tolist() == tokens[:cut] + [0] * (len(tokens) - cut)
    assert stopped[0, 4:].eq(0).all() and (stopped != 0).sum() < (free != 0).sum()
    assert torch.equal(free[0::2], free[1::2])  # greedy samples of one prompt are the same


def test_greedy_is_transformers_greedy(generator, encoded):
    model, tokenizer = generator.model, generator.tokenizer
    greedy = partial(choose_tokens, greedy=True, temperature=1.0, top_p=1.0, generator=None)
    ours = decode(model, encoded, samples=1, max_new_tokens=12, choose=greedy, eos_ids=generator.eos_ids, pad_id=0)
    for row, ids in enumerate(encoded):
        theirs = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, len(ids) :].tolist()
        stop = next((i + 1 for i, t in enumerate(theirs) if t in generator.eos_ids), len(theirs))
        assert ours[row, :stop].tolist() == theirs[:stop]


def test_generator_table_ids_and_seeds(generator):
    prompts = three_prompts()
    params = SamplingParams(4, 6, temperature=0.8, top_p=0.95, seed=21)
    frame = generator.generate(prompts, params, progress=False)
    assert list(frame.columns) == RESPONSE_COLUMNS
    assert len(frame) == 12
    assert frame["prompt_id"].tolist() == [p for p in ["p-a", "p-b", "p-c"] for _ in range(4)]
    assert frame["sample_index"].tolist() == [0, 1, 2, 3] * 3
    assert frame["response_id"].tolist() == [
        response_id(p, "tiny-v0", sampling_json(params), i) for p, i in zip(frame["prompt_id"], frame["sample_index"])
    ]
    assert json.loads(frame["sampling"].iloc[0]) == params.describe()
    assert frame["completion_tokens"].between(1, 6).all()
    assert (frame.loc[frame["finish_reason"] == "length", "completion_tokens"] == 6).all()
    again = generator.generate(prompts, params, progress=False)
    assert frame["response"].tolist() == again["response"].tolist()
    other = generator.generate(prompts, SamplingParams(4, 6, temperature=0.8, top_p=0.95, seed=22), progress=False)
    assert frame["response"].tolist() != other["response"].tolist()
    assert np.isin(frame["finish_reason"], ["stop", "length"]).all()


def test_both_decoders_give_the_same_greedy_table(tiny_model_dir, generator):
    """generation.decoder='generate' (transformers' generate()) is the fallback: the same rows, greedy alike."""
    fallback = TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2, decoder="generate")
    params = SamplingParams(1, 8, greedy=True)
    ours, theirs = generator.generate(three_prompts(), params, False), fallback.generate(three_prompts(), params, False)
    pd.testing.assert_frame_equal(ours, theirs)
    sampled = fallback.generate(three_prompts(), SamplingParams(3, 6, temperature=0.8, top_p=0.95), progress=False)
    assert len(sampled) == 9 and list(sampled.columns) == RESPONSE_COLUMNS
    with pytest.raises(ValueError, match="generation.decoder"):
        TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", decoder="beam")


def test_a_pass_with_fewer_samples_decodes_more_prompts_together(tiny_model_dir, monkeypatch):
    """batch_rows: a greedy pass over 3 prompts is one call of 3 rows, not 2 calls; sampling keeps batch_size."""
    import tao_pipeline.generation.transformers_backend as backend

    calls = []

    def counting(model, prompts, **kwargs):
        calls.append((len(prompts), kwargs["samples"]))
        return decode(model, prompts, **kwargs)

    monkeypatch.setattr(backend, "decode", counting)
    generator = TransformersGenerator(tiny_model_dir, "tiny-v0", dtype="float32", batch_size=2, batch_rows=8)
    generator.generate(three_prompts(), SamplingParams(1, 4, greedy=True), progress=False)
    generator.generate(three_prompts(), SamplingParams(4, 4, temperature=0.8, top_p=0.95), progress=False)
    generator.generate(three_prompts(), SamplingParams(8, 4, temperature=0.8, top_p=0.95), progress=False)
    assert calls == [(3, 1), (2, 4), (1, 4), (2, 8), (1, 8)]


def test_decode_steps_on_a_gpu_leave_out_cudnn_attention():
    """cuDNN's attention builds a plan per new key length, and each decode step is a new length (README, "GPU
    check": 85 ms a step against 28 on an H200); on a CPU the kernels torch picks are left alone."""
    from tao_pipeline.generation.decoding import _attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _attention_kernels(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with _attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
