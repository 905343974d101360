"""The ``hf`` backend: a local transformers causal LM and its chat template.

Prompts are rendered with the model's chat template (thinking retention applied), sorted
by length and decoded in left-padded batches with a KV cache. Finished rows are dropped
from the batch on CPU, where compute scales with the rows left; sampling is counter-based
(:mod:`distill.backends.sample`) so a row's output depends only on its seed.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.backends import Completion, Sampling, mix_seed
from distill.backends.sample import draw
from distill.chat.parse import parse_assistant
from distill.chat.render_python import render_spans
from distill.chat.template import ASSISTANT, CHAT_TEMPLATE
from distill.errors import UserError
from distill.messages import drop_old_reasoning, to_openai

log = logging.getLogger(__name__)

SMALL_MODEL = 20_000_000  # parameters under which CPU decoding uses one thread


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes its KV cache by: ``cache`` (recent transformers,
    5.25 here) or ``past_key_values`` (5.17, the device image's). The other name is not an
    error there: it slips through ``**kwargs`` to the attention layers while the model
    builds a fresh empty cache for itself, so positions restart at 0 and a dense layer
    attends to the new token alone."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class _Row:
    conv: int
    sample: int
    prompt: list[int]
    seed: int
    limit: int  # new tokens allowed (max_new_tokens, bounded by the model's context)
    tokens: list[int] = field(default_factory=list)
    topk: list[dict] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # with sampling.sampler_logprobs
    kept: list[list[int]] = field(default_factory=list)  # likewise, when truncated
    ended: bool = False  # eos or a stop string


def _revision(model_dir: Path) -> str:
    """A short content id of the model directory (config + weight file names and sizes)."""
    h = hashlib.sha256()
    for p in sorted(model_dir.glob("*")):
        if p.suffix in (".json", ".safetensors", ".bin"):
            h.update(p.name.encode())
            h.update(p.read_bytes() if p.suffix == ".json" else str(p.stat().st_size).encode())
    return h.hexdigest()[:12]


class HFBackend:
    """Batched sampling from a transformers model directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 64,
        device: str | None = None,
        static: bool | None = None,
    ):
        """``static``: decode with a static cache and CUDA graphs (default: on GPU)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from distill.dsa import register

        register()  # a DSA student's model type (distill/dsa/)
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise UserError(f"{d}: not a model directory (no config.json)")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(d)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(dev).eval()
        except (OSError, ValueError) as e:
            raise UserError(
                f"{d}: cannot load model or tokenizer ({str(e).splitlines()[0]})"
            ) from None
        self._setup(
            model,
            tokenizer,
            name=str(d),
            revision=_revision(d),
            batch_size=batch_size,
            static=static,
        )

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer,
        *,
        batch_size: int = 64,
        static: bool | None = None,
        name: str = "policy",
    ) -> HFBackend:
        """Wrap a live model and its tokenizer, copying nothing: every decode reads the
        current parameters, so after an (in-place) optimizer step the next call samples
        from the new weights. A model in train mode is decoded in eval mode and handed
        back in train mode. Pass the model itself, not a DDP or FSDP wrapper: the static
        path reads whole parameters."""
        self = cls.__new__(cls)
        self._setup(
            model, tokenizer, name=name, revision=None, batch_size=batch_size, static=static
        )
        return self

    def _setup(
        self,
        model,
        tokenizer,
        *,
        name: str,
        revision: str | None,
        batch_size: int,
        static: bool | None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        if not tokenizer.chat_template:
            raise UserError(f"{name}: tokenizer has no chat template")
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # a small model's matmuls gain nothing from threads, and spinning threads
            # collapse on a busy machine; big models keep torch's default
            if sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
                torch.set_num_threads(1)
        self.name = name
        self.revision = revision
        self.batch_size = batch_size
        self.eos_ids = self._eos_ids()
        self.eos_text = [tokenizer.convert_ids_to_tokens(i) for i in self.eos_ids]
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self._cache_kw = cache_kwarg(model)
        self.static = None
        if static if static is not None else self.device.type == "cuda":
            from distill.backends.llama_decode import supported
            from distill.backends.static_decode import StaticDecoder

            # on GPU a step costs the same for 1 row or 256: keep shapes fixed and graph it
            if supported(model):
                self.static = StaticDecoder(
                    model,
                    pad_id=self.pad_id,
                    eos_ids=self.eos_ids,
                    compile=self.device.type == "cuda",
                )
            else:
                log.warning("%s: %s is decoded with a dynamic cache (no static path for it)",
                            name, type(model).__name__)  # fmt: skip

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        for src in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        end = self.tokenizer.convert_tokens_to_ids("<|end|>")
        if isinstance(end, int) and end != self.tokenizer.unk_token_id:
            ids.add(end)
        if not ids:
            raise UserError(f"{self.name}: model has no eos token")
        return sorted(ids)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt token ids of a conversation, ending with the generation prompt."""
        return self.render_many([messages], [tools])[0]

    def render_many(
        self, conversations: list[list[dict]], tools: list[list[dict] | None] | None = None
    ) -> list[list[int]]:
        """:meth:`render` of many conversations. With our template the texts are rendered
        in Python and tokenized in one batched call, which the Rust tokenizer spreads over
        the cores. Tokenizing is most of a render's time: 0.23 ms of 0.24 for a difficulty-3
        agents episode's ~1,200 characters on a 2-core CPU (load 0.3, one run), 0.14 ms
        batched there, and an agents rollout renders its whole conversation every turn."""
        tools = tools or [None] * len(conversations)
        out: list[list[int] | None] = [None] * len(conversations)
        texts: dict[int, str] = {}
        ours = self.tokenizer.chat_template == CHAT_TEMPLATE
        for i, (messages, t) in enumerate(zip(conversations, tools, strict=True)):
            msgs = to_openai(drop_old_reasoning(messages))
            if ours and (fast := render_spans(msgs, t or None)):
                # our template without Jinja (distill/chat/render_python.py)
                texts[i] = fast[0] + ASSISTANT
                continue
            ids = self.tokenizer.apply_chat_template(
                msgs, tools=t or None, add_generation_prompt=True, tokenize=True,
                return_dict=False,
            )  # fmt: skip
            out[i] = list(ids)
        if texts:
            enc = self.tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]
            for i, ids in zip(texts, enc, strict=True):
                out[i] = ids
        return out  # type: ignore[return-value]

    def complete(
        self,
        conversations: list[list[dict]],
        tools: list[list[dict] | None],
        sampling: Sampling,
        n: int = 1,
        *,
        seeds: list[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per conversation, decoded in length-sorted batches."""
        rows = []
        prompts = self.render_many(conversations, tools)
        for i, prompt in enumerate(prompts):
            base = seeds[i] if seeds is not None else mix_seed(sampling.seed, *prompt)
            limit = max(0, min(sampling.max_new_tokens, self.max_positions - len(prompt)))
            for j in range(n):
                rows.append(_Row(i, j, prompt, mix_seed(base, j), limit))
        order = sorted(rows, key=lambda r: -len(r.prompt))
        for start in range(0, len(order), self.batch_size):
            self.decode(
                [r for r in order[start : start + self.batch_size] if r.limit > 0], sampling
            )
        out: list[list[Completion]] = [[None] * n for _ in conversations]  # type: ignore[list-item]
        for r in rows:
            out[r.conv][r.sample] = self._completion(r, sampling)
        return out

    def _completion(self, r: _Row, sampling: Sampling) -> Completion:
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=False)
        if sampling.stop:
            cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            if cut != -1:
                text = text[:cut]
        msg = parse_assistant(text, eos=self.eos_text)
        reason = ("tool_calls" if msg.get("tool_calls") else "stop") if r.ended else "length"
        return Completion(
            message=msg,
            text=text,
            finish_reason=reason,
            prompt_tokens=len(r.prompt),
            completion_tokens=len(r.tokens),
            topk=r.topk if sampling.topk_logprobs else None,
            **(self._sampler_record(r) if sampling.sampler_logprobs else {}),
        )

    @staticmethod
    def _sampler_record(r: _Row) -> dict[str, Any]:
        n = len(r.tokens)
        return {
            "prompt_ids": list(r.prompt),
            "token_ids": list(r.tokens),
            "logprobs": r.logprobs[:n],
            "kept": r.kept[:n] if r.kept else None,
        }

    def decode(self, rows: list[_Row], sampling: Sampling) -> None:
        """Decode one batch in place: prefill the left-padded prompts, then step the rows
        still running, dropping finished ones from the cache (on CPU). A model in train
        mode (a live policy) is decoded in eval mode and put back."""
        if not rows:
            return
        training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                self._decode(rows, sampling)
        finally:
            self.model.train(training)

    def _decode(self, rows: list[_Row], sampling: Sampling) -> None:
        if self.static is not None:
            self.static.decode(rows, sampling, self.batch_size)
            if sampling.stop:
                for r in rows:
                    r.ended = r.ended or self._hit_stop(r.tokens, sampling.stop)
            return
        from transformers import DynamicCache

        dev = self.device
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[b, width - len(r.prompt) :] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        seeds = torch.tensor([r.seed for r in rows], dtype=torch.long, device=dev)
        live = list(range(len(rows)))  # batch position -> index in rows
        cache = DynamicCache(config=self.model.config)
        eos = torch.tensor(self.eos_ids, device=dev)
        inputs, positions = ids, pos
        for step in range(max(r.limit for r in rows)):
            out = self.model(
                input_ids=inputs, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{self._cache_kw: cache},
            )  # fmt: skip
            logits = out.logits[:, -1, :].float()
            nxt, lp, kept = draw(
                logits,
                seeds,
                step,
                sampling.temperature,
                sampling.top_p,
                sampling.top_k,
                sampling.sampler_logprobs,
            )
            self._record(rows, live, nxt, logits, eos, sampling, lp, kept)
            keep = [
                b
                for b, i in enumerate(live)
                if not rows[i].ended and len(rows[i].tokens) < rows[i].limit
            ]
            if not keep:
                break
            if self.device.type == "cpu" and len(keep) < len(live):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                mask, positions, nxt, seeds = (
                    mask[idx],
                    positions[:, -1:][idx],
                    nxt[idx],
                    seeds[idx],
                )
                live = [live[b] for b in keep]
            inputs = nxt[:, None]
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

    def _record(self, rows, live, nxt, logits, eos, sampling: Sampling, lp, kept) -> None:
        """Append each live row's sampled token (and its top-k logprobs, its sampler
        log-probability and kept set when asked)."""
        tokens = nxt.tolist()
        is_eos = torch.isin(nxt, eos).tolist()
        lp = lp.tolist() if lp is not None else None
        kept = [[t for t in ids if t >= 0] for ids in kept.tolist()] if kept is not None else None
        if sampling.topk_logprobs:
            lsm = logits.log_softmax(-1)
            top_v, top_i = lsm.topk(sampling.topk_logprobs, dim=-1)
            chosen = lsm.gather(-1, nxt[:, None])[:, 0].tolist()
            top_v, top_i = top_v.tolist(), top_i.tolist()
        for b, i in enumerate(live):
            r = rows[i]
            if r.ended or len(r.tokens) >= r.limit:
                continue  # finished rows stay in the batch on GPU; their tokens are ignored
            r.tokens.append(tokens[b])
            if lp is not None:
                r.logprobs.append(lp[b])
            if kept is not None:
                r.kept.append(kept[b])
            if sampling.topk_logprobs:
                r.topk.append(
                    {
                        "ids": top_i[b],
                        "logprobs": top_v[b],
                        "token": tokens[b],
                        "logprob": chosen[b],
                    }
                )
            if is_eos[b] or (sampling.stop and self._hit_stop(r.tokens, sampling.stop)):
                r.ended = True

    def _hit_stop(self, tokens: list[int], stops: list[str]) -> bool:
        tail = self.tokenizer.decode(tokens[-32:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    def release_cache(self) -> None:
        """Free the static decoder's KV caches and CUDA graphs (the RL trainer's update
        reuses their memory); the next decode rebuilds them."""
        if self.static is not None:
            self.static.release()

    def close(self) -> None:
        # the static decoder holds the model too, besides its buffers and graphs
        self.static = None
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision, "device": str(self.device)}
