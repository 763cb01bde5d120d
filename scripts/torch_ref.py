#!/usr/bin/env python3
"""GPU check helper (run by scripts/gpu_check.sh on a CUDA machine with torch 2.11).

Subcommands:
  compare A B [--tol T] [--keys k1,k2]   max relative difference of same-named
                                          tensors in two safetensors files
  make-r50 DIR N SIZE                     random BiT-S-R50x1 weights (torch.save,
                                          paper naming) and an input batch
  torch-forward DIR BATCH REPEAT          the PyTorch reference forward on CUDA
                                          (TF32 off), logits + images/s
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


def make_r50(d, n, size):
    import make_model_fixtures as m
    torch.manual_seed(0)
    net = m.ResNetV2([3, 4, 6, 3], 64, 1000)
    with torch.no_grad():
        net.head.conv.weight.normal_(0, 0.01)
        net.head.conv.bias.normal_(0, 0.01)
        for mod in net.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    sd = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"step": 0, "model": sd}, os.path.join(d, "r50.pth.tar"))
    x = torch.rand(n, 3, size, size) * 2 - 1
    write_st(os.path.join(d, "r50_input.safetensors"), {"images": x})


def torch_forward(d, batch, repeat):
    import make_model_fixtures as m
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    net = m.ResNetV2([3, 4, 6, 3], 64, 1000)
    ck = torch.load(os.path.join(d, "r50.pth.tar"), map_location="cpu")
    net.load_state_dict({k[len("module."):]: v for k, v in ck["model"].items()})
    net = net.cuda().eval()
    x = read_st(os.path.join(d, "r50_input.safetensors"))["images"]

    def one_pass(features):
        outs, feats = [], [[] for _ in range(5)]
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch].cuda()
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
    write_st(os.path.join(d, "r50_torch.safetensors"), out)
    print(f"pytorch forward: {x.shape[0] * repeat / secs:.2f} images/s ({repeat} passes over {x.shape[0]} images, batch {batch}, {secs:.2f} s)")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "compare":
        tol = float(args[args.index("--tol") + 1]) if "--tol" in args else 1e-4
        keys = args[args.index("--keys") + 1].split(",") if "--keys" in args else None
        sys.exit(0 if compare(args[0], args[1], tol, keys) else 1)
    elif cmd == "make-r50":
        make_r50(args[0], int(args[1]), int(args[2]))
    elif cmd == "torch-forward":
        torch_forward(args[0], int(args[1]), int(args[2]))
    else:
        sys.exit(f"unknown subcommand {cmd}")
