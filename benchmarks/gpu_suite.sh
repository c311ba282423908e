#!/usr/bin/env bash
# The GPU suite: one command, under 8 minutes on one H100/H200, one summary at the end.
#
#   benchmarks/gpu_suite.sh CIFAR                 # CUDA (bf16 + torch.compile, ViT-B/16 at 224 px)
#   DEVICE=cpu TINY=1 benchmarks/gpu_suite.sh     # smoke: the same steps on CPU, tiny shapes, no compile
#
# CIFAR (or the CIFAR env variable): the CIFAR-10 training split as an image-folder tree of JPEGs,
# train/<class>/<n>.jpg (50,000 images), either that folder's parent or a .tar.gz of it. You make it
# yourself from the CIFAR-10 python batches (https://www.cs.toronto.edu/~kriz/cifar.html), writing
# each image as a JPEG under its class name. Without it a small synthetic image folder is used.
#
# Steps (each one's log is kept in $OUT/<step>.log; a failing step never stops the others):
#   gpu-tests   pytest -m gpu tests/test_gpu.py: flex BlockMask vs dense SDPA (eager, compiled), FSDP2 bf16
#               step (+ checkpointing + compile), --dry-run estimate vs measured peak, trainer on CUDA
#   models      benchmarks/gpu_bench.py: img/s, MFU, peak memory of MAE/AIM/SimMIM/BEiT beside their peers
#               (HF ViTMAE / ViT-MIM / BEiT with sdpa, lightly AIM), AIM flex vs dense mask
#   loader      benchmarks/bench_loader.py on the CIFAR-10 JPEG tree: folder vs shards vs decoded cache
#   train-mae   `mimaim pretrain` MAE on CIFAR-10 for ~2 minutes (bf16, compile, loader workers): CUDA-only
#               bugs (device of loader-drawn masks, compile, NCCL-free single process); loss must fall
#   train-fsdp  torchrun FSDP2 AIM run with activation checkpointing + compile, killed by --max-steps, then
#               resumed from its sharded (DCP) checkpoint; `mimaim export`-style consolidation of it
#
# Environment: OUT (default: a new temp dir),
# TRAIN_SECONDS (default 120; the MAE run stops at its step budget or this many seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
OUT=${OUT:-$(mktemp -d -t mimaim-gpu-suite-XXXX)}
CIFAR=${1:-${CIFAR:-}}
TRAIN_SECONDS=${TRAIN_SECONDS:-120}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
T0=$(date +%s)

step() {  # step NAME COMMAND...: run, log, one status line
    local name=$1; shift
    local t=$(date +%s)
    echo "== $name: $*" >&2
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-11s %-6s %5ss  (log: %s)\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL:$rc)" \
        "$(( $(date +%s) - t ))" "$OUT/$name.log" | tee -a "$SUMMARY" >&2
    return 0
}

if [ "$DEVICE" = cpu ]; then
    SMOKE=--smoke; PRECISION=fp32; COMPILE=""; export CUDA_VISIBLE_DEVICES=""
else
    SMOKE=""; PRECISION=bf16; COMPILE=--compile
fi

# ---- data: the CIFAR-10 tree (smoke: 20 images per class of it)
DATA="$OUT/cifar"
mkdir -p "$DATA"
if [ -d "$CIFAR/train" ]; then
    ln -s "$(cd "$CIFAR" && pwd)/train" "$DATA/train"
elif [ -f "$CIFAR" ]; then
    if [ "$TINY" = 1 ]; then
        tar xzf "$CIFAR" -C "$DATA" --wildcards 'train/*/00[01]?.jpg'
    else
        tar xzf "$CIFAR" -C "$DATA"
    fi
else
    echo "no CIFAR-10 tree given: writing a small synthetic image folder instead" | tee -a "$SUMMARY" >&2
    python - "$DATA/train" <<'EOF'
import sys, numpy as np
from pathlib import Path
from PIL import Image
rng = np.random.default_rng(0)
for c in range(10):
    d = Path(sys.argv[1]) / f"class{c}"; d.mkdir(parents=True, exist_ok=True)
    for i in range(200):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg")
EOF
fi
TRAIN="$DATA/train"

