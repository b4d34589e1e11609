#!/usr/bin/env bash
# The paper's protocol end to end on GPUs: recipes/paper.toml (ResNet34v2 stages 1-3, LHC-Net
# stage 4 with its acceptance rule, LHC-NetC stage C) at 224 px, then the final model on
# PrivateTest, single view and with the paper's 60-view TTA (docs/training.md, "GPU").
#
#   scripts/paper_gpu.sh fer2013.csv.gz runs/paper                   # one GPU
#   NPROC=4 scripts/paper_gpu.sh fer2013.csv.gz runs/paper           # 4 GPUs of this machine (torchrun)
#   scripts/paper_gpu.sh fer2013.csv.gz runs/paper --bf16 --compile  # more `lhcnet train` options
#
# Run it again with the same arguments to continue a stopped run (--resume is added when OUT
# holds one). Needs the converted ImageNet backbone: without it `lhcnet train` stops at once and
# names the file to download and the `lhcnet convert-weights` command. Exit codes are those of
# `lhcnet train`; 4: stage 4 was rejected by the acceptance rule (the paper trains stage 4 again
# from the same ResNet: a recipe of stages 4 and C with `from = "OUT/stage3-best.safetensors"`
# and another seed in stage 4); running this script again instead continues with stage C from
# the rejected stage-4 model.
set -euo pipefail

usage="usage: [NPROC=N] scripts/paper_gpu.sh DATA OUT [lhcnet train options...]"
DATA=${1:?$usage}
OUT=${2:?$usage}
shift 2
NPROC=${NPROC:-1}
RECIPE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/recipes/paper.toml"

python3 - "$NPROC" <<'PY'
import sys, torch
need = int(sys.argv[1])
have = torch.cuda.device_count()
if have < need:
    sys.exit(f"paper_gpu.sh: {need} GPU(s) asked for (NPROC), {have} visible to torch {torch.__version__}")
PY

resume=()
if [ -f "$OUT/config.toml" ]; then
    resume=(--resume)
fi
train_args=(train --recipe "$RECIPE" --data "$DATA" --out "$OUT" --device cuda --no-progress "${resume[@]}" "$@")
if [ "$NPROC" -gt 1 ]; then
    # one process per GPU (LOCAL_RANK); every process takes batch_size / NPROC of each batch
    torchrun --standalone --nproc_per_node="$NPROC" -m lhcnet.cli "${train_args[@]}"
else
    lhcnet "${train_args[@]}"
fi

lhcnet evaluate "$OUT/final.safetensors" --data "$DATA" --split PrivateTest --device cuda --out "$OUT/eval"
lhcnet evaluate "$OUT/final.safetensors" --data "$DATA" --split PrivateTest --device cuda --tta-views paper \
    --out "$OUT/eval-tta"
