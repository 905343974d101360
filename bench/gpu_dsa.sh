#!/usr/bin/env bash
# Issue #19's GPU figures that one device call (10 minutes) can hold: the DSA tests on the
# device's own transformers (the CPU ones too: the image's version names the indexed cache
# layer differently), the attention and decode benchmark, and the 16k retrieval check,
# each in its own time box; every log goes to $OUT/run.log.
# Run on the GPU host from the repository root: OUT=dir bash bench/gpu_dsa.sh
set -u
OUT=${OUT:-bench/results/gpu-dsa}
mkdir -p "$OUT"
LOG=$OUT/run.log
. "$(dirname "$0")/gpu_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)" | tee -a "$LOG"
step tests-dsa 70 python3 -m pytest -q -rs tests/test_dsa.py -m "not slow"
step dsa 150 python3 bench/dsa.py --preset h100 --out "$OUT/dsa.json"
# the h100 preset: copy at 16k, dense 150 s, then 50 warm-up and 50 sparse steps
step retrieval 320 python3 bench/dsa_retrieval.py --preset h100 --out "$OUT/dsa-retrieval.json"
tail -n 3 "$OUT"/*.json 2>/dev/null | head -40
