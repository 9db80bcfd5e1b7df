#!/usr/bin/env python3
"""Time HF transformers (CPU PyTorch, float32 compute, SDPA attention) on an llava-hf checkpoint folder,
with the same protocol as `miadpo bench`, so the two sets of numbers compare.

Usage:
  python scripts/compare_hf_cpu.py --model DIR [--prompt-tokens 320] [--new-tokens 64] [--repeats 5]
                                   [--threads os.cpu_count()] [--warmup 1] [--json-only]
Setup (outside the repo):  python3 -m venv /work/hfvenv && /work/hfvenv/bin/pip install -r scripts/requirements-hf.txt

Protocol (keep it identical to the Rust side; change both or neither):
  - model: LlavaForConditionalGeneration.from_pretrained(DIR, dtype=float32, attn_implementation="sdpa")
    (SDPA is HF's default; weights stored as f16/bf16 are upcast to f32 at load, load is not timed).
    torch.set_num_threads(T).
  - prompt ids (batch 1, no attention mask, no padding):
      [1] + [image_token_index] * image_seq_length
          + [100 + (i * 7919) % 31000 for i in range(P - 1 - image_seq_length)]
  - pixel_values: one image (1, 3, H, W), H/W = crop_size from preprocessor_config.json, values
      torch.randn(generator=torch.Generator().manual_seed(0)), float32. Not timed.
  - prefill: wall time of one forward model(input_ids, pixel_values=..., use_cache=True, logits_to_keep=1)
      = vision tower + projector + decoder over all P tokens (logits of the last position only when this
      transformers version supports logits_to_keep; the JSON says which). prefill tok/s = P / seconds.
  - decode: right after that prefill, N greedy steps; step k takes the argmax of the previous logits
      (last position), feeds that one token with the returned KV cache and use_cache=True.
      Manual loop under torch.inference_mode(), no generate(). decode tok/s = N / seconds of the N steps
      (each step's time includes its argmax and its forward).
  - warmup W full prefill+decode runs (untimed), then R timed repeats; report median, min, max.
  The whole thing runs under torch.inference_mode(). Timer: time.perf_counter().
Output: one JSON line on stdout (first line), then a human-readable summary unless --json-only.
"""
import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import struct
import sys
import time

