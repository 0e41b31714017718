#!/usr/bin/env bash
# Data-parallel training over MPI (`--features mpi`): installs Open MPI and
# libclang if needed, builds with the feature and runs the 2-rank tests
# (kernels-tests/mpi.rs) on lavapipe. Run after scripts/test.sh (it rebuilds
# target/release/cvt-gpu with the feature).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --datasets --mpi
export CVT_GPU_BACKEND="${CVT_GPU_BACKEND:-vulkan}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
# Open MPI refuses root unless told; CI runs as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "--- 2-rank data-parallel tests (--features mpi)"
cargo test --release --features mpi --test mpi
