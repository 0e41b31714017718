#!/usr/bin/env python3
"""Checks a `cvt-gpu convert --naming hf` export in transformers: loads the
directory with CvtForImageClassification.from_pretrained, runs it on images
prepared as cvt-gpu prepares them (the `preprocess` metadata of the export:
channels, mean, std; images must already be at the model's resolution), and
compares its logits with `cvt-gpu infer --json --topk <classes> --no-resize`.

    python3 check_hf_export.py HF_DIR INFER_JSON IMAGE...

Prints the max |logit difference| and exits 1 if it is above 1e-3.
"""
import json
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from transformers import CvtForImageClassification


def main():
    hf_dir, infer_json, images = sys.argv[1], sys.argv[2], sys.argv[3:]
    model = CvtForImageClassification.from_pretrained(hf_dir).eval()
    with safe_open(f"{hf_dir}/model.safetensors", "pt") as f:
        meta = f.metadata() or {}
    spec = json.loads(meta.get("preprocess", '{"channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}'))
    mode = "L" if spec["channels"] == 1 else "RGB"
    mean, std = np.array(spec["mean"], np.float32), np.array(spec["std"], np.float32)
    x = []
    for p in images:
        a = np.asarray(Image.open(p).convert(mode), np.float32) / 255.0
        a = a[:, :, None] if a.ndim == 2 else a
        x.append(((a - mean) / std).transpose(2, 0, 1))
    with torch.no_grad():
        logits = model(pixel_values=torch.tensor(np.stack(x))).logits.numpy()
    ours = json.load(open(infer_json))
    worst = 0.0
    for i, r in enumerate(ours):
        for p in r["top"]:
            worst = max(worst, abs(p["logit"] - float(logits[i, p["index"]])))
        print(r["image"], "transformers top-1", int(logits[i].argmax()), "cvt-gpu top-1", r["top"][0]["index"])
    print(f"max |logit difference| over {sum(len(r['top']) for r in ours)} logits: {worst:.3g}")
    sys.exit(0 if worst <= 1e-3 else 1)


if __name__ == "__main__":
    main()
