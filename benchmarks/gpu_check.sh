#!/usr/bin/env bash
# The GPU check in one script, under 8 minutes on one GPU: the test suite on CUDA, both benchmarks
# (eager, compiled, bf16) against normflows, the bf16 bits/dim drift, a CUDA-graphed step, and the
# distributed test on NCCL. It prints its tables and writes them to benchmarks/gpu_check.md (or $1).
# On a machine without CUDA the non-CUDA parts run and every CUDA part says that it was skipped.
#
#     bash benchmarks/gpu_check.sh [results.md]
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/gpu_check.md}
: >"$results"
python=${PYTHON:-python}
export PYTHONUNBUFFERED=1 # a section stopped at its limit keeps what it printed
failed=0

say() { echo "$@" | tee -a "$results"; }
# run LIMIT TITLE COMMAND...: a section under a time limit, its output into the results
run() {
    local limit=$1 title=$2
    shift 2
    say ""
    say "## $title"
    say ""
    say "\`$*\`"
    say ""
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | grep -v "^W[0-9]" | tee -a "$results"
    local status=${PIPESTATUS[0]}
    [ "$status" -ne 0 ] && failed=1
    [ "$status" -eq 124 ] && say "(stopped at its limit of $limit s)"
    [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && say "(exit status $status)"
    say "($((SECONDS - started)) s)"
}
skipped() { say ""; say "## $1"; say ""; say "SKIPPED: $2"; }

say "# GPU check, $(date -u +%Y-%m-%d) at iresnet $(git rev-parse --short HEAD 2>/dev/null)"
run 30 "Environment" "$python" -c "import torch, normflows; print('torch', torch.__version__, '| normflows', normflows.__version__, '| CUDA', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| GPUs', torch.cuda.device_count())"

gpus=$("$python" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
gpus=${gpus:-0}
if [ "$gpus" -eq 0 ]; then
    run 300 "torch.compile on the CPU (the non-CUDA part)" "$python" -m pytest -q -p no:cacheprovider tests/test_compile.py
    for part in "Test suite on CUDA" "Toy flow benchmark on CUDA (eager, compiled)" "Toy flow benchmark on CUDA in bf16" \
        "Image flow benchmark on CUDA (eager, compiled)" "Image flow benchmark on CUDA in bf16" \
        "bf16 against float32: bits/dim drift" "A CUDA-graphed training step" "Distributed training on NCCL"; do
        skipped "$part" "no CUDA device on this machine"
    done
    exit "$failed"
fi

run 180 "Test suite on CUDA" "$python" -m pytest -q -x -p no:cacheprovider --device cuda
run 60 "Toy flow benchmark on CUDA (eager, compiled)" "$python" benchmarks/toy_flow_vs_normflows.py --device cuda --compile --steps 20
run 30 "Toy flow benchmark on CUDA in bf16" "$python" benchmarks/toy_flow_vs_normflows.py --device cuda --precision bf16 --steps 20
run 50 "Image flow benchmark on CUDA (eager, compiled)" "$python" benchmarks/image_flow_vs_normflows.py --device cuda --compile --steps 15
run 30 "Image flow benchmark on CUDA in bf16" "$python" benchmarks/image_flow_vs_normflows.py --device cuda --precision bf16 --steps 15
run 80 "bf16 against float32: bits/dim drift and a CUDA-graphed training step" "$python" benchmarks/cuda_extras.py --drift --cuda-graphs --steps 200
if [ "$gpus" -ge 2 ]; then
    run 50 "Distributed training on NCCL" "$python" -m torch.distributed.run --standalone --nproc-per-node 2 -m iresnet train \
        --device cuda --out "$(mktemp -d)/nccl" --steps 20 --no-progress model.blocks=2 model.hidden=16 eval_size=500
else
    skipped "Distributed training on NCCL" "one GPU: NCCL cannot run two ranks on one device (tests/test_distributed.py covers gloo)"
fi
say ""
say "Written to $results"
exit "$failed"