# ---- 1. CUDA-only tests
if [ "$DEVICE" != cpu ]; then
    step gpu-tests python -m pytest -q -m gpu tests/test_gpu.py -rs
fi

# ---- 2. models beside their peers
step models python benchmarks/gpu_bench.py $SMOKE --json "$OUT/models.jsonl"

# ---- 3. the loader: JPEG folder vs shards vs decoded cache
if [ "$TINY" = 1 ]; then
    step loader python benchmarks/bench_loader.py --data "imagefolder:$TRAIN" --max-images 200 --workers 0 \
        --shard-size 100 --steps 0
else
    step loader python benchmarks/bench_loader.py --data "imagefolder:$TRAIN" --max-images 20000 --workers 0,4,8 \
        --batch-size 256 --steps 0
fi

# ---- 4. a ~2-minute MAE run on CIFAR-10 (loss must fall)
if [ "$TINY" = 1 ]; then
    MAE_ARGS=(--model vit_micro --batch-size 32 --max-steps 6 --epochs 1 --num-workers 0 --log-every 3)
else
    MAE_ARGS=(--model vit_small --batch-size 256 --epochs 2 --num-workers 8 --log-every 20)
fi
step train-mae timeout "$((TRAIN_SECONDS + 60))" python -m mimaim pretrain --objective mae --data "imagefolder:$TRAIN" \
    --img-size 32 --patch-size 4 --device "$DEVICE" --precision "$PRECISION" $COMPILE \
    --no-progress --out "$OUT/run-mae" "${MAE_ARGS[@]}"
python - "$OUT/run-mae" >> "$SUMMARY" <<'EOF'
import sys
from mimaim.engine.logging import read_metrics
rows = read_metrics(sys.argv[1])
if len(rows) >= 2:
    first, last = rows[0], rows[-1]
    fell = float(last["loss"]) < float(first["loss"])
    print(f"train-mae   loss {float(first['loss']):.4f} (step {first['step']}) -> {float(last['loss']):.4f} "
          f"(step {last['step']}) {'falls' if fell else 'DOES NOT FALL'}; {float(last['images_per_s']):.0f} img/s")
else:
    print(f"train-mae   {len(rows)} metrics row(s) written (see its log)")
EOF

# ---- 5. FSDP2 + checkpointing + compile through torchrun, then resume from its sharded checkpoint
if python -m mimaim pretrain --help 2>/dev/null | grep -q -- "--strategy"; then
    if [ "$TINY" = 1 ]; then
        FSDP_ARGS=(--model vit_micro --batch-size 16 --num-workers 0); NPROC=2; STEPS=(4 6)
    else
        FSDP_ARGS=(--model vit_base --batch-size 128 --num-workers 4); NPROC=1; STEPS=(30 40)
    fi
    step train-fsdp torchrun --standalone --nproc_per_node=$NPROC -m mimaim pretrain --objective aim \
        --strategy fsdp --activation-checkpointing --data "imagefolder:$TRAIN" --img-size 32 --patch-size 4 \
        --device "$DEVICE" --precision "$PRECISION" $COMPILE --epochs 1 --max-steps "${STEPS[0]}" --save-every 2 \
        --no-progress --out "$OUT/run-fsdp" "${FSDP_ARGS[@]}"
    step resume-fsdp torchrun --standalone --nproc_per_node=$NPROC -m mimaim pretrain --resume "$OUT/run-fsdp" \
        --max-steps "${STEPS[1]}" --no-progress
    step read-fsdp python -c "
import sys
from mimaim import load_backbone
m = load_backbone('$OUT/run-fsdp')
print(type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters read from the sharded checkpoint')"
fi

# ---- the one table
{
    echo
    echo "mimaim GPU suite, $(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - T0 ))s in all"
    python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU: ' + open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].split(chr(10))[0].strip())"
    echo
    echo "steps:"; cat "$SUMMARY"
    echo
    sed -n '/^training throughput/,$p' "$OUT/models.log"
    echo
    echo "loader (benchmarks/bench_loader.py):"
    grep -v "^\s*$" "$OUT/loader.log" | tail -15
} | tee "$OUT/table.txt"
