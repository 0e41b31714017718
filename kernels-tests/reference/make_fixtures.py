#!/usr/bin/env python3
"""Builds the PyTorch parity fixtures for cvt-gpu's tests.

Reference: transformers' CvtForImageClassification (torch, f32, eval mode) with
random but non-trivial weights: every Linear/Conv re-drawn, LayerNorm and
BatchNorm affine parameters and BatchNorm running statistics re-randomised, so a
kernel that ignores any of them fails. Two activations: exact GELU (what
transformers computes) and QuickGELU (what the official CvT code computes,
patched into the same model). Two namings: the Hugging Face state dict as is,
and the official `stage{i}.blocks.{j}...` names (spec §5.1).

Outputs (kernels-tests/reference/fixtures/, small, committed):
  tiny/                     tiny CvT (dims 16/32/48), two real photos at 64x64, batch 2
  preprocess/               a real photo and torchvision's eval preprocessing of it
  tiny/official.pth, tiny/pytorch_model.bin
                            the tiny CvT written by torch.save in both namings
  torch/                    torch.save edge cases: wrapped + `module.` + F16, views
                            (non-contiguous, shared storage, offsets, dtypes), a
                            pickle naming os.system, an archive missing a storage
and with --large (kernels-tests/reference/large/, not committed, ~80 MB each):
  cvt13/                    CvT-13 at 224 on a real photo

Usage: python3 make_fixtures.py [--large]
Needs: torch, torchvision, transformers, scikit-image, safetensors, pillow.
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from transformers import ConvNextImageProcessor, CvtConfig, CvtForImageClassification

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

HF_TO_OFFICIAL = [
    ("embedding.convolution_embeddings.projection.", "patch_embed.proj."),
    ("embedding.convolution_embeddings.normalization.", "patch_embed.norm."),
    (".layers.", ".blocks."),
] + [
    (f"attention.attention.convolution_projection_{hf}.convolution_projection.convolution.", f"attn.conv_proj_{o}.conv.")
    for hf, o in [("query", "q"), ("key", "k"), ("value", "v")]
] + [
    (f"attention.attention.convolution_projection_{hf}.convolution_projection.normalization.", f"attn.conv_proj_{o}.bn.")
    for hf, o in [("query", "q"), ("key", "k"), ("value", "v")]
] + [
    ("attention.attention.projection_query.", "attn.proj_q."),
    ("attention.attention.projection_key.", "attn.proj_k."),
    ("attention.attention.projection_value.", "attn.proj_v."),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
]


def official_name(hf):
    if hf.startswith("layernorm."):
        return "norm." + hf[len("layernorm."):]
    if hf.startswith("classifier."):
        return "head." + hf[len("classifier."):]
    rest = hf[len("cvt.encoder.stages."):]
    stage, tail = rest.split(".", 1)
    tail = "." + tail
    for a, b in HF_TO_OFFICIAL:
        tail = tail.replace(a, b)
    return f"stage{stage}{tail}"


class QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):  # LayerNorm / BatchNorm scale
                p.copy_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
            else:  # biases, cls token
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    model.eval()


def photos(size):
    """Real photographs from scikit-image, Pillow-bicubic-resized to size x size."""
    out = []
    for name, arr in [("chelsea", skdata.chelsea()), ("coffee", skdata.coffee())]:
        img = Image.fromarray(arr).convert("RGB").resize((size, size), Image.BICUBIC)
        out.append((name, img))
    return out


def pixel_values(images):
    proc = ConvNextImageProcessor(do_resize=False, do_rescale=True, do_normalize=True, image_mean=MEAN, image_std=STD)
    return proc(images=images, return_tensors="pt")["pixel_values"]


def logits_both(model, pixels):
    with torch.no_grad():
        gelu = model(pixel_values=pixels).logits
        saved = []
        for stage in model.cvt.encoder.stages:
            for layer in stage.layers:
                saved.append(layer.intermediate.activation)
                layer.intermediate.activation = QuickGELU()
        quick = model(pixel_values=pixels).logits
        i = 0
        for stage in model.cvt.encoder.stages:
            for layer in stage.layers:
                layer.intermediate.activation = saved[i]
                i += 1
    return gelu, quick


def save_model(model, out_dir):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "hf.safetensors"))
    save_file({official_name(k): v for k, v in sd.items()}, os.path.join(out_dir, "official.safetensors"))


def build(out_dir, cfg, size, seed, n_images):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    model = CvtForImageClassification(cfg)
    randomise(model, seed)
    save_model(model, out_dir)
    imgs = photos(size)[:n_images]
    names = []
    for name, img in imgs:
        fn = f"{name}{size}.png"
        img.save(os.path.join(out_dir, fn))
        names.append(fn)
    pixels = pixel_values([im for _, im in imgs])
    gelu, quick = logits_both(model, pixels)
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump({
            "images": names,
            "size": size,
            "config": {
                "dims": cfg.embed_dim, "heads": cfg.num_heads, "depths": cfg.depth,
                "num_classes": cfg.num_labels, "image_size": size,
            },
            "logits_gelu": gelu.tolist(),
            "logits_quick_gelu": quick.tolist(),
            "pixel_values_sum": float(pixels.double().sum()),
            "torch": torch.__version__,
        }, f)
    # The same architecture in cvt-gpu's config format (heads are not visible in shapes).
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"name": os.path.basename(out_dir), "num_classes": cfg.num_labels, "dims": cfg.embed_dim,
                   "heads": cfg.num_heads, "depths": cfg.depth, "image_size": size}, f, indent=1)
    print(out_dir, "gelu top1", gelu.argmax(-1).tolist(), "quick top1", quick.argmax(-1).tolist(),
          "max |gelu-quick|", float((gelu - quick).abs().max()))


def preprocess_fixture(out_dir):
    """torchvision's official eval transform on a real photo, for the Rust port."""
    from torchvision import transforms
    os.makedirs(out_dir, exist_ok=True)
    img = Image.fromarray(skdata.chelsea()).convert("RGB")
    img.save(os.path.join(out_dir, "chelsea.png"))
    crop = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224)])(img)
    np.asarray(crop, dtype=np.uint8).tofile(os.path.join(out_dir, "chelsea_eval224.rgb"))
    warp = img.resize((384, 384), Image.BICUBIC)
    np.asarray(warp, dtype=np.uint8).tofile(os.path.join(out_dir, "chelsea_warp384.rgb"))
    # transformers' processor as shipped with microsoft/cvt-13 (crop_pct 0.875, shortest_edge 224).
    proc = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=3, image_mean=MEAN, image_std=STD)
    hf = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0).astype(np.float32)
    hf.tofile(os.path.join(out_dir, "chelsea_hf224.f32"))
    print(out_dir, "crop", crop.size, "warp", warp.size)


