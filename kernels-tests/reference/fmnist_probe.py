"""Planning probe (not a test): how fast a small CvT learns Fashion-MNIST per image
seen, in PyTorch on the CPU, to choose the `cvt-fmnist` config and recipe that
`cvt-gpu train --fashion-mnist` uses (weights/README.md quotes its results).

    python3 kernels-tests/reference/fmnist_probe.py CONFIG.json IMAGES BATCH LR

CONFIG.json is a cvt-gpu config (dims, heads, depths, patch_*); the model is
transformers' CvtForImageClassification with the same shape (GELU; the engine
trains QuickGELU by default), AdamW (wd 0.05, none on norms/biases/cls), linear
warmup then cosine per step, label smoothing 0.1, random horizontal flips;
prints test accuracy four times over the run.
"""
import gzip
import json
import os
import math
import sys
import time

import numpy as np
import torch
import transformers.models.cvt.modeling_cvt as mc
from transformers import CvtConfig, CvtForImageClassification

# transformers indexes its per-block drop-path list by the stage number (a bug that
# only bites when a stage has fewer blocks than its index); drop path is 0 here, so
# give it a longer list.
_linspace = torch.linspace


class _TorchShim:
    def __getattr__(self, k):
        return getattr(torch, k)

    @staticmethod
    def linspace(a, b, n, **kw):
        return _linspace(a, b, max(n, 4), **kw)


mc.torch = _TorchShim()
torch.set_num_threads(1)


def load(split):
    base = "/usr/share/datasets/fashion-mnist/"
    im = np.frombuffer(gzip.open(base + f"{split}-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    lb = np.frombuffer(gzip.open(base + f"{split}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return torch.tensor((im / 255.0 - 0.2860) / 0.3530, dtype=torch.float32), torch.tensor(lb, dtype=torch.long)


def main():
    xtr, ytr = load("train")
    xte, yte = load("t10k")
    c = json.load(open(sys.argv[1]))
    budget, bs, lr = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    n = len(c["dims"])
    cfg = CvtConfig(num_channels=1, patch_sizes=c["patch_sizes"], patch_stride=c["patch_strides"], patch_padding=c["patch_padding"],
                    embed_dim=c["dims"], num_heads=c["heads"], depth=c["depths"], cls_token=[False] * (n - 1) + [True], num_labels=10,
                    drop_path_rate=[0.0] * n, mlp_ratio=[4.0] * n, attention_drop_rate=[0.0] * n, drop_rate=[0.0] * n,
                    qkv_bias=[True] * n, kernel_qkv=[3] * n, padding_kv=[1] * n, stride_kv=[2] * n, padding_q=[1] * n, stride_q=[1] * n,
                    qkv_projection_method=["dw_bn"] * n)
    torch.manual_seed(0)
    m = CvtForImageClassification(cfg)
    print("params", sum(p.numel() for p in m.parameters()))
    decay = [p for k, p in m.named_parameters() if p.ndim > 1 and "cls_token" not in k]
    rest = [p for k, p in m.named_parameters() if not (p.ndim > 1 and "cls_token" not in k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    steps = budget // bs
    warm = min(int(os.environ.get("WARMUP", "200")), steps // 10)

    def lr_at(s):
        return lr * s / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    def evaluate():
        m.eval()
        ok = 0
        with torch.no_grad():
            for i in range(0, 10000, 1000):
                ok += (m(xte[i:i + 1000]).logits.argmax(1) == yte[i:i + 1000]).sum().item()
        m.train()
        return ok / 100

    g = torch.Generator().manual_seed(1)
    perm, pi, t0 = torch.randperm(60000, generator=g), 0, time.time()
    for s in range(steps):
        if pi + bs > 60000:
            perm, pi = torch.randperm(60000, generator=g), 0
        idx = perm[pi:pi + bs]
        pi += bs
        x = xtr[idx]
        flip = torch.rand(bs, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        for group in opt.param_groups:
            group["lr"] = lr_at(s)
        loss = torch.nn.functional.cross_entropy(m(x).logits, ytr[idx], label_smoothing=float(os.environ.get("LS", "0.1")))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % max(1, steps // 4) == 0:
            print(f"step {s + 1} images {(s + 1) * bs} loss {loss.item():.3f} test acc {evaluate():.2f}% ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
