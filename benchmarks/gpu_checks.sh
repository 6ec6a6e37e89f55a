#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (the GPU machine is lent by the minute):
#
#     bash benchmarks/gpu_checks.sh OUT_DIR [PART ...]
#
# PART is any of: env, finetune, torchrun, throughput, compile, compile-train, cpu-latency, cpu-overhead, cpu-profile,
# cpu-python, overhead-parts, cpu-latency-compile, train-step, cpu-latency-threads, gpu-tests, nan-stop (default: env finetune torchrun throughput cpu-latency).
# LATENCY_MODELS (default: the script's pairs) narrows the cpu-latency part to some base models.
# Each part appends to OUT_DIR/gpu_checks.log and copies its small results (metrics, JSON) into OUT_DIR.
# The model weights of the fine-tuning runs stay in a temporary folder: they are large and random-init.
set -uo pipefail

OUT=${1:?usage: gpu_checks.sh OUT_DIR [PART ...]}
shift
PARTS=${*:-env finetune torchrun throughput cpu-latency}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
RUNS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

# Returns the command's status, so that `step ... && cp RESULT` copies only what this run wrote.
step() {
    echo "=== $* ($(date +%T))"
    "$@" && return 0
    local rc=$?
    echo "=== FAILED ($rc): $*"
    status=1
    return $rc
}
if [ -z "${SE_RETROFIT_COMMIT:-}" ] && ! git -C "$HERE" rev-parse HEAD >/dev/null 2>&1; then
    echo "warning: SE_RETROFIT_COMMIT is not set and this copy has no .git: results will not say which code measured them"
fi

