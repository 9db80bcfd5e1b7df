//! `miadpo bench --task ops`: every backend op at LLaMA-7B shapes (hidden 4096, 32 heads of 128,
//! MLP 11008, vocab 32000), timed on whichever backend runs it, reported as achieved GB/s (memory-bound
//! ops: bytes read + written) or TFLOP/s (products, attention: FlashAttention's counting, 4·T²·H·D
//! forward halved when causal, backward 2.5× forward), against two ceilings measured in the same run:
//! a large copy (GB/s) and a large matrix product (TFLOP/s).
use std::time::Instant;

use crate::backend::{AttnShape, Backend, CachedSeq, Heads, KeyGroups};
use crate::bench::Stats;
use crate::model::config::Activation;
use crate::model::random::Rng;
use crate::model::weights::Tensor;
use crate::select::ratio::RatioSpec;
use crate::Result;

/// What an op's figure is measured against.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    Memory,
    Compute,
}

/// One timed op.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpResult {
    pub name: String,
    pub shape: String,
    pub ms: Stats,
    pub bound: Bound,
    /// GB/s or TFLOP/s at the median time
    pub achieved: f64,
    /// the same unit's ceiling of this run, and the share of it
    pub ceiling: f64,
    pub of_ceiling: f64,
    /// device memory one call takes beyond its inputs, MiB (None where the backend does not count:
    /// the CPU)
    pub extra_mib: Option<f64>,
}

type Run<'a> = Box<dyn FnMut() + 'a>;

struct Case<'a> {
    name: &'static str,
    shape: String,
    bound: Bound,
    /// bytes moved or floating-point operations per call
    work: f64,
    run: Run<'a>,
}

/// The op names, in order (`--list`).
pub const OPS: [&str; 22] = [
    "ceiling/copy",
    "ceiling/gemm",
    "linear/forward",
    "linear/decode",
    "linear/backward",
    "norm/rms_norm",
    "norm/rms_norm_backward",
    "rope/rope",
    "elementwise/silu",
    "elementwise/swiglu_backward",
    "elementwise/add",
    "elementwise/dropout",
    "attention/causal",
    "attention/causal_mass",
    "attention/causal_mass_pip",
    "attention/causal_backward",
    "attention/bidirectional",
    "attention/decode_mass",
    "attention/decode_mass_pip",
    "attention/decode_cached",
    "logprob/fused",
    "logprob/fused_backward",
];

/// Median per-call time over `repeats` timed batches after one warm-up call. A batch runs the op
/// enough times back to back to last ~2 ms before its synchronisation, so that launch and
/// synchronisation latency (~10 µs on a GPU) do not dominate ops that take a few microseconds.
fn time(run: &mut Run, sync: &dyn Fn(), repeats: usize) -> Stats {
    let t0 = Instant::now();
    run();
    sync();
    let once = t0.elapsed().as_secs_f64() * 1e3;
    let inner = ((2.0 / once.max(1e-6)).ceil() as usize).clamp(1, 200);
    let mut ms = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        for _ in 0..inner {
            run();
        }
        sync();
        ms.push(t0.elapsed().as_secs_f64() * 1e3 / inner as f64);
    }
    Stats::of(ms)
}

