"""Feature stores for scripts/bench.sh (the store section), in mos's store format
(docs/formats.md#feature-stores).

  synthetic DIR ROWS CLASSES SEED [GROUPS]
      a one-shard store of ROWS random logits over CLASSES classes (head CLASSES, or
      CLASSES + GROUPS for a group-softmax head), labels cycling over the classes;
      SEED 0 gives in-distribution-like logits (the label's logit raised), others
      plain noise.
  head FILE CLASSES DIM SEED
      a random head (head.conv.weight [CLASSES, DIM, 1, 1], head.conv.bias) as a
      safetensors checkpoint, for the post-hoc methods (mos score --model-path).
  features DIR ROWS HEAD SEED [SHIFT]
      a one-shard store of ROWS random non-negative pre-logit features
      (relu(normal + SHIFT), DIM wide; BiT-S-R101x1's 2048 for DIM 2048) and their
      logits under HEAD, whose SHA-256 the manifest records.
  round16 SRC DST
      a copy of store SRC whose float32 tensors are rounded through float16, to
      measure what storing float16 would change; prints the bytes per row of SRC
      and what float16 tensors would take.
  compare A.csv B.csv
      the largest absolute and relative difference between the score columns of two
      score CSVs of the same images.
"""
import csv
import hashlib
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def fingerprint(m):
    """The manifest's fingerprint as mos computes it (Manifest::compute_fingerprint in
    src/pipeline/store.rs): SHA-256 of the settings' `name=value` lines."""
    settings = [
        ("format", m["format"]), ("mos version", m["mos_version"]), ("model", m["model"]),
        ("checkpoint SHA-256", m["checkpoint_sha256"]),
        ("checkpoint format", m["checkpoint_format"]), ("head size", m["head_size"]),
        ("classes", m["num_classes"]), ("crop", m["crop"]), ("batch", m["batch"]),
        ("precision", m["precision"]),
        ("skip bad images", "true" if m["skip_bad_images"] else "false"),
        ("layers", ",".join(m["layers"])), ("images", m["images"]),
        ("data fingerprint", m["data_fingerprint"]), ("shards", m["num_shards"]),
    ]
    if m.get("group_config") is not None:
        settings.append(("group config", ",".join(str(g) for g in m["group_config"])))
    text = "".join(f"{k}={v}\n" for k, v in settings)
    return hashlib.sha256(text.encode()).hexdigest()


def write_shard(d, manifest, tensors, paths):
    stem = "shard-00000-of-00001"
    meta = {"format": "mos-store-shard-v1", "fingerprint": manifest["fingerprint"],
            "shard": "0", "num_shards": "1"}
    path = os.path.join(d, stem + ".safetensors")
    save_file(tensors, path, metadata=meta)
    data = open(path, "rb").read()
    rows = len(paths)
    index = {"format": "mos-store-shard-v1", "fingerprint": manifest["fingerprint"],
             "shard": 0, "num_shards": 1, "start": 0, "end": rows, "rows": rows,
             "paths": paths, "indices": list(range(rows)), "skipped": [],
             "file": stem + ".safetensors", "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(), "device": "synthetic",
             "mos_version": manifest["mos_version"]}
    with open(os.path.join(d, stem + ".json"), "w") as f:
        json.dump(index, f)


def synthetic(d, rows, classes, seed, groups=0):
    rows, classes, seed, groups = int(rows), int(classes), int(seed), int(groups)
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    head = classes + groups
    labels = np.arange(rows, dtype=np.int64) % classes
    logits = rng.standard_normal((rows, head), dtype=np.float32) * 2
    if seed == 0:
        logits[np.arange(rows), labels + (groups > 0)] += 6
    paths = [f"c{label:04d}/{i:06d}.JPEG" for i, label in enumerate(labels)]
    manifest = {
        "format": "mos-store-v1", "mos_version": "0.1.0", "model": "BiT-S-R101x1",
        "checkpoint": "synthetic", "checkpoint_sha256": "0" * 64,
        "checkpoint_format": "synthetic", "head_size": head, "num_classes": classes,
        "crop": 480, "batch": 256, "precision": "fp32", "skip_bad_images": False,
        "layers": ["logits"], "datadir": d, "list": None,
        "dataset": os.path.basename(d.rstrip("/")), "images": rows,
        "data_fingerprint": f"synthetic-{seed}", "num_shards": 1,
        "fingerprint": "", "command": ["mos", "extract"], "complete": True,
    }
    manifest["fingerprint"] = fingerprint(manifest)
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    write_shard(d, manifest, {"logits": logits, "labels": labels}, paths)


