#!/usr/bin/env bash
# Issue #19's quality check on the GPU student: recipes/gpu.yaml's student converted to
# DSA against the dense one, on the same teachers and data. Run on a warm device machine
# right after `bench/gpu_recipe.sh SEED` in an earlier call (its data/gpu-sSEED is still
# there: teachers, generate and filter are up to date and skip; train converts the dense
# run's distilled student (copied to $DATA/dense-student: student.kind hf) and runs the
# DSA phases, warm-up then sparse, and rl and eval after it; FROM_DENSE=0 trains the dense
# phase again from scratch instead, as a recipe with attention dsa does). The dense run's
# report is kept as $OUT/dense-report-sSEED.json before the DSA run replaces it.
# On one H100 (2026-12-06 16:54 UTC, seed 0, after gpu_recipe.sh 0 with rl.enabled=false;
# 280 s): DSA - dense +2.5 / +0.5 / +1.5 / +2.5 points on math / code / logic / agents
# (± 1.1-2.0 s.e., 200 tasks each; BENCHMARKS.md).
# Run from the repository root: OUT=dir bash bench/gpu_dsa_student.sh [SEED]
# TOP_K (default 64: traces are 100-400 tokens, so top-k 64 is sparse on most of them; on
# the demo it lost 6 points on agents on one seed of two, and TOP_K=128 met the 1-point
# target on all four seeds tried: BENCHMARKS.md, 2026-12-06 23:10 UTC),
# SPARSE_STEPS (default 800: the demo's DSA student needed 800 to match the dense one),
# SPARSE_LR (default 5e-4; empty: the recipe's learning rate. Converting the demo's
# finished student on 2 seeds, 2-core CPU at load 0.4-2.3, 2026-12-06: DSA 0.2 points under the dense student on
# average at 5e-4, 1.1 under at the recipe's 3e-3, every difference within ~2 standard
# errors: the better average, not a settled choice),
# WITH_RL (default 0: the DSA run skips mixed RL and its eval scores the distilled DSA
# student, compared with the dense run's distilled one: the conversion is what is
# measured; when this was written a DSA student decoded on the GPU without the CUDA-graph
# decoder, and scoring two DSA students and RL's rollouts did not fit the 10-minute call
# after two 110 s phases. It now takes the static decoder too, not yet tried here; 1:
# mixed RL as the recipe has it),
# CONTROL (default 0; 1: a copy of the run, $DATA-ctl, continues the dense student for as
# many steps as the DSA run's sparse phase took, at the same learning rate, and is scored:
# the DSA student trains that much more than the dense one, so this separates what the
# sparse attention costs from what the extra training gives. 2-core CPU, demo seeds 2 and 3,
# 2026-12-06: the continued dense student gained as much as the DSA one; BENCHMARKS.md),
# RECIPE_SET as in gpu_recipe.sh. RECIPE and DATA (default recipes/gpu.yaml and
# data/gpu-sSEED) run the same check on another recipe's finished run, e.g. the demo's on
# a CPU: RECIPE=recipes/demo.yaml DATA=data/demo bash bench/gpu_dsa_student.sh 0
set -u
OUT=${OUT:-bench/results/gpu-dsa-student}
mkdir -p "$OUT"
s=${1:-0}
RECIPE=${RECIPE:-recipes/gpu.yaml}
DATA=${DATA:-data/gpu-s$s}
DATA=${DATA%/}  # $DATA-ctl beside it, not inside
PY=${PYTHON:-python3}
if [ ! -f "$DATA/eval/report.json" ]; then
    echo "no $DATA/eval/report.json: run $RECIPE (seed $s) into $DATA on this machine first" >&2
    exit 2
fi
if grep -q '"distill_dsa"' "$DATA/student/config.json" 2>/dev/null; then
    # a second run on the same data: student/ and eval/ are the DSA run's now
    echo "$DATA/student is already a DSA student: rerun $RECIPE (seed $s) into $DATA first" >&2
    exit 2
