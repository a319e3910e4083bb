#!/usr/bin/env bash
# README command 1: set up, then a short SimCLR pretraining on Fashion-MNIST (CPU) that prints the kNN top-1
# of the same backbone at random init and after training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
log=$(mktemp)
.venv/bin/python tools/pretrain.py experiment=fmnist_simclr "$@" | tee "$log"
DEMO_LOG="$log" .venv/bin/python - <<'PY'
import json, os
res = json.loads(open(os.environ["DEMO_LOG"]).read().strip().splitlines()[-1])
print(f"\nkNN top-1 on the Fashion-MNIST test set ({res['backbone']}, k=200):"
      f"  random init {res['knn_top1_init']:.2f}%   after {res['steps']} SimCLR steps {res['knn_top1']:.2f}%"
      f"   (online probe {res['probe_top1']:.2f}%, {res['train_s']:.0f} s of training, {res['wall_s']:.0f} s for the command)")
PY
