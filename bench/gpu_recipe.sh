#!/usr/bin/env bash
# recipes/gpu.yaml for the given seeds, one after the other, each under its own output
# dir (data/gpu-sN); the reports and logs go to $OUT (6 files a seed; a call brings back
# 8). One seed fills a device call (the
# recipe's target is 9 minutes; a call ends at 10). Run on the GPU host from the
# repository root: OUT=dir bash bench/gpu_recipe.sh [SEEDS...]   (default: 0); the wheels
# the image lacks: bench/device_wheels.sh
# RECIPE_SET="key=value ..." adds --set overrides to every seed's run (a variant of the
# recipe tried before it is committed), e.g. RECIPE_SET="rl.domains.logic.beta=0.05"
set -u
OUT=${OUT:-bench/results/gpu-recipe}
mkdir -p "$OUT"
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(0)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the host's CPU: the student's step took 47, 80 and 64 ms on three hosts for the same
# work, and the tokenizer 10-12 s there against 2 s on a 2-core CPU (2026-12-06): each
# run says what it had
echo "host: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), load $(cut -d' ' -f1-3 /proc/loadavg)"
python3 -c "import time; t = time.perf_counter(); sum(i * i for i in range(10**7)); print(f'host: a 1e7-step Python loop in {time.perf_counter() - t:.2f} s')"
t0=$SECONDS
for s in "${seeds[@]}"; do
    rm -rf "data/gpu-s$s"
    PYTHONUNBUFFERED=1 timeout "${RECIPE_TIMEOUT:-570}" python3 -m distill run recipes/gpu.yaml --set seed="$s" \
        --set output_dir="data/gpu-s$s" ${RECIPE_SET:+$(printf -- '--set %s ' $RECIPE_SET)} >"$OUT/gpu-s$s.log" 2>&1
    echo "seed $s rc=$? at $((SECONDS - t0)) s"
    cp "data/gpu-s$s/eval/report.json" "$OUT/report-s$s.json" 2>/dev/null
    cp "data/gpu-s$s/eval/report.md" "$OUT/report-s$s.md" 2>/dev/null
    cp "data/gpu-s$s/eval/report.png" "$OUT/report-s$s.png" 2>/dev/null
    # the RL stage's per-step log: its time split (generate / score / update) and rewards
    cp "data/gpu-s$s/runs/rl/rl_log.jsonl" "$OUT/rl_log-s$s.jsonl" 2>/dev/null
    # every training's report (steps, per-step losses and times, tokens/s), each finished
    # stage's record (its seconds, also when the time box ends the run; generate's per
    # domain), the filter's report (its seconds per domain and step) and the eval's
    # rollouts, in one file
    (cd "data/gpu-s$s" && find runs clean eval/samples -name 'train_report.json' -o -name 'train.log' \
        -o -name '_stage.json' -o -name 'filter_report.json' \
        -o -name '*.jsonl' -path 'eval/samples/*' | tar -czf "$OUT/runs-s$s.tgz" -T -) 2>/dev/null
    echo "== seed $s"; grep -iE "MISSED|met|recovery|wall" "data/gpu-s$s/eval/report.md" | head -40
    python3 bench/gpu_summary.py "data/gpu-s$s"  # where the time went, stage by stage
    tail -n 5 "$OUT/gpu-s$s.log"
done
