#!/usr/bin/env bash
# The demo: installs the GPU driver if needed, builds, shows the adapter and runs
# a CvT-13 forward at 224x224 (random weights) with its timing and GFLOP/s.
# With a released checkpoint, classify the bundled photos instead:
#   ./target/release/cvt-gpu infer --weights cvt-13.safetensors weights/samples/*
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo build --release --quiet
./target/release/cvt-gpu adapters | head -2
./target/release/cvt-gpu bench --model cvt-13 --batch 1 --iters 1
