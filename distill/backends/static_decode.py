"""GPU decoding for the ``hf`` backend: a static KV cache and a CUDA-graphed decode step.

Everything a decode step needs stays on the device with fixed shapes (the batch padded to
``batch_size``, the cache length and the attention mask bucketed), so ``torch.compile``
with ``mode="reduce-overhead"`` captures the step once and replays it; sampling runs on
the device too, and the host checks for finished rows only every few steps.
"""

from __future__ import annotations

import torch

from distill.backends.sample import draw, kept_width

CHECK_EVERY = 16  # steps between host syncs to see whether every row has finished
MAX_CACHES = 4  # static caches kept, one per (batch, length) shape


def _bucket(n: int, size: int) -> int:
    return -(-n // size) * size


class StaticDecoder:
    """Decodes batches of rows (``hf._Row``) in place with a reusable static cache."""

    def __init__(
        self,
        model,
        *,
        pad_id: int,
        eos_ids: list[int],
        compile: bool = True,
        cache_kw: str = "cache",
    ):
        self.model = model
        self.cache_kw = cache_kw  # "past_key_values" before transformers 5.2x
        self.pad_id = pad_id
        self.eos = torch.tensor(eos_ids, device=model.device)
        self.step_fn = (
            torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
            if compile
            else model.forward
        )
        self.caches: dict[tuple[int, int], object] = {}

    def _cache(self, batch: int, length: int):
        from transformers import StaticCache

        key = (batch, length)
        if key in self.caches:
            cache = self.caches.pop(key)
            cache.reset()
        else:
            # a captured graph keeps its cache's addresses: reuse caches, keep a few shapes
            while len(self.caches) >= MAX_CACHES:
                self.caches.pop(next(iter(self.caches)))
            cache = StaticCache(config=self.model.config, max_cache_len=length)
        self.caches[key] = cache  # most recently used last
        return cache

    @torch.inference_mode()
    def decode(self, rows: list, sampling, batch: int) -> None:
        dev = self.model.device
        steps = max(r.limit for r in rows)
        width = _bucket(max(len(r.prompt) for r in rows), 64)
        total = _bucket(width + steps, 256)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, total), dtype=torch.long)
        for b in range(batch):
            prompt = rows[b].prompt if b < len(rows) else [self.pad_id]  # filler rows
            ids[b, width - len(prompt) :] = torch.tensor(prompt)
            mask[b, width - len(prompt) :] = 1  # future slots: the causal mask hides them
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        seeds = torch.tensor([r.seed for r in rows] + [0] * (batch - len(rows)), device=dev)
        limits = torch.tensor([r.limit for r in rows] + [1] * (batch - len(rows)), device=dev)
        cache = self._cache(batch, total)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            logits_to_keep=1,
            **{self.cache_kw: cache},
        )
        logits = out.logits[:, -1].float()
        tokens = torch.full((batch, steps), self.pad_id, dtype=torch.long, device=dev)
        k = sampling.topk_logprobs
        top_i = torch.zeros((batch, steps, max(k, 1)), dtype=torch.long, device=dev)
        top_v = torch.zeros((batch, steps, max(k, 1)), device=dev)
        chosen = torch.zeros((batch, steps), device=dev)
        record = sampling.sampler_logprobs
        kw = kept_width(
            logits.shape[-1], sampling.temperature, sampling.top_p, sampling.top_k, record
        )
        lps = torch.zeros((batch, steps if record else 0), device=dev)
        kept = torch.full((batch, steps if record else 0, kw), -1, dtype=torch.int32, device=dev)
        finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        next_pos = pos[:, -1:] + 1
        for step in range(steps):
            nxt, lp, kp = draw(logits, seeds, step, sampling.temperature, sampling.top_p,
                               sampling.top_k, record)  # fmt: skip
            tokens[:, step] = nxt
            if lp is not None:
                lps[:, step] = lp
            if kp is not None:
                kept[:, step] = kp.to(torch.int32)
            if k:
                lp = logits.log_softmax(-1)
                top_v[:, step], top_i[:, step] = lp.topk(k, dim=-1)
                chosen[:, step] = lp.gather(-1, nxt[:, None])[:, 0]
            finished |= torch.isin(nxt, self.eos) | (step + 1 >= limits)
            if step + 1 == steps or (
                step % CHECK_EVERY == CHECK_EVERY - 1 and bool(finished.all())
            ):
                break
            out = self.step_fn(
                input_ids=nxt[:, None].clone(), attention_mask=mask, position_ids=next_pos.clone(),
                logits_to_keep=1, **{self.cache_kw: cache},
            )  # fmt: skip
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        self._unpack(rows, tokens.cpu(), top_i.cpu(), top_v.cpu(), chosen.cpu(), k)
        if record:
            _unpack_record(rows, lps.cpu(), kept.cpu() if kw else None)

    def _unpack(self, rows, tokens, top_i, top_v, chosen, k: int) -> None:
        eos = set(self.eos.tolist())
        for b, r in enumerate(rows):
            seq = tokens[b, : r.limit].tolist()
            end = next((t + 1 for t, tok in enumerate(seq) if tok in eos), None)
            r.tokens = seq[: end or r.limit]
            r.ended = end is not None
            if k:
                r.topk = [
                    {
                        "ids": top_i[b, t].tolist(),
                        "logprobs": top_v[b, t].tolist(),
                        "token": seq[t],
                        "logprob": float(chosen[b, t]),
                    }
                    for t in range(len(r.tokens))
                ]


def _unpack_record(rows, lps, kept) -> None:
    """Each row's sampler log-probabilities and kept sets (only as wide as the widest)."""
    if kept is not None:
        kept = kept[:, :, : max(1, int((kept >= 0).sum(-1).max()))]
    for b, r in enumerate(rows):
        n = len(r.tokens)
        r.logprobs = lps[b, :n].tolist()
        if kept is not None:
            r.kept = [[t for t in ids if t >= 0] for ids in kept[b, :n].tolist()]
