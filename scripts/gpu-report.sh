#!/usr/bin/env bash
# The GPU report: what this engine does on this machine's GPU, with PyTorch beside
# it where torch and transformers import.
#
#   bash scripts/gpu-report.sh [--quick]
#
# Builds the release binary if needed (or runs CVT_GPU_BIN=path, for a machine
# with no Rust toolchain), then measures and prints a markdown table, and writes
# every figure to target/gpu-report/report.json (GPU_REPORT_DIR overrides):
#   - the adapter, backend, driver, features and the resolved kernel profile;
#   - the GEMM rate at 1024³ and at CvT-13's own shapes (GPU timestamps where
#     the adapter has them), and its share of the GPU's FP32 peak where that is
#     known (PEAK_GFLOPS=... gives it for any GPU);
#   - CvT-13 inference at 224, batches 1, 8 and 64 (latency, img/s, GFLOP/s,
#     share of the GEMM ceiling, peak memory, first call); CvT-W24 at 384,
#     batch 1; a CvT-13 training step at 64×64 batch 64 and at 224 batch 32;
#   - with torch: the same CvT-13 (CvtForImageClassification, same random
#     weights, eager f32, TF32 off) on torch's best device, its logits against
#     the engine's and the speed ratio (kernels-tests/reference/torch_bench.py).
# --quick: 1024³ and two CvT shapes, inference batches 1 and 8, the training step
# at 64×64 batch 16; no W24, no 224 training. A figure the adapter cannot hold
# (storage-binding limits) is reported as such, not as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
out="${GPU_REPORT_DIR:-target/gpu-report}"
mkdir -p "$out"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
bin="${CVT_GPU_BIN:-}"
if [[ -z "$bin" ]]; then
  if ! command -v cargo >/dev/null; then
    echo "error: no cargo here; build elsewhere and set CVT_GPU_BIN=path/to/cvt-gpu" >&2
    exit 1
  fi
  cargo build --release --quiet || exit 1
  bin=target/release/cvt-gpu
fi
[[ -x "$bin" ]] || { echo "error: $bin: not an executable cvt-gpu binary" >&2; exit 1; }
# The binary refuses unknown CVT_GPU_* variables: this one is the script's own.
unset CVT_GPU_BIN

# One measurement: NAME then the cvt-gpu arguments; JSON to $out/NAME.json, or the
# error line to $out/NAME.err.
measure() {
  local name=$1
  shift
  echo "  $name: cvt-gpu $*" >&2
  if "$bin" "$@" --json >"$out/$name.json" 2>"$out/$name.err"; then
    rm -f "$out/$name.err"
  else
    rm -f "$out/$name.json"
    echo "    not measured: $(grep -m1 '^error' "$out/$name.err" || tail -1 "$out/$name.err")" >&2
  fi
}

