#!/usr/bin/env bash
# The whole pretraining command at 224 px on one GPU (one short run of about 8 minutes, each step with its own time
# limit; not yet run on a GPU):
# benchmarks/e2e.py -- the real run_pretraining path beside its loader, batched augmentation and model step alone --
# for MoCo v3 ResNet-50 (batch 256) and DINO ViT-S/16 multi-crop (batch 128), bf16, channels_last, synthetic data,
# 14 loader workers -- the MoCo v3 row also runs the whole command with data.device_prefetch=false (each batch then
# copied right before its step instead of during the step before: whole_no_prefetch, prefetch_gain in its JSON);
# [optional] the same MoCo v3 run from a generated JPEG ImageFolder decoded on the GPU
# (data.decode=device); then the two benchmarks/vs_lightly.py rows of gpu_check.sh (model step, ours vs lightly).
#
# A GPU machine that has torch, timm, lightning, pytorch_lightning, PyYAML, tensorboard, torchmetrics and safetensors
# but no package index gets the rest as wheels (~25 MB; versions that resolved and ran on such a machine with Python
# 3.12 and torch 2.11; the code accepts them, constraints.txt pins newer ones for the .venv), made once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core==1.3.2 omegaconf==2.3.0 lightly==1.6.0 faiss-cpu==1.13.2
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI; pure Python
# Then, on the GPU machine, with .whl/ inside the repository checkout:
#   timeout 540 bash benchmarks/gpu_e2e.sh
# and add the tables it prints (and $OUT/*.json) to benchmarks/RESULTS.md with the card named.
#
# E2E_SMOKE=1 shrinks everything (CPU, 32 px, tiny backbones, 2 timed steps) to check the script itself anywhere:
#   E2E_SMOKE=1 OUT=/tmp/gpu_e2e_smoke bash benchmarks/gpu_e2e.sh
# E2E_JPEG=0 skips the optional JPEG step. Each step has its own time limit; one that fails or runs out is reported
# and the next one runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_e2e}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
PY=${PYTHON:-python3}

if [ "${E2E_SMOKE:-0}" = 1 ]; then
  size=32; n=128; workers=0; steps=(--steps 2 --warmup 1); limit=240
  dev=(--device cpu); r50=(backbone=resnet18 backbone.width=0.125)
  vits=(backbone=vit_tiny method.kwargs.out_dim=256 method.kwargs.hidden_dim=128)
  moco_bs=16; dino_bs=8; jpeg_n=40
  lightly_common=(--device cpu --image-size 32 --batch 16 --steps 1 --warmup 1 --rounds 1)
  lightly_r50=(--backbone resnet18); lightly_vit=(--backbone vit_tiny)
else
  size=224; n=65536; workers=14; steps=(--steps 40 --warmup 10); limit=150
  dev=(--device cuda); r50=(backbone=resnet50); vits=(backbone=vit_s)
  moco_bs=256; dino_bs=128; jpeg_n=16384  # 64 batches of 256 per epoch: no epoch end inside the 50 steps
  lightly_common=(--device cuda --precision bf16 --lightly-channels-last --paper-heads --image-size 224 --batch 128
                  --steps 10 --warmup 5 --rounds 2 --peak-tflops 989)
  lightly_r50=(--backbone resnet50); lightly_vit=(--backbone vit_small)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
nproc | tee "$OUT/cpus.txt"
synthetic=(data=synthetic "data.image_size=$size" "data.synthetic_size=$n" "data.num_workers=$workers"
           augment.backend=batched)

step() {  # step NAME SECONDS CMD...: run with its own time limit; report a failure and go on
  local name=$1 secs=$2; shift 2
  echo "=== $name"
  local t0=$SECONDS rc=0
  timeout "$secs" "$@" || rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}

step moco_v3_r50 $((limit + 60)) "$PY" benchmarks/e2e.py "${dev[@]}" "${steps[@]}" method=moco_v3 "${r50[@]}" \
  "${synthetic[@]}" "data.batch_size=$moco_bs" --stages whole,step,loader,aug,synthetic_gen,whole_no_prefetch \
  --json "$OUT/e2e_moco_v3_r50.json"
step dino_vits16 "$limit" "$PY" benchmarks/e2e.py "${dev[@]}" "${steps[@]}" method=dino "${vits[@]}" \
  "${synthetic[@]}" "data.batch_size=$dino_bs" --json "$OUT/e2e_dino_vits16.json"

# [optional] JPEG ImageFolder decoded on the device (data.decode=device): the synthetic images written once as
# JPEG files (quality 90, 10 class folders; val/ a tenth the size), then the MoCo v3 run reading them.
if [ "${E2E_JPEG:-1}" = 1 ] && "$PY" tools/pretrain.py --cfg job data=imagefolder | grep -q "^  decode:"; then
  step make_jpegs 90 "$PY" - "$OUT/jpeg" "$jpeg_n" "$size" <<'EOF'
import sys
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, ".")
from ssl_vision.data.datasets import SyntheticDataset

root, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def write(args):
    split, lo, hi = args
    ds = SyntheticDataset(n if split == "train" else max(n // 10, 10), size, 3, 10, seed=0 if split == "train" else 1)
    for i in range(lo, min(hi, len(ds))):
        img, label = ds[i]
        d = root / split / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:06d}.jpg", quality=90)

jobs = [(s, lo, lo + 256) for s, m in (("train", n), ("val", max(n // 10, 10))) for lo in range(0, m, 256)]
with ProcessPoolExecutor() as pool:
    list(pool.map(write, jobs))
print(f"{sum(1 for _ in root.rglob('*.jpg'))} JPEG files under {root}")
EOF
  step moco_v3_r50_jpeg "$limit" "$PY" benchmarks/e2e.py "${dev[@]}" "${steps[@]}" method=moco_v3 "${r50[@]}" \
    data=imagefolder "data.root=$OUT/jpeg" data.num_classes=10 "data.image_size=$size" data.decode=device \
    "data.num_workers=$workers" augment.backend=batched "data.batch_size=$moco_bs" \
    --json "$OUT/e2e_moco_v3_r50_jpeg.json"
fi

# the model step alone, ours vs lightly (as in gpu_check.sh)
if "$PY" -c "import lightly" 2>/dev/null; then
  step lightly_moco_v3 "$limit" "$PY" benchmarks/vs_lightly.py --methods moco_v3 "${lightly_r50[@]}" \
    "${lightly_common[@]}" --json "$OUT/moco_v3_r50.json"
  step lightly_dino "$limit" "$PY" benchmarks/vs_lightly.py --methods dino "${lightly_vit[@]}" \
    "${lightly_common[@]}" --json "$OUT/dino_vits16.json"
else
  echo "=== vs_lightly skipped: lightly is not installed (pip install -e '.[bench]', or the .whl/ wheels above)"
fi
ls -l "$OUT"
