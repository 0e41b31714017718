#!/usr/bin/env python3
"""The command line against PyTorch on CvT-13: `cvt-gpu [--kernels SET] infer
--weights W --no-resize --json --topk 1000 chelsea.png coffee.png` for both
checkpoint namings (official/QuickGELU and Hugging Face/GELU), against
transformers' CvtForImageClassification with the same weights on the same two
real photos (scikit-image's, Pillow-bicubic to 224, as make_fixtures.py).

    python3 kernels-tests/reference/cli_parity.py --bin target/release/cvt-gpu \
        --dir kernels-tests/reference/large/cvt13 [--kernels gpu]

Needs the --large fixture of make_fixtures.py (its random non-trivial CvT-13
weights in both namings), torch, transformers, scikit-image, pillow. Prints one
line per naming: max |logit difference| over both images and whether the top-5
agree; exits 1 if any difference passes 1e-3 or a top-5 differs.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import CvtConfig, CvtForImageClassification

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import QuickGELU, photos, pixel_values  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--bin", required=True)
p.add_argument("--dir", required=True)
p.add_argument("--kernels", default="auto")
a = p.parse_args()

tmp = tempfile.mkdtemp()
paths = []
images = []
for name, img in photos(224):
    path = os.path.join(tmp, f"{name}.png")
    img.save(path)
    paths.append(path)
    images.append(img)
x = pixel_values(images)

model = CvtForImageClassification(CvtConfig(num_labels=1000)).eval()
missing, unexpected = model.load_state_dict(load_file(os.path.join(a.dir, "hf.safetensors")), strict=False)
# Only BatchNorm's batch counters may be absent (they do not affect eval).
assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
with torch.no_grad():
    gelu = model(pixel_values=x).logits
    for m in model.modules():
        for n, c in m.named_children():
            if isinstance(c, torch.nn.GELU):
                setattr(m, n, QuickGELU())
    quick = model(pixel_values=x).logits

ok = True
for file, want, what in [("official.safetensors", quick, "official/QuickGELU"), ("hf.safetensors", gelu, "hf/GELU")]:
    cmd = [a.bin, "--kernels", a.kernels, "infer", "--weights", os.path.join(a.dir, file), "--no-resize", "--json", "--topk", "1000", *paths]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {r.stderr.strip()}")
    worst, same = 0.0, True
    for i, res in enumerate(json.loads(r.stdout)):
        got = torch.zeros(1000)
        for e in res["top"]:
            got[e["index"]] = e["logit"]
        worst = max(worst, (got - want[i]).abs().max().item())
        same &= [e["index"] for e in res["top"][:5]] == want[i].topk(5).indices.tolist()
    print(f"--kernels {a.kernels}, {what}: max |logit - torch| = {worst:.3e} over {len(paths)} photos, same top-5: {same}")
    ok &= worst < 1e-3 and same
sys.exit(0 if ok else 1)