fi
cp "$DATA/eval/report.json" "$OUT/dense-report-s$s.json"
lr=()
[ -n "${SPARSE_LR-5e-4}" ] && lr=(--set "train.dsa.sparse_learning_rate=${SPARSE_LR-5e-4}")
rl=()
[ "${WITH_RL:-0}" = 1 ] || rl=(--set rl.enabled=false)
init=()
if [ "${FROM_DENSE:-1}" = 1 ]; then
    rm -rf "$DATA/dense-student" && cp -r "$DATA/student" "$DATA/dense-student" || exit 2
    init=(--set student.kind=hf --set "student.path=$DATA/dense-student")
fi
if [ "${CONTROL:-0}" = 1 ] && [ "${FROM_DENSE:-1}" != 1 ]; then
    echo "CONTROL=1 continues the dense run's student: it needs FROM_DENSE=1" >&2
    exit 2
fi
if [ "${CONTROL:-0}" = 1 ]; then  # the dense run as it is now, for the control after
    rm -rf "$DATA-ctl" && cp -r "$DATA" "$DATA-ctl" || exit 2
fi
PYTHONUNBUFFERED=1 timeout "${RECIPE_TIMEOUT:-570}" $PY -m distill run "$RECIPE" \
    --set seed="$s" --set output_dir="$DATA" --set student.arch.attention=dsa \
    --set student.arch.index_top_k="${TOP_K:-64}" --set train.dsa.sparse_steps="${SPARSE_STEPS:-800}" "${init[@]}" "${lr[@]}" "${rl[@]}" \
    ${RECIPE_SET:+$(printf -- '--set %s ' $RECIPE_SET)} >"$OUT/dsa-s$s.log" 2>&1
rc=$?
echo "dsa run rc=$rc"
if [ "$rc" = 0 ]; then
    cp "$DATA/eval/report.json" "$OUT/dsa-report-s$s.json"
    cp "$DATA/eval/report.md" "$OUT/dsa-report-s$s.md"
    $PY bench/dsa_vs_dense.py "$OUT/dense-report-s$s.json" "$OUT/dsa-report-s$s.json"
    if [ "${CONTROL:-0}" = 1 ]; then
        # the sparse phase's steps (its report is the train stage's last)
        steps=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['steps'])" \
            "$DATA/runs/student/train_report.json")
        ctl_lr=()
        [ -n "${SPARSE_LR-5e-4}" ] && ctl_lr=(--set "train.learning_rate=${SPARSE_LR-5e-4}")
        echo "control: the dense student continued for $steps steps"
        PYTHONUNBUFFERED=1 timeout "${CONTROL_TIMEOUT:-300}" $PY -m distill run "$RECIPE" \
            --set seed="$s" --set output_dir="$DATA-ctl" --set student.kind=hf \
            --set "student.path=$DATA-ctl/dense-student" --set train.max_steps="$steps" \
            "${ctl_lr[@]}" "${rl[@]}" ${RECIPE_SET:+$(printf -- '--set %s ' $RECIPE_SET)} \
            >"$OUT/ctl-s$s.log" 2>&1
        echo "control run rc=$?"
        if cp "$DATA-ctl/eval/report.json" "$OUT/ctl-report-s$s.json"; then
            $PY bench/dsa_vs_dense.py --names "dense,dense continued" \
                "$OUT/dense-report-s$s.json" "$OUT/ctl-report-s$s.json"
            $PY bench/dsa_vs_dense.py --names "dense continued,DSA" \
                "$OUT/ctl-report-s$s.json" "$OUT/dsa-report-s$s.json"
        fi
    fi
else  # eval/report.json is still the dense run's (2026-12-06: a table of +0.0 everywhere)
    echo "the DSA run did not finish: no comparison (its log: $OUT/dsa-s$s.log)"
fi
# every finished phase's report (its steps, per-step losses and times) and the stage's
# record: where the time went (a phase the box ends leaves none)
(cd "$DATA" && find runs/student -name train_report.json -o -name _stage.json \
    | tar -czf "$OUT/dsa-runs-s$s.tgz" -T -) 2>/dev/null
$PY bench/gpu_summary.py "$DATA"
tail -n 8 "$OUT/dsa-s$s.log"
