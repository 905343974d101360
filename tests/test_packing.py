"""Packing, mixture and the tokenize-once cache."""

import random
from collections import Counter

import numpy as np
import pytest
import torch
from tiny_artifacts import (
    domain_data,
    make_tokenizer,
    math_trace,
    per_trace_loss_sum,
    tensors,
    tiny_model,
    tool_trace,
    write_shards,
)

from distill.errors import UserError
from distill.train.data import collate, mixture_order, pack_rows, tokenize_domain
from distill.train.loss import Objective

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_packed_loss_equals_sum_of_per_trace_losses(tok):
    rng = random.Random(0)
    dd = domain_data(tok, "math", [math_trace(i, rng) for i in range(5)] + [tool_trace()])
    model = tiny_model(tok).eval()
    rows = [
        [("math", 0), ("math", 1), ("math", 5)],
        [("math", 2), ("math", 3), ("math", 4), ("math", 6)],
    ]
    batch = tensors(collate(rows, {"math": dd}, {"math": 0}, {}, tok.pad_token_id))
    assert batch["position_ids"][0, 0] == 0 and (batch["position_ids"] == 0).sum() >= 7  # restarts
    with torch.no_grad():
        packed, _, _ = Objective(model)(n_domains=1, norm=torch.tensor(1.0), **batch)
        want = per_trace_loss_sum(model, dd, range(7))
        assert abs(packed.item() - want) < 1e-5 * max(1.0, want)
        # the same rows with one causal sequence per row (attention crossing traces) differ
        flat = dict(
            batch,
            position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]),
        )
        leaky, _, _ = Objective(model)(n_domains=1, norm=torch.tensor(1.0), **flat)
    assert abs(leaky.item() - want) > 1e-3


def test_pack_rows_fits_every_example_once():
    lengths = [int(x) for x in np.random.default_rng(0).integers(5, 120, size=300)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.9  # dense
    assert pack_rows(lengths, 128, pack=False) == [[i] for i in range(300)]


def test_mixture_by_rows_upsamples_and_is_deterministic():
    lengths = {"a": np.full(10, 50), "b": np.full(100, 50)}
    order = mixture_order(lengths, {"a": 1.0, "b": 1.0}, "rows", seed=0, epoch=0)
    count = Counter(d for d, _ in order)
    assert count == {"a": 55, "b": 55}
    per_example = Counter(i for d, i in order if d == "a")
    assert min(per_example.values()) >= 5  # every example of the small domain repeated
    assert order == mixture_order(lengths, {"a": 1.0, "b": 1.0}, "rows", seed=0, epoch=0)
    assert order != mixture_order(lengths, {"a": 1.0, "b": 1.0}, "rows", seed=1, epoch=0)
    assert order != mixture_order(lengths, {"a": 1.0, "b": 1.0}, "rows", seed=0, epoch=1)


def test_mixture_by_tokens_splits_the_token_budget():
    lengths = {"long": np.full(50, 400), "short": np.full(200, 20)}
    order = mixture_order(lengths, {"long": 1.0, "short": 3.0}, "tokens", seed=0, epoch=0)
    tokens = Counter()
    for d, i in order:
        tokens[d] += int(lengths[d][i])
    share = tokens["short"] / (tokens["short"] + tokens["long"])
    assert abs(share - 0.75) < 0.01
    rows = Counter(d for d, _ in order)
    assert rows["short"] > 10 * rows["long"]


def test_tokenize_cache_is_reused_and_keyed(tok, tmp_path):
    rng = random.Random(0)
    traces = [math_trace(i, rng) for i in range(20)] + [tool_trace()]
    shards = write_shards(tmp_path / "clean", "math", traces)
    cache = tmp_path / "cache"
    a = tokenize_domain("math", shards, tok, 512, cache)
    assert len(a) == 22 and a.dropped == 0  # the tool trace gives two examples
    made = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    b = tokenize_domain("math", shards, tok, 512, cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == made
    assert np.array_equal(a.ids, b.ids)
    short = tokenize_domain("math", shards, tok, 40, cache)
    assert len(list(cache.iterdir())) == 2 and short.dropped > 0
    assert len(short) + short.dropped == 22


def test_kd_teacher_tokens_merged_otherwise_are_aligned_and_never_stop_the_run(tok, tmp_path):
    """A teacher that sampled pieces the student's tokenizer merges (``}`` ``}`` where
    the render has ``}}``; issue #16 item 8): its entries are aligned to the render by
    their text, the merged token gets no KD target; a trace that cannot be aligned at all
    trains without KD. Both are counted; neither raises."""
    from distill.chat.render import render_trace

    trace = [
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "reasoning_content": "The calculator said 84.", "content": "84"},
    ]
    exs = render_trace(tok, trace)
    loss = [t for e in exs for t, m in zip(e.input_ids, e.loss_mask, strict=True) if m]
    pieces = tok.convert_ids_to_tokens(loss)
    k = next(i for i, p in enumerate(pieces) if len(p) > 1 and not p.startswith("<"))
    split = tok.convert_tokens_to_ids(list(pieces[k]))  # the same text, one byte a token
    teacher = loss[:k] + split + loss[k + 1 :]
    entries = [{"ids": [t, 5], "logprobs": [-0.1, -3.0]} for t in teacher]
    unalignable = [{"ids": [1], "logprobs": [-0.1]}] * 3
    shards = write_shards(
        tmp_path / "clean", "math", [trace, tool_trace()], topk=[entries, unalignable]
    )
    dd = tokenize_domain("math", shards, tok, 512, tmp_path / "cache", kd=True)
    assert (dd.kd_realigned, dd.kd_unaligned) == (1, 1)
    first = dd.kd_ids[dd.kd_offsets[0] : dd.kd_offsets[1]]
    assert first[:, 0].tolist() == loss[:k] + [-1] + loss[k + 1 :]
    assert (dd.kd_ids[dd.kd_offsets[1] :] == -1).all()  # the other trace: CE only
    assert len(dd) == 3  # every example still trains


def test_unmaskable_template_error_names_the_trace(tok, tmp_path):
    shards = write_shards(tmp_path / "clean", "agents", [tool_trace()])
    old = tok.chat_template
    tok.chat_template = old.replace(
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}",
        "{%- for m in messages -%}{%- if loop.last -%}!{%- endif -%}{%- if m['role'] == 'assistant' -%}",
    )
    assert tok.chat_template != old
    try:
        with pytest.raises(
            UserError, match=r"clean: trace agents-0: chat template is not prefix-stable"
        ):
            tokenize_domain("agents", shards, tok, 512, tmp_path / "cache")
    finally:
        tok.chat_template = old


