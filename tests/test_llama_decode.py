"""llama_decode's forward against transformers' own (CPU, float64 and float32) on tiny random models
with grouped-query attention (two query heads per KV head, so one-token steps take the
packed-GQA branch): a Qwen2 (q/k/v biases), a Qwen3 (q/k norms, head_dim wider than
hidden / heads) and a Llama with attention and MLP biases. Every parameter is drawn at
random, biases and norm weights included: at their init (zeros, ones) a wrong bias or a
missing norm would go unseen."""

import copy

import pytest
import torch
import torch.nn.functional as F
from old_releases import skip_where_old

from distill.backends import Sampling
from distill.backends import llama_decode as L
from distill.backends.hf import _Row
from distill.backends.static_decode import StaticDecoder

pytestmark = pytest.mark.usefixtures("one_thread")
PAD, EOS, STEPS = 0, 1, 10
PROMPTS = [[5, 17, 3, 40, 22, 9, 61], [8, 2], [33, 70, 12, 4]]  # left-padded to 7


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def model(request):
    return _random_model(request.param)


def _random_model(family: str):
    import transformers as T

    torch.manual_seed(0)
    common = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    cfg, cls = {
        "qwen2": (T.Qwen2Config(**common), T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config(**common, head_dim=16), T.Qwen3ForCausalLM),
        "llama": (T.LlamaConfig(**common, attention_bias=True, mlp_bias=True), T.LlamaForCausalLM),
    }[family]
    m = cls(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    assert L.supported(m)
    d = L.dims(m)
    assert d.heads == 2 * d.kv_heads
    return m


def _logits(model, x):
    return F.linear(L.rms_norm(x, model.model.norm.weight, model.model.norm.variance_epsilon),
                    model.lm_head.weight)  # fmt: skip


def _decode_logits(model, prompts: list[list[int]], fed: torch.Tensor) -> torch.Tensor:
    """Logits [rows, 1 + steps, vocab] from each row's last prompt token on, as
    StaticDecoder computes them: one prefill of the left-padded prompts, then one token
    per row per step (``fed`` [rows, steps]) over a growing KV cache."""
    layers, embed = L.layers(model), model.model.embed_tokens.weight
    n, width = len(prompts), max(map(len, prompts))
    ids = torch.full((n, width), PAD)
    valid = torch.zeros((n, width), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        valid[b, width - len(p) :] = True
    cos, sin = L.rope_tables(model, width + fed.shape[1], "cpu", embed.dtype)
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = ((causal & valid[:, None]) | torch.eye(width, dtype=torch.bool))[:, None]
    x, ks, vs = F.embedding(ids, embed), [], []
    for lw in layers:
        q, k, v = L.attn_in(x, cos[pos], sin[pos], *lw.attn_in)
        x = L.attn_out(x, q, k, v, mask, *lw.attn_out)
        ks.append(k)
        vs.append(v)
    out, pos = [_logits(model, x[:, -1])], pos[:, -1:]
    for tok in fed.T:
        pos, valid = pos + 1, torch.cat([valid, torch.ones((n, 1), dtype=torch.bool)], 1)
        x = F.embedding(tok[:, None], embed)
        for i, lw in enumerate(layers):
            q, k, v = L.attn_in(x, cos[pos], sin[pos], *lw.attn_in)
            ks[i], vs[i] = torch.cat([ks[i], k], 2), torch.cat([vs[i], v], 2)
            x = L.attn_out(x, q, ks[i], vs[i], valid[:, None, None], *lw.attn_out)
        out.append(_logits(model, x[:, -1]))
    return torch.stack(out, 1)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-10), (torch.float32, 5e-5)])
@torch.no_grad()
def test_prefill_and_steps_match_transformers(model, dtype, atol):
    """Each row's logits equal transformers' forward over that row alone, unpadded: to
    rounding in float64 (the two mirror each other op for op), and in float32 to what
    float32 rounding leaves after ten steps of these large random weights (~2e-5)."""
    model = copy.deepcopy(model).to(dtype)
    g = torch.Generator().manual_seed(1)
    fed = torch.randint(2, model.config.vocab_size, (len(PROMPTS), STEPS), generator=g)
    got = _decode_logits(model, PROMPTS, fed)
    for b, p in enumerate(PROMPTS):
        seq = torch.tensor([p + fed[b].tolist()])
        want = model(input_ids=seq).logits[0, len(p) - 1 :]
        assert want.std() > 1  # logits far apart: a wrong term shows
        torch.testing.assert_close(got[b], want, atol=atol, rtol=0)


