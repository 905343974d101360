"""Math task generators by difficulty, each with the oracle's step-by-step reasoning.

Difficulty 1 is column-wise addition written in a fixed-width format a ~1M-parameter
model learns; 2 two-step word problems; 3 fractions; 4 linear equations; 5 systems of two
equations, polynomial expansion and percentage word problems.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

from teachers.common import Candidate

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jon", "Kim", "Lea"]
ITEMS = ["apple", "book", "card", "coin", "egg", "marble", "pencil", "shell", "stamp", "toy"]


def fmt(q: Fraction) -> str:
    r"""An exact answer in the form the oracle writes: ``12``, ``-3`` or ``\frac{7}{3}``."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _candidate(identity: str, prompt: str, answer: str, steps: list[str], kind: str) -> Candidate:
    return identity, prompt, {"answer": answer}, {"kind": kind, "steps": steps}


def addition(rng: random.Random) -> Candidate:
    """Column-wise addition. The reasoning first restates both numbers padded to three
    digits, then one fixed-width line per column, least significant first:
    ``x+y+carry=SS`` with a two-digit sum whose first digit is the next carry. Every
    digit a step needs sits at a fixed offset, which is what a ~1M-parameter model
    learns reliably."""
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    pa, pb = f"{a:03d}", f"{b:03d}"
    steps, carry = [f"{pa} + {pb}"], 0
    for i in (2, 1, 0):
        x, y = int(pa[i]), int(pb[i])
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return _candidate(f"add:{a}+{b}", f"What is {a} + {b}?", str(a + b), steps, "addition")


