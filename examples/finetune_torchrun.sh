#!/usr/bin/env bash
# Fine-tune with DistributedDataParallel: 2 processes on the CPU (gloo backend), on the built-in digits data.
#
#     bash examples/finetune_torchrun.sh [OUT_DIR]
#
# Under torchrun, `se-retrofit convert-and-finetune` joins the process group torchrun describes (nccl on
# GPUs, gloo on the CPU), shards the data by rank, wraps the model in DDP and writes the run folder from
# rank 0 only. --batch-size is per process: the global batch here is 2 x 32. On a machine with GPUs, drop
# --device cpu and set --nproc_per_node to the number of GPUs.
#
# `python -m torch.distributed.run` is `torchrun`; it is used so that the python of your environment
# (PYTHON, default: python) is the one that runs. Offline: --no-pretrained (random weights), so the
# accuracy says nothing; pass --checkpoint FILE for your own weights.
set -euo pipefail

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-2}
OUT=${1:-$(mktemp -d)/run}

"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    -m se_retrofit.cli convert-and-finetune resnet10t \
    --data digits --out "$OUT" --no-pretrained \
    --epochs 1 --batch-size 32 --image-size 32 \
    --device cpu --workers 0 --no-progress

# Check what the run promises: rank 0 wrote the run folder, with the weights, the adapter and a config
# that records every process. Exit non-zero (and say why) otherwise.
for name in config.json metrics.csv model.safetensors se_adapter.safetensors; do
    test -f "$OUT/$name" || { echo "error: $OUT/$name was not written" >&2; exit 1; }
done
grep -Eq "\"world_size\": $NPROC([^0-9]|\$)" "$OUT/config.json" \
    || { echo "error: $OUT/config.json does not record world_size $NPROC" >&2; exit 1; }

echo "run folder $OUT ($NPROC processes):"
ls "$OUT"
