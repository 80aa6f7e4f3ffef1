#!/usr/bin/env bash
# The offline default: LoRA and the linear probe on the same pretrained tiny ViT, test accuracies side by side.
source "$(dirname "$0")/setup_env.sh"
rm -rf runs/quickstart
python tools/train.py configs/quickstart.yaml --work-dir runs/quickstart/lora
python tools/train.py configs/quickstart_linear.yaml --work-dir runs/quickstart/linear
python tools/compare.py runs/quickstart/lora runs/quickstart/linear
