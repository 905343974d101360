"""n-gram decontamination: which training texts overlap an eval task's text?

Tokens are the lower-cased ``\\w+`` runs and single punctuation marks of a text (so
``3+4`` and ``3 + 4`` agree and ``T and (F or T)`` differs from ``(T and F) or T``).
Each eval text (an eval task's prompt, or the strings of its reference) is cut into token
n-grams: ``n``-grams when it has at least ``2 * n`` tokens, else ``short_n``-grams. An
eval prompt shorter than ``short_n`` tokens (``What is 752 + 404?``) matches only a
training prompt equal to it (case and spacing aside). Eval references and training
answers with fewer than ``short_n`` words (a bare number, ``\\boxed{12}``) are not
compared: they agree by chance, not by leakage.

Overlap rule: a training text is contaminated by an eval text when it contains at least
``overlap`` of that eval text's distinct n-grams (``overlap=0``: any one shared n-gram,
the classic rule). Synthetic tasks come from a few templates with a few slots, so two
distinct tasks routinely share an n-gram of template words and one slot value ("is
discounted by 10%, and then a 20% tax is added to the discounted price"); requiring most
of the eval text catches a copied or embedded eval task and leaves template siblings.

Same words, other task: a prompt match with an eval task of the trace's own domain counts
only when the trace's reference equals the eval task's (or one is unknown). Agent tasks
ask the same question ("What is mike's balance?") over different hidden account states:
those are different tasks.

Boilerplate rule: an n-gram found in more than ``boilerplate`` (a fraction) of one
domain's eval tasks, and in at least 3 of them, is template text, not a task's content:
it counts neither as shared nor in the eval text's total.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.filter.texthash import tokenize, window_hashes

DECONTAM_VERSION = "2"
_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORDS = re.compile(r"\w+")


def words_text(text: str) -> str:
    """The text as lower-cased tokens (words and punctuation marks), space separated:
    what n-grams are taken over."""
    return " ".join(_TOKEN.findall(text.lower()))


def _n_words(text: str) -> int:
    return len(_WORDS.findall(text))


@dataclass
class EvalText:
    """One eval task's text (prompt or reference) and the domain it comes from."""

    task_id: str
    domain: str
    text: str
    kind: str = "prompt"  # or "reference"
    reference: str | None = None  # canonical JSON of the task's reference


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(a):
        return a, b
    pairs = np.unique(np.stack([a.astype(np.uint64), b.astype(np.uint64)]), axis=1)
    return pairs[0], pairs[1].astype(np.int64)