def adamw_fixture(out_dir):
    """torch.optim.AdamW for 3 steps on given gradients, with and without decay."""
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    p0 = torch.randn(13, generator=g)
    grads = [torch.randn(13, generator=g) * (i + 1) for i in range(3)]
    out = {"p0": p0.tolist(), "grads": [x.tolist() for x in grads], "lr": 0.01, "weight_decay": 0.05,
           "betas": [0.9, 0.999], "eps": 1e-8}
    for decay in (True, False):
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05 if decay else 0.0)
        steps = []
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
            steps.append(p.detach().clone().tolist())
        out["decay" if decay else "no_decay"] = steps
    with open(os.path.join(out_dir, "adamw.json"), "w") as f:
        json.dump(out, f)
    print(out_dir, "adamw 3 steps")


def train_fixture(out_dir, tiny_dir, cfg):
    """Gradients of every parameter for one training step of the tiny CvT, with
    BatchNorm in train mode (batch statistics; also the running statistics after
    the step) and in eval mode (running statistics, frozen): QuickGELU (official),
    no drop path, cross-entropy with label smoothing 0.1 on two photos."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = CvtConfig(**{**cfg.to_dict(), "drop_path_rate": [0.0, 0.0, 0.0]})
    names = json.load(open(os.path.join(tiny_dir, "expected.json")))["images"]
    imgs = [Image.open(os.path.join(tiny_dir, n)).convert("RGB") for n in names]
    pixels = pixel_values(imgs)
    labels = torch.tensor([3, 7])
    for mode in ("train", "eval"):
        model = CvtForImageClassification(cfg)
        randomise(model, 1)
        for stage in model.cvt.encoder.stages:
            for layer in stage.layers:
                layer.intermediate.activation = QuickGELU()
        model.train(mode == "train")
        logits = model(pixel_values=pixels).logits
        loss = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
        loss.backward()
        suffix = "" if mode == "train" else "_eval"
        grads = {official_name(k): p.grad.contiguous() for k, p in model.named_parameters()}
        save_file(grads, os.path.join(out_dir, f"grads{suffix}.safetensors"))
        if mode == "train":
            running = {official_name(k): v.contiguous() for k, v in model.state_dict().items() if "running" in k}
            save_file(running, os.path.join(out_dir, "running_after.safetensors"))
        with open(os.path.join(out_dir, f"expected{suffix}.json"), "w") as f:
            json.dump({"labels": labels.tolist(), "label_smoothing": 0.1, "loss": float(loss), "logits": logits.detach().tolist()}, f)
        print(out_dir, mode, "loss", float(loss))


def torch_format_fixture(tiny_dir, out_dir):
    """PyTorch's own checkpoint format (torch.save zip), for the pure-Rust reader:
    the tiny CvT in both namings (HF with its int64 num_batches_tracked buffers,
    as transformers saves pytorch_model.bin), a wrapped checkpoint, tensor views,
    and two files that must be refused."""
    import collections
    import pickle
    import zipfile
    from safetensors.torch import load_file
    os.makedirs(out_dir, exist_ok=True)
    official = load_file(os.path.join(tiny_dir, "official.safetensors"))
    torch.save(collections.OrderedDict(official), os.path.join(tiny_dir, "official.pth"))
    cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
    model = CvtForImageClassification(CvtConfig(num_labels=cfg["num_classes"], embed_dim=cfg["dims"], num_heads=cfg["heads"], depth=cfg["depths"]))
    model.load_state_dict(load_file(os.path.join(tiny_dir, "hf.safetensors")), strict=False)
    torch.save(model.state_dict(), os.path.join(tiny_dir, "pytorch_model.bin"))
    # A training script's checkpoint: DataParallel names, F16, other entries beside it.
    wrapped = {"epoch": 7, "best_acc1": 81.5, "arch": "cvt-tiny", "lr_schedule": [0.1, 0.01, None, True],
               "state_dict": collections.OrderedDict(("module." + k, v.half() if v.is_floating_point() else v) for k, v in official.items())}
    torch.save(wrapped, os.path.join(out_dir, "wrapped.pth"))
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 3, generator=g)
    shared = torch.arange(20, dtype=torch.float32) * 0.5
    views = collections.OrderedDict([
        ("transposed", base.t()),                    # non-contiguous: strides (1, 3)
        ("head", shared[2:8]),                       # offset 2 into a storage ...
        ("tail", shared[10:20].view(2, 5)),          # ... that this one shares
        ("every_other", shared[1::4]),               # stride 4
        ("f16", torch.randn(4, 3, generator=g).half()),
        ("bf16", torch.randn(3, generator=g).bfloat16()),
        ("f64", torch.randn(2, 2, generator=g).double()),
        ("scalar", torch.tensor(2.5)),
        ("count", torch.tensor(5)),                  # int64: not a weight, skipped
        ("param", torch.nn.Parameter(torch.randn(2, 3, generator=g))),
    ])
    torch.save(views, os.path.join(out_dir, "views.pth"))
    save_file({k: v.detach().float().contiguous() for k, v in views.items() if v.is_floating_point()}, os.path.join(out_dir, "views.safetensors"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch cvt-gpu-pwned",))
    with zipfile.ZipFile(os.path.join(out_dir, "evil.pth"), "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(collections.OrderedDict([("w", Evil())]), protocol=2))
    with zipfile.ZipFile(os.path.join(out_dir, "views.pth")) as src, zipfile.ZipFile(os.path.join(out_dir, "missing_storage.pth"), "w") as z:
        for item in src.infolist():
            if not item.filename.endswith("/data/0"):
                z.writestr(item.filename, src.read(item.filename))
    print(out_dir, "torch.save fixtures")


def main():
    fixtures = os.path.join(HERE, "fixtures")
    adamw_fixture(os.path.join(fixtures, "optim"))
    tiny = CvtConfig(num_labels=10, embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])  # HF indexes drop-path rates by stage (spec §5.2): depth[i] > i
    build(os.path.join(fixtures, "tiny"), tiny, 64, 1, 2)
    train_fixture(os.path.join(fixtures, "train"), os.path.join(fixtures, "tiny"), tiny)
    preprocess_fixture(os.path.join(fixtures, "preprocess"))
    torch_format_fixture(os.path.join(fixtures, "tiny"), os.path.join(fixtures, "torch"))
    if "--large" in sys.argv:
        cvt13 = CvtConfig(num_labels=1000)
        build(os.path.join(HERE, "large", "cvt13"), cvt13, 224, 13, 1)


if __name__ == "__main__":
    main()
