#!/usr/bin/env python3
"""HF transformers baseline for `miadpo select`: MIA-DPO's attention-aware answer generation with
`model.generate(output_attentions=True)`, timed, on augment-format records.

Usage:
  python scripts/compare_hf_select.py --model DIR --data FILE [--image-root DIR ...] [--template vicuna_v1]
        [--aspect pad|crop] [--max-new-tokens 64] [--batch-size 1] [--limit K] [--attn-layer L]
        [--threads T] [--warmup 1] [--json-only]
Setup (outside the repo):  python3 -m venv /work/hfvenv && /work/hfvenv/bin/pip install -r scripts/requirements-hf.txt
Bench data:  python scripts/make_select_bench_data.py --kind sequence --images 2 --count 8 --out DIR

What it does (keep it identical to the Rust side; change both or neither):
  - model: LlavaForConditionalGeneration.from_pretrained(DIR, dtype=float32, attn_implementation="eager")
    (eager: the only implementation that returns attention probabilities); torch.set_num_threads(T);
    everything under torch.inference_mode(). Load is not timed.
  - records: the augment JSON (list of {"id", "image": path | [paths], "conversations", "mia"}); the first human
    turn is the question, `image` paths are absolute or tried against each --image-root in order.
  - prompt: [BOS] + tokenizer.json(template(question) with every <image> expanded to image_seq_length <image>
    tokens, no special tokens added). vicuna_v1 = "{SYSTEM} USER: {q} ASSISTANT:".
  - pixels: per image, RGB; `pad` = LLaVA expand2square (fill int(mean*255), image at ((s-w)//2, (s-h)//2)),
    then the CLIP processor of preprocessor_config.json (CLIPImageProcessorPil, Pillow BICUBIC); `crop` = the
    processor only.
  - batches of B records in file order, LEFT padded with pad_token_id and an attention mask;
    generate(input_ids, attention_mask, pixel_values, do_sample=False, max_new_tokens=N, output_attentions=True,
    output_logits=True, return_dict_in_generate=True), stopping at eos_token_id. This is how MIA-DPO's
    selection scripts get attentions: generate keeps every step's attentions for every layer, including the
    prompt's (layers x B x heads x T x T) from the prefill.
  - per record: answer = decode(generated ids up to and including the first EOS, skip_special_tokens).strip();
    ratio from generate's attentions at layer L (default num_layers // 2): for each generated token fed back
    (steps 1 .. n-1; step 0 is the prefill whose rows are the prompt's and is skipped), heads averaged, row
    summed over each group's key positions (positions shifted by the row's left padding), averaged over rows,
    normalised over groups:
      sequence: one group per image span; ratio = share of image `target` (1-based);
      grid:     the image's g x g patch grid (g = image_size // patch_size, CLS already dropped) split into
                rows x cols blocks (sizes g // k, remainders to the first blocks); ratio = block `target`
                (1-based, row-major) over the whole grid;
      pip:      the centre inner x inner block (inner = 2g // 3, offset (g - inner) // 2) over the whole grid.
    ppl = exp(-mean over the n generated steps of log max softmax(logits)) (MIA-DPO's max_softmax_ppl).
  - timing: time.perf_counter() around the whole loop over batches, including image loading, preprocessing,
    tokenization, generate and the ratio computation (the same work `miadpo select` does per record, minus
    writing output). answers/s = records / s; tokens/s = generated tokens (incl. EOS) / s; latency = wall
    time of the batch a record was in (prefill included), median over records.
    --warmup W (default 1): W untimed generate calls on the first record alone with max_new_tokens=2 first.
  - memory (MiB): loaded_rss_mb = resident set (/proc/self/status VmRSS) right after loading, before warmup;
    loaded_peak_rss_mb = ru_maxrss then (HF's load has a transient: f16 weights upcast to f32).
    After the warmup the kernel's peak mark is reset (/proc/self/clear_refs "5"), so ru_maxrss at the end is
    the peak of the timed loop: loop_peak_rss_mb (null where the reset is not allowed). peak_rss_mb =
    max(ru_maxrss at the end, loaded_peak_rss_mb), the whole process's peak (as /usr/bin/time would report
    it, except for the untimed warmup). loop_peak - loaded is what generation with output_attentions costs
    (grows with B * layers * heads * T^2 for the prefill attentions generate returns).
Output: one JSON line on stdout (first line), then a human-readable summary unless --json-only.
"""
import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer
from transformers import LlavaForConditionalGeneration

