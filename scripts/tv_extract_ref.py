#!/usr/bin/env python3
"""torchvision side of scripts/bench.sh extract-tv (needs torch 2.11, torchvision 0.26).

Evaluation extraction as one writes it with torchvision: ImageFolder + DataLoader
with the models' own transform (Resize(256), CenterCrop(224), ToTensor, ImageNet
normalisation), the model in eval mode under torch.inference_mode(), float32 on the
CPU, keeping the logits and the pooled features (the head's input, caught by a
forward pre-hook on `fc` / `heads`). Subcommands:
  make-model MODEL PATH [SEED]            torchvision's MODEL (resnet50, vit_b_16, ...)
                                          with its own random initialisation under
                                          torch.manual_seed(SEED) (ViT: the zero-
                                          initialised head drawn N(0, 0.02), bias
                                          N(0, 0.01), so that logits are not all 0);
                                          state_dict saved with torch.save to PATH
  extract MODEL WEIGHTS DATADIR BATCH WORKERS THREADS OUT [DEVICE]
                                          the extraction above over DATADIR (batch
                                          BATCH, WORKERS DataLoader workers,
                                          torch.set_num_threads(THREADS)) on DEVICE
                                          (cpu, default, or cuda[:N]: pinned batches,
                                          no TF32): images/s of the loop (decoding,
                                          transform, forward; not the model's
                                          creation), logits and features to OUT
                                          (safetensors)
  forward MODEL WEIGHTS N BATCH THREADS [DEVICE]
                                          the model alone on N random 224 x 224
                                          inputs made beforehand (on DEVICE), in batches of
                                          BATCH (one batch of warm-up first): the
                                          images/s of the forward passes, the ceiling
                                          of any extraction with this model
  compare STORE OUT                       mos's store (one shard) vs OUT: same images
                                          in the same order, max |difference| of
                                          logits and of features relative to the
                                          largest |value|; exit 1 above 1e-4
"""
import glob
import json
import os
import sys
import time

import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)




def build(model):
    import torchvision

    return torchvision.models.get_model(model, weights=None)


def make_model(model, path, seed=0):
    torch.manual_seed(seed)
    net = build(model)
    if hasattr(net, "heads"):  # ViT: torchvision initialises the head to zeros
        with torch.no_grad():
            net.heads.head.weight.normal_(0, 0.02)
            net.heads.head.bias.normal_(0, 0.01)
    torch.save(net.state_dict(), path)


def load(model, weights, threads, device):
    """MODEL with WEIGHTS in eval mode on DEVICE after torch.set_num_threads(THREADS),
    float32 kept exact on CUDA (no TF32): (net, torch device, a function that waits
    for the device's queued work, for timing)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = lambda: None  # noqa: E731
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        sync = lambda: torch.cuda.synchronize(dev)  # noqa: E731
    net = build(model)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval().to(dev), dev, sync


def head_of(net):
    return net.heads if hasattr(net, "heads") else net.fc


def extract(model, weights, datadir, batch, workers, threads, out, device="cpu"):
    import torchvision.datasets as datasets
    import torchvision.transforms as T
    from safetensors.torch import save_file

    net, dev, sync = load(model, weights, threads, device)
    feats = []
    head_of(net).register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].clone()))
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(datadir, tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False,
                                     pin_memory=dev.type == "cuda")
    logits = []
    t = time.time()
    with torch.inference_mode():
        for x, _ in dl:
            logits.append(net(x.to(dev, non_blocking=True)))
        sync()
    secs = time.time() - t
    n = sum(x.shape[0] for x in logits)
    save_file({"logits": torch.cat(logits).cpu().contiguous(), "features": torch.cat(feats).cpu().contiguous()}, out)
    with open(out + ".paths", "w") as f:
        f.write("".join(os.path.relpath(p, datadir) + "\n" for p, _ in ds.samples))
    print(f"torchvision extract ({model}, {device}, {torch.get_num_threads()} threads, {workers} workers, batch {batch}): "
          f"{n / secs:.3f} images/s ({n} images, {secs:.2f} s)")


def forward(model, weights, n, batch, threads, device="cpu"):
    net, dev, sync = load(model, weights, threads, device)
    x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.inference_mode():
        net(x[:batch])
        sync()
        t = time.time()
        for start in range(0, n, batch):
            net(x[start:start + batch])
        sync()
        secs = time.time() - t
    print(f"torchvision forward alone ({model}, {device}, {torch.get_num_threads()} threads, batch {batch}): "
          f"{n / secs:.3f} images/s ({n} images, {secs:.2f} s)")


def compare(store, out, tol=1e-4):
    from safetensors.torch import load_file

    shards = sorted(glob.glob(os.path.join(store, "shard-*.safetensors")))
    if len(shards) != 1:
        sys.exit(f"compare: expected one shard in {store}, found {len(shards)}")
    with open(shards[0][: -len(".safetensors")] + ".json") as f:
        index = json.load(f)
    with open(out + ".paths") as f:
        paths = f.read().split()
    ours = [e if isinstance(e, str) else e.get("path") for e in index.get("paths", index.get("images", []))]
    if ours and ours != paths:
        sys.exit(f"compare: {store} and {out} list different images or orders")
    a, b = load_file(shards[0]), load_file(out)
    worst, parts = 0.0, []
    for k in ("logits", "features"):
        x, y = a[k].double(), b[k].double()
        if x.shape != y.shape:
            sys.exit(f"compare: {k} shapes differ: mos {list(x.shape)}, torchvision {list(y.shape)}")
        d = ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, d)
        parts.append(f"{k} {d:.2e} (max |{k[:-1] if k == 'logits' else 'feature'}| {y.abs().max().item():.3g})")
    verdict = "ok" if worst <= tol else "FAIL"
    print(f"mos vs torchvision, max |difference| / max |value|: {', '.join(parts)}; {len(paths)} images, same order"
          f"{'' if ours else ' (order not checked: no paths in the index)'}; tolerance {tol:g} {verdict}")
    return worst <= tol


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "make-model":
        make_model(args[0], args[1], *(int(a) for a in args[2:3]))
    elif cmd == "extract":
        extract(args[0], args[1], args[2], int(args[3]), int(args[4]), int(args[5]), args[6], *args[7:8])
    elif cmd == "forward":
        forward(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), *args[5:6])
    elif cmd == "compare":
        sys.exit(0 if compare(args[0], args[1]) else 1)
    else:
        sys.exit(f"unknown subcommand {cmd}")
