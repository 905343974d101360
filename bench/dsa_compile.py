"""Compile the DSA Triton kernels for a GPU target on a machine without one, and report
what the compiler made of each: the matrix-multiply instructions (Hopper's warpgroup MMA,
"wgmma", or the older "mma"), registers per thread, spilled bytes, and the atomic adds
(global reductions) by width.

Triton compiles to PTX and a cubin with its bundled ``ptxas`` and needs no GPU for that,
so a kernel change can be checked for compile errors, register spills and the MMA it
lowers to before device time is spent on it. Timing still needs the device
(``bench/dsa.py``). Each kernel at the shapes of ``bench/dsa.py``'s presets (Qwen2-0.5B:
14 heads of 64 over 2 KV heads; MQA: 64 heads of 128 over 1), bf16, with every setting
the kernels take (``kl_kernel.MAIN_DOT_FP32``, the KL reading the attention's
log-sum-exps), at the launch the layer uses, specialized as the launch specializes it
(``divisible``).

On this 2-core CPU, Triton 3.9, sm_90 (2026-12-06): the fused KL's forward at the MQA
shape lowered its main logits to the old MMA (a batched 3D dot) while the sparse
attention's forward took wgmma; the KL now takes a 2D dot where one slot holds 64 rows
or more, and lowers to wgmma there. Without the launch's specialization (before
2026-12-07 14:00 UTC) the registers and spills it reported were not the launched
kernels', and the backward's atomic adds showed one float an instruction where the launch
makes four (``REDG.E.ADD.F32x4``).

    pip install triton==3.9.0   # CPU machines: Triton is a CUDA torch's dependency
    python bench/dsa_compile.py [--arch 90] [--shapes qwen2,mqa] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dsa import PRESETS  # noqa: E402 - bench/dsa.py's layer shapes, indexer included

# the layer shapes bench/dsa.py times, and Llama-3-8B's GQA (32 heads of 128 over 8)
SHAPES = {
    "qwen2": PRESETS["h100"],
    "mqa": PRESETS["h100-mqa"],
    "llama8b": dict(PRESETS["h100"], heads=32, kv=8, head_dim=128),
}


def compile_kernel(fn, types: dict, consts: dict, launch: dict, arch: int, divisible=()):
    """``fn`` (a ``triton.jit`` function) compiled for ``cuda:arch``: pointer and scalar
    arguments typed by ``types`` (the rest int32), ``consts`` as its constexprs. As
    Triton's launch specializes them: every pointer 16-byte aligned (torch's allocations)
    and the integers named in ``divisible`` multiples of 16, which is what lets it
    vectorize loads, stores and atomic adds along a contiguous row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if sig[n].startswith("*") or (n in divisible and sig[n] == "i32")
    }
    src = ASTSource(fn, sig, constexprs=dict(consts), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch)


def divisible(shape: str, kernel: str) -> set[str]:
    """The integer arguments of the training kernels that are multiples of 16 at
    ``shape`` (row strides of Q, K, the index tensors and the selection, and the keys a
    row), each name's value across those kernels; none for the decode kernels, whose
    strides follow the cache's layout. Without them the compiled kernel is not the one
    the launch runs: on Triton 3.6, sm_90, the backward's dK and dV adds came out one
    element each instead of four (2026-12-07)."""
    if kernel.startswith("decode"):
        return set()
    p = SHAPES[shape]
    h, hkv, d, hi, di, k = (p[n] for n in ("heads", "kv", "head_dim", "index_heads",
                                            "index_head_dim", "top_k"))  # fmt: skip
    # s_qt: Q's (or the index queries') token stride; s_kt: K's (or the index keys')
    values = dict(s_qt=(h * d, hi * di), s_qh=(d, di), s_kt=(hkv * d, di), s_kh=(d,),
                  s_it=(k,), s_ib=(k,), s_pt=(k,), n_sel=(k,), s_qit=(hi * di,),
                  s_qih=(di,), s_kit=(di,), s_lt=(h,), s_wt=(hi,))  # fmt: skip
    return {n for n, vs in values.items() if all(v % 16 == 0 for v in vs)}