rm -f "$out"/*.json "$out"/*.err
echo "measuring (figures in $out):" >&2
if "$bin" adapters --json >"$out/adapters.json" 2>"$out/adapters.err"; then
  rm -f "$out/adapters.err"
else
  rm -f "$out/adapters.json"
  echo "  adapters: $(grep -m1 '^error' "$out/adapters.err" || tail -1 "$out/adapters.err")" >&2
fi
measure gemm-1024 bench --gemm --iters 10
measure gemm-stage0-qkv bench --gemm --shape 200704,64,64 --iters 5
measure gemm-stage2-fc1 bench --gemm --shape 12608,1536,384 --iters 5
if [[ $quick == 0 ]]; then
  measure gemm-stage1-fc1 bench --gemm --shape 50176,768,192 --iters 5
  # A weight gradient's shape (64x64 over every token of a batch), as a forward product.
  measure gemm-long-k bench --gemm --shape 64,64,200704 --iters 5
fi
for b in 1 8 $([[ $quick == 0 ]] && echo 64); do
  measure "cvt13-224-b$b" bench --model cvt-13 --res 224 --batch "$b" --iters 5
done
if [[ $quick == 0 ]]; then
  measure w24-384-b1 bench --model cvt-w24 --res 384 --batch 1 --iters 3
  measure train-64-b64 bench --model cvt-13 --mode train --res 64 --batch 64 --iters 3
  measure train-224-b32 bench --model cvt-13 --mode train --res 224 --batch 32 --iters 3
else
  measure train-64-b16 bench --model cvt-13 --mode train --res 64 --batch 16 --iters 2
fi

# PyTorch beside it, where torch and transformers import.
py="${PYTHON:-python3}"
if "$py" -c "import torch, transformers, safetensors, PIL" 2>/dev/null; then
  echo "  torch: kernels-tests/reference/torch_bench.py" >&2
  batches=$([[ $quick == 0 ]] && echo 1,8,64 || echo 1,8)
  "$py" kernels-tests/reference/torch_bench.py --bin "$bin" --out "$out" --batches "$batches" >"$out/torch.json" 2>"$out/torch.err" \
    && rm -f "$out/torch.err" || { rm -f "$out/torch.json"; echo "    torch comparison failed: $(tail -1 "$out/torch.err")" >&2; }
else
  echo "  torch: not measured ($py cannot import torch, transformers, safetensors and PIL)" >&2
fi

if ! command -v python3 >/dev/null; then
  echo "python3 is not here to assemble the table; the figures are the JSON files in $out" >&2
  exit 0
fi
python3 - "$out" "${PEAK_GFLOPS:-}" <<'PY'
import json, os, sys
out, peak_arg = sys.argv[1], sys.argv[2]
def load(name):
    p = os.path.join(out, name + ".json")
    try:
        return json.load(open(p))
    except (OSError, ValueError):
        return None
def why(name):
    p = os.path.join(out, name + ".err")
    if not os.path.exists(p):
        return "not run"
    lines = [l for l in open(p).read().splitlines() if l.strip()]
    err = [l for l in lines if l.startswith("error")]
    return (err or lines or ["failed"])[0][:120]
ad = load("adapters") or {}
sel = ad.get("selected", {})
prof = sel.get("profile", {})
name = sel.get("adapter", "?")
info = next((a for a in ad.get("adapters", []) if a.get("name", "") and a["name"] in name), {})
# FP32 peak (non-tensor) of known GPUs, GFLOP/s; PEAK_GFLOPS overrides.
known = {"H100 80GB HBM3": 66900, "H100 PCIe": 51200, "H100": 66900, "H200": 66900, "A100": 19500, "RTX 4090": 82600, "L40S": 91600, "L4": 30300}
peak = float(peak_arg) if peak_arg else next((v for k, v in known.items() if k in name), None)
rep = {"adapter": name, "adapter_info": info, "profile": prof, "peak_fp32_gflops": peak, "gemm": {}, "inference": {}, "training": {}, "torch": load("torch")}
print(f"# cvt-gpu GPU report\n")
print(f"- adapter: **{name}**; device type {info.get('device_type', '?')}, driver {info.get('driver', '?')} {info.get('driver_info', '')}")
print(f"- features: {' '.join(info.get('features', []))}")
print(f"- kernel profile: {prof.get('kernels', '?')} kernel set, {prof.get('texture_read', '?')} texture reads, GEMM tiles {prof.get('gemm', {}).get('tiles')}, sources {prof.get('sources')}")
print(f"- FP32 peak used for shares: {peak if peak else 'unknown (set PEAK_GFLOPS)'} GFLOP/s\n")
print("| GEMM (M×N×K) | kernels | wall ms | GPU ms | GFLOP/s | share of FP32 peak |\n|---|---|---|---|---|---|")
for n in ["gemm-1024", "gemm-stage0-qkv", "gemm-stage1-fc1", "gemm-stage2-fc1", "gemm-long-k"]:
    g = load(n)
    if g is None:
        if os.path.exists(os.path.join(out, n + ".err")):
            print(f"| {n} | | not measured: {why(n)} | | | |")
        continue
    rate = g.get("gpu_gflops_per_s") or g["gflops_per_s"]
    rep["gemm"][n] = g
    share = f"{rate / peak:.1%}" if peak else "n/a"
    gms = f"{g['gpu_ms']:.3f}" if g.get("gpu_ms") is not None else "n/a"
    print(f"| {g['m']}×{g['n']}×{g['k']} | {g.get('kernels', '?')} | {g['median_ms']:.3f} | {gms} | {rate:.1f} | {share} |")
print("\n| CvT | mode | res | batch | latency ms | img/s | GFLOP/s | of 1024³ GEMM | peak MiB | first call ms |\n|---|---|---|---|---|---|---|---|---|---|")
rows = [("cvt13-224-b1", "inference"), ("cvt13-224-b8", "inference"), ("cvt13-224-b64", "inference"), ("w24-384-b1", "inference"), ("train-64-b64", "training"), ("train-64-b16", "training"), ("train-224-b32", "training")]
for n, kind in rows:
    r = load(n)
    if r is None:
        if os.path.exists(os.path.join(out, n + ".err")):
            print(f"| {n} | {kind} | | | not measured: {why(n)} | | | | | |")
        continue
    rep[kind][n] = {k: v for k, v in r.items() if k != "kernels"}
    print(f"| {r['model']} | {kind} | {r['res']} | {r['batch']} | {r['median_ms']:.1f} | {r['img_per_s']:.2f} | {r['gflops_per_s']:.1f} | {r['ratio_to_ceiling']:.0%} | {r['peak_memory_bytes'] / 2**20:.0f} | {r['first_call_ms']:.0f} |")
t = rep["torch"]
if t:
    print(f"\nPyTorch {t['torch']} (transformers {t['transformers']}) on {t['device']}, eager f32, TF32 off, same random CvT-13 weights:")
    print(f"- logits against the engine's ({t['image']}): max |Δ| {t['max_abs_logit_diff']:.2e}, same top-5: {t['same_top5']}")
    print("\n| batch | torch ms | engine ms | engine / torch speed |\n|---|---|---|---|")
    for b, ms in sorted(t["torch_ms"].items(), key=lambda kv: int(kv[0])):
        e = load(f"cvt13-224-b{b}")
        if e:
            print(f"| {b} | {ms:.1f} | {e['median_ms']:.1f} | {ms / e['median_ms']:.2f}× |")
        else:
            print(f"| {b} | {ms:.1f} | n/a | n/a |")
else:
    print(f"\nPyTorch: not measured ({why('torch') if os.path.exists(os.path.join(out, 'torch.err')) else 'torch and transformers do not import here'})")
json.dump(rep, open(os.path.join(out, "report.json"), "w"), indent=2)
print(f"\n(all figures: {os.path.join(out, 'report.json')})")
PY
