#!/usr/bin/env python3
"""The predictions written in docs/attention-notes.md before a device run, against what the run
measured: one markdown table, a row per prediction (predicted range, measured value, inside or not).
Reads the scratch folder of scripts/device-check.sh (its jsonl files and device-check.md); a figure
the run did not reach reads "not measured".

    python3 scripts/device_predictions.py DIR [--targets]

--targets adds issue 7's benchmark targets (speed against SDPA and HF eager, mass cost, prefix
sharing) as a second table, each figure "met" or "missed".
"""
import json
import os
import re
import sys


def load(d, name):
    """name -> record of a bench/torch_compare jsonl file ({} when absent)."""
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return {}
    out = {}
    for line in open(p):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("name"):
            out[r["name"]] = r
    return out


def ms(rec):
    """median milliseconds of a miadpo record, or a torch_compare one (a plain number)."""
    if not rec:
        return None
    m = rec.get("ms")
    return m.get("median") if isinstance(m, dict) else m


def after(md, header, pattern):
    """the first float that `pattern` captures in the lines after `header` (before the next header)."""
    i = md.find(header)
    if i < 0:
        return None
    block = md[i + len(header):].split("\nbench ", 1)[0].split("\nscore ", 1)[0]
    m = re.search(pattern, block)
    return float(m.group(1)) if m else None


