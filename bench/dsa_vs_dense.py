"""Issue #19's quality check from two eval reports: the DSA student against the dense one
it was converted from (same teachers and data), per domain, distilled and after mixed RL.
A DSA report without mixed RL (``rl.enabled: false``: its student is the distilled one) is
compared on the distilled stage alone.

The target: the DSA student's held-out pass@1 within 1 point of the dense student's on
every domain. A difference of two scores on n tasks each has a standard error of
sqrt(p1(1-p1)/n + p2(1-p2)/n); the table gives it, so a gap is read against its noise.

    python bench/dsa_vs_dense.py DENSE/report.json DSA/report.json [--within 1.0]

``--names`` labels the two columns, for other pairs of students: e.g. the dense student
continued for as many steps as the DSA one's sparse phase (``bench/gpu_dsa_student.sh``
with ``CONTROL=1``) against the DSA one, ``--names "dense continued,DSA"``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def rows(dense: dict, dsa: dict, within: float) -> list[dict]:
    out = []
    for d in dense["domains"]:
        a, b = dense["recovery"].get(d), dsa["recovery"].get(d)
        if a is None or b is None:
            continue
        n = next(s["tasks"] for s in dsa["scores"] if s["domain"] == d)
        sa, sb = stages(a), stages(b)
        for stage in ("distilled", "final"):
            p1, p2 = sa.get(stage), sb.get(stage)
            if p1 is None or p2 is None:
                continue
            gap = 100 * (p2 - p1)
            se = 100 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
            out.append(dict(domain=d, stage=stage, dense=100 * p1, dsa=100 * p2, gap=gap,
                            se=se, tasks=n, met=round(gap, 6) >= -within))  # fmt: skip
    return out


def stages(rec: dict) -> dict[str, float]:
    """A domain's pass@1 by stage: with mixed RL the report holds both (``distilled`` and
    the final ``student``); without it, ``student`` is the distilled one."""
    if "distilled" in rec:
        return {"distilled": rec["distilled"], "final": rec["student"]}
    return {"distilled": rec["student"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dense", type=Path)
    ap.add_argument("dsa", type=Path)
    ap.add_argument("--within", type=float, default=1.0, help="points the DSA student may lose")
    ap.add_argument("--names", default="dense,DSA", help="the two columns' labels, comma-separated")
    a = ap.parse_args()
    first, _, second = a.names.partition(",")
    try:
        dense, dsa = (json.loads(p.read_text()) for p in (a.dense, a.dsa))
    except (OSError, ValueError) as e:
        print(f"dsa_vs_dense: cannot read a report: {e}", file=sys.stderr)
        return 2
    got = rows(dense, dsa, a.within)
    print(f"| domain | stage | {first} pass@1 | {second} pass@1 | {second} - {first} (± 1 s.e.) "
          f"| within {a.within:g} point |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in got:
        print(f"| {r['domain']} | {r['stage']} | {r['dense']:.1f}% | {r['dsa']:.1f}% | "
              f"{r['gap']:+.1f} ± {r['se']:.1f} | {'met' if r['met'] else 'MISSED'} |")  # fmt: skip
    return 0 if got and all(r["met"] for r in got) else 1


if __name__ == "__main__":
    sys.exit(main())
