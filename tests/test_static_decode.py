"""The static decoder's per-setting record buffers are bounded: decoding under more
sampling settings than ``MAX_SETTINGS`` drops the least recently used set and its graph,
and a setting decoded again after its eviction gives the same rows as before."""

import pytest
import torch
from gen_fixtures import PROMPT, TOOLS, tiny_model_dir

from distill.backends import Sampling
from distill.backends import static_decode as sd
from distill.backends.hf import HFBackend

torch.set_num_threads(1)
CONVS = [PROMPT, [{"role": "user", "content": "the quick brown fox"}], [{"role": "user", "content": "0123"}]]  # fmt: skip
TOOLS_OF = [TOOLS, None, None]
SETTINGS = [  # four distinct (temperature, top_p, top_k, sampler_logprobs, topk_logprobs)
    Sampling(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=1, sampler_logprobs=True),
    Sampling(temperature=0.7, top_k=5, max_new_tokens=12, seed=2, sampler_logprobs=True),
    Sampling(temperature=1.0, max_new_tokens=12, seed=3, sampler_logprobs=True, topk_logprobs=2),
    Sampling(temperature=0.0, max_new_tokens=12, sampler_logprobs=True),
]


class _EagerGraph:
    """A CUDA graph's stand-in on CPU: replay runs the captured step on the buffers it
    was captured with, as a real graph writes to the addresses it captured."""

    def __init__(self, step):
        self.replay = step


def _rows(backend: HFBackend, s: Sampling) -> list:
    out = backend.complete(CONVS, TOOLS_OF, s, n=2)
    return [(c.token_ids, c.logprobs, c.kept, c.topk) for r in out for c in r]


def _same(a: list, b: list) -> None:
    assert [r[0] for r in a] == [r[0] for r in b]  # tokens
    for (_, lp, kept, topk), (_, lp2, kept2, topk2) in zip(a, b, strict=True):
        assert lp == pytest.approx(lp2, abs=1e-6) and kept == kept2 and topk == topk2


def test_record_buffers_are_bounded_and_eviction_changes_no_row(tmp_path):
    # on the CPU wherever it runs: _EagerGraph stands in for the GPU's graphs
    backend = HFBackend(tiny_model_dir(tmp_path), batch_size=4, static=True, device="cpu")
    dec = backend.static

    def capture(buf, layers, rest, key, rec):
        graph = _EagerGraph(lambda: dec._step(buf, layers, rest, key, rec))
        buf.graphs[key] = graph
        graph.replay()
        return graph

    dec.use_graphs, dec._capture = True, capture  # steps 2.. replay "graphs", as on a GPU
    first, seen = [], []
    for s in SETTINGS + SETTINGS[:2]:  # the first two again, after both were evicted
        first.append(_rows(backend, s))
        (buf,) = dec.shapes.values()
        seen.append(len(buf.records))
        assert set(buf.graphs) <= set(buf.records)
    assert max(seen) == sd.MAX_SETTINGS == 2
    keys = [(s.temperature, s.top_p, s.top_k, s.sampler_logprobs, s.topk_logprobs)
            for s in SETTINGS[:2]]  # fmt: skip
    assert list(buf.records) == keys == list(buf.graphs)  # the most recent two, in use order
    # an evicted setting is decoded exactly as before: a stale graph left behind would
    # write its log-probs into the dropped buffers, leaving the new ones zero
    _same(first[4], first[0])
    _same(first[5], first[1])
    # and every setting as a decoder that never evicted gives it
    for s, rows in zip(SETTINGS, first, strict=False):
        fresh = HFBackend(backend.name, batch_size=4, static=True, device="cpu")
        _same(_rows(fresh, s), rows)
        fresh.close()
    backend.close()
