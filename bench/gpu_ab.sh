#!/usr/bin/env bash
# A DSA layer's A/B on one device call: the working tree against an earlier revision,
# interleaved (old, new, old, new: a drift of the card shows in both), each run in its own
# time box, every log in $OUT/run.log. Prepare the earlier tree here first, then carry it
# (run's carry: [".whl", ".base"]):
#   rm -rf .base && mkdir .base && git archive REV | tar -x -C .base
# Then on the GPU host, from the repository root: OUT=dir bash bench/gpu_ab.sh
# PRESET (h100-mqa), LENGTHS (32768) and RUNS (3) pick the layer; the first new run also
# prints the layer's ops (--profile-layer). The parts timed: dense, the DSA layer, the
# selection alone, the index KL alone, and the rank keys' top-k (with the rows where its
# keys differ from the default selection's).
set -u
OUT=${OUT:-bench/results/gpu-ab}
mkdir -p "$OUT"
LOG=$OUT/run.log
. "$(dirname "$0")/gpu_steps.sh"
[ -d .base/bench ] || { echo "no .base: see this script's header" | tee -a "$LOG"; exit 2; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$LOG"
SKIP=kl,kl_fused,kl_fused_sum,sparse_acq_rel,kl_fused_acq_rel,kl_fused_fp32,gather,dsa_before
SKIP=$SKIP,select_fp32,select_fused,select_fused_hist,dsa_select_fused,kl_fused_sum_w8,dsa_kl_w8
SKIP=$SKIP,dsa_kl_bwd,sparse,sparse_fwd,dsa_kl_fused,sparse_p,sparse_fwd_p,dsa_select_topk
ARGS=(--preset "${PRESET:-h100-mqa}" --lengths "${LENGTHS:-32768}" --skip-decode --skip-parts "$SKIP")
for i in $(seq 1 "${RUNS:-3}"); do
    (cd .base && step "old-$i" 90 python3 bench/dsa.py "${ARGS[@]}" --out "$OUT/old-$i.json")
    prof=(); [ "$i" = 1 ] && prof=(--profile-layer)
    step "new-$i" 90 python3 bench/dsa.py "${ARGS[@]}" "${prof[@]}" --out "$OUT/new-$i.json"
done
for f in "$OUT"/old-*.json "$OUT"/new-*.json; do
    python3 - "$f" <<'PY' | tee -a "$LOG"
import json, sys
for r in json.load(open(sys.argv[1]))["attention"]:
    keys = ("tokens", "dense_ms", "dsa_ms", "speedup", "select_ms", "kl_index_ms", "dsa_peak_gb")
    print(sys.argv[1].rsplit("/", 1)[-1], {k: r.get(k) for k in keys})
PY
done