try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ClipProc
except ImportError:  # older transformers: the slow processor is the Pillow one
    from transformers import CLIPImageProcessor as ClipProc

SYSTEM_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAVA_V0 = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEMPLATES = {  # same strings as src/text/template.rs
    "vicuna_v1": lambda q: f"{SYSTEM_VICUNA_V1} USER: {q} ASSISTANT:",
    "llava_v0": lambda q: f"{SYSTEM_LLAVA_V0}###Human: {q}###Assistant:",
    "llava_hf": lambda q: f"USER: {q} ASSISTANT:",
    "plain": lambda q: q,
}


class RecordError(Exception):
    pass


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss_mb():
    """Current resident set size in MiB (VmRSS); falls back to ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM, which ru_maxrss of a live process reads) so that ru_maxrss
    afterwards is the peak of what follows; False where /proc/self/clear_refs is not writable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_busy_s():
    """System-wide busy CPU seconds (all cores, all processes) from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    return (sum(v[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def split_even(n, k):
    """[start, end) of k consecutive parts of range(n): sizes n // k, the remainder to the first parts."""
    base, rem = divmod(n, k)
    out, s = [], 0
    for i in range(k):
        e = s + base + (1 if i < rem else 0)
        out.append((s, e))
        s = e
    return out


def image_spans(ids, image_token, seq_len):
    """[start, end) of every image's token span in a prompt (adjacent images' runs split by seq_len)."""
    spans, i = [], 0
    while i < len(ids):
        if ids[i] == image_token:
            j = i
            while j < len(ids) and ids[j] == image_token:
                j += 1
            if (j - i) % seq_len:
                raise RecordError(f"a run of {j - i} image tokens is not a multiple of {seq_len}")
            spans += [(s, s + seq_len) for s in range(i, j, seq_len)]
            i = j
        else:
            i += 1
    return spans


class Geometry:
    def __init__(self, cfg):
        vc = cfg.vision_config
        self.g = vc.image_size // vc.patch_size
        self.seq_len = int(getattr(cfg, "image_seq_length", 0) or 0) or self.g * self.g
        self.cls = 1 if cfg.vision_feature_select_strategy == "full" else 0  # CLS kept first in `full`
        self.image_token = int(getattr(cfg, "image_token_index", None) or cfg.image_token_id)

    def patch(self, span, r, c):
        return span[0] + self.cls + r * self.g + c


def groups_for(rec_id, mia, spans, geo):
    """(groups, target index) where each group is a list of prompt positions (keys)."""
    kind = mia.get("kind")
    n = len(spans)
    if kind == "sequence":
        t = int(mia.get("target", 0))
        if not 1 <= t <= n:
            raise RecordError(f"mia.target {t} outside 1..{n}")
        return [list(range(s, e)) for s, e in spans], t - 1
    if kind not in ("grid", "pip"):
        raise RecordError(f"unknown mia.kind {kind!r}")
    if n != 1:
        raise RecordError(f"{kind} record with {n} images (expected 1)")
    g, span = geo.g, spans[0]
    if geo.cls + g * g != span[1] - span[0]:
        raise RecordError(f"image span of {span[1] - span[0]} tokens is not a {g}x{g} patch grid")
    if kind == "grid":
        rows, cols, t = int(mia["rows"]), int(mia["cols"]), int(mia["target"])
        if not 1 <= t <= rows * cols or rows < 1 or cols < 1 or rows > g or cols > g:
            raise RecordError(f"bad grid {rows}x{cols} target {t} (patch grid {g}x{g})")
        groups = []
        for r0, r1 in split_even(g, rows):
            for c0, c1 in split_even(g, cols):
                groups.append([geo.patch(span, r, c) for r in range(r0, r1) for c in range(c0, c1)])
        return groups, t - 1
    inner = 2 * g // 3
    off = (g - inner) // 2
    centre = [geo.patch(span, r, c) for r in range(off, off + inner) for c in range(off, off + inner)]
    cs = set(centre)
    rest = [geo.patch(span, r, c) for r in range(g) for c in range(g) if geo.patch(span, r, c) not in cs]
    return [centre, rest], 0


def resolve(path, roots):
    if os.path.isabs(path):
        return path if os.path.exists(path) else None
    for r in roots:
        p = os.path.join(r, path)
        if os.path.exists(p):
            return p
    return None


def expand2square(im, fill):
    w, h = im.size
    if w == h:
        return im
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), fill)
    canvas.paste(im, ((s - w) // 2, (s - h) // 2))
    return canvas


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="llava-hf folder (config.json, model.safetensors, "
                                                   "tokenizer.json, preprocessor_config.json)")
    ap.add_argument("--data", required=True, help="augment-format JSON (list of records with 'mia')")
    ap.add_argument("--image-root", action="append", default=[], help="folder for relative image paths "
                                                                      "(repeatable; tried in order; default .)")
    ap.add_argument("--template", default="vicuna_v1", choices=sorted(TEMPLATES))
    ap.add_argument("--aspect", default="pad", choices=["pad", "crop"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="only the first K records")
    ap.add_argument("--attn-layer", type=int, default=None, help="decoder layer (0-based; default layers // 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=1, help="untimed generate calls on the first record (default 1)")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the model in bf16 on GPU 0 (how MIA-DPO runs it), peak GPU memory reported")
    a = ap.parse_args()
    if a.max_new_tokens < 1 or a.batch_size < 1 or a.threads < 1 or a.warmup < 0:
        ap.error("--max-new-tokens, --batch-size, --threads must be >= 1, --warmup >= 0")
    roots = a.image_root or ["."]

    torch.set_num_threads(a.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    # ---- load (not timed)
    t_load = time.perf_counter()
    load_kw = {"attn_implementation": "eager"}
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    if int(transformers.__version__.split(".")[0]) >= 5:
        load_kw["dtype"] = dtype
    else:
        load_kw["torch_dtype"] = dtype
    model = LlavaForConditionalGeneration.from_pretrained(a.model, **load_kw).eval().to(a.device)
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    proc = ClipProc.from_pretrained(a.model)
    load_s = time.perf_counter() - t_load

    cfg = model.config
    tc = cfg.text_config
    geo = Geometry(cfg)
    n_layers = tc.num_hidden_layers
    L = n_layers // 2 if a.attn_layer is None else a.attn_layer
    if not 0 <= L < n_layers:
        ap.error(f"--attn-layer {L} outside 0..{n_layers - 1}")
    gc_ = model.generation_config
    bos = tc.bos_token_id if tc.bos_token_id is not None else gc_.bos_token_id
    eos = tc.eos_token_id if tc.eos_token_id is not None else gc_.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = gc_.pad_token_id if gc_.pad_token_id is not None else tc.pad_token_id
    if pad is None:
        pad = eos
    fill = tuple(int(m * 255) for m in proc.image_mean)
    template = TEMPLATES[a.template]

    with open(a.data) as f:
        records = json.load(f)
    if not isinstance(records, list):
        sys.exit(f"{a.data}: expected a JSON list of records")
    if a.limit is not None:
        records = records[:a.limit]
    if not records:
        sys.exit(f"{a.data}: no records")

    def prepare(rec):
        """(prompt ids, pixel_values (n, 3, H, W), groups, target) of one record."""
        rid = rec.get("id", "?")
        try:
            mia = rec.get("mia")
            if not isinstance(mia, dict):
                raise RecordError("no 'mia' metadata")
            conv = rec.get("conversations") or []
            human = [c for c in conv if c.get("from") == "human"]
            if not human:
                raise RecordError("no human turn")
            q = human[0]["value"]
            paths = rec.get("image")
            paths = [paths] if isinstance(paths, str) else list(paths or [])
            if q.count("<image>") != len(paths):
                raise RecordError(f"{q.count('<image>')} <image> in the question, {len(paths)} images")
            text = template(q).replace("<image>", "<image>" * geo.seq_len)
            ids = [bos] + tok.encode(text, add_special_tokens=False).ids
            spans = image_spans(ids, geo.image_token, geo.seq_len)
            if len(spans) != len(paths):
                raise RecordError(f"{len(spans)} image spans for {len(paths)} images")
            groups, target = groups_for(rid, mia, spans, geo)
            ims = []
            for p in paths:
                full = resolve(p, roots)
                if full is None:
                    raise RecordError(f"image {p!r} not found under {roots}")
                with Image.open(full) as im:
                    im = im.convert("RGB")
                ims.append(expand2square(im, fill) if a.aspect == "pad" else im)
            pv = proc(images=ims, return_tensors="pt")["pixel_values"].to(torch.float32)
            return ids, pv, groups, target, mia["kind"]
        except (RecordError, KeyError, TypeError, ValueError, OSError) as e:
            raise SystemExit(f"record {rid!r}: {e}")

    def run_batch(recs, max_new):
        """Generate for a list of records; per-record results."""
        prep = [prepare(r) for r in recs]
        T = max(len(p[0]) for p in prep)
        B = len(prep)
        input_ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        offs = []
        for b, (ids, *_rest) in enumerate(prep):
            o = T - len(ids)  # left padding
            input_ids[b, o:] = torch.tensor(ids)
            mask[b, o:] = 1
            offs.append(o)
        pixel_values = torch.cat([p[1] for p in prep]).to(a.device, dtype)
        input_ids, mask = input_ids.to(a.device), mask.to(a.device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                             do_sample=False, max_new_tokens=max_new, output_attentions=True,
                             output_logits=True, output_scores=True, return_dict_in_generate=True,
                             eos_token_id=eos, pad_token_id=pad)
        seqs = out.sequences[:, T:] if out.sequences.shape[1] > T else out.sequences[:, :0]
        seqs = seqs.cpu()
        logits = out.logits if getattr(out, "logits", None) is not None else out.scores
        n_steps = len(logits)
        # group masks over prompt key positions per row (shifted by that row's left padding): (B, G, T)
        G = max(len(p[2]) for p in prep)
        gm = torch.zeros((B, G, T), dtype=torch.float32)
        for b, p in enumerate(prep):
            for gi, pos in enumerate(p[2]):
                gm[b, gi, torch.tensor(pos, dtype=torch.long) + offs[b]] = 1.0
        # generated length per row: up to and including the first EOS
        lens = []
        for b in range(B):
            row = seqs[b].tolist()
            lens.append(row.index(eos) + 1 if eos in row else len(row))
        # per-step masses: steps 1.. are the generated tokens fed back; attentions[s][L]: (B, H, 1, T + s)
        mass = torch.zeros((B, G), dtype=torch.float64)
        for s in range(1, len(out.attentions)):
            att = out.attentions[s][L].float().cpu()
            assert att.shape[2] == 1 and att.shape[3] == T + s, tuple(att.shape)
            row = att[:, :, 0, :T].mean(1)  # (B, T) heads averaged, prompt keys
            m = torch.einsum("bt,bgt->bg", row, gm).double()  # (B, G)
            live = torch.tensor([s < lens[b] for b in range(B)], dtype=torch.float64)[:, None]
            mass += m * live
        results = []
        for b, (ids, _pv, groups, target, kind) in enumerate(prep):
            n = lens[b]
            gen = seqs[b, :n].tolist()
            lmax = [float(torch.log_softmax(logits[s][b].double().cpu(), -1).max()) for s in range(min(n, n_steps))]
            ppl = math.exp(-sum(lmax) / len(lmax)) if lmax else float("nan")
            rows = n - 1
            ng = len(groups)
            if rows > 0:
                per = (mass[b, :ng] / rows).tolist()
                tot = sum(per)
                shares = [x / tot for x in per] if tot > 0 else [float("nan")] * ng
                ratio = shares[target]
            else:  # a single generated token: no token fed back, no rows (MIA-DPO would divide by zero)
                shares, ratio = [], float("nan")
            results.append({"id": recs[b].get("id"), "kind": kind, "answer": tok.decode(gen, skip_special_tokens=True).strip(),
                            "token_ids": gen, "ratio": ratio, "ppl": ppl, "group_attention": shares,
                            "prompt_tokens": len(ids), "attn_rows": max(rows, 0)})
        del out
        return results

    other_before = None
    gc.collect()
    loaded_rss = rss_mb()
    loaded_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.inference_mode():
        for _ in range(a.warmup):
            run_batch(records[:1], min(2, a.max_new_tokens))
        gc.collect()
        hwm_reset = reset_peak_rss()
        if a.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        results, lat = [], []
        b0, c0 = cpu_busy_s(), time.process_time()
        t0 = time.perf_counter()
        for i in range(0, len(records), a.batch_size):
            tb = time.perf_counter()
            res = run_batch(records[i:i + a.batch_size], a.max_new_tokens)
            if a.device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - tb
            results += res
            lat += [dt] * len(res)
        wall = time.perf_counter() - t0
        b1, c1 = cpu_busy_s(), time.process_time()
    end_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    loop_peak = end_maxrss if hwm_reset else None
    peak = max(end_maxrss, loaded_peak)
    if b0 is not None and b1 is not None:
        other_before = max(0.0, ((b1 - b0) - (c1 - c0)) / wall)
    n_tok = sum(len(r["token_ids"]) for r in results)
    out = {
        "runtime": "hf",
        "answers": len(results),
        "answers_per_s": len(results) / wall,
        "tokens_per_s": n_tok / wall,
        "generated_tokens": n_tok,
        "wall_s": wall,
        "latency_median_s": statistics.median(lat),
        "peak_rss_mb": peak,
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else None,
        "loaded_rss_mb": loaded_rss,
        "loaded_peak_rss_mb": loaded_peak,
        "loop_peak_rss_mb": loop_peak,
        "batch_size": a.batch_size,
        "threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": os.path.abspath(a.model),
        "data": os.path.abspath(a.data),
        "template": a.template,
        "aspect": a.aspect,
        "attn_layer": L,
        "max_new_tokens": a.max_new_tokens,
        "warmup": a.warmup,
        "load_s": load_s,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        # cores' worth of CPU used by other processes during the timed loop (0 = the machine was ours)
        "other_cpu_cores": other_before,
        "loadavg_end": list(os.getloadavg()),
        "records": results,
    }
    print(json.dumps(out), flush=True)
    if a.json_only:
        return
    print(f"HF transformers {transformers.__version__} / torch {torch.__version__}, CPU: {out['cpu_model']}, "
          f"{out['threads']} threads, f32, eager attention, layer {L}, batch {a.batch_size}, "
          f"max_new_tokens {a.max_new_tokens}, template {a.template}, aspect {a.aspect}")
    for r in results:
        print(f"  {r['id']}: {r['kind']} T={r['prompt_tokens']} ratio {r['ratio']:.6f} ppl {r['ppl']:.4f} "
              f"{len(r['token_ids'])} tok: {r['answer'][:60]!r}")
    print(f"{len(results)} answers, {n_tok} tokens in {wall:.2f}s: {out['answers_per_s']:.3f} answers/s, "
          f"{out['tokens_per_s']:.2f} tokens/s, latency median {out['latency_median_s']:.2f}s")
    print(f"RSS: loaded {loaded_rss:.0f} MiB (peak while loading {loaded_peak:.0f}), process peak {peak:.0f} MiB"
          + (f", timed loop peak {loop_peak:.0f} MiB (+{loop_peak - loaded_rss:.0f} MiB over loaded)"
             if loop_peak is not None else "")
          + (f"; other processes' CPU {other_before:.2f} cores" if other_before is not None else "")
          + ("   <- contended: numbers are not clean" if (other_before or 0) > 0.1 else ""))


if __name__ == "__main__":
    main()