/// Times the ops whose name contains `filter` (all with ""), `repeats` timed calls each after one
/// warm-up, at sequence length `t` (attention) and `rows` rows (everything else).
pub fn run<B: Backend>(
    be: &B,
    filter: &str,
    t: usize,
    rows: usize,
    repeats: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<OpResult>> {
    let mut rng = Rng::new(7);
    let mut rand =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| scale * (rng.normal() as f32 + 0.01)).collect() };
    let (h, heads, hd, inter, vocab) = (4096usize, 32usize, 128usize, 11008usize, 32000usize);
    let origin = std::path::Path::new("<bench>");
    let mat = |name: &str, r: usize, c: usize, v: Vec<f32>| {
        be.matrix(&Tensor::from_f32(name, vec![r, c], &v, origin)?)
    };
    let w = mat("w", h, h, rand(h * h, 0.02))?;
    let lm = if OPS
        .iter()
        .any(|o| o.starts_with("logprob/") && o.contains(filter))
    {
        Some(mat("lm_head", vocab, h, rand(vocab * h, 0.02))?)
    } else {
        None
    };
    let x = be.upload(&rand(rows * h, 1.0));
    // the compute ceiling: a product large enough to fill a GPU (8192³, 1.1 TFLOP); on the CPU the
    // linear op's own shape (the large one would take minutes)
    let (gm, gk) = if be.name() == "cpu" {
        (rows, h)
    } else {
        (8192, 8192)
    };
    let gw = if be.name() == "cpu" {
        None
    } else {
        Some(mat("w8192", gk, gk, rand(gk * gk, 0.02))?)
    };
    let gx = if be.name() == "cpu" {
        x.clone()
    } else {
        be.upload(&rand(gm * gk, 1.0))
    };
    let mid = be.upload(&rand(rows * inter, 1.0));
    let norm_w = be.upload(&rand(h, 1.0));
    let big = be.upload(&rand(64 << 20, 1.0)); // 256 MB: past every cache
    let q = be.upload(&rand(t * heads * hd, 1.0));
    let kv = be.upload(&rand(t * heads * hd, 1.0));
    let q1 = be.upload(&rand(heads * hd, 1.0));
    let positions: Vec<usize> = (0..rows).collect();
    let mass_spans: Vec<(usize, usize)> = (0..5).map(|i| (1 + i * t / 6, (i + 1) * t / 6)).collect();
    let mass_spans = KeyGroups::per_span(&mass_spans)?;
    // decode_cached: a cache of t - 1 keys (K and V alike) and the new row's K and V
    let mut kc = be.kv_new();
    be.kv_append(&mut kc, &be.slice_rows(&kv, heads * hd, 0, t - 1));
    let mut vc = kc.clone();
    let kv1 = be.upload(&rand(heads * hd, 1.0));
    let cache_heads = Heads {
        heads,
        kv_heads: heads,
        dim: hd,
    };
    let (spans, q1r) = (&mass_spans, &q1);
    // select's pic-in-pic groups: an image of 24×24 patches at keys 1..577 (group 0) and its centre,
    // 16 patch rows of 16 (group 1); ranges past T count nothing
    let pip = RatioSpec::pip((1, 577), 24)?.groups;
    let targets: Vec<u32> = (0..rows).map(|i| (i * 7919 % vocab) as u32).collect();
    let shape = |causal| AttnShape {
        tq: t,
        tk: t,
        heads,
        kv_heads: heads,
        head_dim: hd,
        causal,
        q_pos0: 0,
        hole: None,
    };
    let att_out = be.attention(&q, &kv, &kv, shape(true), None).0;
    let lse = lm.as_ref().map(|lm| be.fused_logprobs(&x, rows, lm, &targets).1);
    let f = 4.0; // bytes per f32
    let n = (rows * h) as f64;
    let attn_flops = 4.0 * (t * t * heads * hd) as f64;
    let mut cases: Vec<Case> = vec![
        Case {
            name: "ceiling/copy",
            shape: "64M f32".into(),
            bound: Bound::Memory,
            work: 2.0 * f * (64 << 20) as f64,
            run: Box::new(|| {
                std::hint::black_box(be.slice_rows(&big, 1, 0, 64 << 20));
            }),
        },
        Case {
            name: "ceiling/gemm",
            shape: format!("{gm}x{gk} · {gk}x{gk}"),
            bound: Bound::Compute,
            work: 2.0 * (gm * gk * gk) as f64,
            run: Box::new(|| {
                std::hint::black_box(be.linear(&gx, gm, gw.as_ref().unwrap_or(&w), None));
            }),
        },
        Case {
            name: "linear/forward",
            shape: format!("{rows}x{h} · {h}x{h}"),
            bound: Bound::Compute,
            work: 2.0 * n * h as f64,
            run: Box::new(|| {
                std::hint::black_box(be.linear(&x, rows, &w, None));
            }),
        },
        Case {
            // a decode step's product: one row against the whole weight matrix, a read of W
            name: "linear/decode",
            shape: format!("1x{h} · {h}x{h}"),
            bound: Bound::Memory,
            // the weights as the backend holds them: bf16 on the GPU, this bench's f32 on the CPU
            work: (h * h) as f64 * if be.name() == "cuda" { 2.0 } else { f },
            run: Box::new({
                let (x1, w) = (be.slice_rows(&x, h, 0, 1), &w);
                move || {
                    std::hint::black_box(be.linear(&x1, 1, w, None));
                }
            }),
        },
        Case {
            name: "linear/backward",
            shape: format!("{rows}x{h} · {h}x{h}"),
            bound: Bound::Compute,
            work: 2.0 * n * h as f64,
            run: Box::new(|| {
                std::hint::black_box(be.linear_backward(&x, rows, &w));
            }),
        },
        Case {
            name: "norm/rms_norm",
            shape: format!("{rows}x{h}"),
            bound: Bound::Memory,
            work: 2.0 * f * n,
            run: Box::new(|| {
                std::hint::black_box(be.rms_norm(&x, h, &norm_w, 1e-5));
            }),
        },
        Case {
            name: "norm/rms_norm_backward",
            shape: format!("{rows}x{h}"),
            bound: Bound::Memory,
            work: 3.0 * f * n,
            run: Box::new(|| {
                std::hint::black_box(be.rms_norm_backward(&x, h, &norm_w, &x, 1e-5));
            }),
        },
        Case {
            name: "rope/rope",
            shape: format!("{rows}x{heads}x{hd}"),
            bound: Bound::Memory,
            work: 2.0 * f * n,
            run: Box::new({
                // in place on a buffer of its own (a clone per call would add a copy to the time)
                let (mut y, positions) = (x.clone(), &positions);
                move || be.rope(&mut y, heads, hd, positions, 10000.0)
            }),
        },
        Case {
            name: "elementwise/silu",
            shape: format!("{rows}x{inter}"),
            bound: Bound::Memory,
            work: 2.0 * f * (rows * inter) as f64,
            run: Box::new({
                let mut y = mid.clone();
                move || be.activation(&mut y, Activation::Silu)
            }),
        },
        Case {
            name: "elementwise/swiglu_backward",
            shape: format!("{rows}x{inter}"),
            bound: Bound::Memory,
            work: 5.0 * f * (rows * inter) as f64,
            run: Box::new(|| {
                std::hint::black_box(be.swiglu_backward(&mid, &mid, &mid));
            }),
        },
        Case {
            name: "elementwise/add",
            shape: format!("{rows}x{h}"),
            bound: Bound::Memory,
            work: 3.0 * f * n,
            run: Box::new({
                let (mut y, x) = (x.clone(), &x);
                move || be.add(&mut y, x)
            }),
        },
        Case {
            name: "elementwise/dropout",
            shape: format!("{rows}x{h}"),
            bound: Bound::Memory,
            work: 2.0 * f * n,
            run: Box::new(|| {
                std::hint::black_box(be.dropout(&x, 0.1, 3));
            }),
        },
        Case {
            name: "attention/causal",
            shape: format!("T={t} H={heads} D={hd}"),
            bound: Bound::Compute,
            work: attn_flops / 2.0,
            run: Box::new(|| {
                std::hint::black_box(be.attention(&q, &kv, &kv, shape(true), None));
            }),
        },
        Case {
            // the same with the per-image attention mass of five images (a group each: sequence selection)
            name: "attention/causal_mass",
            shape: format!("T={t} H={heads} D={hd} 5 images"),
            bound: Bound::Compute,
            work: attn_flops / 2.0,
            run: Box::new(|| {
                std::hint::black_box(be.attention(&q, &kv, &kv, shape(true), Some(&mass_spans)));
            }),
        },
        Case {
            // pic-in-pic selection: 17 ranges in two groups, one launch
            name: "attention/causal_mass_pip",
            shape: format!("T={t} H={heads} D={hd} pip groups"),
            bound: Bound::Compute,
            work: attn_flops / 2.0,
            run: Box::new(|| {
                std::hint::black_box(be.attention(&q, &kv, &kv, shape(true), Some(&pip)));
            }),
        },
        Case {
            name: "attention/causal_backward",
            shape: format!("T={t} H={heads} D={hd}"),
            bound: Bound::Compute,
            work: 2.5 * attn_flops / 2.0,
            run: Box::new(|| {
                std::hint::black_box(be.attention_backward(&q, &kv, &kv, &att_out, &q, None, shape(true)));
            }),
        },
        Case {
            name: "attention/bidirectional",
            shape: format!("T={t} H={heads} D={hd}"),
            bound: Bound::Compute,
            work: attn_flops,
            run: Box::new(|| {
                std::hint::black_box(be.attention(&q, &kv, &kv, shape(false), None));
            }),
        },
        Case {
            // one new token against a cache of t keys, with the mass of five images (select)
            name: "attention/decode_mass",
            shape: format!("1 x T={t} H={heads} D={hd} 5 images"),
            bound: Bound::Memory,
            work: 2.0 * f * (t * heads * hd) as f64, // K and V read once
            run: Box::new(|| {
                let s = AttnShape {
                    tq: 1,
                    q_pos0: t - 1,
                    ..shape(true)
                };
                std::hint::black_box(be.attention(&q1, &kv, &kv, s, Some(&mass_spans)));
            }),
        },
        Case {
            name: "attention/decode_mass_pip",
            shape: format!("1 x T={t} H={heads} D={hd} pip groups"),
            bound: Bound::Memory,
            work: 2.0 * f * (t * heads * hd) as f64,
            run: Box::new(|| {
                let s = AttnShape {
                    tq: 1,
                    q_pos0: t - 1,
                    ..shape(true)
                };
                std::hint::black_box(be.attention(&q1, &kv, &kv, s, Some(&pip)));
            }),
        },
        Case {
            // select's step at the captured layer: one new row appended to a KV cache of t - 1 keys
            // (bf16 on the GPU) and attended with the mass of five images, left on the device as
            // `select` leaves it until the step's end (the batched append, flash-decoding, the merge
            // and the head average); the cache is cut back to t - 1 keys after each call
            name: "attention/decode_cached",
            shape: format!("1 x T={t} H={heads} D={hd} cached"),
            bound: Bound::Memory,
            work: (2 * B::KV_BYTES * t * heads * hd) as f64, // K and V read once
            run: Box::new(move || {
                let mut seq = [CachedSeq {
                    k: &mut kc,
                    v: &mut vc,
                    len: t - 1,
                    rows: 1,
                    groups: Some(spans),
                }];
                std::hint::black_box(be.attention_cached(q1r, &kv1, &kv1, cache_heads, &mut seq));
                be.kv_truncate(&mut kc, (t - 1) * heads * hd);
                be.kv_truncate(&mut vc, (t - 1) * heads * hd);
            }),
        },
    ];
    if let (Some(lm), Some(lse)) = (lm.as_ref(), lse) {
        // per-token log-probs of `rows` target tokens (a sequence of T = rows), never the (T, V) logits
        let (t2, h2, l2) = (targets.clone(), x.clone(), lse.clone());
        let flops = 2.0 * (rows * vocab * h) as f64;
        let hid = x.clone();
        cases.push(Case {
            name: "logprob/fused",
            shape: format!("{rows}x{h} · {vocab}x{h}"),
            bound: Bound::Compute,
            work: flops,
            run: Box::new(move || {
                std::hint::black_box(be.fused_logprobs(&hid, rows, lm, &targets));
            }),
        });
        let g = vec![1.0f32; rows];
        cases.push(Case {
            name: "logprob/fused_backward",
            shape: format!("{rows}x{h} · {vocab}x{h}"),
            bound: Bound::Compute,
            work: 2.0 * flops,
            run: Box::new(move || {
                std::hint::black_box(be.fused_logprobs_backward(&h2, rows, lm, &t2, &l2, &g));
            }),
        });
    }
    let sync = || be.synchronize();
    let mut timed: Vec<(String, String, Bound, f64, Stats, Option<f64>)> = Vec::new();
    for mut c in cases {
        let wanted = c.name.starts_with("ceiling/") || c.name.contains(filter);
        if !wanted {
            continue;
        }
        progress(c.name);
        // the memory one call needs beyond its inputs (outputs and scratch), where the backend
        // keeps count: the pool's high-water mark over one call, less what was in use before it
        sync();
        be.reset_peak_memory();
        let before = be.memory_in_use_mib();
        (c.run)();
        sync();
        let extra = before.zip(be.peak_memory_mib()).map(|(b, p)| (p - b).max(0.0));
        let ms = time(&mut c.run, &sync, repeats);
        timed.push((c.name.to_string(), c.shape, c.bound, c.work, ms, extra));
    }
    let rate = |bound: Bound, work: f64, ms: f64| match bound {
        Bound::Memory => work / (ms * 1e-3) / 1e9,
        Bound::Compute => work / (ms * 1e-3) / 1e12,
    };
    let ceil = |name: &str| {
        timed
            .iter()
            .find(|r| r.0 == name)
            .map(|r| rate(r.2, r.3, r.4.median))
            .unwrap_or(f64::NAN)
    };
    let (copy, gemm) = (ceil("ceiling/copy"), ceil("ceiling/gemm"));
    Ok(timed
        .iter()
        .filter(|r| filter.is_empty() || r.0.contains(filter))
        .map(|(name, shape, bound, work, ms, extra)| {
            let achieved = rate(*bound, *work, ms.median);
            let ceiling = if *bound == Bound::Memory { copy } else { gemm };
            OpResult {
                name: name.clone(),
                shape: shape.clone(),
                ms: ms.clone(),
                bound: *bound,
                achieved,
                ceiling,
                of_ceiling: achieved / ceiling,
                extra_mib: *extra,
            }
        })
        .collect())
}
