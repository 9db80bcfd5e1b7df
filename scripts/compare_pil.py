#!/usr/bin/env python3
"""Pillow baseline for miadpo's collage composition (benches/augment.rs).

Does the same compositing as `src/augment/compose.rs` with Pillow, the library the original MIA-DPO
code uses: grid collages of 2, 4 and 9 images (Lanczos resize to fit 448x448, white canvas, 40 px gaps,
a 40 px label band above each row with `ImageK` in DejaVu Sans Bold at 36 px) and a pic-in-pic (the
foreground scaled to 0.7 of the background, centred), plus a 2x2 grid followed by a JPEG encode at
quality 95. Inputs are the same synthetic images as the Rust bench (same formula, same sizes:
640x480, 500x375, 427x640), built in memory so that decoding is not timed.

Timing: single process, one thread. Pillow's resize is C code that runs on the calling thread (it
releases the GIL but never spreads one resize over threads), as do paste, text drawing and the JPEG
encoder, so these figures are one core's worth. miadpo resizes the cells of a grid in parallel; compare
its single-thread figure (criterion run with RAYON_NUM_THREADS=1) as well as its default one.

Usage:
    /work/hfvenv/bin/python scripts/compare_pil.py                      # Pillow only
    RAYON_NUM_THREADS=1 cargo bench --bench augment -- --save-baseline t1
    cargo bench --bench augment -- --save-baseline t2
    /work/hfvenv/bin/python scripts/compare_pil.py --criterion-dir target/criterion --baselines t2,t1
    /work/hfvenv/bin/python scripts/compare_pil.py --miadpo-json ours.json
        # ours.json: {"<label>": {"grid_n2": collages_per_s, ...}, ...}
    /work/hfvenv/bin/python scripts/compare_pil.py --dump /tmp/pil && \
        MIADPO_PIL_DIR=/tmp/pil cargo test --release --test compose -- --ignored matches_pillow
        # pixel check: Pillow's collages, pic-in-pic and plain resizes against miadpo's
"""
import argparse
import io
import json
import os
import platform
import statistics
import time

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFont, features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FONT_PATH = os.path.join(ROOT, "assets", "fonts", "DejaVuSans-Bold.ttf")
CELL, GAP, LABEL_BAND, LABEL_INDENT = 448, 40, 40, 20
SHAPES = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}
SIZES = [(640, 480), (500, 375), (427, 640), (640, 480), (640, 480), (500, 375), (640, 480), (427, 640), (640, 480)]
CASES = ["grid_n2", "grid_n4", "grid_n9", "pip_640x480_500x375", "grid_n4_jpeg_q95"]