@torch.inference_mode()
def _generate(model, prompt: list[int]) -> list[int]:
    """transformers' greedy ``generate`` on ``prompt`` alone: the new tokens."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS,
        do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def test_static_decoder_greedy_matches_generate(model):
    """The whole StaticDecoder (uncompiled, no graphs; a filler row in the batch) decodes
    the tokens of transformers' greedy generate on each prompt alone."""
    dec = StaticDecoder(model, pad_id=PAD, eos_ids=[EOS], compile=False, graphs=False)
    rows = [_Row(conv=i, sample=0, prompt=p, seed=0, limit=STEPS) for i, p in enumerate(PROMPTS)]
    with torch.inference_mode():
        dec.decode(rows, Sampling(temperature=0, max_new_tokens=STEPS), batch=4)
        for r in rows:
            assert r.tokens == _generate(model, r.prompt)
    assert sum(len(r.tokens) for r in rows) > STEPS  # not all cut short by the eos


def _random_dsa(top_k: int = 3):
    """A DSA student (distill.dsa) of the same tiny shape, every parameter random (the
    indexer's too); prompts of up to 7 tokens and 10 steps read more keys than ``top_k``."""
    from distill.dsa import register
    from distill.dsa.config import DSAConfig
    from distill.dsa.model import DSAForCausalLM

    register()
    torch.manual_seed(0)
    cfg = DSAConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
        index_n_heads=2, index_head_dim=8, index_top_k=top_k,
    )  # fmt: skip
    m = DSAForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if "norm" in name and "weight" in name else 0.0, 0.3)
    return m


def _greedy(model, length: int = 256) -> list[list[int]]:
    dec = StaticDecoder(model, pad_id=PAD, eos_ids=[EOS], compile=False, graphs=False)
    rows = [_Row(conv=i, sample=0, prompt=p, seed=0, limit=STEPS) for i, p in enumerate(PROMPTS)]
    with torch.inference_mode():
        dec.decode(rows, Sampling(temperature=0, max_new_tokens=STEPS), batch=4)
    return [r.tokens for r in rows]


def test_static_decoder_runs_a_dsa_student_as_generate_does():
    """A DSA student decodes through the static path (its index keys cached, each step's
    top-k keys gathered) to the tokens of transformers' greedy generate on each prompt
    alone; and its selection matters here: with every key read (its layers marked dense)
    the tokens change."""
    model = _random_dsa(top_k=3)
    assert L.supported(model) and all(lw.top_k == 3 for lw in L.layers(model))
    got = _greedy(model)
    assert got == [_generate(model, p) for p in PROMPTS]
    assert sum(map(len, got)) > STEPS
    for a in model.attention_layers():
        a.dense = True
    assert all(lw.top_k == 0 for lw in L.layers(model))
    assert _greedy(model) != got


@torch.no_grad()
def test_dsa_step_reads_the_reference_selection():
    """One step's selection and attention (select_step, then attn_out over the gathered
    rows) equal the reference's attention over the top-k mask, with padding columns and
    ties (an index query of zeros scores every key 0: the later keys win)."""
    from distill.dsa import attention as A

    g = torch.Generator().manual_seed(3)
    b, hkv, s, d, hi, di = 2, 2, 9, 8, 2, 4
    q, k, v = (torch.randn(b, n, t, d, generator=g, dtype=torch.float64)
               for n, t in ((4, 1), (hkv, s), (hkv, s)))  # fmt: skip
    ki = torch.randn(b, s, di, generator=g, dtype=torch.float64)
    w = torch.randn(b, 1, hi, generator=g, dtype=torch.float64)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :3] = False  # row 0 left-padded
    for qi in (torch.randn(b, 1, hi, di, generator=g, dtype=torch.float64),
               torch.zeros(b, 1, hi, di, dtype=torch.float64)):  # fmt: skip
        kg, vg, m = L.select_step(qi, ki, w, valid, k, v, 4)
        rep = 2
        got = F.scaled_dot_product_attention(
            q.reshape(b, hkv, rep, d), kg, vg, attn_mask=m, scale=0.3
        ).reshape(b, 4, 1, d)
        mask = A.select(A.index_scores(qi, ki, w), valid[:, None], 4)
        assert int(mask.sum()) == 2 * 4
        want = A.attend(q, k, v, mask, 0.3)
        torch.testing.assert_close(got, want)
    assert mask[:, 0, -4:].all()  # the ties: the four latest keys


