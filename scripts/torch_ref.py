#!/usr/bin/env python3
"""PyTorch side of scripts/gpu_check.sh and scripts/bench.sh (needs torch 2.11).

The reference model is tests/fixtures/make_model_fixtures.py's ResNetV2
(docs/model.md#architecture).
Subcommands:
  compare A B [--tol T] [--keys k1,k2]   max relative difference of same-named
                                          tensors in two safetensors files
  make-model DIR MODEL N SIZE [HEAD]      random weights for MODEL (R50x1, R101x1, R26x0.5;
                                          torch.save, paper naming) in DIR/MODEL.pth.tar
                                          and an input batch DIR/MODEL_input.safetensors
  torch-forward DIR MODEL DEVICE BATCH REPEAT
                                          the reference forward (TF32 off) on DEVICE:
                                          logits + features, and images/s
  torch-train MODEL BATCH SIZE NBO STEPS   fine-tuning's step in PyTorch (frozen parts
                                          under no_grad as the original, CE, backward,
                                          SGD momentum 0.9) on random data: images/s
  make-jpegs DIR N [SEED]                 N real-photo JPEGs (crops of scikit-learn's
                                          sample photos, re-encoded by PIL) in an
                                          ImageFolder DIR/photos/
  torch-loader DIR WORKERS BATCH SIZE     torchvision's ImageFolder + DataLoader with
                                          the eval transform: images/s
  compare-scores A.csv B.csv TOL [NAMES]  per-image score CSVs (--save-scores) of two
                                          runs: same images, max |difference| per
                                          method relative to that method's score range
                                          (methods in NAMES: reported, not checked)
"""
import json
import os
import struct
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "BF16": torch.bfloat16, "F16": torch.float16}


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = bytearray(data[8 + n + a:8 + n + b])
        out[k] = torch.frombuffer(buf, dtype=DTYPES[v["dtype"]]).reshape(v["shape"]).clone()
    return out


def write_st(path, tensors):
    header, blobs, off = {}, [], 0
    for k, t in tensors.items():
        b = t.contiguous().cpu().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def compare(a, b, tol, keys):
    ta, tb = read_st(a), read_st(b)
    worst = 0.0
    for k in keys or sorted(set(ta) & set(tb)):
        x, y = ta[k].double(), tb[k].double()
        d = ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, d)
        print(f"  {k:12s} rel max diff {d:.3e}")
    verdict = "ok" if worst <= tol else "FAIL"
    print(f"  {os.path.basename(a)} vs {os.path.basename(b)}: worst {worst:.3e} (tolerance {tol:g}) {verdict}")
    return worst <= tol


UNITS = {"R50x1": ([3, 4, 6, 3], 64), "R101x1": ([3, 4, 23, 3], 64), "R26x0.5": ([2, 2, 2, 2], 32)}


def make_model(d, model, n, size, head=1000):
    import make_model_fixtures as m
    torch.manual_seed(0)
    units, base = UNITS[model]
    net = m.ResNetV2(units, base, head)
    with torch.no_grad():
        net.head.conv.weight.normal_(0, 0.01)
        net.head.conv.bias.normal_(0, 0.01)
        for mod in net.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    sd = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"step": 0, "model": sd}, os.path.join(d, f"{model}.pth.tar"))
    x = torch.rand(n, 3, size, size) * 2 - 1
    write_st(os.path.join(d, f"{model}_input.safetensors"), {"images": x})


def torch_forward(d, model, device, batch, repeat):
    import make_model_fixtures as m
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    m.RELU_INPLACE = True  # as the paper code's units (nn.ReLU(inplace=True))
    units, base = UNITS[model]
    net = m.ResNetV2(units, base, 1000)
    ck = torch.load(os.path.join(d, f"{model}.pth.tar"), map_location="cpu")
    net.load_state_dict({k[len("module."):]: v for k, v in ck["model"].items()})
    net = net.to(device).eval()
    x = read_st(os.path.join(d, f"{model}_input.safetensors"))["images"]

    def one_pass(features):
        outs, feats = [], [[] for _ in range(5)]
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].to(device)
            if features:
                fs = net.features(xb)
                for k, f in enumerate(fs):
                    feats[k].append(f.mean(dim=(2, 3)).cpu())
                outs.append(net.head(net.before_head(fs[-1]))[..., 0, 0].cpu())
            else:
                outs.append(net(xb).cpu())
        return torch.cat(outs), feats

    with torch.no_grad():
        logits, feats = one_pass(True)
        t = time.time()
        for _ in range(repeat):
            one_pass(False)
        secs = time.time() - t
    out = {"logits": logits}
    for k, f in enumerate(feats):
        out[f"features.{k}"] = torch.cat(f)
    write_st(os.path.join(d, f"{model}_torch.safetensors"), out)
    print(f"pytorch forward ({device}, {torch.get_num_threads()} threads): {x.shape[0] * repeat / secs:.2f} images/s ({repeat} passes over {x.shape[0]} images, batch {batch}, {secs:.2f} s)")


