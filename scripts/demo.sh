#!/usr/bin/env bash
# The demo: installs the GPU driver if needed, builds, shows the adapter, then
# classifies the bundled Fashion-MNIST test images with the small CvT this engine
# trained (weights/fmnist/model.safetensors; how: weights/README.md) and times a
# CvT-13 forward at 224x224 (random weights) on this machine's GPU.
# With a released ImageNet checkpoint, classify the bundled photos instead:
#   ./target/release/cvt-gpu infer --weights cvt-13.safetensors weights/samples/*.png weights/samples/*.jpg
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo build --release --quiet
./target/release/cvt-gpu adapters
./target/release/cvt-gpu infer --topk 3 --weights weights/fmnist/model.safetensors weights/samples/fmnist-*.png
./target/release/cvt-gpu bench --model cvt-13 --batch 1 --iters 1
