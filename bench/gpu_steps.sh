# shellcheck shell=bash
# Sourced by the bench/gpu_*.sh scripts (the wheels they need: bench/device_wheels.sh):
# each step of a device call in its own time box,
# its output appended to one log ($LOG: a device call brings back 8 files).
step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    echo "===== $name" >>"$LOG"
    timeout "$secs" "$@" >>"$LOG" 2>&1
    echo "$name rc=$? ${SECONDS}s total, $((SECONDS - t0))s" | tee -a "$LOG"
}
