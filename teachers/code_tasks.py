"""Code task templates by difficulty: a Python function to write, a short plan (the
oracle's reasoning), the solution and hidden unit tests.

Difficulty 1 is one-line functions over lists, strings, numbers and dicts with a fixed
plan a ~1M-parameter model learns; 2 adds two-step one-liners (filter then map, sums,
sorting); 3 and above loops over several lines (running sums, Caesar shifts, counts).
Expected test values come from running the template's own solution, so the oracle
passes by construction. Constants range widely where a template allows: the hash split
holds out whole tasks, so a held-out task's constant is one never seen in training, and a
template with a handful of values teaches memorising them instead of copying.
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from teachers.common import Candidate

WORDS = ["red", "cat", "sun", "box", "key", "map", "pen", "cup", "owl", "fig", "jam", "ink"]
LETTERS = "abcdefgh"
N_TESTS = 5


@dataclass(frozen=True)
class Spec:
    """One function task: ``def name(arg): body`` does what ``text`` says."""

    name: str
    arg: str
    text: str
    plan: str
    body: tuple[str, ...]
    inputs: Callable[[random.Random], Any]
    edges: tuple[Any, ...] = ()  # inputs tested first: boundaries a wrong constant misses

    @property
    def solution(self) -> str:
        lines = [f"def {self.name}({self.arg}):", *(f"    {b}" for b in self.body)]
        return "\n".join(lines) + "\n"


def ints(rng: random.Random, lo: int = -9, hi: int = 20, most: int = 6) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(0, most))]


def text(rng: random.Random, most: int = 8) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(0, most)))


def sentence(rng: random.Random) -> str:
    vocab = [*WORDS, "a", "to", "tree", "chair", "yellow"]
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 5)))


def mapping(rng: random.Random) -> dict[str, int]:
    keys = rng.sample(WORDS, rng.randint(0, 4))
    return {k: rng.randint(0, 20) for k in keys}


# -- difficulty 1: one line, fixed plan ---------------------------------------------


def add_k(rng: random.Random) -> Spec:
    k = rng.randint(1, 999)
    return Spec("add_k", "xs", f"returns each element of xs plus {k}",
                f"Loop over xs; add {k} to each; return the list.",
                (f"return [x + {k} for x in xs]",), ints)  # fmt: skip


def times_k(rng: random.Random) -> Spec:
    k = rng.randint(2, 99)
    return Spec("times_k", "xs", f"returns each element of xs times {k}",
                f"Loop over xs; multiply each by {k}; return the list.",
                (f"return [x * {k} for x in xs]",), ints)  # fmt: skip


def keep_big(rng: random.Random) -> Spec:
    k = rng.randint(-20, 50)
    return Spec("keep_big", "xs", f"returns the elements of xs greater than {k}",
                f"Loop over xs; keep x if x > {k}; return the list.",
                (f"return [x for x in xs if x > {k}]",), ints,
                edges=([k - 1, k, k + 1, k + 2],))  # fmt: skip


def keep_small(rng: random.Random) -> Spec:
    k = rng.randint(-20, 50)
    return Spec("keep_small", "xs", f"returns the elements of xs less than {k}",
                f"Loop over xs; keep x if x < {k}; return the list.",
                (f"return [x for x in xs if x < {k}]",), ints,
                edges=([k - 2, k - 1, k, k + 1],))  # fmt: skip


def count_k(rng: random.Random) -> Spec:
    k = rng.randint(0, 20)
    return Spec("count_k", "xs", f"returns how many elements of xs equal {k}",
                f"Count the elements equal to {k} with xs.count.",
                (f"return xs.count({k})",), lambda r: ints(r, 0, 20, 8),
                edges=([k, k + 1, k - 1, k],))  # fmt: skip


def affine(rng: random.Random) -> Spec:
    a, b = rng.randint(2, 30), rng.randint(1, 199)
    return Spec("affine", "n", f"returns n times {a} plus {b}",
                f"Multiply n by {a}; add {b}; return it.",
                (f"return n * {a} + {b}",), lambda r: r.randint(-50, 50))  # fmt: skip


def is_multiple(rng: random.Random) -> Spec:
    k = rng.randint(2, 60)
    return Spec("is_multiple", "n", f"returns True if n is divisible by {k}, else False",
                f"Check n % {k} == 0; return it.",
                (f"return n % {k} == 0",), lambda r: r.randint(0, 200),
                edges=(k, 3 * k, k + 1, 2 * k - 1))  # fmt: skip


def repeat_s(rng: random.Random) -> Spec:
    k = rng.randint(2, 40)
    return Spec("repeat_s", "s", f"returns s repeated {k} times",
                f"Multiply the string s by {k}; return it.",
                (f"return s * {k}",), text,
                edges=('ab',))  # fmt: skip


def add_end(rng: random.Random) -> Spec:
    # one to three words (1,884 suffixes): with two words (132) every held-out suffix was
    # one no model had seen, and they wrote a memorised one instead of copying it
    w = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    return Spec("add_end", "s", f"returns s followed by '{w}'",
                f"Add '{w}' to the end of s; return it.",
                (f"return s + '{w}'",), text)  # fmt: skip


def count_c(rng: random.Random) -> Spec:
    c = rng.choice(LETTERS)
    return Spec("count_c", "s", f"returns how many times '{c}' occurs in s",
                f"Count '{c}' in s with s.count.",
                (f"return s.count('{c}')",), text,
                edges=(f"{c}a{c}b",))  # fmt: skip


def swap_c(rng: random.Random) -> Spec:
    a, b = rng.sample(string.ascii_lowercase[:12], 2)
    return Spec("swap_c", "s", f"returns s with every '{a}' replaced by '{b}'",
                f"Replace '{a}' by '{b}' in s with s.replace.",
                (f"return s.replace('{a}', '{b}')",), text,
                edges=(f"{a}x{b}{a}",))  # fmt: skip


def get_or(rng: random.Random) -> Spec:
    key, k = rng.choice(WORDS), rng.randint(0, 199)
    return Spec("get_or", "d", f"returns d['{key}'], or {k} if the key is missing",
                f"Look up '{key}' in d with d.get; default {k}.",
                (f"return d.get('{key}', {k})",), mapping,
                edges=({key: 7}, {}))  # fmt: skip


# -- difficulty 2: two steps in one line -----------------------------------------------


def sum_big(rng: random.Random) -> Spec:
    k = rng.randint(-5, 15)
    return Spec("sum_big", "xs", f"returns the sum of the elements of xs greater than {k}",
                f"Keep x > {k}; add them up; return the sum (0 if none).",
                (f"return sum(x for x in xs if x > {k})",), ints,
                edges=([k - 1, k, k + 1, k + 2],))  # fmt: skip


def even_times(rng: random.Random) -> Spec:
    k = rng.randint(2, 60)
    return Spec("even_times", "xs", f"returns x * {k} for each even x in xs, in order",
                f"Keep even x; multiply each by {k}; return the list.",
                (f"return [x * {k} for x in xs if x % 2 == 0]",), ints,
                edges=([1, 2, 3, 4],))  # fmt: skip


def long_words(rng: random.Random) -> Spec:
    k = rng.randint(1, 4)
    return Spec("long_words", "s", f"returns the words of s longer than {k} letters, in order",
                f"Split s into words; keep those with len > {k}; return the list.",
                (f"return [w for w in s.split() if len(w) > {k}]",), sentence,
                edges=(' '.join('abcdef'[:n] for n in range(1, 7)),))  # fmt: skip


def keys_above(rng: random.Random) -> Spec:
    k = rng.randint(0, 15)
    return Spec("keys_above", "d", f"returns the sorted keys of d whose value is greater than {k}",
                f"Keep keys with d[key] > {k}; sort them; return the list.",
                (f"return sorted(k for k, v in d.items() if v > {k})",), mapping,
                edges=({'red': k, 'cat': k + 1, 'sun': k - 1},))  # fmt: skip


def digit_sum(rng: random.Random) -> Spec:
    k = rng.randint(2, 60)
    return Spec("digit_sum", "n", f"returns the sum of the digits of n (n >= 0) times {k}",
                f"Turn n into a string; add up its digits; multiply by {k}.",
                (f"return sum(int(c) for c in str(n)) * {k}",), lambda r: r.randint(0, 99999))  # fmt: skip


def top_k(rng: random.Random) -> Spec:
    k = rng.randint(1, 9)
    return Spec("top_k", "xs", f"returns the {k} largest elements of xs, largest first",
                f"Sort xs in descending order; take the first {k}.",
                (f"return sorted(xs, reverse=True)[:{k}]",), lambda r: ints(r, most=12),
                edges=([5, 1, 9, 3, 7, 2, 8],))  # fmt: skip


# -- difficulty 3: loops over several lines --------------------------------------------


def running_sum(rng: random.Random) -> Spec:
    k = rng.randint(0, 50)
    return Spec("running_sum", "xs", f"returns the running sums of xs, starting from {k}",
                f"Start a total at {k}; for each x add it and record the total.",
                (f"total = {k}", "out = []", "for x in xs:", "    total += x",
                 "    out.append(total)", "return out"), ints)  # fmt: skip


def caesar(rng: random.Random) -> Spec:
    k = rng.randint(1, 25)
    return Spec("caesar", "s", f"returns s (lowercase letters) with each letter shifted {k} places forward, wrapping after 'z'",
                f"For each letter: index in the alphabet, add {k} mod 26, back to a letter.",
                ("out = ''", "for c in s:", f"    out += chr((ord(c) - 97 + {k}) % 26 + 97)",
                 "return out"), lambda r: text(r, 10))  # fmt: skip


def count_words(rng: random.Random) -> Spec:
    k = rng.randint(1, 3)
    return Spec("count_words", "s", f"returns a dict mapping each word of s that occurs at least {k} times to its count",
                f"Count every word in a dict; keep counts >= {k}.",
                ("counts = {}", "for w in s.split():", "    counts[w] = counts.get(w, 0) + 1",
                 f"return {{w: c for w, c in counts.items() if c >= {k}}}"), sentence,
                edges=(' '.join(['red'] * k + ['cat'] * (k + 1) + ['sun'] * (k - 1)),))  # fmt: skip


def fizz(rng: random.Random) -> Spec:
    a, b = rng.sample(range(2, 8), 2)
    return Spec("fizz", "n", f"returns a list for i from 1 to n: 'ab' if i is divisible by {a} and {b}, 'a' if by {a}, 'b' if by {b}, else i",
                f"Loop i from 1 to n; test {a} and {b} together first, then each.",
                ("out = []", "for i in range(1, n + 1):", f"    if i % {a} == 0 and i % {b} == 0:",
                 "        out.append('ab')", f"    elif i % {a} == 0:", "        out.append('a')",
                 f"    elif i % {b} == 0:", "        out.append('b')", "    else:",
                 "        out.append(i)", "return out"), lambda r: r.randint(0, 30),
                edges=(30,))  # fmt: skip


def max_gap(rng: random.Random) -> Spec:
    k = rng.randint(0, 99)
    return Spec("max_gap", "xs", f"returns the largest difference between neighbouring elements of xs, or {k} if xs has fewer than 2 elements",
                f"If len(xs) < 2 return {k}; else the max of xs[i+1] - xs[i].",
                ("if len(xs) < 2:", f"    return {k}",
                 "return max(xs[i + 1] - xs[i] for i in range(len(xs) - 1))"), ints,
                edges=([], [3], [4, 9], [1, 5, 2]))  # fmt: skip


LEVELS: dict[int, list[Callable[[random.Random], Spec]]] = {
    1: [add_k, times_k, keep_big, keep_small, count_k, affine, is_multiple, repeat_s,
        add_end, count_c, swap_c, get_or],
    2: [sum_big, even_times, long_words, keys_above, digit_sum, top_k],
    3: [running_sum, caesar, count_words, fizz, max_gap],
}  # fmt: skip


def spec_for(rng: random.Random, difficulty: int) -> Spec:
    """A template of ``difficulty`` (the hardest level at most ``difficulty``, with the
    easier levels mixed in at higher difficulty)."""
    top = min(difficulty, max(LEVELS))
    pool = (
        LEVELS[top]
        if top == 1
        else LEVELS[top] * 2 + [f for lv in range(1, top) for f in LEVELS[lv]]
    )
    return rng.choice(pool)(rng)


_TESTS: dict[str, list[str]] = {}


def hidden_tests(spec: Spec, identity: str) -> list[str]:
    """``assert name(input) == expected`` lines; inputs are seeded by the task itself
    (the same task always has the same tests), expected values come from the solution.
    Cached by identity: the generator meets the same task again and again."""
    if identity not in _TESTS:
        if len(_TESTS) > 200_000:
            _TESTS.clear()
        _TESTS[identity] = _make_tests(spec, identity)
    return list(_TESTS[identity])


def _make_tests(spec: Spec, identity: str) -> list[str]:
    ns: dict[str, Any] = {}
    exec(spec.solution, ns)  # our own template code, never model output
    fn, rng = ns[spec.name], random.Random(f"code-tests:{identity}")
    seen, tests = set(), []
    candidates = itertools.chain(spec.edges, (spec.inputs(rng) for _ in range(50)))
    for value in candidates:
        if repr(value) in seen:
            continue
        seen.add(repr(value))
        tests.append(f"assert {spec.name}({value!r}) == {fn(value)!r}")
        if len(tests) == N_TESTS:
            break
    return tests


def make(rng: random.Random, difficulty: int) -> Candidate:
    """One code task candidate for :func:`teachers.common.generate_tasks`."""
    spec = spec_for(rng, difficulty)
    prompt = f"Write a function `{spec.name}({spec.arg})` that {spec.text}."
    reference = {
        "entry_point": spec.name,
        "tests": hidden_tests(spec, prompt),
        "setup": "",
        "prelude": "",
        "prefix": None,
    }
    meta = {"kind": spec.name, "plan": spec.plan, "solution": spec.solution}
    return prompt, prompt, reference, meta
