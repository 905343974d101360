"""What the hf backend records for an RL trainer (``Sampling.sampler_logprobs``): the
sampler's own log-probabilities equal a teacher-forced forward scored by
``distill.rl.loss.token_logprobs``, the kept set is the top-k/top-p truncation, a wrapped
live model is decoded with its current weights, and the static (GPU) path records the same."""

import pytest
import torch
from gen_fixtures import PROMPT, TOOLS, tiny_model_dir

from distill.backends import Sampling
from distill.backends.hf import HFBackend
from distill.backends.sample import draw, sample_next
from distill.rl.loss import token_logprobs

torch.set_num_threads(1)
CONVS = [
    PROMPT,
    [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}],
    [{"role": "user", "content": "0123"}],
]
SETTINGS = {
    "nucleus": dict(temperature=1.0, top_p=0.8, topk_logprobs=2),  # both records at once
    "top_k": dict(temperature=0.7, top_k=5),
    "top_k_then_nucleus": dict(temperature=1.3, top_k=12, top_p=0.7),
    "untruncated": dict(temperature=0.9),
    "greedy": dict(temperature=0.0),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def backend(model_dir):
    # fp32 on the CPU wherever the tests run: the contracts below are exact to 1e-5 (the
    # GPU's bf16 path has its own tests at the end)
    b = HFBackend(model_dir, batch_size=2, device="cpu")
    yield b
    b.close()


def _sampling(name: str, **kw) -> Sampling:
    return Sampling(**{"max_new_tokens": 14, "seed": 5, "sampler_logprobs": True,
                       **SETTINGS[name], **kw})  # fmt: skip


def _padded(kept: list[list[int]]) -> torch.Tensor:
    width = max(map(len, kept))
    return torch.tensor([k + [-1] * (width - len(k)) for k in kept])


@pytest.mark.parametrize("name", SETTINGS)
def test_sampler_logprobs_equal_a_teacher_forced_forward(backend, name):
    s = _sampling(name)
    tools = [TOOLS, None, None]
    out = backend.complete(CONVS, tools, s, n=2)
    truncated = s.temperature > 0 and (s.top_p < 1 or s.top_k > 0)
    for c, conv, t in (
        (c, conv, t) for conv, t, row in zip(CONVS, tools, out, strict=True) for c in row
    ):
        assert len(c.token_ids) == c.completion_tokens == len(c.logprobs) > 0
        assert c.prompt_ids == backend.render(conv, t)
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            logits = backend.model(input_ids=ids).logits[0, len(c.prompt_ids) - 1 : -1].float()
        kept = _padded(c.kept) if truncated else None
        assert (c.kept is None) == (not truncated)
        want, _ = token_logprobs(logits, torch.tensor(c.token_ids), s.temperature or 1.0, kept)
        assert torch.allclose(torch.tensor(c.logprobs), want, atol=1e-5, rtol=0)
        if truncated:  # the sampled token is always kept
            assert all(t in k for t, k in zip(c.token_ids, c.kept, strict=True))
            if s.top_k:
                assert max(map(len, c.kept)) <= s.top_k


def _nucleus(z: torch.Tensor, top_p: float, top_k: int) -> set[int]:
    """The kept set computed directly, one token at a time, from softmax(z) in float64."""
    order = sorted(range(len(z)), key=lambda i: -float(z[i]))
    if top_k:
        order = order[:top_k]
    p = torch.softmax(z[order].double(), -1).tolist()
    kept, mass = set(), 0.0
    for i, pi in zip(order, p, strict=True):
        if mass >= top_p:
            break
        kept.add(i)
        mass += pi
    return kept


@pytest.mark.parametrize(("top_p", "top_k"), [(0.8, 0), (0.5, 0), (0.95, 7), (1.0, 20)])
def test_kept_set_is_the_truncation(top_p, top_k):
    torch.manual_seed(0)
    logits = torch.randn(64, 300) * 2
    seeds = torch.arange(64) * 7919
    tok, lp, kept = draw(logits, seeds, 3, 0.8, top_p, top_k, record=True)
    assert torch.equal(tok, sample_next(logits, seeds, 3, 0.8, top_p, top_k))  # record is free
    for b in range(64):
        got = {int(t) for t in kept[b] if t >= 0}
        assert got == _nucleus(logits[b] / 0.8, top_p, top_k)
        assert int(tok[b]) in got
    assert torch.allclose(lp, token_logprobs(logits, tok, 0.8, kept)[0], atol=1e-6)


def test_top_k_samples_the_renormalised_top_k():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(20000, 1)
    seeds = torch.arange(20000)
    got = torch.bincount(sample_next(logits, seeds, 0, 1.0, 1.0, 2), minlength=5).float() / 2e4
    assert got[2:].sum() == 0
    assert torch.allclose(got[:2], logits[0, :2].softmax(-1), atol=0.015)


def test_from_model_decodes_the_live_weights(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model.train()  # a policy mid-training
    live = HFBackend.from_model(model, tok, batch_size=2)
    s = _sampling("nucleus", max_new_tokens=10)

    def ids(b):
        return [c.token_ids for row in b.complete(CONVS, [TOOLS, None, None], s) for c in row]

    before = ids(live)
    assert model.training  # handed back in train mode
    with torch.no_grad():  # an in-place "optimizer step"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = ids(live)
    assert after != before
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    fresh = HFBackend(tmp_path, batch_size=2, device="cpu")  # where `model` is
    assert ids(fresh) == after


@pytest.mark.parametrize("name", ["nucleus", "top_k_then_nucleus", "untruncated", "greedy"])
def test_static_path_records_the_same(backend, name):
    """The GPU path (static cache, fixed shapes) run eagerly on CPU records what the
    dynamic-cache path records."""
    static = HFBackend.from_model(backend.model, backend.tokenizer, batch_size=4, static=True)
    s = _sampling(name)
    convs, tools = CONVS * 2, [TOOLS, None, None] * 2
    a = [c for row in backend.complete(convs, tools, s, n=2) for c in row]
    b = [c for row in static.complete(convs, tools, s, n=2) for c in row]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.kept for c in a] == [c.kept for c in b]
    for x, y in zip(a, b, strict=True):
        assert x.prompt_ids == y.prompt_ids
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_graph_decodes_the_live_weights(model_dir):
    """On the GPU the step is compiled and replayed as a CUDA graph holding the parameters'
    addresses: an in-place update is decoded by the next call, which matches an uncompiled,
    ungraphed decode of the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.backends.static_decode import StaticDecoder

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    tok = AutoTokenizer.from_pretrained(model_dir)
    fast = HFBackend.from_model(model, tok, batch_size=8)
    ref = HFBackend.from_model(model, tok, batch_size=8, static=True)
    ref.static = StaticDecoder(
        model, pad_id=ref.pad_id, eos_ids=ref.eos_ids, compile=False, graphs=False
    )
    s = _sampling("top_k_then_nucleus", max_new_tokens=24)

    def run(b):
        return [c for row in b.complete(CONVS, [TOOLS, None, None], s, n=2) for c in row]

    def same(a, b):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)

    before = run(fast)
    assert any(buf.graphs for buf in fast.static.shapes.values())  # a graph was replayed
    same(before, run(ref))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = run(fast)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    same(after, run(ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"), [(0.8, 1.0, 0), (1.0, 0.9, 0), (0.7, 1.0, 50), (0.0, 1.0, 0)]
)
def test_compiled_sampler_matches_eager_on_gpu(temperature, top_p, top_k):
    """The compiled sampler (one fused pass of counter-based noise) draws what the eager
    one draws, over a real vocabulary."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 151936, device="cuda", generator=g).mul_(3).bfloat16()
    seeds = torch.arange(64, device="cuda") * 1_000_003
    ids = torch.arange(151936, device="cuda")
    step = torch.full((1,), 9, device="cuda")
    args = (temperature, top_p, top_k, True)
    want = draw(logits, seeds, 9, *args)
    got = torch.compile(draw, dynamic=False, fullgraph=True)(logits, seeds, step, *args, ids)
    assert torch.equal(want[0], got[0])
    assert torch.allclose(want[1], got[1], atol=1e-4)
    if want[2] is not None:  # the kept set, where the settings truncate
        assert torch.equal(want[2], got[2])


@pytest.fixture(scope="module")
def dsa_student(model_dir):
    """The tiny model converted to a DSA student reading 4 keys a query (its indexer
    seeded, not trained: a selection that differs from reading every key)."""
    from transformers import AutoModelForCausalLM

    from distill.dsa.model import from_dense

    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    model = from_dense(dense, index_n_heads=2, index_head_dim=8, index_top_k=4, warmup=False)
    return model.eval()


@pytest.mark.parametrize("name", ["nucleus", "greedy"])
def test_dsa_student_static_path_records_what_rl_scores(backend, dsa_student, name):
    """A DSA student through the static path (its index keys cached, each step's top-k
    keys gathered) records the dynamic-cache path's tokens, kept sets and log-probs, and
    those log-probs are what a teacher-forced forward of the student gives (what the RL
    trainer scores)."""
    tok = backend.tokenizer
    dynamic = HFBackend.from_model(dsa_student, tok, batch_size=2, static=False)
    static = HFBackend.from_model(dsa_student, tok, batch_size=4, static=True)
    assert static.static is not None and dynamic.static is None
    s = _sampling(name)
    tools = [TOOLS, None, None]
    a = [c for row in dynamic.complete(CONVS, tools, s, n=2) for c in row]
    b = [c for row in static.complete(CONVS, tools, s, n=2) for c in row]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.kept for c in a] == [c.kept for c in b]
    truncated = s.temperature > 0 and s.top_p < 1
    for x, y in zip(a, b, strict=True):
        assert len(y.prompt_ids) > 4  # more keys than a query reads: selection matters
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)
        ids = torch.tensor([y.prompt_ids + y.token_ids])
        with torch.no_grad():
            logits = dsa_student(input_ids=ids).logits[0, len(y.prompt_ids) - 1 : -1].float()
        kept = _padded(y.kept) if truncated else None
        want, _ = token_logprobs(logits, torch.tensor(y.token_ids), s.temperature or 1.0, kept)
        assert torch.allclose(torch.tensor(y.logprobs), want, atol=1e-5, rtol=0)
