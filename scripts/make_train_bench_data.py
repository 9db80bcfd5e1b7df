#!/usr/bin/env python3
"""Write DPO preference pairs with synthetic images for `miadpo train` / scripts/compare_trl_cpu.py.

Usage:
  python scripts/make_train_bench_data.py --out DIR [--count 16] [--size 336x336] [--seed 0]
        [--prompt $'<image>\\nDescribe the picture.'] [--json train_bench.json]
Writes DIR/train_bench.json (or --json NAME): a JSON list of {"id", "image", "prompt", "chosen", "rejected"}
(the format `miadpo train --data` / src/data.rs `load_pairs` reads), and one PNG per pair under DIR/images/
(noise + coloured shapes from scripts/make_select_bench_data.py; same seed -> same bytes). Pass DIR as
--image-root. Every prompt is the same single-image question (one "<image>"); chosen = "The picture shows
<the shapes drawn>." plus a short remark, rejected = a description of other shapes; both are plain sentences
of roughly 10-30 LLaMA tokens and always differ. The images are square by default, so LLaVA's pad-to-square
(miadpo's default `--aspect pad`) and the HF CLIP processor's centre crop see the same pixels.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_select_bench_data import COLORS, article, make_image  # noqa: E402

SHAPES = ["rectangle", "ellipse", "triangle", "circle", "square"]
PLACES = ["on a noisy background", "near the top left corner", "in the middle of the frame",
          "over a speckled texture", "close to the lower edge"]
REMARKS = ["", " The colours are bright and easy to tell apart.", " Nothing else is visible.",
           " The shapes overlap a little."]


def wrong_description(rng):
    names = list(COLORS)
    parts = []
    for _ in range(int(rng.integers(1, 3))):
        c = names[int(rng.integers(0, len(names)))]
        s = SHAPES[int(rng.integers(0, len(SHAPES)))]
        parts.append(f"{article(c)} {c} {s}")
    return "It looks like " + " and ".join(parts) + " " + PLACES[int(rng.integers(0, len(PLACES)))] + "."


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (JSON + images/)")
    ap.add_argument("--count", type=int, default=16, help="number of pairs (default 16)")
    ap.add_argument("--size", default="336x336", help="WxH of the synthetic images (default 336x336)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="<image>\nDescribe the picture.", help="question; exactly one <image>")
    ap.add_argument("--json", default="train_bench.json", help="JSON file name inside --out")
    a = ap.parse_args()
    if a.count < 1:
        ap.error("--count must be >= 1")
    if a.prompt.count("<image>") != 1:
        ap.error("--prompt must contain exactly one <image>")
    w, h = (int(x) for x in a.size.lower().split("x"))
    rng = np.random.default_rng(a.seed)
    os.makedirs(os.path.join(a.out, "images"), exist_ok=True)
    recs = []
    for i in range(a.count):
        im, desc = make_image(rng, w, h)
        rel = f"images/train_{i:05d}.png"
        im.save(os.path.join(a.out, rel))
        shapes = desc[0] if len(desc) == 1 else ", ".join(desc[:-1]) + " and " + desc[-1]
        chosen = "The picture shows " + shapes + "." + REMARKS[int(rng.integers(0, len(REMARKS)))]
        rejected = wrong_description(rng)
        while rejected == chosen:
            rejected = wrong_description(rng)
        recs.append({"id": f"train-{i}", "image": rel, "prompt": a.prompt, "chosen": chosen, "rejected": rejected})
    path = os.path.join(a.out, a.json)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(recs, f, indent=1)
    os.replace(tmp, path)
    print(f"{len(recs)} preference pairs ({w}x{h} PNGs) -> {path}")


if __name__ == "__main__":
    main()
