"""GPU decoding for the ``hf`` backend: static KV buffers and one decode step (forward,
sampling, bookkeeping) captured as a CUDA graph and replayed.

Everything a step needs sits in fixed buffers on the device (the batch padded to
``batch_size``, the KV length bucketed), so the step is captured once per shape and
sampling setting and then replayed: no Python, no launches, no host syncs inside; the
host looks at the finished flags every ``CHECK_EVERY`` steps. The forward is
:mod:`distill.backends.llama_decode` (the live parameters, packed-GQA attention), its two
per-layer halves and the sampler compiled by ``torch.compile`` (one compiled function
serves every layer); the sampler's counter-based noise over the vocabulary then costs one
fused pass instead of a dozen [rows, vocab] int64 tensors.

A DSA student (``distill.dsa``) decodes here too: its layers also cache the indexer's keys,
score every cached key for the new token, and gather the top-k keys' K and V rows, so a
step reads those rows and the index keys instead of the whole KV cache. Its caches can be
8-bit (``llama_decode.INDEX_FP8``, ``KV_INT8``, or the model config's ``cache_8bit``).

The graph holds the parameters' addresses: an in-place optimizer step is decoded by the
next replay; parameters replaced by new tensors are noticed and the graphs recaptured.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from distill.backends import llama_decode as L
from distill.backends.sample import draw, kept_width
from distill.dsa import decode_kernel

log = logging.getLogger(__name__)

CHECK_EVERY = 16  # steps between host syncs to see whether every row has finished
MAX_SHAPES = 2  # (batch, length) buffer sets kept; each holds a KV cache and its graphs
MAX_SETTINGS = 2  # sampling settings a shape keeps record buffers (and a graph) for: each
# set is [batch, length] floats, plus [batch, length, kept width] ints when kept sets are
# recorded; two let a caller alternate between two settings without reallocating them
PREFILL_TOKENS = 16384  # prompt tokens per prefill chunk: bounds its activations (the MLP's
# [rows, width, 4.9k] of a 0.5B model at 512 rows x 256 columns would be 1.3 GB each)


def _tail(error: Exception) -> str:
    """An error's message for a warning: a compile worker's traceback names the cause at
    its end."""
    msg = str(error)
    return msg if len(msg) < 2000 else f"{msg[:400]} [...] {msg[-1600:]}"


def _bucket(n: int, size: int) -> int:
    return -(-n // size) * size


def _copy(cache, dim: int, col, x) -> None:
    """``cache.index_copy_(dim, col, x)``, fp8 caches as bytes (index_copy_ has no fp8
    kernel, torch 2.11-2.13)."""
    if cache.dtype == L.FP8:
        cache, x = cache.view(torch.uint8), x.view(torch.uint8)
    cache.index_copy_(dim, col, x)


class _Buffers:
    """The state of one (batch, length) shape, at fixed addresses."""

    def __init__(self, model, batch: int, length: int):
        dev, dt = model.device, model.model.embed_tokens.weight.dtype
        d = L.dims(model)
        # 8-bit caches where the module says so or the model's config does (a DSA student's
        # cache_8bit, distill.dsa.config)
        cfg8 = bool(getattr(model.config, "cache_8bit", False))
        index_fp8, kv_int8 = L.INDEX_FP8 or cfg8, L.KV_INT8 or cfg8

        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=dev)

        # a DSA layer's cached index keys, where the buffer holds more keys than it reads
        # (at most top_k keys: every one is read, and the indexer has nothing to choose)
        self.ki = [
            z(batch, length, a.indexer.head_dim, dtype=L.FP8 if index_fp8 else dt)
            if hasattr(a, "indexer") and length > a.top_k
            else None
            for a in (layer.self_attn for layer in model.model.layers)
        ]
        # their scales, where they are fp8 (llama_decode.quantize_fp8)
        self.ks = [
            z(batch, length, dtype=torch.float32) if ki is not None and index_fp8 else None
            for ki in self.ki
        ]
        # K and V, in int8 with a scale a row where a DSA layer reads only its top-k rows
        # (llama_decode.KV_INT8)
        int8 = [ki is not None and kv_int8 for ki in self.ki]
        kv = (batch, d.kv_heads, length, d.head_dim)
        self.k = [z(*kv, dtype=torch.int8 if f else dt) for f in int8]
        self.v = [z(*kv, dtype=torch.int8 if f else dt) for f in int8]
        # their scales, K's and V's side by side (one sector for the attention kernel)
        self.kv_scale = [z(*kv[:3], 2, dtype=torch.float32) if f else None for f in int8]
        self.cos, self.sin = L.rope_tables(model, length, dev, dt)
        self.valid = z(batch, length, dtype=torch.bool)  # KV columns a row attends to
        self.tok = z(batch)  # the last sampled token: the next step's input
        self.pos0 = z(batch, 1)  # position of a row's first generated token
        self.width = z(1)  # prompt columns (left-padded)
        self.step = z(1)  # the token being sampled
        self.seeds, self.limits = z(batch), z(batch)
        self.finished = z(batch, dtype=torch.bool)
        self.tokens = z(batch, length)
        self.vocab_ids = torch.arange(model.lm_head.weight.shape[0], device=dev)  # see draw()
        self.records: dict[tuple, dict] = {}  # per sampling setting: what draw records
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # keys: some of records' keys

    def record_buffers(self, key: tuple, vocab: int) -> dict:
        """What :func:`draw` records under sampling setting ``key``, at fixed addresses.
        Beyond ``MAX_SETTINGS`` the least recently used setting is dropped, and its graph
        with it: a captured graph writes into the buffers it was captured with."""
        if key in self.records:
            self.records[key] = self.records.pop(key)  # most recently used last
            return self.records[key]
        while len(self.records) >= MAX_SETTINGS:
            old = next(iter(self.records))
            self.graphs.pop(old, None)
            del self.records[old]
        temperature, top_p, top_k, record, top_n = key
        b, n = self.tokens.shape
        kw = kept_width(vocab, temperature, top_p, top_k, record)
        z = self.tokens.new_zeros
        self.records[key] = {
            "logprobs": z((b, n), dtype=torch.float32) if record else None,
            "kept": z((b, n, kw), dtype=torch.int32) if kw else None,
            "top_v": z((b, n, top_n), dtype=torch.float32) if top_n else None,
            "top_i": z((b, n, top_n)) if top_n else None,
            "chosen": z((b, n), dtype=torch.float32) if top_n else None,
        }
        return self.records[key]


def head(x, norm_w, eps, lm_w, lm_b, seeds, step, vocab_ids, temperature, top_p, top_k, record,
         top_n):  # fmt: skip
    """Final norm, logits and :func:`draw`; with ``top_n`` also the top-n log-probabilities
    of the raw logits and the sampled token's."""
    logits = F.linear(L.rms_norm(x, norm_w, eps), lm_w, lm_b)
    tok, lp, kept = draw(logits, seeds, step, temperature, top_p, top_k, record, vocab_ids)
    if not top_n:
        return tok, lp, kept, None, None, None
    lsm = logits.float().log_softmax(-1)
    top_v, top_i = lsm.topk(top_n, dim=-1)
    return tok, lp, kept, top_v, top_i, lsm.gather(-1, tok[:, None])[:, 0]