def main():
    d = sys.argv[1]
    md = open(os.path.join(d, "device-check.md")).read() if os.path.exists(os.path.join(d, "device-check.md")) else ""
    default, torch = load(d, "attn-miadpo-4096.jsonl"), load(d, "attn-torch-4096.jsonl")
    v5, v6 = load(d, "attn-wgmma-bulk-4096.jsonl"), load(d, "attn-wgmma-overlap-4096.jsonl")
    big, tbig = load(d, "attn-miadpo-16384.jsonl"), load(d, "attn-torch-16384.jsonl")
    ops, tops = load(d, "ops-miadpo.jsonl"), load(d, "ops-torch.jsonl")
    rows = []

    def row(what, lo, hi, value, unit, fmt="{:.3f}"):
        # a one-sided target reads as such: "≥ lo" (hi open) or "≤ hi" (from 0)
        if hi >= 100 and unit == "×":
            predicted = f"≥ {fmt.format(lo)} {unit}"
        elif lo == 0:
            predicted = f"≤ {fmt.format(hi)} {unit}"
        else:
            predicted = f"{fmt.format(lo)}–{fmt.format(hi)} {unit}"
        if value is None:
            rows.append((what, predicted, "not measured", ""))
            return
        inside = lo <= value <= hi
        verdict = "inside" if inside else ("better" if (value < lo) == (unit in ("ms", "s", "%")) else "worse")
        rows.append((what, predicted, f"{fmt.format(value)} {unit}", verdict))

    row("variant 5 causal, T = 4096", 0.65, 0.80, ms(v5.get("attention/causal")), "ms")
    row("variant 6 causal, T = 4096", 0.45, 0.60, ms(v6.get("attention/causal")), "ms")
    for label, src in (("default", default), ("variant 5", v5), ("variant 6", v6)):
        c, cm = ms(src.get("attention/causal")), ms(src.get("attention/causal_mass"))
        row(f"{label}: mass cost (causal_mass / causal − 1)", 0.0, 5.0,
            None if not (c and cm) else 100.0 * (cm / c - 1.0), "%", "{:.1f}")
    sdpa = ms(torch.get("attention/causal"))
    for label, src in (("default", default), ("variant 5", v5), ("variant 6", v6)):
        c = ms(src.get("attention/causal"))
        row(f"{label}: causal speed / SDPA (target ≥ 1.0)", 1.0, 100.0,
            None if not (c and sdpa) else sdpa / c, "×", "{:.2f}")
    row("backward (default: variant 3's), T = 4096", 5.0, 7.0, ms(default.get("attention/causal_backward")), "ms")
    row("decode + mass, T = 16384", 0.25, 0.35, ms(big.get("attention/decode_mass")), "ms")
    # session 7: the decode step's cache in bf16 (append, flash-decoding, merge, head average)
    dc, tdc = ms(big.get("attention/decode_cached")), ms(tbig.get("attention/decode_cached"))
    row("decode step on the bf16 cache, T = 16384", 0.12, 0.25, dc, "ms")
    row("decode step on the bf16 cache / SDPA speed, T = 16384", 0.55, 1.1,
        None if not (dc and tdc) else tdc / dc, "×", "{:.2f}")
    dec1 = after(md, "bench --task generate --device cuda:", r"decode\s+([0-9.]+) tok/s")
    dec8 = after(md, "bench --task generate --device cuda --batch 8:", r"decode\s+([0-9.]+) tok/s")
    row("generate: decode, batch 1", 750, 1200, dec1, "tok/s", "{:.0f}")
    row("generate: decode, batch 8 / batch 1", 5.0, 8.0, None if not (dec1 and dec8) else dec8 / dec1, "×", "{:.2f}")
    upd = after(md, "bench --task train --device cuda:", r"of which update ([0-9.]+) s")
    row("DPO step's update (small LLaVA)", 0.0, 0.005, upd, "s", "{:.4f}")
    shared = after(md, "--prefix-sharing true:", r"step ([0-9.]+) s")
    separate = after(md, "--prefix-sharing false:", r"step ([0-9.]+) s")
    row("prefix-shared step speed-up (target ≥ 1.3)", 1.3, 100.0,
        None if not (shared and separate) else separate / shared, "×", "{:.2f}")
    c, tc = ms(ops.get("ceiling/copy")), ms(tops.get("ceiling/copy"))
    row("copy / Tensor.clone speed", 0.9, 1.2, None if not (c and tc) else tc / c, "×", "{:.2f}")
    ld = ops.get("linear/decode")
    row("linear/decode (1 × 4096 · 4096 × 4096 bf16)", 2000, 3350, ld.get("achieved") if ld else None, "GB/s", "{:.0f}")
    print("| prediction | predicted | measured | |")
    print("|---|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if "--targets" in sys.argv:
        print()
        targets(d, md, default, torch, shared, separate)


def targets(d, md, default, torch, shared, separate):
    """issue 7's benchmark targets against this run: one row per figure, 'met' or 'missed'."""
    rows = []

    def row(what, target, value, ok, fmt="{:.2f}×"):
        if value is None:
            rows.append((what, target, "not measured", ""))
        else:
            verdict = "" if ok is None else ("met" if ok(value) else "missed")
            rows.append((what, target, fmt.format(value), verdict))

    by_t = {4096: (default, torch)}
    for t in (1024, 16384):
        by_t[t] = (load(d, f"attn-miadpo-{t}.jsonl"), load(d, f"attn-torch-{t}.jsonl"))
    for op, what in (("causal", "forward, causal"), ("bidirectional", "forward, not causal"),
                     ("causal_backward", "backward, causal")):
        for t in (1024, 4096, 16384):
            ours, theirs = by_t[t]
            a, b = ms(ours.get(f"attention/{op}")), ms(theirs.get(f"attention/{op}"))
            forward = "forward" in what  # the issue sets no target for the backward
            row(f"{what}, d128, T = {t}: speed / SDPA", "≥ 1.0×" if forward else "-",
                None if not (a and b) else b / a, (lambda v: v >= 1.0) if forward else None)
    c, cm = ms(default.get("attention/causal")), ms(default.get("attention/causal_mass"))
    row("group mass cost, T = 4096 (causal_mass / causal − 1)", "≤ 5%",
        None if not (c and cm) else 100.0 * (cm / c - 1.0), lambda v: v <= 5.0, "{:.1f}%")
    # the selection table of scripts/side_by_side_select.py: | images | batch | HF a/s | ours a/s | × | ...
    for line in md.splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].isdigit() and cells[1].isdigit():
            try:
                x = float(cells[4])
            except ValueError:
                continue
            row(f"selection, {cells[0]} images, batch {cells[1]}: answers/s / HF eager", "≥ 20×", x,
                lambda v: v >= 20.0)
    row("prefix-shared DPO step / two-sequence step (speed)", "≥ 1.3×",
        None if not (shared and separate) else separate / shared, lambda v: v >= 1.3)
    print("## Issue 7's benchmark targets against this run")
    print()
    print("| issue 7 target | target | measured | |")
    print("|---|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
