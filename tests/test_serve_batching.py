"""Continuous batching in `tao serve`'s local engine: rows join and leave the running batch and decode exactly as
alone, each row samples with its own settings and seed, and a long request does not hold short ones."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from tao_pipeline.generation.decoding import RunningBatch, decode
from tao_pipeline.generation.sampling import choose_tokens_per_row, top_p_keep_mask
from tao_pipeline.registry.loading import load_model, load_tokenizer
from tao_pipeline.serving.local import _Detokenizer
from tests.serve_helpers import load, running_server, serve_config


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="float32")
    model.eval()
    return model, load_tokenizer(tiny_model_dir)


def greedy_alone(model, prompt: list[int], tokens: int, pad_id: int) -> list[int]:
    out = decode(
        model,
        [prompt],
        samples=1,
        max_new_tokens=tokens,
        choose=lambda logits: logits.argmax(-1),
        eos_ids=[],
        pad_id=pad_id,
    )
    return out[0].tolist()


def test_rows_that_join_and_leave_decode_as_they_would_alone(tiny):
    """A starts alone; B joins after 5 steps (a longer prompt: the batch is re-padded); C joins later, its long
    prompt read in chunks; A is split off into a batch of its own after 12 steps (as a row that grew long is);
    rows leave at different lengths. Every row's greedy tokens equal its decode alone."""
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    prompts = {
        "A": tokenizer("short one")["input_ids"],
        "B": tokenizer("a much longer prompt than the first, with more words in it")["input_ids"],
        "C": tokenizer(" ".join(["chunked prefill of a long prompt"] * 6))["input_ids"],
    }
    lengths = {"A": 30, "B": 9, "C": 14}
    expected = {name: greedy_alone(model, prompts[name], lengths[name], pad) for name in prompts}

    with torch.inference_mode():
        batch = RunningBatch.prefill(model, pad, [prompts["A"]])
        names, produced = ["A"], {name: [] for name in prompts}
        chunked = alone = None
        for step in range(40):
            if step == 5:
                batch.join(RunningBatch.prefill(model, pad, [prompts["B"]]))
                names.append("B")
            if step in (8, 9, 10):  # C's prompt, a third at a time
                piece = prompts["C"][(step - 8) * 9 : (step - 7) * 9 if step < 10 else None]
                if chunked is None:
                    chunked = RunningBatch.prefill(model, pad, [piece])
                else:
                    chunked.extend(piece)
                if step == 10:
                    batch.join(chunked)
                    names.append("C")
            if step == 12:
                alone, names = batch.split([names.index("A")]), [name for name in names if name != "A"]
            if alone is not None and len(alone):
                token = alone.logits.argmax(-1)
                produced["A"].append(int(token[0]))
                alone.keep([0] if len(produced["A"]) < lengths["A"] else [])
                if len(alone):
                    alone.step(token)
            if not names:
                continue
            tokens = batch.logits.argmax(-1)
            for name, token in zip(names, tokens.tolist(), strict=True):
                produced[name].append(token)
            kept = [i for i, name in enumerate(names) if len(produced[name]) < lengths[name]]
            batch.keep(kept)
            names = [names[i] for i in kept]
            if names:
                batch.step(tokens[kept])
    assert produced == expected


def test_per_row_sampling_keeps_each_rows_nucleus_and_seed(tiny):
    model, _ = tiny
    logits = torch.randn(6, model.config.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    temperatures = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9, 0.5])
    top_ps = torch.tensor([1.0, 0.9, 1.0, 0.5, 0.95, 0.3], dtype=torch.float64)

    def draw(seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return choose_tokens_per_row(logits, temperatures=temperatures, top_ps=top_ps, generators=generators)

    tokens = draw([1, 2, 3, 4, 5, 6])
    assert tokens[0] == logits[0].argmax()  # temperature 0: greedy
    for row in range(1, 6):
        nucleus = top_p_keep_mask((logits[row : row + 1].float() / temperatures[row]), float(top_ps[row]))[0]
        assert nucleus[tokens[row]], row
    # A row's draw depends on its own seed only: other rows' seeds change nothing for it.
    assert draw([1, 2, 3, 4, 5, 6])[3] == draw([9, 9, 9, 4, 9, 9])[3]
    assert len({int(draw([0, 0, 0, 0, seed, 0])[4]) for seed in range(100)}) > 1  # seeds do change draws


def test_text_grown_token_by_token_is_the_whole_decode(tiny):
    _, tokenizer = tiny
    rng = random.Random(0)
    for _ in range(50):
        tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        text = _Detokenizer(tokenizer)
        for token in tokens:
            text.add(token)
        text.finish()
        assert text.text == tokenizer.decode(tokens, skip_special_tokens=True).lstrip()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    config = serve_config(tmp_path_factory.mktemp("batching"), tiny_model_dir)
    with running_server(load(config, "serve.batch_window_ms=100")) as running:
        yield running


def ask(server, **options):
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    options = {"model": "tao", "messages": [{"role": "user", "content": "Tell me a story."}], **options}
    return client.chat.completions.create(**options)


def test_mixed_sampling_settings_share_a_batch(server):
    before = len(server.engine.step_rows)
    settings = [{"temperature": 0}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.2}, {"top_p": 0.5}] * 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: ask(server, max_tokens=12, **s), settings))
    assert all(answer.choices for answer in answers)
    assert max(list(server.engine.step_rows)[before:]) >= 4  # rows of different settings decoded in one step


