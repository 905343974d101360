#!/usr/bin/env bash
# The wheels the device's image lacks, for its Python 3.12, into .whl/ (git-ignored), at
# the versions this checkout's .venv holds: run from the repository root after `make
# setup`. A device call carries them (`carry: [".whl"]`) and installs them first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD
# The image has torch, transformers, accelerate, peft, pyarrow, typer, rich, httpx, anyio
# (/work/.library/device/KINDS.md); fastapi, starlette and uvicorn let the serve test run.
set -eu
names="datasets dill multiprocess xxhash pydantic pydantic_core annotated-types
typing-inspection jsonlines ruamel.yaml math-verify latex2sympy2_extended httpx2 httpcore2 truststore
antlr4-python3-runtime fastapi starlette uvicorn annotated-doc h11 opentelemetry-api openai distro
jiter sniffio"
# WITH_TRL=1: the TRL anchors of bench/train_throughput.py and bench/rl.py too (liger-kernel
# 0.8.5 ran with TRL 1.16.0 there; it is not in .venv, hence pinned here)
[ "${WITH_TRL:-0}" = 1 ] && names="$names trl"
pins=()
[ "${WITH_TRL:-0}" = 1 ] && pins+=("liger-kernel==0.8.5")
for n in $names; do
    v=$(.venv/bin/python -m pip show "$n" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$v" ] || { echo "$n is not in .venv: run make setup first" >&2; exit 2; }
    pins+=("$n==$v")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls .whl | wc -l
du -sh .whl
