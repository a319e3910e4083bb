#!/usr/bin/env bash
# GPU check (one short run, under 9 minutes; not yet run on a GPU):
# images/s and model FLOP utilisation of ResNet-50 MoCo v3 and ViT-S/16 DINO at 224 px, bf16 and channels_last,
# ours beside the lightly-built equivalent (benchmarks/vs_lightly.py: same backbone, views, head sizes, optimizer).
#
# A GPU machine that has torch, timm, lightning, pytorch_lightning, PyYAML, tensorboard, torchmetrics and safetensors
# but no package index gets the rest as wheels (19 MB; the versions pinned for this project's .venv), made once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core==1.3.8 omegaconf==2.3.1 lightly==1.6.0 faiss-cpu==1.15.1
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI; pure Python
# Then, on the GPU machine, with .whl/ inside the repository checkout:
#   timeout 540 bash benchmarks/gpu_check.sh
# and add the two tables it prints (and $OUT/*.json) to benchmarks/RESULTS.md with the card named.
#
# MFU is against --peak-tflops 989 (H100/H200 SXM dense bf16, the datasheet figure); an 8192^3 bf16 matmul measured
# 769-798 TFLOP/s on an H200, so ~80 % MFU is the practical ceiling. Batch 128 per side: the
# recipes' per-GPU batch on 8-GPU runs of a 1024 global batch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
common=(--device cuda --precision bf16 --lightly-channels-last --paper-heads --image-size 224 --batch 128
        --steps 10 --warmup 5 --rounds 2 --peak-tflops 989)
python3 benchmarks/vs_lightly.py --methods moco_v3 --backbone resnet50 "${common[@]}" --json "$OUT/moco_v3_r50.json"
python3 benchmarks/vs_lightly.py --methods dino --backbone vit_small "${common[@]}" --json "$OUT/dino_vits16.json"
