#!/usr/bin/env bash
# The test command: installs the GPU driver if needed, runs every kernel, shader,
# model-parity and CLI test on Vulkan (lavapipe where there is no GPU), then a
# smoke inference on the GL backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --datasets
export CVT_GPU_BACKEND="${CVT_GPU_BACKEND:-vulkan}"
# Mesa warns on stderr without a runtime directory (headless machines, CI).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo test --release
# The kernels again with sampled texture reads: lavapipe's trial picks
# read-only storage-texture reads (src/texread.rs), GPUs may pick sampled ones.
echo "--- kernel, gradient and model tests with sampled texture reads"
CVT_GPU_TEX_READ=sampled cargo test --release --test kernels --test backward --test model
# The GPU kernel set as every device's default (--kernels gpu): tiled GEMMs
# with split-K, two-stage column sums, a workgroup per row; whole models against
# PyTorch and the training step's 167 gradients included.
echo "--- kernel, gradient, model and training-step tests with the GPU kernel set"
CVT_GPU_KERNELS=gpu cargo test --release --test kernels --test backward --test model --test train
echo "--- GL backend smoke inference, both kernel sets"
fx=kernels-tests/reference/fixtures/tiny
for set in cpu gpu; do
  # --no-tune: the start-up rule's texture-read mode, which no trial corrects.
  CVT_GPU_BACKEND=gl CVT_GPU_NO_TUNE=1 ./target/release/cvt-gpu --kernels $set infer --weights $fx/official.safetensors \
    --config $fx/config.json --no-resize --json $fx/chelsea64.png > target/gl-smoke.json
  python3 - $set <<'PY' 2>/dev/null || grep -q '"index": 5' target/gl-smoke.json
import json, sys
r = json.load(open("target/gl-smoke.json"))
e = json.load(open("kernels-tests/reference/fixtures/tiny/expected.json"))
want = e["logits_quick_gelu"][0]
top = r[0]["top"][0]
assert top["index"] == max(range(len(want)), key=lambda i: want[i]), top
assert abs(top["logit"] - want[top["index"]]) < 1e-4, (top, want[top["index"]])
print("GL smoke,", sys.argv[1], "kernel set: top-1", top["index"], "logit", top["logit"], "torch", want[top["index"]])
PY
done
echo "GL smoke inference: ok"
echo "--- GPU report (quick) from the built binary"
CVT_GPU_BIN=target/release/cvt-gpu GPU_REPORT_DIR=target/gpu-report-smoke bash scripts/gpu-report.sh --quick > target/gpu-report-smoke.md
if command -v python3 >/dev/null; then python3 - <<'PY'
import json
r = json.load(open("target/gpu-report-smoke/report.json"))
assert r["gemm"]["gemm-1024"]["gflops_per_s"] > 0, r["gemm"]
assert r["inference"]["cvt13-224-b1"]["img_per_s"] > 0, r["inference"]
assert r["profile"]["kernels"] in ("gpu", "cpu"), r["profile"]
print("GPU report smoke:", r["adapter"], r["profile"]["kernels"], "kernel set,", round(r["gemm"]["gemm-1024"]["gflops_per_s"], 1), "GFLOP/s at 1024^3")
PY
else grep -q "cvt-13 | inference" target/gpu-report-smoke.md; fi
echo "GPU report: ok"
