"""ConViT reference fixtures from timm (`pip install torch timm safetensors pillow
scikit-image numpy`; the engine itself never needs Python).

Writes, for `kernels-tests/gpsa.rs`-style parity tests of the whole model:
  fixtures/convit_tiny/  (committed, small)
    config.json            the engine's ConvitConfig for the tiny model
    model.safetensors      timm names, random non-trivial weights (gates and
                           pos_proj off their initial values, LayerNorm affine
                           randomised)
    model.pth              the same state dict under "model" (the official
                           training checkpoints' layout), as torch.save writes it
    chelsea32.png, coffee32.png   real photos, bicubic to 32x32
    expected.json          logits of both photos; the training step's loss and
                           logits; one AdamW step's settings
    grads.safetensors      every parameter's gradient of the mean soft-target
                           cross-entropy (label smoothing 0.1)
    adamw.safetensors      every parameter after one AdamW step (DeiT/ConViT
                           decay groups)
  large/convit_ti/ (not committed: --large)
    model.safetensors, model.pth, a.png, b.png (224 centre crops of two photos),
    expected.json (logits, top-5)
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from timm.models.convit import ConVit

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HERE = os.path.dirname(os.path.abspath(__file__))


def photos(size):
    out = []
    for name, arr in [("chelsea", skdata.chelsea()), ("coffee", skdata.coffee())]:
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
        out.append((name, img))
    return out


def pixels(images):
    a = np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])
    a = (a - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def randomise(model, seed):
    """Moves every parameter off its initial value: gates, pos_proj (weight and
    bias), LayerNorm affine, biases, position embedding and class token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gating_param"):
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
            elif "pos_proj" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("bias") or name in ("pos_embed", "cls_token"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("v.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def state(model):
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_model(model, out):
    sd = state(model)
    save_file(sd, os.path.join(out, "model.safetensors"))
    torch.save({"model": sd, "epoch": 0}, os.path.join(out, "model.pth"))


def decay_groups(model):
    """timm's add_weight_decay as main.py uses it: no decay on 1-D tensors,
    biases, pos_embed and cls_token."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return decay, no_decay


def tiny(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=8, depth=4, num_heads=3, local_up_to_layer=2)
    model = ConVit(**cfg).eval()
    randomise(model, 1)
    save_model(model, out)
    json.dump(
        {"name": "convit-tiny-fixture", "in_chans": 3, "num_classes": 10, "image_size": 32, "patch_size": 8, "heads": 3, "head_dim": 8, "depth": 4, "local_layers": 2, "mlp_ratio": 4},
        open(os.path.join(out, "config.json"), "w"),
        indent=1,
    )
    imgs = photos(32)
    for name, img in imgs:
        img.save(os.path.join(out, f"{name}32.png"))
    x = pixels([i for _, i in imgs])
    with torch.no_grad():
        logits = model(x)
    # The training step: mean soft-target cross-entropy, label smoothing 0.1.
    labels = [3, 7]
    smooth = 0.1
    t = torch.full((2, 10), smooth / 10)
    for i, l in enumerate(labels):
        t[i, l] += 1 - smooth
    model.train()
    model.zero_grad()
    out_logits = model(x)
    loss = torch.sum(-t * torch.log_softmax(out_logits, dim=-1), dim=-1).mean()
    loss.backward()
    grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()}
    save_file(grads, os.path.join(out, "grads.safetensors"))
    lr, wd = 1e-3, 0.05
    decay, no_decay = decay_groups(model)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    opt.step()
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, os.path.join(out, "adamw.safetensors"))
    json.dump(
        {
            "logits": logits.tolist(),
            "labels": labels,
            "label_smoothing": smooth,
            "loss": loss.item(),
            "train_logits": out_logits.detach().tolist(),
            "adamw": {"lr": lr, "weight_decay": wd, "betas": [0.9, 0.999], "eps": 1e-8},
        },
        open(os.path.join(out, "expected.json"), "w"),
        indent=1,
    )
    print("tiny: loss", loss.item())


def large(out):
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = ConVit(embed_dim=48, num_heads=4, local_up_to_layer=10).eval()  # convit_tiny
    randomise(model, 2)
    save_model(model, out)
    imgs = photos(224)
    for name, (_, img) in zip(["a", "b"], imgs):
        img.save(os.path.join(out, f"{name}.png"))
    with torch.no_grad():
        logits = model(pixels([i for _, i in imgs]))
    top5 = torch.topk(logits, 5).indices.tolist()
    json.dump({"logits": logits.tolist(), "top5": top5}, open(os.path.join(out, "expected.json"), "w"))
    print("convit_ti top5", top5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true", help="also the ConViT-Ti fixture (not committed)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tiny(os.path.join(HERE, "fixtures", "convit_tiny"))
    if a.large:
        large(os.path.join(HERE, "large", "convit_ti"))


if __name__ == "__main__":
    main()