import torch
import transformers
from transformers import LlavaForConditionalGeneration


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def safetensors_dtypes(model_dir):
    """Dtypes of the stored tensors (read from the safetensors headers): {dtype: tensor count}."""
    files = []
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(model_dir, "model.safetensors")):
        files = ["model.safetensors"]
    counts = {}
    for name in files:
        with open(os.path.join(model_dir, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + 1
    return counts


def image_hw(model_dir, vision_cfg):
    path = os.path.join(model_dir, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            pp = json.load(f)
        crop = pp.get("crop_size")
        if isinstance(crop, dict) and "height" in crop:
            return int(crop["height"]), int(crop["width"]), "preprocessor_config.json crop_size"
        if isinstance(crop, int):
            return crop, crop, "preprocessor_config.json crop_size"
    s = int(vision_cfg.image_size)
    return s, s, "vision_config.image_size (no crop_size in preprocessor_config.json)"


def cpu_busy_s():
    """System-wide busy CPU seconds (all cores, all processes) from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    steal = v[7] if len(v) > 7 else 0
    return (sum(v[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def summarize(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="llava-hf folder: config.json, model.safetensors, "
                                                   "preprocessor_config.json")
    ap.add_argument("--prompt-tokens", type=int, default=320, help="P, total prompt length incl. BOS and "
                                                                   "image tokens (default 320)")
    ap.add_argument("--new-tokens", type=int, default=64, help="N greedy decode steps (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="R timed repeats (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default os.cpu_count())")
    ap.add_argument("--warmup", type=int, default=1, help="untimed prefill+decode runs first (default 1)")
    ap.add_argument("--json-only", action="store_true", help="print only the JSON line")
    a = ap.parse_args()
    if a.repeats < 1 or a.new_tokens < 1 or a.threads < 1 or a.warmup < 0:
        ap.error("--repeats, --new-tokens, --threads must be >= 1 and --warmup >= 0")

    torch.set_num_threads(a.threads)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)

    # Load (not timed). `torch_dtype` is the pre-5.x name of `dtype` (deprecated in 5.x, same meaning).
    load_kw = {"attn_implementation": "sdpa"}
    if int(transformers.__version__.split(".")[0]) >= 5:
        load_kw["dtype"] = torch.float32
    else:
        load_kw["torch_dtype"] = torch.float32
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(a.model, **load_kw)
    model.eval()
    load_s = time.perf_counter() - t0

    cfg = model.config
    vc, tc = cfg.vision_config, cfg.text_config
    n_img = int(getattr(cfg, "image_seq_length", 0) or 0)
    if n_img <= 0:  # llava default strategy drops CLS
        n_img = (vc.image_size // vc.patch_size) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    img_tok = int(cfg.image_token_index if hasattr(cfg, "image_token_index") else cfg.image_token_id)
    P, N = a.prompt_tokens, a.new_tokens
    if P < 1 + n_img + 1:
        ap.error(f"--prompt-tokens must be >= {n_img + 2} (BOS + {n_img} image tokens + at least 1 text token)")
    ids = [1] + [img_tok] * n_img + [100 + (i * 7919) % 31000 for i in range(P - 1 - n_img)]
    assert len(ids) == P
    input_ids = torch.tensor([ids], dtype=torch.long)
    H, W, hw_src = image_hw(a.model, vc)
    pixel_values = torch.randn((1, 3, H, W), generator=torch.Generator().manual_seed(0), dtype=torch.float32)

    params = inspect.signature(model.forward).parameters
    fwd_kw = {}
    logits_kept = "all"
    if "logits_to_keep" in params:
        fwd_kw["logits_to_keep"] = 1
        logits_kept = "last"
    # transformers >= 5.2x renamed past_key_values -> cache (old name still accepted with a warning)
    cache_arg = "cache" if "cache" in params else "past_key_values"

    def get_cache(out):
        c = getattr(out, "cache", None)
        return c if c is not None else out.past_key_values

    def one_run():
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, **fwd_kw)
        t1 = time.perf_counter()
        logits, cache = out.logits, get_cache(out)
        toks = []
        t2 = time.perf_counter()
        for _ in range(N):
            nxt = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (1, 1)
            out = model(input_ids=nxt, use_cache=True, **{cache_arg: cache}, **fwd_kw)
            logits, cache = out.logits, get_cache(out)
            toks.append(int(nxt))
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2, toks, tuple(out.logits.shape)

    with torch.inference_mode():
        for _ in range(a.warmup):
            one_run()
        pre_s, dec_s, tokens, other = [], [], None, []
        for _ in range(a.repeats):
            b0, c0, w0 = cpu_busy_s(), time.process_time(), time.perf_counter()
            p, d, toks, lshape = one_run()
            b1, c1, w1 = cpu_busy_s(), time.process_time(), time.perf_counter()
            if b0 is not None and b1 is not None:
                # CPU used by other processes during this repeat, in cores (0 = machine was ours alone)
                other.append(max(0.0, ((b1 - b0) - (c1 - c0)) / (w1 - w0)))
            pre_s.append(p)
            dec_s.append(d)
            if tokens is None:
                tokens = toks
            elif toks != tokens:
                print("warning: greedy tokens differ between repeats", file=sys.stderr)

    pre_tps = [P / s for s in pre_s]
    dec_tps = [N / s for s in dec_s]
    stored = safetensors_dtypes(a.model)
    text_head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    result = {
        "tool": "hf_transformers_cpu",
        "model": os.path.abspath(a.model),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "compute_dtype": "float32",
        "stored_dtype": "/".join(sorted(stored)) if stored else "unknown",
        "stored_dtype_counts": stored,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "logits_kept": logits_kept,
        "prompt_tokens": P,
        "image_tokens": n_img,
        "new_tokens": N,
        "repeats": a.repeats,
        "warmup": a.warmup,
        "image_hw": [H, W],
        "image_hw_source": hw_src,
        "load_s": load_s,
        "params": sum(p.numel() for p in model.parameters()),
        "prefill_s": summarize(pre_s),
        "prefill_tok_s": summarize(pre_tps),
        "decode_s": summarize(dec_s),
        "decode_tok_s": summarize(dec_tps),
        "decode_ms_per_token": summarize([1000 * s / N for s in dec_s]),
        "prefill_s_all": pre_s,
        "decode_s_all": dec_s,
        "greedy_tokens_head": tokens[:16],
        # contention check: cores' worth of CPU that other processes used during each timed repeat
        # (from /proc/stat minus our own process time; jiffy resolution). Near 0 = clean run.
        "other_cpu_cores_per_repeat": other,
        "loadavg_end": list(os.getloadavg()),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": {
            "vision": {"layers": vc.num_hidden_layers, "hidden": vc.hidden_size, "heads": vc.num_attention_heads,
                       "intermediate": vc.intermediate_size, "image_size": vc.image_size,
                       "patch_size": vc.patch_size},
            "text": {"hidden": tc.hidden_size, "layers": tc.num_hidden_layers, "heads": tc.num_attention_heads,
                     "kv_heads": getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
                     "head_dim": text_head_dim, "intermediate": tc.intermediate_size, "vocab": tc.vocab_size},
            "image_seq_length": n_img,
            "image_token_index": img_tok,
            "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        },
    }
    print(json.dumps(result), flush=True)
    if a.json_only:
        return
    v, t = result["config"]["vision"], result["config"]["text"]
    fmt = lambda s: f"median {s['median']:.2f}  min {s['min']:.2f}  max {s['max']:.2f}"
    fms = lambda s: f"median {1000 * s['median']:.2f}  min {1000 * s['min']:.2f}  max {1000 * s['max']:.2f}"
    print(f"HF transformers {transformers.__version__} / torch {torch.__version__}, CPU: {result['cpu_model']}, "
          f"{result['threads']} threads, f32 compute ({result['stored_dtype']} stored), "
          f"attention {result['attn_implementation']}, logits kept: {logits_kept}")
    print(f"model: vision {v['layers']}L h{v['hidden']} img{v['image_size']}/p{v['patch_size']} | "
          f"text {t['layers']}L h{t['hidden']} heads {t['heads']}/{t['kv_heads']}kv inter {t['intermediate']} "
          f"vocab {t['vocab']} | {result['params'] / 1e6:.1f}M params, load {load_s:.1f}s")
    print(f"protocol: P={P} ({n_img} image tokens), N={N}, warmup {a.warmup}, repeats {a.repeats}")
    if other:
        print("other processes' CPU use per repeat (cores): " + " ".join(f"{x:.2f}" for x in other)
              + ("   <- contended: numbers are not clean" if max(other) > 0.1 else ""))
    print(f"prefill tok/s: {fmt(result['prefill_tok_s'])}   (ms: {fms(result['prefill_s'])})")
    print(f"decode  tok/s: {fmt(result['decode_tok_s'])}   (ms for {N} steps: {fms(result['decode_s'])})")


if __name__ == "__main__":
    main()