def test_fp8_index_keys_round_within_e4m3_and_select_as_their_values():
    """quantize_fp8 of index keys: each key within e4m3's rounding of its largest magnitude (a
    zero key stays zero), a positive scale a key; the selection over fp8 keys and their
    scales picks the keys the same selection picks over their dequantized values."""
    g = torch.Generator().manual_seed(5)
    ki = torch.randn(2, 40, 8, generator=g) * torch.logspace(-3, 3, 40)[None, :, None]
    ki[0, 7] = 0.0
    k8, scale = L.quantize_fp8(ki)
    assert k8.dtype == L.FP8 and scale.shape == (2, 40) and bool((scale > 0).all())
    back = k8.float() * scale[..., None]
    err = (back - ki).abs().amax(-1) / ki.abs().amax(-1).clamp_min(1e-30)
    assert float(err.max()) <= 2**-4  # 3 mantissa bits: within half a step of 1/8
    assert float(back[0, 7].abs().sum()) == 0.0
    qi = torch.randn(2, 1, 3, 8, generator=g, dtype=torch.float64)
    w = torch.randn(2, 1, 3, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, :5] = False
    idx, ok = L.select_keys(qi, k8, w, valid, 6, scale)
    want_idx, want_ok = L.select_keys(qi, back.double(), w, valid, 6)
    assert torch.equal(ok, want_ok) and torch.equal(idx[ok], want_idx[want_ok])
    # without their scales the keys' order changes (they span six decades): what is tested
    assert not torch.equal(L.select_keys(qi, k8, w, valid, 6)[0], want_idx)


@pytest.mark.parametrize("compiled", [False, True])
def test_static_decoder_goes_on_without_failing_decode_kernels(compiled, monkeypatch, caplog):
    """Where the DSA decode kernels fail (here: on the CPU, where they cannot launch, and
    compiled, where the step cannot trace them), the static decoder says so, turns them
    off and decodes with the torch step, still compiled where it was: the tokens of the
    decoder without them."""
    from distill.backends import static_decode
    from distill.dsa import decode_kernel

    model = _random_dsa(top_k=3)
    want = _greedy(model)
    monkeypatch.setattr(decode_kernel, "DECODE_FUSED", True)
    monkeypatch.setattr(decode_kernel, "DECODE_ATTENTION", True)
    monkeypatch.setattr(decode_kernel, "use_decode_kernel", lambda x: decode_kernel.DECODE_FUSED)
    monkeypatch.setattr(
        decode_kernel, "use_attention_kernel", lambda q: decode_kernel.DECODE_ATTENTION
    )
    dec = StaticDecoder(model, pad_id=PAD, eos_ids=[EOS], compile=compiled, graphs=False)
    rows = [_Row(conv=i, sample=0, prompt=p, seed=0, limit=STEPS) for i, p in enumerate(PROMPTS)]
    with caplog.at_level("WARNING"), torch.inference_mode():
        dec.decode(rows, Sampling(temperature=0, max_new_tokens=STEPS), batch=4)
    assert [r.tokens for r in rows] == want
    assert "decode kernels failed" in caplog.text
    assert not decode_kernel.DECODE_FUSED and not decode_kernel.DECODE_ATTENTION
    assert (dec.head is not static_decode.head) == compiled  # compiled: not dropped


def _decoded(model):
    dec = StaticDecoder(model, pad_id=PAD, eos_ids=[EOS], compile=False, graphs=False)
    rows = [_Row(conv=i, sample=0, prompt=p, seed=0, limit=STEPS) for i, p in enumerate(PROMPTS)]
    with torch.inference_mode():
        dec.decode(rows, Sampling(temperature=0, max_new_tokens=STEPS), batch=4)
    (buf,) = dec.shapes.values()
    return [r.tokens for r in rows], buf


def test_static_decoder_caches_fp8_index_keys(monkeypatch):
    """With ``INDEX_FP8`` the static decoder caches a DSA student's index keys in fp8 with
    their scales, prompt and steps alike: the prompt's and the first step's keys are the
    dtype run's within e4m3's rounding (later steps may read other keys: other tokens)."""
    model = _random_dsa(top_k=3)
    tokens, plain = _decoded(model)
    monkeypatch.setattr(L, "INDEX_FP8", True)
    tokens8, buf = _decoded(model)
    assert [t[:1] for t in tokens8] == [t[:1] for t in tokens]  # from the prompt alone
    assert all(len(t) > 1 for t in tokens8)
    width = int(buf.width) + 1  # the prompt's columns and the first step's
    for ki, k8, ks in zip(plain.ki, buf.ki, buf.ks, strict=True):
        assert k8.dtype == L.FP8 and ks is not None and ki.dtype == torch.float32
        back = k8[:, :width].float() * ks[:, :width, None]
        tol = ki[:, :width].abs().amax(-1, keepdim=True) / 16
        assert bool(((back - ki[:, :width]).abs() <= tol).all())
        assert bool((ks[:, :width] > 0).all())


