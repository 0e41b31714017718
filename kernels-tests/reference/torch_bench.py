#!/usr/bin/env python3
"""PyTorch beside the engine, for scripts/gpu-report.sh.

Builds transformers' CvtForImageClassification with CvT-13's config and seeded
random weights (LayerNorm affines and BatchNorm statistics moved off their
initial values, so no layer is an identity), saves them as Hugging Face
safetensors, runs the engine (`--bin`) on them for one generated 224×224 image,
and compares its logits with torch's on the same image. Then times torch's
forward (eager, f32, TF32 off) on its best device (CUDA/ROCm, MPS, else CPU) at
each batch of `--batches`. Prints one JSON object:
  {torch, transformers, device, image, max_abs_logit_diff, same_top5, torch_ms: {batch: ms}}

Needs: torch, transformers, safetensors, pillow, numpy.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import CvtConfig, CvtForImageClassification

p = argparse.ArgumentParser()
p.add_argument("--bin", required=True, help="the cvt-gpu binary")
p.add_argument("--out", required=True, help="directory for the weights and the image")
p.add_argument("--batches", default="1,8")
p.add_argument("--res", type=int, default=224)
p.add_argument("--iters", type=int, default=5)
a = p.parse_args()

torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
model = CvtForImageClassification(CvtConfig(num_labels=1000)).eval()
with torch.no_grad():
    for name, t in model.named_parameters():
        if "layernorm" in name or "normalization" in name:
            t.add_(0.1 * torch.randn_like(t))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.1 * torch.randn_like(b))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand_like(b))
wdir = os.path.join(a.out, "cvt13-random")
model.save_pretrained(wdir, safe_serialization=True)

# A deterministic, smooth test image (gradients and a few discs).
h = w = a.res
yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
img = np.stack([(xx / w) * 255, (yy / h) * 255, ((xx + yy) % 97) / 97 * 255], axis=-1)
for cx, cy, r, c in [(60, 80, 30, (250, 40, 40)), (150, 140, 45, (30, 200, 90))]:
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = c
img = img.astype(np.uint8)
img_path = os.path.join(a.out, "torch-bench.png")
Image.fromarray(img).save(img_path)

mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - mean) / std
with torch.no_grad():
    want = model(pixel_values=x).logits[0]

r = subprocess.run([a.bin, "infer", "--weights", os.path.join(wdir, "model.safetensors"), "--no-resize", "--json", "--topk", "1000", img_path], capture_output=True, text=True)
if r.returncode != 0:
    raise SystemExit(f"cvt-gpu infer failed: {r.stderr.strip()}")
top = json.loads(r.stdout)[0]["top"]
got = torch.zeros(1000)
for e in top:
    got[e["index"]] = e["logit"]
diff = (got - want).abs().max().item()
same_top5 = [e["index"] for e in top[:5]] == want.topk(5).indices.tolist()

if torch.cuda.is_available():
    device = "cuda"
elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
    device = "mps"
else:
    device = "cpu"
dev = torch.device(device)
model = model.to(dev)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


times = {}
for b in [int(v) for v in a.batches.split(",")]:
    xb = torch.randn(b, 3, a.res, a.res, device=dev)
    with torch.no_grad():
        for _ in range(2):
            model(pixel_values=xb)
        sync()
        t = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            model(pixel_values=xb)
            sync()
            t.append((time.perf_counter() - t0) * 1e3)
    times[str(b)] = statistics.median(t)

name = torch.cuda.get_device_name(0) if device == "cuda" else device
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "device": name, "image": os.path.basename(img_path), "max_abs_logit_diff": diff, "same_top5": same_top5, "torch_ms": times}, indent=2))