def synthetic(w, h, seed):
    """The Rust bench's `synthetic` (gradients plus hash noise), in wrapping u32 arithmetic."""
    x = np.arange(w, dtype=np.uint32)[None, :]
    y = np.arange(h, dtype=np.uint32)[:, None]
    with np.errstate(over="ignore"):
        s = (x * np.uint32(73_856_093)) ^ (y * np.uint32(19_349_663)) ^ np.uint32((seed * 83_492_791) % 2**32)
        s ^= s >> np.uint32(13)
        s = s * np.uint32(0x5BD1E995)
        s ^= s >> np.uint32(15)
    n = s & np.uint32(31)
    r = (x * 255 // max(w, 1) + n + seed * 40) % 256
    g = (y * 255 // max(h, 1) + n) % 256
    b = ((x + y) * 128 // max(w + h, 1) + seed * 17 + n) % 256
    return Image.fromarray(np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8), "RGB")


def fit_in(w, h, side):
    """miadpo's fit_in: long side -> side, short side rounded half up (integer arithmetic), >= 1."""
    w, h = max(w, 1), max(h, 1)
    if w >= h:
        return side, max((2 * h * side + w) // (2 * w), 1)
    return max((2 * w * side + h) // (2 * h), 1), side


def pip_box(bw, bh, fw, fh):
    fw, fh = max(fw, 1), max(fh, 1)
    scale = 0.7 * min(bw / fw, bh / fh)
    w = min(max(int(np.floor(fw * scale + 0.5)), 1), bw)
    h = min(max(int(np.floor(fh * scale + 0.5)), 1), bh)
    return (bw - w) // 2, (bh - h) // 2, w, h


class Composer:
    def __init__(self, layout):
        engine = {"basic": ImageFont.Layout.BASIC, "raqm": ImageFont.Layout.RAQM, None: None}[layout]
        self.font = ImageFont.truetype(FONT_PATH, 36, layout_engine=engine)
        # Centre the ink of "ImageK" in the band, as compose.rs does.
        _, top, _, bottom = self.font.getbbox("Image0123456789")
        self.dy = (LABEL_BAND - (bottom - top)) // 2 - top

    def grid(self, images):
        rows, cols = SHAPES[len(images)]
        size = (CELL * cols + GAP * (cols - 1), (CELL + LABEL_BAND) * rows)
        canvas = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(canvas)
        for k, img in enumerate(images):
            r, c = divmod(k, cols)
            x, y = c * (CELL + GAP), r * (CELL + LABEL_BAND) + LABEL_BAND
            canvas.paste(img.resize(fit_in(*img.size, CELL), Image.LANCZOS), (x, y))
            draw.text((x + LABEL_INDENT, y - LABEL_BAND + self.dy), f"Image{k + 1}", fill="black", font=self.font)
        return canvas

    @staticmethod
    def pip(background, foreground):
        x, y, w, h = pip_box(*background.size, *foreground.size)
        out = background.copy()
        out.paste(foreground.resize((w, h), Image.LANCZOS), (x, y))
        return out


# Plain resizes for the pixel check: (source index, width, height, filter name).
RESIZE_CASES = [
    (0, 448, 336, "lanczos"), (2, 299, 448, "lanczos"), (1, 448, 336, "lanczos"), (0, 1000, 750, "lanczos"),
    (3, 97, 31, "lanczos"), (5, 336, 336, "bicubic"), (7, 200, 500, "bicubic"), (4, 123, 77, "bilinear"),
]
FILTERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def dump(out_dir, comp, images, background, foreground):
    """Writes the inputs and Pillow's outputs as PNG, for tests/compose.rs `matches_pillow`."""
    os.makedirs(out_dir, exist_ok=True)
    for i, img in enumerate(images):
        img.save(os.path.join(out_dir, f"src{i}.png"))
    background.save(os.path.join(out_dir, "bg.png"))
    foreground.save(os.path.join(out_dir, "fg.png"))
    for n in SHAPES:
        comp.grid(images[:n]).save(os.path.join(out_dir, f"grid_n{n}.png"))
    comp.pip(background, foreground).save(os.path.join(out_dir, "pip.png"))
    resizes = []
    for src, w, h, f in RESIZE_CASES:
        name = f"resize_src{src}_{w}x{h}_{f}.png"
        images[src].resize((w, h), FILTERS[f]).save(os.path.join(out_dir, name))
        resizes.append({"src": src, "width": w, "height": h, "filter": f, "file": name})
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"n_sources": len(images), "grids": list(SHAPES), "resizes": resizes}, f, indent=1)
    print(f"wrote Pillow references to {out_dir}")


def time_case(fn, repeats, min_time):
    """Median over `repeats` runs of the per-collage time, each run looping for at least `min_time` s."""
    fn()  # warm-up (font caches, allocator)
    per_call = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        per_call.append(dt / n)
    return 1.0 / statistics.median(per_call)


def criterion_numbers(root, baseline):
    out = {}
    for case in CASES:
        path = os.path.join(root, "augment", case, baseline, "estimates.json")
        if os.path.exists(path):
            with open(path) as f:
                out[case] = 1e9 / json.load(f)["median"]["point_estimate"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per repeat")
    ap.add_argument("--layout", choices=["basic", "raqm"], default=None,
                    help="Pillow text layout engine (default: Pillow's choice, raqm when available)")
    ap.add_argument("--criterion-dir", help="target/criterion of `cargo bench --bench augment`")
    ap.add_argument("--baselines", default="base", help="comma-separated criterion baselines to show")
    ap.add_argument("--miadpo-json", help='{"label": {"grid_n2": collages_per_s, ...}} to show beside Pillow')
    ap.add_argument("--json-out", help="write Pillow's numbers here")
    ap.add_argument("--dump", metavar="DIR", help="write inputs and Pillow outputs as PNG for the pixel check, "
                    "then exit")
    args = ap.parse_args()

    images = [synthetic(w, h, i) for i, (w, h) in enumerate(SIZES)]
    background, foreground = synthetic(640, 480, 11), synthetic(500, 375, 12)
    comp = Composer(args.layout)
    if args.dump:
        dump(args.dump, comp, images, background, foreground)
        return

    def grid_jpeg():
        buf = io.BytesIO()
        comp.grid(images[:4]).save(buf, "JPEG", quality=95)
        return buf

    fns = {
        "grid_n2": lambda: comp.grid(images[:2]),
        "grid_n4": lambda: comp.grid(images[:4]),
        "grid_n9": lambda: comp.grid(images[:9]),
        "pip_640x480_500x375": lambda: comp.pip(background, foreground),
        "grid_n4_jpeg_q95": grid_jpeg,
    }
    pillow = {case: time_case(fn, args.repeats, args.min_time) for case, fn in fns.items()}

    ours = {}
    if args.criterion_dir:
        for b in args.baselines.split(","):
            ours[f"miadpo[{b}]"] = criterion_numbers(args.criterion_dir, b)
    if args.miadpo_json:
        with open(args.miadpo_json) as f:
            ours.update(json.load(f))

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    layout = "raqm" if comp.font.layout_engine == ImageFont.Layout.RAQM else "basic"
    print(f"CPU: {cpu} ({os.cpu_count()} logical cores); Python {platform.python_version()}, "
          f"Pillow {PIL.__version__} (SIMD build: {'post' in PIL.__version__}), "
          f"libjpeg-turbo: {features.check_feature('libjpeg_turbo')}, text layout: {layout}; Pillow on 1 thread")
    print("collages per second (median of %d x %.1f s)" % (args.repeats, args.min_time))
    header = f"{'case':<22}{'Pillow':>10}" + "".join(f"{k:>16}{'x':>7}" for k in ours)
    print(header)
    print("-" * len(header))
    for case in CASES:
        row = f"{case:<22}{pillow[case]:>10.1f}"
        for nums in ours.values():
            v = nums.get(case)
            row += f"{v:>16.1f}{v / pillow[case]:>6.2f}x" if v else f"{'-':>16}{'':>7}"
        print(row)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"Pillow": pillow}, f, indent=1)


if __name__ == "__main__":
    main()