@torch.no_grad()
def test_dsa_step_reads_int8_kv_as_their_dequantized_rows():
    """With int8 caches and their scales (``quantize_int8`` of K and V rows), one step's
    gathered rows are the dequantized caches' rows, and each entry is within half a step
    (its row's largest magnitude over 254) of the unrounded one."""
    g = torch.Generator().manual_seed(4)
    b, hkv, s, d, hi, di = 2, 2, 30, 8, 2, 4
    k, v = (torch.randn(b, hkv, s, d, generator=g) * torch.logspace(-2, 2, s)[:, None]
            for _ in range(2))  # fmt: skip
    qi = torch.randn(b, 1, hi, di, generator=g)
    ki = torch.randn(b, s, di, generator=g)
    w = torch.randn(b, 1, hi, generator=g)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :4] = False
    (k8, ks), (v8, vs) = L.quantize_int8(k), L.quantize_int8(v)
    assert k8.dtype == torch.int8 and ks.shape == (b, hkv, s)
    kb, vb = L.dequantize_rows(k8, ks, torch.float32), L.dequantize_rows(v8, vs, torch.float32)
    for x, x8, back in ((k, k8, kb), (v, v8, vb)):
        assert bool(((back - x).abs() <= x.abs().amax(-1, keepdim=True) / 250).all())
        assert bool((x8.abs().amax(-1) == 127).all())  # each row's largest entry at 127
    kg, vg, m = L.select_step(qi, ki, w, valid, k8, v8, 5, None, torch.stack((ks, vs), -1))
    want_k, want_v, want_m = L.select_step(qi, ki, w, valid, kb, vb, 5)
    assert kg.dtype == torch.float32 and torch.equal(m, want_m)
    assert torch.equal(kg, want_k) and torch.equal(vg, want_v)


def test_static_decoder_caches_int8_kv(monkeypatch):
    """With ``KV_INT8`` a DSA layer's K and V buffers are int8 with a scale a row (a dense
    layer's, no longer than top-k, stay in the model's dtype), prompt and steps alike:
    within half a step of the plain run's (the prompt's columns, and the first step's in
    the first layer: later layers' inputs have read rounded K and V); the first token,
    from the prompt's unrounded attention, is the plain run's."""
    model = _random_dsa(top_k=3)
    tokens, plain = _decoded(model)
    monkeypatch.setattr(L, "KV_INT8", True)
    tokens8, buf = _decoded(model)
    assert [t[:1] for t in tokens8] == [t[:1] for t in tokens]
    assert all(len(t) > 1 for t in tokens8)
    for j, (want, got) in enumerate(((plain.k, buf.k), (plain.v, buf.v))):
        for li, (x, x8, kvs) in enumerate(zip(want, got, buf.kv_scale, strict=True)):
            assert x8.dtype == torch.int8 and x.dtype == torch.float32
            width = int(buf.width) + (li == 0)
            sc = kvs[..., j]
            back = L.dequantize_rows(x8[:, :, :width], sc[:, :, :width], torch.float32)
            tol = x[:, :, :width].abs().amax(-1, keepdim=True) / 250
            assert bool(((back - x[:, :, :width]).abs() <= tol).all())
    short = StaticDecoder(model, pad_id=PAD, eos_ids=[EOS], compile=False, graphs=False)
    dense = short._buffers(4, 3)  # no longer than top-k: every key read, none int8
    for k, s in zip(dense.k, dense.kv_scale, strict=True):
        assert k.dtype == torch.float32 and s is None


def test_dsa_config_cache_8bit_turns_both_8bit_caches_on(monkeypatch, tmp_path):
    """A DSA student whose config says ``cache_8bit`` (saved and loaded back) decodes from
    fp8 index keys and int8 K and V (the module flags off): the tokens of the decode with
    both flags on."""
    model = _random_dsa(top_k=3)
    monkeypatch.setattr(L, "INDEX_FP8", True)
    monkeypatch.setattr(L, "KV_INT8", True)
    want, _ = _decoded(model)
    monkeypatch.setattr(L, "INDEX_FP8", False)
    monkeypatch.setattr(L, "KV_INT8", False)
    model.config.cache_8bit = True
    model.save_pretrained(tmp_path)  # the key a served model's config.json carries
    model = type(model).from_pretrained(tmp_path)
    assert model.config.cache_8bit is True
    got, buf = _decoded(model)
    assert got == want
    assert all(t.dtype == L.FP8 for t in buf.ki)
    assert all(t.dtype == torch.int8 for t in (*buf.k, *buf.v))
    assert all(t is not None for t in (*buf.ks, *buf.kv_scale))