def torch_train(model, batch, size, nbo, steps):
    import make_model_fixtures as m

    torch.manual_seed(0)
    m.RELU_INPLACE = True  # as the paper code's units (nn.ReLU(inplace=True))
    units, base = UNITS[model]
    net = m.ResNetV2(units, base, 1000)
    stages = [net.root] + list(net.body)
    frozen = {-1: 0, 0: 5}.get(nbo, 5 - nbo)
    for s in stages[:frozen]:
        for p in s.parameters():
            p.requires_grad_(False)
    if nbo == 0:
        for p in net.before_head.parameters():
            p.requires_grad_(False)
    elif nbo > 0:
        stages[frozen].unit01.gn1.requires_grad_(False)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.003, momentum=0.9)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    y = torch.randint(1000, (batch,))

    def step():
        with torch.no_grad():
            h = x
            for s in stages[:frozen]:
                h = s(h)
        for s in stages[frozen:]:
            h = s(h)
        logits = net.head(net.before_head(h))[..., 0, 0]
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss.item()

    step()
    t = time.time()
    for _ in range(steps):
        step()
    secs = time.time() - t
    print(f"pytorch train: {steps * batch / secs:.2f} images/s ({steps} steps of {batch} images at {size}x{size}, num_block_open {nbo}, {secs:.2f} s)")


def make_jpegs(d, n, seed=0):
    import random

    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    out = os.path.join(d, "photos")
    os.makedirs(out, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        if i % 3 == 0:
            crop = crop.resize((cw * 3 // 2, ch * 3 // 2))
        crop.save(os.path.join(out, f"{i:05d}.jpg"), quality=90)


def make_val_jpegs(d, n, seed=0):
    """JPEGs with the size statistics of ImageNet validation images: most are
    500x375 or 375x500 (quality 90, as ImageNet's are about), the rest other
    sizes with a 500-pixel long side or smaller; the content is real photographs
    (scikit-learn's sample images, randomly cropped and resized), so decoding costs
    what a photograph costs."""
    import random

    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = random.Random(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        r = rng.random()
        if r < 0.60:
            size = (500, 375)
        elif r < 0.80:
            size = (375, 500)
        elif r < 0.90:
            size = (500, 333)
        elif r < 0.95:
            size = (500, 500)
        else:
            size = (rng.randint(200, 500), rng.randint(150, 500))
        img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR).save(
            os.path.join(d, f"{i:05d}.jpg"), quality=90
        )


def make_maha(path, model, classes, magnitude):
    """Mahalanobis parameters of the right shapes for `model` (random class means,
    identity precisions), for timing the image pass."""
    dims = {"R50x1": [64, 256, 512, 1024, 2048], "R101x1": [64, 256, 512, 1024, 2048]}[model]
    g = torch.Generator().manual_seed(0)
    t = {}
    for l, d in enumerate(dims):
        t[f"mean.{l}"] = torch.randn(classes, d, generator=g)
        t[f"precision.{l}"] = torch.eye(d)
    t["lr_weight"] = torch.randn(5, generator=g)
    t["lr_bias"] = torch.zeros(1)
    t["magnitude"] = torch.tensor([magnitude])
    write_st(path, t)


def torch_loader(d, workers, batch, size):
    import torchvision.datasets as datasets
    import torchvision.transforms as T

    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    ds = datasets.ImageFolder(d, tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False)
    t = time.time()
    n = 0
    for x, _ in dl:
        n += x.shape[0]
    secs = time.time() - t
    print(f"torchvision loader: {n / secs:.1f} images/s ({n} images, {workers} workers, {secs:.2f} s)")


def compare_scores(a, b, tol, report_only=()):
    import csv

    def load(p):
        with open(p, newline="") as f:
            rows = list(csv.reader(f))
        return rows[0], rows[1:]

    ha, ra = load(a)
    hb, rb = load(b)
    if ha != hb or [r[:2] for r in ra] != [r[:2] for r in rb]:
        print(f"  {a} and {b} do not list the same images/methods")
        return False
    worst = 0.0
    for j, name in enumerate(ha[2:], start=2):
        xa = [float(r[j]) for r in ra]
        xb = [float(r[j]) for r in rb]
        span = (max(xb) - min(xb)) or 1.0
        d = max(abs(x - y) for x, y in zip(xa, xb)) / span
        if name in report_only:
            print(f"  {name:12s} max |diff| / range {d:.3e} (reported, not checked)")
            continue
        worst = max(worst, d)
        print(f"  {name:12s} max |diff| / range {d:.3e}")
    print(f"  worst {worst:.3e} (tolerance {tol:g}) {'ok' if worst <= tol else 'FAIL'}")
    return worst <= tol


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "compare":
        tol = float(args[args.index("--tol") + 1]) if "--tol" in args else 1e-4
        keys = args[args.index("--keys") + 1].split(",") if "--keys" in args else None
        sys.exit(0 if compare(args[0], args[1], tol, keys) else 1)
    elif cmd == "make-model":
        make_model(args[0], args[1], int(args[2]), int(args[3]), *(int(a) for a in args[4:5]))
    elif cmd == "torch-forward":
        torch_forward(args[0], args[1], args[2], int(args[3]), int(args[4]))
    elif cmd == "compare-scores":
        only = args[3].split(",") if len(args) > 3 else ()
        sys.exit(0 if compare_scores(args[0], args[1], float(args[2]), only) else 1)
    elif cmd == "torch-train":
        torch_train(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]))
    elif cmd == "make-jpegs":
        make_jpegs(args[0], int(args[1]), *(int(a) for a in args[2:3]))
    elif cmd == "make-val-jpegs":
        make_val_jpegs(args[0], int(args[1]), *(int(a) for a in args[2:3]))
    elif cmd == "make-maha":
        make_maha(args[0], args[1], int(args[2]), float(args[3]))
    elif cmd == "torch-loader":
        torch_loader(args[0], int(args[1]), int(args[2]), int(args[3]))
    else:
        sys.exit(f"unknown subcommand {cmd}")