class StaticDecoder:
    """Decodes batches of rows (``hf._Row``) in place with reusable static buffers."""

    def __init__(self, model, *, pad_id: int, eos_ids: list[int], compile: bool = True,
                 graphs: bool | None = None):  # fmt: skip
        if not L.supported(model):
            raise ValueError(f"static decoding supports {L.FAMILY} models with full attention")
        self.model = model
        self.pad_id = pad_id
        self.eos = torch.tensor(eos_ids, device=model.device)
        self.use_graphs = model.device.type == "cuda" if graphs is None else graphs
        wrap = (
            (lambda f: torch.compile(f, dynamic=False, fullgraph=True))
            if compile
            else (lambda f: f)
        )
        self.attn_in, self.attn_out, self.head = wrap(L.attn_in), wrap(L.attn_out), wrap(head)
        self.index_in, self.select = wrap(L.index_in), wrap(L.select_step)  # DSA layers'
        self.attn_in_int8, self.index_in_fp8 = wrap(L.attn_in_int8), wrap(L.index_in_fp8)
        self.select_keys, self.sparse_attn_out = wrap(L.select_keys), wrap(L.sparse_attn_out)
        self.shapes: dict[tuple[int, int], _Buffers] = {}
        self._addresses: tuple = ()

    def _params(self) -> tuple[list[L.Layer], tuple]:
        """The live parameters, read now; graphs captured on others are dropped."""
        m = self.model
        layers = L.layers(m)
        rest = (m.model.embed_tokens.weight.detach(), m.model.norm.weight.detach(),
                m.model.norm.variance_epsilon, m.lm_head.weight.detach(),
                None if m.lm_head.bias is None else m.lm_head.bias.detach())  # fmt: skip
        every = (a for lw in layers for a in (*lw.attn_in, *lw.attn_out, *(lw.index or ())))
        addresses = tuple(t.data_ptr() for t in (*rest, *every) if isinstance(t, torch.Tensor))
        addresses += tuple(lw.top_k for lw in layers)  # a DSA warm-up's dense flag captured
        if addresses != self._addresses:
            for buf in self.shapes.values():
                buf.graphs.clear()
            self._addresses = addresses
        return layers, rest

    def _buffers(self, batch: int, length: int) -> _Buffers:
        key = (batch, length)
        if key in self.shapes:
            self.shapes[key] = self.shapes.pop(key)  # most recently used last
        else:
            while len(self.shapes) >= MAX_SHAPES:
                self.shapes.pop(next(iter(self.shapes)))
            self.shapes[key] = _Buffers(self.model, batch, length)
        return self.shapes[key]

    def release(self) -> None:
        """Drop every KV cache and CUDA graph (the RL trainer frees them for its update;
        the next decode allocates and captures again, at the cost of one capture)."""
        self.shapes.clear()

    def decode(self, rows: list, sampling, batch: int) -> None:
        """Decode ``rows`` (at most ``batch``) in place; call under inference mode."""
        steps = max(r.limit for r in rows)
        width = _bucket(max(len(r.prompt) for r in rows), 64)
        buf = self._buffers(batch, _bucket(width + steps, 256))
        layers, rest = self._params()
        key = (sampling.temperature, sampling.top_p, sampling.top_k, sampling.sampler_logprobs,
               sampling.topk_logprobs)  # fmt: skip
        rec = buf.record_buffers(key, rest[3].shape[0])
        x = self._prefill(buf, rows, batch, width, layers)
        self._eager(self._sample, buf, x, rest, key, rec)  # step 0, from the prompt
        graph = buf.graphs.get(key)
        for step in range(1, steps):
            if step % CHECK_EVERY == 0 and bool(buf.finished.all()):
                break
            if graph is not None:
                graph.replay()
            elif self.use_graphs and step >= 2:  # step 1 ran eagerly: compiled and warm
                graph = self._capture(buf, layers, rest, key, rec)
            else:
                self._eager(self._step, buf, layers, rest, key, rec)
        self._unpack(rows, buf, rec, steps)

    def _eager(self, fn, *args) -> None:
        """Run a step eagerly. If it fails with the DSA decode kernels on (a GPU or shape
        their launch or their compile does not fit), say why and go on with the torch
        step, compiled (the compiled torch step beat the kernels run uncompiled: 1.73x
        against 1.33x dense on one H100, 2026-12-07, one run each); if compiling fails, say
        why and go on uncompiled. A failed step is safe to redo: what it wrote before
        failing, it writes again."""
        try:
            fn(*args)
            return
        except Exception as e:
            error = e
        kernels = decode_kernel.DECODE_FUSED or decode_kernel.DECODE_ATTENTION
        if kernels and fn == self._step and any(ki is not None for ki in args[0].ki):
            log.warning("the DSA decode kernels failed, decoding with the torch step: %s",
                        _tail(error))  # fmt: skip
            decode_kernel.DECODE_FUSED = decode_kernel.DECODE_ATTENTION = False  # process
            try:
                fn(*args)  # compiled anew without them, or failing, uncompiled below
                return
            except Exception as e:
                error = e
        if self.head is head:
            raise error
        log.warning("torch.compile failed, decoding uncompiled: %s", _tail(error))
        self.attn_in, self.attn_out, self.head = L.attn_in, L.attn_out, head
        self.index_in, self.select = L.index_in, L.select_step
        self.select_keys, self.sparse_attn_out = L.select_keys, L.sparse_attn_out
        self.attn_in_int8, self.index_in_fp8 = L.attn_in_int8, L.index_in_fp8
        fn(*args)

    def _capture(self, buf, layers, rest, key, rec):
        """Capture one step as a CUDA graph (capturing runs nothing: replay it once)."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                self._step(buf, layers, rest, key, rec)
        except RuntimeError as e:  # decode on, eagerly, and say why
            log.warning("CUDA graph capture failed, decoding without graphs: %s", e)
            self.use_graphs = False
            self._step(buf, layers, rest, key, rec)
            return None
        buf.graphs[key] = graph
        graph.replay()
        return graph

    def _prefill(self, buf: _Buffers, rows: list, batch: int, width: int, layers) -> torch.Tensor:
        """Fill the KV buffers with the left-padded prompts; the last position's hidden state."""
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((batch, width), dtype=torch.bool)
        pos0 = torch.zeros((batch, 1), dtype=torch.long)
        for b in range(batch):
            prompt = rows[b].prompt if b < len(rows) else [self.pad_id]  # filler rows
            ids[b, width - len(prompt) :] = torch.tensor(prompt)
            valid[b, width - len(prompt) :] = True
            pos0[b] = len(prompt)
        dev = buf.tokens.device
        buf.valid.zero_()
        buf.valid[:, :width] = valid.to(dev)
        buf.pos0.copy_(pos0)
        buf.width.fill_(width)
        buf.step.zero_()
        buf.finished.zero_()
        seeds = [r.seed for r in rows] + [0] * (batch - len(rows))
        buf.seeds.copy_(torch.tensor(seeds))
        buf.limits.copy_(torch.tensor([r.limit for r in rows] + [1] * (batch - len(rows))))
        causal = torch.ones((width, width), dtype=torch.bool, device=dev).tril()
        # a padding query attends to itself: no row without a key (NaN K/V in the buffers)
        eye = torch.eye(width, dtype=torch.bool, device=dev)
        ids = ids.to(dev)
        step = max(1, PREFILL_TOKENS // width)
        last = []
        for a in range(0, batch, step):  # rows in chunks: the same values, bounded memory
            rs = slice(a, a + step)
            valid = buf.valid[rs, :width]
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
            x = F.embedding(ids[rs], self.model.model.embed_tokens.weight)
            cos, sin = buf.cos[pos], buf.sin[pos]
            mask = ((causal & valid[:, None, :]) | eye)[:, None]
            for i, lw in enumerate(layers):
                q, k, v = L.attn_in(x, cos, sin, *lw.attn_in)
                if buf.kv_scale[i] is None:
                    buf.k[i][rs, :, :width] = k
                    buf.v[i][rs, :, :width] = v
                else:  # the prompt's own attention below reads them unrounded
                    sc = buf.kv_scale[i][rs, :, :width]
                    buf.k[i][rs, :, :width], sc[..., 0] = L.quantize_int8(k)
                    buf.v[i][rs, :, :width], sc[..., 1] = L.quantize_int8(v)
                m = mask
                if lw.top_k and buf.ki[i] is not None:  # DSA: each query's top-k keys
                    qi, ki, w = L.index_in(x, cos, sin, *lw.index)
                    if buf.ks[i] is None:
                        buf.ki[i][rs, :width] = ki
                    else:
                        buf.ki[i][rs, :width], buf.ks[i][rs, :width] = L.quantize_fp8(ki)
                    if width > lw.top_k:
                        m = L.select_prefill(qi, ki, w, mask, lw.top_k)
                x = L.attn_out(x, q, k, v, m, *lw.attn_out)
            last.append(x[:, -1])
        return torch.cat(last)  # [batch, H], contiguous: one compiled head serves both

    def _step(self, buf: _Buffers, layers, rest, key, rec) -> None:
        """Forward the last sampled token of every row, then sample the next (the graph)."""
        col = buf.width + buf.step - 1
        pos = buf.pos0 + (buf.step - 1)
        x = F.embedding(buf.tok[:, None], rest[0])
        cos, sin = buf.cos[pos], buf.sin[pos]
        buf.valid.index_fill_(1, col, True)
        mask = buf.valid[:, None, None, :]
        for i, lw in enumerate(layers):
            kvs, ks = buf.kv_scale[i], buf.ks[i]
            if kvs is None:
                q, k, v = self.attn_in(x, cos, sin, *lw.attn_in)
            else:  # int8 K and V and their scales, quantized inside the compiled projections
                q, k, v, sc = self.attn_in_int8(x, cos, sin, *lw.attn_in)
                kvs.index_copy_(2, col, sc)
            _copy(buf.k[i], 2, col, k)
            _copy(buf.v[i], 2, col, v)
            if lw.top_k and buf.ki[i] is not None:  # DSA: read the top-k keys' rows only
                if ks is None:
                    qi, ki, w = self.index_in(x, cos, sin, *lw.index)
                else:
                    qi, ki, sc, w = self.index_in_fp8(x, cos, sin, *lw.index)
                    ks.index_copy_(1, col, sc)
                _copy(buf.ki[i], 1, col, ki)
                if decode_kernel.use_attention_kernel(q):  # the selected rows read in place
                    idx, ok = self.select_keys(qi, buf.ki[i], w, buf.valid, lw.top_k, ks)
                    x = self.sparse_attn_out(x, q, buf.k[i], buf.v[i], idx, ok, kvs, *lw.attn_out)
                    continue
                kg, vg, m = self.select(
                    qi, buf.ki[i], w, buf.valid, buf.k[i], buf.v[i], lw.top_k, ks, kvs
                )
                x = self.attn_out(x, q, kg, vg, m, *lw.attn_out)
                continue
            x = self.attn_out(x, q, buf.k[i], buf.v[i], mask, *lw.attn_out)
        self._sample(buf, x[:, -1], rest, key, rec)

    def _sample(self, buf: _Buffers, x, rest, key, rec) -> None:
        """Sample token ``buf.step`` from the hidden states ``x`` and write it down."""
        _, norm_w, eps, lm_w, lm_b = rest
        tok, lp, kept, top_v, top_i, chosen = self.head(
            x, norm_w, eps, lm_w, lm_b, buf.seeds, buf.step, buf.vocab_ids, *key
        )
        s = buf.step
        buf.tokens.index_copy_(1, s, tok[:, None])
        for name, val in (("logprobs", lp), ("kept", kept), ("top_v", top_v), ("top_i", top_i),
                          ("chosen", chosen)):  # fmt: skip
            if val is not None:
                rec[name].index_copy_(1, s, val[:, None].to(rec[name].dtype))
        buf.finished.logical_or_((tok[:, None] == self.eos).any(-1) | (s + 1 >= buf.limits))
        buf.tok.copy_(tok)
        buf.step.add_(1)

    def _unpack(self, rows: list, buf: _Buffers, rec: dict, steps: int) -> None:
        n = len(rows)
        tokens = buf.tokens[:n, :steps].cpu()
        out = {k: v[:n, :steps] for k, v in rec.items() if v is not None}
        if "kept" in out:  # only as wide as the widest kept set
            out["kept"] = out["kept"][:, :, : max(1, int((out["kept"] >= 0).sum(-1).max()))]
        out = {k: v.cpu() for k, v in out.items()}
        kept = out.get("kept")
        eos = set(self.eos.tolist())
        for b, r in enumerate(rows):
            seq = tokens[b, : r.limit].tolist()
            end = next((t + 1 for t, tok in enumerate(seq) if tok in eos), None)
            r.tokens = seq[: end or r.limit]
            r.ended = end is not None
            m = len(r.tokens)
            if "logprobs" in out:
                r.logprobs = out["logprobs"][b, :m].tolist()
            if kept is not None:
                r.kept = [[t for t in ids if t >= 0] for ids in kept[b, :m].tolist()]
            if "top_v" in out:
                r.topk = [
                    {"ids": out["top_i"][b, t].tolist(), "logprobs": out["top_v"][b, t].tolist(),
                     "token": seq[t], "logprob": float(out["chosen"][b, t])}
                    for t in range(m)
                ]  # fmt: skip