{
for part in $PARTS; do
    case $part in
    env)
        step nvidia-smi -L
        step "$PYTHON" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
        ;;
    finetune)
        # GPU path of the CLI: AMP (bf16), channels_last, torch.compile, on the built-in digits data.
        step "$PYTHON" -m se_retrofit.cli convert-and-finetune resnet50 --data digits --out "$RUNS/cuda" \
            --no-pretrained --epochs 3 --batch-size 64 --image-size 64 --device cuda --amp --channels-last \
            --compile --workers 4 --no-progress
        mkdir -p "$OUT/finetune_cuda"
        cp "$RUNS/cuda/"{metrics.csv,config.json,report.md} "$OUT/finetune_cuda/" 2>/dev/null
        ;;
    torchrun)
        # DDP with the nccl backend (one process per GPU; on a one-GPU machine, one process).
        ngpu=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
        step "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" \
            -m se_retrofit.cli convert-and-finetune resnet50 --data digits --out "$RUNS/ddp" --no-pretrained \
            --epochs 1 --batch-size 64 --image-size 64 --amp --channels-last --workers 2 --no-progress
        mkdir -p "$OUT/finetune_ddp"
        cp "$RUNS/ddp/"{metrics.csv,config.json} "$OUT/finetune_ddp/" 2>/dev/null
        ;;
    nan-stop)
        # The NaN/inf stop under torchrun (nccl): the flag stays on the GPU and the ranks agree through a MIN
        # all-reduce. lr 1e30 overflows the weights in the first step; the run must fail (torchrun exits 1 when
        # its worker exits 2), say so, and not print "done:".
        echo "=== nan-stop ($(date +%T))"
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
            -m se_retrofit.cli convert-and-finetune resnet50 --data digits --out "$RUNS/nan" --no-pretrained \
            --epochs 2 --batch-size 64 --image-size 64 --lr 1e30 --amp --channels-last --workers 2 --no-progress \
            > "$OUT/nan_stop.log" 2>&1
        rc=$?
        grep -E "NaN or inf|done:" "$OUT/nan_stop.log" | head -3
        ls "$RUNS/nan"
        if [ "$rc" -eq 0 ] || ! grep -q "NaN or inf" "$OUT/nan_stop.log" || grep -q "done:" "$OUT/nan_stop.log"; then
            echo "=== FAILED: nan-stop (exit $rc)"; status=1
        else
            echo "=== nan-stop: stopped as expected (exit $rc)"
        fi
        ;;
    throughput)
        step "$PYTHON" "$HERE/gpu_throughput.py" --rounds 7 --steps 10 && cp "$HERE/results/gpu_throughput.json" "$OUT/"
        ;;
    compile)
        step "$PYTHON" "$HERE/gpu_throughput.py" --rounds 7 --steps 10 --compile --name gpu_throughput_compile \
            && cp "$HERE/results/gpu_throughput_compile.json" "$OUT/"
        ;;
    compile-train)
        # Compiled training only, the three models the issue compares (compiling each takes a minute or more).
        step "$PYTHON" "$HERE/gpu_throughput.py" --rounds 5 --steps 10 --compiled-only --kinds train \
            --configs base hand retro --name gpu_throughput_compile_train \
            && cp "$HERE/results/gpu_throughput_compile_train.json" "$OUT/"
        ;;
    cpu-latency)
        # The GPU machine's CPU is otherwise idle: a quieter place for the CPU latency ratios.
        CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/latency.py" --repeats 31 ${LATENCY_MODELS:+--models $LATENCY_MODELS} \
            && cp "$HERE/results/latency.json" "$OUT/latency_gpu_host.json"
        ;;
    cpu-overhead)
        # The retrofit's overhead over the base model alone (twice the rounds per minute), at 16 and 4 threads.
        for t in 16 4; do
            CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/latency.py" --models resnet50 --base-and-retrofit \
                --threads $t --repeats $((t == 16 ? 101 : 41)) --name latency_overhead_t$t \
                && cp "$HERE/results/latency_overhead_t$t.json" "$OUT/latency_overhead_t${t}_gpu_host.json"
        done
        ;;
    cpu-profile)
        # Where the retrofit's time goes at 16 threads: profiler op times, base model and retrofit only (~1 min).
        CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/se_overhead.py" --threads 16 --rounds 15 --variants retrofitted \
            --no-page-faults --name se_overhead_t16 && cp "$HERE/results/se_overhead_t16.json" "$OUT/se_overhead_t16_gpu_host.json"
        ;;
    cpu-python)
        # The Python around SE's kernels on this machine's cores (one thread; ~20 s).
        CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/gate_overhead.py" --name gate_overhead_host \
            && cp "$HERE/results/gate_overhead_host.json" "$OUT/gate_overhead_gpu_host.json"
        ;;
    overhead-parts)
        # The retrofit's time over the base model split by variant (kernels only, gate given, ...), 16 and 4
        # threads (~4 min).
        CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/overhead_parts.py" --threads 16 4 --rounds 101 25 \
            --name overhead_parts_host && cp "$HERE/results/overhead_parts_host.json" "$OUT/overhead_parts_gpu_host.json"
        ;;
    cpu-latency-threads)
        for t in 16 4; do
            CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/latency.py" --repeats 41 --models resnet50 --threads $t --name latency_t$t \
                && cp "$HERE/results/latency_t$t.json" "$OUT/latency_t${t}_gpu_host.json"
        done
        ;;
    cpu-latency-compile)
        CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/latency.py" --repeats 21 --models resnet50 --compile \
            && cp "$HERE/results/latency_compile.json" "$OUT/latency_compile_gpu_host.json"
        ;;
    train-step)
        # Training step on the CPU (16 quiet cores): retrofitted vs hand-written, --train se vs all.
        CUDA_VISIBLE_DEVICES= step "$PYTHON" "$HERE/train_step.py" --json "$OUT/train_step_gpu_host.json"
        ;;
    gpu-tests)
        step "$PYTHON" -m pytest -q -p no:cacheprovider "$HERE/../tests/test_gpu.py" "$HERE/../tests/test_fusion.py"
        ;;
    *)
        echo "unknown part $part"; status=2
        ;;
    esac
done
exit "$status"
} 2>&1 | tee -a "$OUT/gpu_checks.log"
exit "${PIPESTATUS[0]}"
