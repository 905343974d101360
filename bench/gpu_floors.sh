#!/usr/bin/env bash
# The DSA layer against its floors on one device call (bench/dsa.py's "gather": the K and V
# reads of the sparse forward alone; "scatter": the dK and dV atomic adds of its backward
# alone): the Qwen2-0.5B shape at 32k (with its profile), then at 16k, 64k and 128k (where
# DSA would break even with dense flash attention), then a second Qwen2 run and the MQA
# shape at 32k, last: a call cut short keeps the first figures.
# Needs the wheels (bench/device_wheels.sh). On the GPU host: OUT=dir bash bench/gpu_floors.sh
set -u
OUT=${OUT:-bench/results/gpu-floors}
mkdir -p "$OUT"
LOG=$OUT/run.log
. "$(dirname "$0")/gpu_steps.sh"
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$LOG"
P=dense,dsa,select,sparse,sparse_fwd,sparse_fwd_p,kl_index,gather,scatter
A=(--skip-decode --lengths 32768 --parts "$P")
step qwen2-32k-1 150 python3 bench/dsa.py --preset h100 "${A[@]}" --profile-layer \
    --out "$OUT/qwen2-1.json"
step qwen2-long 240 python3 bench/dsa.py --preset h100 --skip-decode \
    --lengths 16384,65536,131072 --parts dense,dsa,select,sparse,kl_index,gather,scatter \
    --out "$OUT/qwen2-long.json"
step qwen2-32k-2 90 python3 bench/dsa.py --preset h100 "${A[@]}" --out "$OUT/qwen2-2.json"
step mqa-32k 150 python3 bench/dsa.py --preset h100-mqa "${A[@]}" --out "$OUT/mqa.json"
for f in "$OUT"/*.json; do
    python3 - "$f" <<'PY' | tee -a "$LOG"
import json, sys
for r in json.load(open(sys.argv[1]))["attention"]:
    print(sys.argv[1].rsplit("/", 1)[-1], {k: v for k, v in r.items() if not k.endswith("_peak_gb")
          or k in ("dense_peak_gb", "dsa_peak_gb")})
PY
done
