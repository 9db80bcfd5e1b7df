#!/usr/bin/env python3
"""Write augment-format benchmark data for `miadpo select` / scripts/compare_hf_select.py.

Usage:
  python scripts/make_select_bench_data.py --out DIR [--kind sequence|grid|pip] [--images N] [--count K]
        [--size 640x480] [--seed 0] [--rows R --cols C]
Writes DIR/select_bench.json (or --json NAME) and the synthetic PNGs under DIR/images/ (noise + shapes, same
seed -> same bytes). Pass DIR as --image-root. Records: id "bench-<i>", question "Describe the picture."
addressed to image `target` (sequence: "Image1:<image>\\n...ImageN:<image>\\nIn ImageK, describe the picture.";
grid: "<image>\\nIn ImageK, describe the picture."; pip: "<image>\\nIn the centre picture, describe the
picture."), ground truth "The picture shows <shapes>.", and "mia" metadata with the fields `miadpo augment`
writes (src/augment/llava_json.rs `Mia`).
Grid and pip records use one synthetic image each (this data measures speed, not composition).
"""
import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
GRID_SHAPES = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}  # as `miadpo augment`


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def make_image(rng, w, h):
    """Noise background plus 1-3 coloured rectangles/ellipses; returns (image, description)."""
    base = rng.integers(0, 256, 3)
    noise = rng.integers(-40, 41, (h, w, 3))
    arr = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    names = list(COLORS)
    desc = []
    for _ in range(int(rng.integers(1, 4))):
        cname = names[int(rng.integers(0, len(names)))]
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = x0 + int(rng.integers(w // 6, w // 2)), y0 + int(rng.integers(h // 6, h // 2))
        if rng.random() < 0.5:
            d.rectangle([x0, y0, x1, y1], fill=COLORS[cname]); desc.append(f"{article(cname)} {cname} rectangle")
        else:
            d.ellipse([x0, y0, x1, y1], fill=COLORS[cname]); desc.append(f"{article(cname)} {cname} ellipse")
    return im, desc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (JSON + images/)")
    ap.add_argument("--kind", default="sequence", choices=["sequence", "grid", "pip"])
    ap.add_argument("--images", type=int, default=2, help="sequence: images per record; grid: cells (2,3,4,6,9)")
    ap.add_argument("--count", type=int, default=16, help="number of records")
    ap.add_argument("--size", default="640x480", help="WxH of the synthetic images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=None, help="grid rows (default from --images)")
    ap.add_argument("--cols", type=int, default=None, help="grid cols (default from --images)")
    ap.add_argument("--json", default=None, help="JSON file name inside --out (default select_bench.json)")
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.lower().split("x"))
    if a.count < 1 or a.images < 1:
        ap.error("--count and --images must be >= 1")
    if a.kind == "grid":
        if a.rows is None or a.cols is None:
            if a.images not in GRID_SHAPES:
                ap.error(f"grid --images must be one of {sorted(GRID_SHAPES)} (or give --rows and --cols)")
            a.rows, a.cols = GRID_SHAPES[a.images]
        a.images = a.rows * a.cols
    rng = np.random.default_rng(a.seed)
    os.makedirs(os.path.join(a.out, "images"), exist_ok=True)
    n_files = a.count * (a.images if a.kind == "sequence" else 1)
    descs = []
    for j in range(n_files):
        im, desc = make_image(rng, w, h)
        im.save(os.path.join(a.out, "images", f"bench_{j:05d}.png"))
        descs.append(desc)
    recs = []
    for i in range(a.count):
        if a.kind == "sequence":
            n = a.images
            files = [i * n + k for k in range(n)]
            t = int(rng.integers(1, n + 1))
            q = "".join(f"Image{k + 1}:<image>\n" for k in range(n)) + f"In Image{t}, describe the picture."
            mia = {"kind": "sequence", "target": t, "n_images": n, "source_id": f"bench-src-{i}"}
            image = [f"images/bench_{f:05d}.png" for f in files]
            gt_desc = descs[files[t - 1]]
        else:
            image = f"images/bench_{i:05d}.png"
            gt_desc = descs[i]
            if a.kind == "grid":
                t = int(rng.integers(1, a.images + 1))
                q = f"<image>\nIn Image{t}, describe the picture."
                mia = {"kind": "grid", "target": t, "n_images": a.images, "rows": a.rows, "cols": a.cols,
                       "sources": [image], "source_id": f"bench-src-{i}"}
            else:
                q = "<image>\nIn the centre picture, describe the picture."
                mia = {"kind": "pip", "background": image, "foreground": image, "source_id": f"bench-src-{i}"}
        gt = "The picture shows " + ", ".join(gt_desc) + "."
        recs.append({"id": f"bench-{i}", "image": image,
                     "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": gt}], "mia": mia})
    path = os.path.join(a.out, a.json or "select_bench.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(recs, f, indent=1)
    os.replace(tmp, path)
    per = f"{a.images} images each" if a.kind == "sequence" else (f"{a.rows}x{a.cols} grid" if a.kind == "grid" else "centre")
    print(f"{len(recs)} {a.kind} records ({per}, {n_files} PNGs {w}x{h}) -> {path}")


if __name__ == "__main__":
    main()