INTERPRETED_DECODE = """
import sys
sys.path.insert(0, {tests!r})
from test_llama_decode import _greedy, _random_dsa
from distill.dsa import decode_kernel as D
D.DECODE_LAUNCH = {{"CS": 64}}  # several chunks a row
D.ATTENTION_LAUNCH = {{"BN": 16, "programs": 64}}
model = _random_dsa(top_k=3)
plain = _greedy(model)
D.use_decode_kernel = lambda x: True  # the kernels on the CPU, under the interpreter
assert _greedy(model) == plain
D.use_attention_kernel = lambda q: True  # and the attention over the rows in place
assert _greedy(model) == plain
from distill.backends import llama_decode as L
L.INDEX_FP8 = True  # fp8 index keys: the scores kernel applies their scales as torch does
fp8 = _greedy(model)
D.use_decode_kernel = D.use_attention_kernel = lambda x: False
assert _greedy(model) == fp8
L.KV_INT8 = True  # and int8 K and V: the attention kernel applies their scales
kv8 = _greedy(model)
D.use_decode_kernel = D.use_attention_kernel = lambda x: True
assert _greedy(model) == kv8
print("ok")
"""


def test_dsa_decode_selection_kernel_decodes_the_same_tokens_interpreted(tmp_path):
    """The static decoder's DSA step with its selection in one Triton kernel
    (``decode_kernel.DECODE_FUSED``, a registered op), and then its attention too
    (``DECODE_ATTENTION``), decodes the tokens it decodes with ``torch.topk`` and SDPA,
    with index keys in fp8 too, and K and V in int8 as well (``KV_INT8``): on the CPU under
    TRITON_INTERPRET=1, in a fresh process (the interpreter is chosen when the kernels
    are defined)."""
    import os
    import subprocess
    import sys

    from distill.dsa import select_kernel

    if not select_kernel.HAVE_TRITON:
        pytest.skip("triton is not installed")
    script = tmp_path / "decode.py"
    script.write_text(INTERPRETED_DECODE.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    skip_where_old(proc.stderr)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "kernels",
    ["", "select", "select+attention", "select+attention+fp8", "kv8", "select+attention+fp8+kv8"],
)
def test_dsa_student_decodes_compiled_and_graphed_on_gpu(kernels, monkeypatch):
    """On the GPU a DSA student's step (indexer, top-k, gathered keys) is compiled and
    captured as a CUDA graph: its greedy tokens equal the uncompiled, ungraphed decode's
    and transformers' generate; with the selection in Triton kernels
    (``decode_kernel.DECODE_FUSED``, registered ops inside the compiled step) too, and the
    attention over the selected rows in place (``DECODE_ATTENTION``); with the index keys
    cached in fp8 (``INDEX_FP8``) and K and V in int8 (``KV_INT8``), the uncompiled 8-bit
    decode's (``generate`` keeps its caches in the model's dtype)."""
    from distill.backends import static_decode
    from distill.dsa import decode_kernel

    if kernels and not decode_kernel.HAVE_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(decode_kernel, "DECODE_FUSED", "select" in kernels)
    monkeypatch.setattr(decode_kernel, "DECODE_ATTENTION", "attention" in kernels)
    monkeypatch.setattr(L, "INDEX_FP8", "fp8" in kernels)
    monkeypatch.setattr(L, "KV_INT8", "kv8" in kernels)
    model = _random_dsa(top_k=3).cuda()
    dec = StaticDecoder(model, pad_id=PAD, eos_ids=[EOS])
    rows = [_Row(conv=i, sample=0, prompt=p, seed=0, limit=STEPS) for i, p in enumerate(PROMPTS)]
    with torch.inference_mode():
        dec.decode(rows, Sampling(temperature=0, max_new_tokens=STEPS), batch=4)
    assert dec.head is not static_decode.head  # compiled: no fallback to eager
    # the kernels kept: no fallback to the torch step either
    assert decode_kernel.DECODE_FUSED == ("select" in kernels)
    assert decode_kernel.DECODE_ATTENTION == ("attention" in kernels)
    assert any(buf.graphs for buf in dec.shapes.values())
    got = [r.tokens for r in rows]
    assert got == _greedy(model)
    if "fp8" not in kernels and "kv8" not in kernels:
        assert got == [_generate(model, p) for p in PROMPTS]