def head(path, classes, dim, seed):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rng = np.random.default_rng(int(seed))
    classes, dim = int(classes), int(dim)
    w = (rng.standard_normal((classes, dim, 1, 1), dtype=np.float32) * 0.02)
    b = (rng.standard_normal(classes, dtype=np.float32) * 0.1)
    save_file({"head.conv.weight": w, "head.conv.bias": b}, path)


def features(d, rows, head_path, seed, shift="0"):
    rows, seed, shift = int(rows), int(seed), float(shift)
    os.makedirs(d, exist_ok=True)
    t = load_file(head_path)
    w, b = t["head.conv.weight"], t["head.conv.bias"]
    classes, dim = w.shape[0], w.shape[1]
    w = w.reshape(classes, dim)
    rng = np.random.default_rng(seed)
    feats = np.empty((rows, dim), dtype=np.float32)
    for s in range(0, rows, 10000):
        n = min(10000, rows - s)
        feats[s:s + n] = np.maximum(rng.standard_normal((n, dim), dtype=np.float32) + shift, 0)
    logits = feats @ w.T + b
    labels = np.arange(rows, dtype=np.int64) % classes
    paths = [f"c{label:04d}/{i:06d}.JPEG" for i, label in enumerate(labels)]
    sha = hashlib.sha256(open(head_path, "rb").read()).hexdigest()
    manifest = {
        "format": "mos-store-v1", "mos_version": "0.1.0", "model": "BiT-S-R101x1",
        "checkpoint": head_path, "checkpoint_sha256": sha,
        "checkpoint_format": "safetensors", "head_size": classes, "num_classes": classes,
        "crop": 480, "batch": 256, "precision": "fp32", "skip_bad_images": False,
        "layers": ["logits", "features"], "datadir": d, "list": None,
        "dataset": os.path.basename(d.rstrip("/")), "images": rows,
        "data_fingerprint": f"synthetic-{seed}", "num_shards": 1,
        "fingerprint": "", "command": ["mos", "extract"],
        "complete": True,
    }
    manifest["fingerprint"] = fingerprint(manifest)
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    write_shard(d, manifest, {"logits": logits, "features": feats, "labels": labels}, paths)


def round16(src, dst):
    os.makedirs(dst, exist_ok=True)
    manifest = json.load(open(os.path.join(src, "manifest.json")))
    index = json.load(open(os.path.join(src, "shard-00000-of-00001.json")))
    t = load_file(os.path.join(src, index["file"]))
    f32 = sum(v.nbytes for v in t.values())
    f16 = sum(v.nbytes // 2 if v.dtype == np.float32 else v.nbytes for v in t.values())
    t = {k: v.astype(np.float16).astype(np.float32) if v.dtype == np.float32 else v
         for k, v in t.items()}
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    write_shard(dst, manifest, t, index["paths"])
    rows = index["rows"]
    print(f"bytes per row: {f32 / rows:.0f} with float32 tensors, {f16 / rows:.0f} with float16")


def compare(a, b):
    def cols(p):
        with open(p) as f:
            r = list(csv.reader(f))
        return r[0][2:], np.array([[float(x) for x in row[2:]] for row in r[1:]])
    names, x = cols(a)
    _, y = cols(b)
    for j, n in enumerate(names):
        d = np.abs(x[:, j] - y[:, j])
        scale = np.abs(x[:, j]).max()
        print(f"{n}: largest score difference {d.max():.3e} ({d.max() / scale:.2e} of the largest score)")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"synthetic": synthetic, "round16": round16, "compare": compare, "head": head,
     "features": features}[cmd](*args)