def word_problem(rng: random.Random) -> Candidate:
    """A two-step word problem with whole numbers."""
    name, item, form = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(4)
    a, b, c = rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 30)
    if form == 0:
        prompt = f"{name} has {a} {item}s and buys {b} bags of {c} {item}s. How many {item}s does {name} have now?"
        p = b * c
        steps, ans = [f"{b} * {c} = {p}", f"{a} + {p} = {a + p}"], a + p
    elif form == 1:
        a = a + b + 1
        prompt = f"{name} has {a} {item}s, gives {b} away and then finds {c} more. How many {item}s does {name} have?"
        steps, ans = [f"{a} - {b} = {a - b}", f"{a - b} + {c} = {a - b + c}"], a - b + c
    elif form == 2:
        cost = b * c
        paid = (cost // 10 + 1 + rng.randrange(3)) * 10
        prompt = f"A {item} costs {c} dollars. {name} buys {b} and pays {paid} dollars. How much change does {name} get?"
        steps, ans = [f"{b} * {c} = {cost}", f"{paid} - {cost} = {paid - cost}"], paid - cost
    else:
        prompt = f"{name} reads {c} pages a day for {b} days, then {a} more pages. How many pages is that in total?"
        p = b * c
        steps, ans = [f"{c} * {b} = {p}", f"{p} + {a} = {p + a}"], p + a
    return _candidate(f"word:{prompt}", prompt, str(ans), steps, "word")


def fractions(rng: random.Random) -> Candidate:
    """Add, subtract or multiply two fractions; the answer reduced."""
    b, d = rng.randint(2, 12), rng.randint(2, 12)
    a, c = rng.randint(1, 2 * b), rng.randint(1, 2 * d)
    op = rng.choice("+-*")
    x, y = Fraction(a, b), Fraction(c, d)
    prompt = f"Compute {a}/{b} {op} {c}/{d}. Give the answer as a reduced fraction."
    if op == "*":
        num, den = a * c, b * d
        steps = [f"numerators: {a} * {c} = {num}", f"denominators: {b} * {d} = {den}"]
        result = x * y
    else:
        den = b * d // math.gcd(b, d)
        na, nc = a * (den // b), c * (den // d)
        num = na + nc if op == "+" else na - nc
        steps = [
            f"common denominator: {den}",
            f"{a}/{b} = {na}/{den}, {c}/{d} = {nc}/{den}",
            f"{na} {op} {nc} = {num}",
        ]
        result = x + y if op == "+" else x - y
    g = math.gcd(num, den)
    steps.append(f"{num}/{den} reduced by {g} is {fmt(result)}")
    return _candidate(f"frac:{a}/{b}{op}{c}/{d}", prompt, fmt(result), steps, "fraction")


def _side(coef: int, const: int) -> str:
    text = f"{coef}x" if coef not in (1, -1) else ("x" if coef == 1 else "-x")
    if const:
        text += f" + {const}" if const > 0 else f" - {-const}"
    return text


def linear(rng: random.Random) -> Candidate:
    """Solve a x + b = c x + d; the solution is an integer or a fraction."""
    a, c = rng.randint(-9, 9), rng.randint(-9, 9)
    while a == c or a == 0:
        a, c = rng.randint(-9, 9), rng.randint(-9, 9)
    b, d = rng.randint(-30, 30), rng.randint(-30, 30)
    k, m = a - c, d - b
    x = Fraction(m, k)
    rhs = _side(c, d) if c else str(d)
    prompt = f"Solve for x: {_side(a, b)} = {rhs}."
    steps = [
        f"subtract {c}x from both sides: {k}x + {b} = {d}",
        f"subtract {b} from both sides: {k}x = {m}",
        f"divide by {k}: x = {fmt(x)}",
    ]
    return _candidate(f"lin:{a},{b},{c},{d}", prompt, f"x = {fmt(x)}", steps, "linear")


def system(rng: random.Random) -> Candidate:
    """Two linear equations in x and y with an integer solution, solved by elimination."""
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    a1, b1, a2, b2 = (rng.randint(1, 6) * rng.choice((1, -1)) for _ in range(4))
    while a1 * b2 - a2 * b1 == 0:
        a2 = rng.randint(1, 6)
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    e1, e2 = f"{a1}x + {b1}y = {c1}", f"{a2}x + {b2}y = {c2}"
    prompt = f"Solve the system: {e1} and {e2}. Give x and y."
    det, dx = a1 * b2 - a2 * b1, c1 * b2 - c2 * b1
    steps = [
        f"multiply the first by {b2} and the second by {b1}, subtract: {det}x = {dx}",
        f"x = {dx}/{det} = {x}",
        f"substitute into the first: {b1}y = {c1} - {a1 * x} = {c1 - a1 * x}",
        f"y = {y}",
    ]
    return _candidate(f"sys:{e1};{e2}", prompt, f"x = {x}, y = {y}", steps, "system")


def _poly(a: int, b: int, c: int) -> str:
    terms = [(a, "x^2"), (b, "x"), (c, "")]
    out = ""
    for coef, var in terms:
        if coef == 0:
            continue
        mag = str(abs(coef)) if abs(coef) != 1 or not var else ""
        sign = ("-" if coef < 0 else "") if not out else (" - " if coef < 0 else " + ")
        out += f"{sign}{mag}{var}"
    return out or "0"


def expansion(rng: random.Random) -> Candidate:
    """Expand (a x + b)(c x + d)."""
    a, c = rng.randint(1, 9), rng.randint(1, 9)
    b, d = rng.choice([i for i in range(-9, 10) if i]), rng.choice([i for i in range(-9, 10) if i])
    prompt = f"Expand ({_side(a, b)})({_side(c, d)})."
    steps = [
        f"x^2 term: {a} * {c} = {a * c}",
        f"x term: {a} * {d} + {b} * {c} = {a * d + b * c}",
        f"constant: {b} * {d} = {b * d}",
    ]
    answer = _poly(a * c, a * d + b * c, b * d)
    return _candidate(f"exp:{a},{b},{c},{d}", prompt, answer, steps, "expansion")


def percent(rng: random.Random) -> Candidate:
    """A discount then a tax: three exact steps, the answer a terminating decimal."""
    price = rng.randint(2, 60) * 20
    off, tax = rng.choice((10, 20, 25, 30, 40, 50)), rng.choice((5, 10, 15, 20))
    item = rng.choice(["jacket", "lamp", "bike", "chair", "radio"])
    prompt = (
        f"A {item} costs {price} dollars. It is discounted by {off}%, and then a {tax}% tax "
        f"is added to the discounted price. What is the final price in dollars?"
    )
    sale = Fraction(price * (100 - off), 100)
    final = sale * Fraction(100 + tax, 100)
    steps = [
        f"discount: {price} * {off}/100 = {_dec(Fraction(price * off, 100))}",
        f"discounted price: {price} - {_dec(Fraction(price * off, 100))} = {_dec(sale)}",
        f"tax: {_dec(sale)} * {tax}/100 = {_dec(sale * Fraction(tax, 100))}",
        f"final: {_dec(sale)} + {_dec(sale * Fraction(tax, 100))} = {_dec(final)}",
    ]
    return _candidate(f"pct:{item},{price},{off},{tax}", prompt, _dec(final), steps, "percent")


def _dec(q: Fraction) -> str:
    """A terminating decimal without trailing zeros (denominators here divide 10^4)."""
    scaled = q * 10_000
    assert scaled.denominator == 1, q
    whole, frac = divmod(abs(scaled.numerator), 10_000)
    text = f"{whole}.{frac:04d}".rstrip("0").rstrip(".")
    return ("-" if q < 0 else "") + text


def make(rng: random.Random, difficulty: int) -> Candidate:
    """One candidate task of ``difficulty`` (1-5)."""
    if difficulty <= 1:
        return addition(rng)
    if difficulty == 2:
        return word_problem(rng)
    if difficulty == 3:
        return fractions(rng) if rng.random() < 0.7 else word_problem(rng)
    if difficulty == 4:
        return linear(rng) if rng.random() < 0.7 else fractions(rng)
    return rng.choice((system, expansion, percent, linear))(rng)
