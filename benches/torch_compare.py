#!/usr/bin/env python3
"""PyTorch's side of `miadpo bench --task ops`: the same ops at the same shapes (LLaMA-7B: hidden 4096,
32 heads of 128, MLP 11008, vocab 32000), timed the same way (one warm-up, R timed batches of back-to-back calls,
each ~2 ms and followed by a device synchronisation, medians of the per-call time), one JSON line per op with miadpo's names, so
scripts/device-check.sh can print the two side by side.

  python3 benches/torch_compare.py [--device cuda|cpu] [--seq-len 2048] [--rows 512] [--repeats 10] [--filter NAME]

Matrix products take bf16 inputs with f32 accumulation on the GPU (torch.matmul on bf16 tensors), f32
on the CPU; attention is F.scaled_dot_product_attention (the flash backend on the GPU when it applies);
the log-prob is `log_softmax(hidden @ W.T).gather` over the whole (T, V) logits (what the fused kernel
replaces); on the GPU each op also reports the memory one call takes beyond its inputs (extra_mib).
"""
import argparse, json, statistics, time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--filter", default="", help="only ops whose name contains this (ceilings always run)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    mm_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(7)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale + 0.01).to(dev)
    h, heads, hd, inter, vocab, t, rows = 4096, 32, 128, 11008, 32000, a.seq_len, a.rows
    w = rand(h, h, scale=0.02).to(mm_dtype)
    lm = rand(vocab, h, scale=0.02).to(mm_dtype)
    x = rand(rows, h)
    mid = rand(rows, inter)
    norm_w = rand(h)
    big = rand(64 << 20)
    # the compute ceiling: 8192³ on the GPU (as miadpo's), the linear shape on the CPU
    gm, gk = (8192, 8192) if dev.type == "cuda" else (rows, h)
    gw = rand(gk, gk, scale=0.02).to(mm_dtype) if dev.type == "cuda" else w
    gx = rand(gm, gk).to(mm_dtype) if dev.type == "cuda" else x.to(mm_dtype)
    q = rand(1, heads, t, hd).to(mm_dtype)
    kv = rand(1, heads, t, hd).to(mm_dtype)
    # a decode step's cache: K and V apart, bf16 (as miadpo's on the GPU)
    kc, vc = rand(1, heads, t, hd).to(mm_dtype), rand(1, heads, t, hd).to(mm_dtype)
    targets = torch.tensor([(i * 7919) % vocab for i in range(rows)], device=dev)
    pos = torch.arange(rows, device=dev, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, hd, 2, device=dev, dtype=torch.float64) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rms(x):
        return norm_w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rope(x):
        y = x.view(rows, heads, hd)
        rot = torch.cat([-y[..., hd // 2:], y[..., : hd // 2]], -1)
        return (y * cos[:, None] + rot * sin[:, None]).view(rows, h)

    def logprob(hid):
        # what a PyTorch user writes (the reference): the whole (T, V) logits, then
        # log_softmax and gather; f32 logits from the bf16 product
        logits = (hid.to(mm_dtype) @ lm.T).float()
        return torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]

    hid = x
    qg, kg = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out = F.scaled_dot_product_attention(qg, kg, kg, is_causal=True)
    dout = torch.ones_like(out)
    xg = x.clone().requires_grad_()
    f4, n = 4.0, rows * h
    attn = 4.0 * t * t * heads * hd
    cases = [
        ("ceiling/copy", "memory", 2 * f4 * (64 << 20), lambda: big.clone()),
        ("ceiling/gemm", "compute", 2.0 * gm * gk * gk, lambda: gx @ gw.T),
        ("linear/forward", "compute", 2.0 * n * h, lambda: x.to(mm_dtype) @ w.T),
        ("linear/decode", "memory", 2.0 * h * h, lambda: x[:1].to(mm_dtype) @ w.T),
        ("linear/backward", "compute", 2.0 * n * h, lambda: x.to(mm_dtype) @ w),
        ("norm/rms_norm", "memory", 2 * f4 * n, lambda: rms(x)),
        ("norm/rms_norm_backward", "memory", 3 * f4 * n, lambda: torch.autograd.grad(rms(xg), xg, x)),
        ("rope/rope", "memory", 2 * f4 * n, lambda: rope(x)),
        ("elementwise/silu", "memory", 2 * f4 * rows * inter, lambda: F.silu(mid)),
        ("elementwise/add", "memory", 3 * f4 * n, lambda: x + x),
        ("elementwise/dropout", "memory", 2 * f4 * n, lambda: F.dropout(x, 0.1, True)),
        ("attention/causal", "compute", attn / 2, lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True)),
        ("attention/causal_backward", "compute", 2.5 * attn / 2,
         lambda: torch.autograd.grad(out, (qg, kg), dout, retain_graph=True)),
        ("attention/bidirectional", "compute", attn, lambda: F.scaled_dot_product_attention(q, kv, kv)),
        # one query row against the cache; PyTorch has no span-mass output, so this is SDPA alone
        ("attention/decode_mass", "memory", 2 * 2 * t * heads * hd,
         lambda: F.scaled_dot_product_attention(q[:, :, -1:], kv, kv)),
        ("attention/decode_cached", "memory", 2 * 2 * t * heads * hd,
         lambda: F.scaled_dot_product_attention(q[:, :, -1:], kc, vc)),
        ("logprob/fused", "compute", 2.0 * rows * vocab * h, lambda: logprob(hid)),
    ]
    res = {}
    for name, bound, work, fn in cases:
        if not (name.startswith("ceiling/") or a.filter in name):
            continue
        # as miadpo's: batches of back-to-back calls lasting ~2 ms, so launch latency does not dominate
        t0 = time.perf_counter(); fn(); sync(); once = (time.perf_counter() - t0) * 1e3
        extra = None
        if dev.type == "cuda":  # memory one call takes beyond its inputs: peak over a call, less before
            torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
            fn(); sync()
            extra = (torch.cuda.max_memory_allocated() - before) / 2**20
        inner = min(200, max(1, int(2.0 / max(once, 1e-6) + 0.999)))
        ms = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(); ms.append((time.perf_counter() - t0) * 1e3 / inner)
        med = statistics.median(ms)
        rate = work / (med * 1e-3) / (1e9 if bound == "memory" else 1e12)
        res[name] = (bound, med, rate, extra)
    for name, (bound, med, rate, extra) in res.items():
        if a.filter and not (a.filter in name):
            continue
        ceil = res["ceiling/copy" if bound == "memory" else "ceiling/gemm"][2]
        print(json.dumps({"runtime": "torch " + torch.__version__, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                          "name": name, "bound": bound, "ms": med, "achieved": rate, "of_ceiling": rate / ceil,
                          "extra_mib": extra}))


if __name__ == "__main__":
    main()