def describe(kernel) -> dict:
    """MMA kinds, registers and spill stack of a compiled kernel (from its TTGIR and
    ``cuobjdump -res-usage`` of its cubin)."""
    import triton

    ir = kernel.asm["ttgir"]
    mma = sorted(set(re.findall(r"nvidia_mma<\{versionMajor = (\d)", ir)))
    row = {"wgmma": "warp_group_dot" in ir, "mma_versions": mma}
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True)
        m = re.search(r"REG:(\d+) STACK:(\d+)", out.stdout)
        if m:
            row.update(registers=int(m.group(1)), spill_stack_bytes=int(m.group(2)))
        # the fp32 atomic adds whose result is unread (global reductions) by width: F32
        # one element an instruction, F32x4 four
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True)
        reds = re.findall(r"\bREDG\.E\.ADD\.(F32x\d|F32)\b", sass.stdout)
        if reds:
            row["reductions"] = {w: reds.count(w) for w in sorted(set(reds))}
    except OSError as e:  # no cuobjdump in this Triton: the MMA kinds alone
        row["cuobjdump"] = str(e)
    finally:
        os.unlink(f.name)
    return row


def kernels_at(shape: str) -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, argument types, constexprs, launch) for every DSA kernel at ``shape``."""
    import triton

    from distill.dsa import decode_kernel as D
    from distill.dsa import kernels as K
    from distill.dsa import kl_kernel as KL
    from distill.dsa import select_kernel as S

    p = SHAPES[shape]
    h, hkv, d, hi, di = p["heads"], p["kv"], p["head_dim"], p["index_heads"], p["index_head_dim"]
    p2 = triton.next_power_of_2
    index = dict(HI=hi, BHI=max(16, p2(hi)), DI=di, BDI=max(16, p2(di)))
    bd = max(16, triton.next_power_of_2(d))
    sparse_t = dict(Q="*bf16", K="*bf16", V="*bf16", IDX="*i32", OUT="*bf16", LSE="*fp32",
                    P="*fp32", DO="*bf16", DQ="*bf16", DK="*fp32", DV="*fp32",
                    scale="fp32")  # fmt: skip
    index_kl_t = dict(QI="*fp32", KI="*bf16", W="*fp32", IDX="*i32", P="*fp32", LSEI="*fp32",
                      KL="*fp32", DQI="*fp32", DKI="*fp32", DW="*fp32")  # fmt: skip
    ikl = dict(KL.INDEX_KL_LAUNCH)
    index_kl_c = dict(HI=hi, BHI=index["BHI"], DI=di, BDI=index["BDI"], BN=ikl.pop("BN"),
                      SEM=K.ATOMIC_SEM)  # fmt: skip
    rows_sel = dict(S.ROWS_SELECT_LAUNCH)
    rows_sel.pop("CAP")  # an argument: each launch passes it
    rows_sel_c = dict(BS=rows_sel.pop("BS"), HAS_LSE=True)
    kl_t = dict(Q="*bf16", K="*bf16", QI="*fp32", KI="*fp32", W="*fp32", IDX="*i32",
                KL="*fp32", LSE="*fp32", LSEI="*fp32", GOUT="*fp32", DQI="*fp32",
                DKI="*fp32", DW="*fp32", scale="fp32")  # fmt: skip
    score_t = dict(QI="*bf16", KI="*bf16", W="*bf16", SEG="*i64", OUT="*fp32")
    launch = {k: v for k, v in K.sparse_launch(h // hkv).items() if k != "BN"}
    sparse_c = dict(K._blocks(h // hkv, d), BN=K.sparse_launch(h // hkv)["BN"])
    kl_c = dict(H=h, G=h // hkv, HKV=hkv, **KL._slots(h, hkv), D=d, BD=bd, **index,
                BN=KL.BLOCK_N)  # fmt: skip
    score_c = dict(HI=hi, DI=di, BD=index["BDI"], BM=64, BN=64)
    select_c = dict(HI=hi, DI=di, BD=index["BDI"], BM=S.SELECT_LAUNCH["BM"],
                    BN=S.SELECT_LAUNCH["BN"])  # fmt: skip
    select_launch = {k: v for k, v in S.SELECT_LAUNCH.items() if k not in ("BM", "BN")}
    decode_launch = {k: v for k, v in D.DECODE_LAUNCH.items() if k != "CS"}
    attn_launch = {k: v for k, v in D.ATTENTION_LAUNCH.items() if k not in ("BN", "programs")}
    g = h // hkv
    decode_c = dict(CS=D.DECODE_LAUNCH["CS"], NCP=p2(-(-32768 // D.DECODE_LAUNCH["CS"])))
    hist_t = dict(SC="*fp32", VALID="*i8", HIST="*i32", IDX="*i64", OK="*i8")
    dscore_t = dict(QI="*bf16", KI="*bf16", W="*bf16", SC="*fp32", KS="*fp32")
    dscore_c = dict(HI=hi, BH=max(16, p2(hi)), DI=di, BD=index["BDI"],
                    BS=D.SCORE_LAUNCH["BS"], IEEE=False)  # fmt: skip
    dscore_launch = {"num_warps": D.SCORE_LAUNCH["num_warps"]}
    attn_t = dict(Q="*bf16", K="*bf16", V="*bf16", KVS="*fp32", IDX="*i64", OK="*i8",
                  OUT="*fp32", LSE="*fp32", scale="fp32")  # fmt: skip
    attn_c = dict(G=g, BG=max(16, p2(g)), D=d, BD=bd, BN=D.ATTENTION_LAUNCH["BN"], IEEE=False,
                  SCALED=False)  # fmt: skip
    out = [
        ("fused selection", S._select_kernel, dict(score_t, IDX="*i64"),
         dict(select_c, HIST=False), select_launch),
        ("fused selection, one histogram", S._select_kernel, dict(score_t, IDX="*i64"),
         dict(select_c, HIST=True), select_launch),
        ("decode scores", D._decode_score_kernel, dscore_t, dict(dscore_c, SCALED=False),
         dscore_launch),
        ("decode scores, fp8 index keys", D._decode_score_kernel,
         dict(dscore_t, KI="*fp8e4nv"), dict(dscore_c, SCALED=True), dscore_launch),
        ("decode selection, a digit's histograms (32k keys)", D._decode_hist_kernel, hist_t,
         dict(decode_c, PASS=3), decode_launch),
        ("decode selection, the positions (32k keys)", D._decode_emit_kernel, hist_t, decode_c,
         decode_launch),
        ("decode attention", D._decode_attn_kernel, attn_t, attn_c, attn_launch),
        ("decode attention, int8 K and V", D._decode_attn_kernel,
         dict(attn_t, K="*i8", V="*i8"), dict(attn_c, SCALED=True), attn_launch),
        # inside a compiled step inductor passes the Python float scale as fp64
        ("decode attention, fp64 scale (inductor's)", D._decode_attn_kernel,
         dict(attn_t, scale="fp64"), attn_c, attn_launch),
        ("index scores", K._index_score_kernel, score_t, dict(score_c, RANKED=False), {}),
        ("index rank keys", K._index_score_kernel, dict(score_t, OUT="*i64"),
         dict(score_c, RANKED=True), {}),
        ("sparse forward", K._sparse_fwd_kernel, sparse_t,
         dict(sparse_c, H=h, WRITE_P=False, ADD_P=False, **K.P_WALK), launch),
        ("sparse forward writing p", K._sparse_fwd_kernel, sparse_t,
         dict(sparse_c, H=h, WRITE_P=True, ADD_P=hkv > 1, **K.P_WALK), launch),
        ("index KL with its gradient", KL._index_kl_kernel, index_kl_t,
         dict(index_kl_c, GRAD=True, HAS_LSEI=False), ikl),
        ("index KL with its gradient, the selection's log-sum-exps", KL._index_kl_kernel,
         index_kl_t, dict(index_kl_c, GRAD=True, HAS_LSEI=True), ikl),
        ("training selection (SELECT_ROWS), one program a row", S._rows_select_kernel,
         dict(SC="*fp32", IDX="*i32", CV="*fp32", CS="*i32", LSE="*fp32"), rows_sel_c,
         rows_sel),
        ("sparse backward", K._sparse_bwd_kernel, sparse_t,
         dict(sparse_c, SEM=K.ATOMIC_SEM), launch),
    ]  # fmt: skip
    for fp32 in (True, False):
        for has_lse, grad in itertools.product((False, True), (False, True)):
            out.append((f"KL forward, fp32 logits {fp32}, lse given {has_lse}, grad {grad}",
                        KL._kl_fwd_kernel, kl_t,
                        dict(kl_c, FP32=fp32, HAS_LSE=has_lse, GRAD=grad, SEM=K.ATOMIC_SEM),
                        KL.KL_LAUNCH))  # fmt: skip
        out.append((f"KL backward, fp32 logits {fp32}", KL._kl_bwd_kernel, kl_t,
                    dict(kl_c, FP32=fp32, SEM=K.ATOMIC_SEM), KL.KL_LAUNCH))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    ap.add_argument("--shapes", default="qwen2,mqa", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = ap.parse_args()
    try:
        import triton
    except ImportError:
        print("dsa_compile: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, quietly
    rows, failed = [], 0
    print(f"triton {triton.__version__}, target sm_{a.arch}")
    for shape in a.shapes.split(","):
        for name, fn, types, consts, launch in kernels_at(shape):
            row = {"shape": shape, "kernel": name}
            try:
                kernel = compile_kernel(fn, types, consts, launch, a.arch,
                                        divisible(shape, name))  # fmt: skip
                row.update(describe(kernel))
            except Exception as e:  # noqa: BLE001 - a compile error is the finding
                failed += 1
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