def test_a_seed_gives_the_same_answer_alone_and_in_company(server):
    seeded = {"max_tokens": 24, "seed": 1234, "temperature": 1.0, "n": 2}
    alone = [c.message.content for c in ask(server, **seeded).choices]
    assert alone == [c.message.content for c in ask(server, **seeded).choices]
    assert alone[0] != alone[1]  # the two choices of one request draw differently

    def in_company(i: int):
        if i == 2:
            return ask(server, **seeded)
        return ask(server, max_tokens=30, temperature=0.8, messages=[{"role": "user", "content": f"Other {i}"}])

    before = len(server.engine.step_rows)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(in_company, range(5)))
    assert max(list(server.engine.step_rows)[before:]) > 2  # it really was batched with others
    assert [c.message.content for c in answers[2].choices] == alone
    assert [c.message.content for c in ask(server, **{**seeded, "seed": 99}).choices] != alone


def test_a_long_request_does_not_hold_short_ones(server):
    """Short requests sent while a 400-token one decodes join its batch and finish long before it."""
    finished: dict[str, float] = {}
    long_options = {"max_tokens": 400, "seed": 7, "temperature": 1.0, "n": 2}

    def long_one():
        answer = ask(server, **long_options)
        finished["long"] = time.monotonic()
        finished["long_tokens"] = answer.usage.completion_tokens

    thread = threading.Thread(target=long_one)
    thread.start()
    deadline = time.monotonic() + 20
    while server.engine.status()["running_rows"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for i in range(3):
        ask(server, max_tokens=4, messages=[{"role": "user", "content": f"short {i}"}])
    finished["short"] = time.monotonic()
    thread.join()
    assert finished["long_tokens"] >= 600  # it was long indeed
    assert finished["short"] < finished["long"]


def test_a_row_that_grows_long_decodes_apart_and_nobody_waits_on_it(tmp_path, tiny_model_dir):
    """With serve.long_row_tokens=32, a 400-token answer moves to the long lane; short ones still join and end."""
    settings = load(serve_config(tmp_path, tiny_model_dir), "serve.long_row_tokens=32")
    with running_server(settings) as running:
        engine = running.engine
        thread = threading.Thread(target=ask, args=(running,), kwargs={"max_tokens": 400, "seed": 7, "n": 2})
        thread.start()
        deadline = time.monotonic() + 20
        while not any(batch.lane == "long" and batch.rows for batch in engine._batches):
            assert time.monotonic() < deadline, "the long rows never moved to the long lane"
            time.sleep(0.005)
        shorts = [ask(running, max_tokens=4, messages=[{"role": "user", "content": f"s{i}"}]) for i in range(3)]
        assert all(answer.choices[0].finish_reason in ("stop", "length") for answer in shorts)
        thread.join()


@pytest.mark.parametrize(("share", "long_steps"), [(0.25, 3), (0.5, 6), (1.0, 12)])
def test_long_rows_yield_to_short_ones_but_keep_their_share(share, long_steps):
    """Least attained service between the lanes: while short rows decode, long rows take `share` of the steps."""
    from tao_pipeline.serving.local import LocalEngine, _Batch

    engine = LocalEngine(long_rows_share=share)
    short, long = _Batch(None, None, "short", ["row"]), _Batch(None, None, "long", ["row"])
    engine._batches = [short, long]
    stepped = [engine._batches_to_step() for _ in range(12)]
    assert all(short in batches for batches in stepped)
    assert sum(long in batches for batches in stepped) == long_steps
    short.rows = []  # no short row waits: the long lane steps every time
    assert all(long in engine._batches_to_step() for _ in range(5))