class NgramIndex:
    """The eval texts' n-grams (boilerplate removed), by gram size, for overlap queries."""

    def __init__(
        self,
        evals: Sequence[EvalText],
        n: int = 13,
        short_n: int = 8,
        boilerplate: float = 0.05,
        overlap: float = 0.8,
    ):
        if short_n > n:
            raise ValueError(f"short n-gram ({short_n}) longer than n ({n})")
        self.n, self.short_n, self.boilerplate, self.overlap = n, short_n, boilerplate, overlap
        self.evals = list(evals)
        self.tasks = list(dict.fromkeys((e.domain, e.task_id) for e in self.evals))
        words = [words_text(e.text) for e in self.evals]
        lengths = np.array([len(w.split()) for w in words], dtype=np.int64)
        self.size = np.where(lengths >= 2 * n, n, np.where(lengths >= short_n, short_n, 0))
        for i, e in enumerate(self.evals):
            if e.kind != "prompt" and _n_words(e.text) < short_n:
                self.size[i] = 0  # a bare answer ("-\frac{7}{12}") is not evidence
        self.whole: dict[str, list[int]] = {}  # short eval prompts, matched whole
        for i, e in enumerate(self.evals):
            if e.kind == "prompt" and 0 < lengths[i] < short_n:
                self.whole.setdefault(words[i], []).append(i)
        self.excluded = 0  # boilerplate grams left out
        self.grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.total = np.zeros(len(self.evals), np.int64)  # distinct counted grams per text
        for s in sorted(set(self.size.tolist()) - {0}):
            self.grams[s] = self._index(words, lengths, s)

    def _index(
        self, words: list[str], lengths: np.ndarray, s: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sorted (gram, eval text) pairs of the texts of gram size ``s``, boilerplate out."""
        has = np.flatnonzero(lengths >= s)
        grams, owner = window_hashes(*tokenize([words[i] for i in has]), s)
        grams, text = _unique_pairs(grams, has[owner])
        task_of = {t: i for i, t in enumerate(self.tasks)}
        task = np.array([task_of[(e.domain, e.task_id)] for e in self.evals])[text]
        domain = np.array([e.domain for e in self.evals])[text] if len(text) else np.array([])
        boiler = np.zeros(len(grams), bool)
        for d in set(domain.tolist()):
            in_d = domain == d
            n_tasks = len({t for (dd, t) in self.tasks if dd == d})
            g, _ = _unique_pairs(grams[in_d], task[in_d])  # a gram counts once per task
            uniq, df = np.unique(g, return_counts=True)
            common = uniq[df > max(2, self.boilerplate * n_tasks)]
            boiler[in_d] = np.isin(grams[in_d], common)
        self.excluded += len(np.unique(grams[boiler]))
        keep = ~boiler & (self.size[text] == s)
        grams, text = grams[keep], text[keep]
        self.total += np.bincount(text, minlength=len(self.evals))
        order = np.argsort(grams, kind="stable")
        return grams[order], text[order]

    def contaminated(
        self,
        texts: list[str],
        references: list[str | None] | None = None,
        domains: list[str] | None = None,
    ) -> np.ndarray:
        """For each text, the index in :attr:`evals` of the eval text it overlaps most (at
        least ``overlap`` of its n-grams); -1 when clean. With ``references`` (canonical
        JSON per text) the texts are prompts: an eval task of the same domain (``domains``,
        per text) with another reference is another task and does not count."""
        refs = references or [None] * len(texts)

        def same_task(i: int, e: int) -> bool:
            ev = self.evals[e]
            if references is None or (domains is not None and domains[i] != ev.domain):
                return True
            return None in (refs[i], ev.reference) or refs[i] == ev.reference

        hit = np.full(len(texts), -1, np.int64)
        best = np.zeros(len(texts))
        if references is not None and self.whole:
            for i, t in enumerate(texts):
                for e in self.whole.get(words_text(t), []):
                    if same_task(i, e):
                        hit[i], best[i] = e, 1.0
        words = [words_text(t) for t in texts]
        lengths = np.array([len(w.split()) for w in words], dtype=np.int64)
        if references is None:  # answers: as short as a bare number, they match by chance
            lengths[np.array([_n_words(t) < self.short_n for t in texts], dtype=bool)] = 0
        for s, (table, owner_text) in self.grams.items():
            has = np.flatnonzero(lengths >= s)
            if not len(has) or not len(table):
                continue
            grams, owner = window_hashes(*tokenize([words[i] for i in has]), s)
            grams, train = _unique_pairs(grams, has[owner])
            lo = np.searchsorted(table, grams, "left")
            cnt = np.searchsorted(table, grams, "right") - lo
            # every (training text, eval text) pair sharing a gram, once per shared gram
            train = np.repeat(train, cnt)
            pos = np.repeat(lo - np.cumsum(cnt) + cnt, cnt) + np.arange(cnt.sum())
            key, shared = np.unique(train * len(self.evals) + owner_text[pos], return_counts=True)
            t, e = key // len(self.evals), key % len(self.evals)
            frac = shared / np.maximum(self.total[e], 1)
            ok = frac >= max(self.overlap, 1e-9)
            for ti, ei, f in zip(t[ok].tolist(), e[ok].tolist(), frac[ok].tolist(), strict=True):
                if f > best[ti] and same_task(ti, ei):
                    best[ti], hit[ti] = f, ei
        return hit


def eval_texts(tasks: Iterable, domain: str) -> list[EvalText]:
    """The prompt (every user turn) and reference strings of eval tasks."""
    out = []
    for task in tasks:
        turns = [m.get("content") or "" for m in task.messages if m.get("role") == "user"]
        prompt = "\n".join(turns + list(getattr(task, "followups", None) or []))
        key = canonical(task.reference)
        out.append(EvalText(task.id, domain, prompt, "prompt", key))
        ref = "\n".join(_strings(task.reference))
        if ref.strip():
            out.append(EvalText(task.id, domain, ref, "reference", key))
    return out


def canonical(reference: Any) -> str | None:
    """A reference as canonical JSON (None stays None), for equality across tasks."""
    if reference is None:
        return None
    return json.dumps(reference, sort_keys=True, separators=(",", ":"), default=str)


def _strings(value) -> list[str]:
    """Every string and number inside a JSON-like value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [str(value)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return [str(value)]