def test_short_prompt_share_renders_that_share_without_system_prompt(tmp_path):
    """domains.<d>.short_prompt_share: every other trace (share 0.5) loses its system
    message, and the cache keeps the two renderings apart."""
    from teachers.base import short_prompt_at

    tok = make_tokenizer(tmp_path / "tok")
    shards = write_shards(tmp_path / "agents", "agents", [tool_trace() for _ in range(6)])
    full = tokenize_domain("agents", shards, tok, 512, tmp_path / "cache")
    half = tokenize_domain("agents", shards, tok, 512, tmp_path / "cache", short_share=0.5)
    assert [short_prompt_at(i, 0.5) for i in range(6)] == [False, True] * 3
    assert [short_prompt_at(i, 0.25) for i in range(8)] == [False, False, False, True] * 2
    assert not any(short_prompt_at(i, 0.0) for i in range(8))
    assert all(short_prompt_at(i, 1.0) for i in range(8))
    assert len(full) == len(half) == 6 * 2  # two user turns: two examples per trace
    lf, lh = full.lengths.tolist(), half.lengths.tolist()
    shorter = [i for i in range(len(lf)) if lh[i] < lf[i]]
    assert len(shorter) == 6 and all(lh[i] == lf[i] for i in range(len(lf)) if i not in shorter)
    assert sorted({p.name for p in (tmp_path / "cache").iterdir()}).__len__() == 2


def test_parallel_tokenize_writes_the_single_process_cache(tok, tmp_path, monkeypatch):
    """Many-core hosts tokenize a large domain in spawned processes, by contiguous
    chunks (distill/tokenize.py): the arrays and the short-prompt choice (by a row's
    place in the table) come out as one process makes them."""
    import distill.tokenize as data

    rng = random.Random(0)
    traces = [math_trace(i, rng) for i in range(9)] + [tool_trace() for _ in range(4)]
    shards = write_shards(tmp_path / "clean", "agents", traces)
    monkeypatch.setattr(data, "PARALLEL_MIN_ROWS", 1)
    runs = {}
    for workers in ("1", "3"):
        monkeypatch.setenv("DISTILL_TOKENIZE_WORKERS", workers)
        assert data.tokenize_workers(13) == int(workers)
        runs[workers] = tokenize_domain(
            "agents", shards, tok, 512, tmp_path / f"cache{workers}", short_share=0.5
        )
    one, three = runs["1"], runs["3"]
    assert len(one) == 9 + 4 * 2
    for name in ("ids", "mask", "offsets"):
        assert np.array_equal(getattr(one, name), getattr(three, name)), name


def test_tokenize_workers_by_host_size(monkeypatch):
    import os

    import distill.tokenize as data

    monkeypatch.delenv("DISTILL_TOKENIZE_WORKERS", raising=False)
    for cores, want in ((2, 1), (4, 1), (8, 4), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, c=cores: set(range(c)))
        assert data.tokenize_workers(100_000) == want
        assert data.tokenize_workers(10) == 1  # small domains: one process
    monkeypatch.setenv("DISTILL_TOKENIZE_WORKERS", "four")
    with pytest.raises(UserError, match="DISTILL_TOKENIZE_WORKERS: expected 'auto'"):
        data.tokenize_workers(100_000)
