//! The CUDA backend against its CPU twin, op by op at real shapes, and end to end on the fixture.
//! Without a GPU (CI, most machines) every test prints a notice and passes: scripts/device-check.sh
//! runs them on a GPU machine.
//!
//! Tolerances: matrix products take bf16 inputs (8 bits of mantissa, relative rounding 2^-9 ≈ 2e-3
//! per input) with f32 accumulation, so their outputs carry ~1e-2 relative error against the f32 CPU
//! products at these sizes; everything else is f32 on both sides and differs only by summation order
//! and `expf` vs the CPU's Cephes exp (~1e-5). Inputs are random and non-zero; kernel outputs are
//! poisoned with NaN before each launch (an element a kernel misses fails the comparison).
mod common;

use common::TestRng;
use miadpo::backend::cpu::CpuBackend;
use miadpo::backend::cuda::{AttnKernel, CudaBackend};
use miadpo::backend::{AttnShape, Backend, KeyGroups};
use miadpo::model::config::Activation;
use miadpo::model::weights::Tensor;

fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(be) => {
            let be = be.with_poison(true);
            eprintln!("GPU: {}", be.device());
            Some(be)
        }
        Err(e) => {
            eprintln!("skipped: no usable GPU here ({e})");
            None
        }
    }
}

/// max |a − b| / max |b|
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| {
        if x.is_nan() {
            f64::INFINITY
        } else {
            m.max((*x as f64 - *y as f64).abs())
        }
    }) / scale
}

fn check(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel(got, want);
    assert!(e <= tol, "{name}: relative error {e:.2e} > {tol:.0e}");
    eprintln!("{name:<40} rel err {e:.2e} (tol {tol:.0e})");
}

fn tensor(name: &str, rows: usize, cols: usize, data: &[f32]) -> Tensor {
    Tensor::from_f32(name, vec![rows, cols], data, std::path::Path::new("<test>")).unwrap()
}

/// bf16 products (see the module comment)
const GEMM_TOL: f64 = 2e-2;
/// f32 on both sides, other summation order and exp
const F32_TOL: f64 = 1e-4;

/// x rounded to bf16 and back (round to nearest even): what the GPU's KV cache stores.
fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

/// Whether to test variants 4 to 6 (wgmma): on sm_90a, unless MIADPO_TEST_NO_WGMMA is set (to run
/// the other tests alone when one of these is suspect: a sticky CUDA error poisons the process's
/// context, so a fault there would take every later test with it).
fn test_variant_4(g: &CudaBackend) -> bool {
    g.arch() == "sm_90a" && std::env::var_os("MIADPO_TEST_NO_WGMMA").is_none()
}

/// The wgmma variants to test: 4 (both tile widths), and 5 and 6 unless MIADPO_TEST_NO_NEW is set
/// (MIADPO_TEST_NEW=5 or 6: that one only). Variants 5 and 6 have not run on a GPU yet:
/// scripts/device-check.sh runs every test without them first, then the attention tests with each
/// in a process of its own, so that a fault there (a sticky error, or a barrier deadlock, which their
/// kernels turn into a trap after two seconds) cannot take the other tests, or the other
/// variant, with it.
fn wgmma_variants(g: &CudaBackend) -> Vec<AttnKernel> {
    let mut v = Vec::new();
    if test_variant_4(g) {
        v.extend([AttnKernel::Wgmma, AttnKernel::WgmmaWide]);
        if std::env::var_os("MIADPO_TEST_NO_NEW").is_none() {
            let only = std::env::var("MIADPO_TEST_NEW").ok();
            for (n, k) in [("5", AttnKernel::WgmmaBulk), ("6", AttnKernel::WgmmaOverlap)] {
                if only.as_deref().is_none_or(|o| o == n) {
                    v.push(k);
                }
            }
        }
    }
    v
}

/// The tensor-core attention variants to test on this GPU with their tolerance (bf16 operands):
/// variants 2 and 3, and on sm_90a variant 4 (`wgmma`) with 64- and 128-key tiles and variant 5
/// (bulk copies on mbarriers) and 6 (128-key tiles, Q Kᵀ overlapped with the previous P V).
fn tensor_core_variants(g: &CudaBackend) -> Vec<(AttnKernel, f64)> {
    let mut v = vec![(AttnKernel::Fused, GEMM_TOL), (AttnKernel::Pipelined, GEMM_TOL)];
    v.extend(wgmma_variants(g).into_iter().map(|k| (k, GEMM_TOL)));
    v
}

#[test]
fn linear_and_its_backward_at_llama_shapes() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(1);
    // hidden 4096 -> 4096 (q_proj of LLaMA-7B), 300 rows (cuBLAS); 1, 3 and 8 rows (decode steps:
    // the gemv kernels for up to 8 rows, with 1, 4 and 8 rows per launch)
    for m in [300, 1, 3, 8] {
        let (n, k) = (4096, 4096);
        let w = tensor("w", n, k, &rng.vec(n * k, 0.02));
        let (wc, wg) = (c.matrix(&w).unwrap(), g.matrix(&w).unwrap());
        let x = rng.vec(m * k, 1.0);
        let y = g.download(&g.linear(&g.upload(&x), m, &wg, None));
        check(
            &format!("linear m={m}"),
            &y,
            &c.linear(&x, m, &wc, None),
            GEMM_TOL,
        );
        let dy = rng.vec(m * n, 1.0);
        let dx = g.download(&g.linear_backward(&g.upload(&dy), m, &wg));
        check(
            &format!("linear_backward m={m}"),
            &dx,
            &c.linear_backward(&dy, m, &wc),
            GEMM_TOL,
        );
        // three products of one input (q, k, v of a GQA layer: 4096, 1024, 1024 outputs), one with a
        // bias, the input rounded to bf16 once
        let (w2, w3) = (
            tensor("w2", 1024, k, &rng.vec(1024 * k, 0.02)),
            tensor("w3", 1024, k, &rng.vec(1024 * k, 0.02)),
        );
        let (w2c, w2g, w3c, w3g) = (
            c.matrix(&w2).unwrap(),
            g.matrix(&w2).unwrap(),
            c.matrix(&w3).unwrap(),
            g.matrix(&w3).unwrap(),
        );
        let bias = rng.vec(1024, 1.0);
        let bg = g.upload(&bias);
        let got = g.linears(&g.upload(&x), m, &[(&wg, None), (&w2g, Some(&bg)), (&w3g, None)]);
        let want = c.linears(&x, m, &[(&wc, None), (&w2c, Some(&bias)), (&w3c, None)]);
        assert_eq!(got.len(), 3);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            check(&format!("linears m={m} product {i}"), &g.download(a), b, GEMM_TOL);
        }
    }
    // more matrices than one gemv launch takes (4), of several widths, all but 8 and 510 odd (not
    // multiples of the 2 or 4 features a warp takes at 3 to 8 rows); an input width that is not a
    // multiple of 8 (cuBLAS even for one row)
    for (m, k) in [(2, 1024), (7, 1024), (3, 512), (1, 100)] {
        let shapes = [97, 1023, 41, 8, 510, 201];
        let ws: Vec<Tensor> = shapes
            .iter()
            .map(|&n| tensor("w", n, k, &rng.vec(n * k, 0.05)))
            .collect();
        let (wc, wg): (Vec<_>, Vec<_>) = ws
            .iter()
            .map(|t| (c.matrix(t).unwrap(), g.matrix(t).unwrap()))
            .unzip();
        let bias = rng.vec(41, 1.0);
        let bg = g.upload(&bias);
        let x = rng.vec(m * k, 1.0);
        let pick = |i: usize| i == 2; // the 41-wide one has a bias
        let got = g.linears(
            &g.upload(&x),
            m,
            &wg.iter()
                .enumerate()
                .map(|(i, w)| (w, pick(i).then_some(&bg)))
                .collect::<Vec<_>>(),
        );
        let want = c.linears(
            &x,
            m,
            &wc.iter()
                .enumerate()
                .map(|(i, w)| (w, pick(i).then_some(&bias)))
                .collect::<Vec<_>>(),
        );
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            check(
                &format!("linears m={m} k={k} product {i} of 6"),
                &g.download(a),
                b,
                GEMM_TOL,
            );
        }
    }
}

#[test]
fn elementwise_norm_rope_and_dropout() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(2);
    let (rows, d) = (257, 4096);
    let x = rng.vec(rows * d, 2.0);
    let y = rng.vec(rows * d, 2.0);
    let w = rng.vec(d, 1.0);
    let (xg, yg, wg) = (g.upload(&x), g.upload(&y), g.upload(&w));
    check(
        "rms_norm",
        &g.download(&g.rms_norm(&xg, d, &wg, 1e-5)),
        &c.rms_norm(&x, d, &w, 1e-5),
        F32_TOL,
    );
    check(
        "rms_norm_backward",
        &g.download(&g.rms_norm_backward(&xg, d, &wg, &yg, 1e-5)),
        &c.rms_norm_backward(&x, d, &w, &y, 1e-5),
        F32_TOL,
    );
    check(
        "layer_norm",
        &g.download(&g.layer_norm(&xg, d, &wg, &yg.clone(), 1e-5)),
        &c.layer_norm(&x, d, &w, &y[..d].to_vec(), 1e-5),
        F32_TOL,
    );
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
    ] {
        let (mut a, mut b) = (xg.clone(), x.clone());
        g.activation(&mut a, act);
        c.activation(&mut b, act);
        check(&format!("activation {act:?}"), &g.download(&a), &b, F32_TOL);
    }
    // the fused pairs against the CPU's two ops
    let (mut a, mut b) = (xg.clone(), x.clone());
    g.swiglu(&mut a, &yg);
    c.swiglu(&mut b, &y);
    check("swiglu", &g.download(&a), &b, F32_TOL);
    let (mut a, mut b) = (xg.clone(), x.clone());
    let (na, nb) = (
        g.add_rms_norm(&mut a, &yg, d, &wg, 1e-5),
        c.add_rms_norm(&mut b, &y, d, &w, 1e-5),
    );
    check("add_rms_norm: the sum", &g.download(&a), &b, F32_TOL);
    check("add_rms_norm: the norm", &g.download(&na), &nb, F32_TOL);
    let (dg, du) = g.swiglu_backward(&xg, &yg, &yg);
    let (cg, cu) = c.swiglu_backward(&x, &y, &y);
    check("swiglu_backward d gate", &g.download(&dg), &cg, F32_TOL);
    check("swiglu_backward d up", &g.download(&du), &cu, F32_TOL);
    let positions: Vec<usize> = (0..rows).map(|i| i * 13).collect();
    for back in [false, true] {
        let (mut a, mut b) = (xg.clone(), x.clone());
        if back {
            g.rope_backward(&mut a, 32, 128, &positions, 10000.0);
            c.rope_backward(&mut b, 32, 128, &positions, 10000.0);
        } else {
            g.rope(&mut a, 32, 128, &positions, 10000.0);
            c.rope(&mut b, 32, 128, &positions, 10000.0);
        }
        check(&format!("rope backward={back}"), &g.download(&a), &b, F32_TOL);
    }
    // q and k of a GQA layer in one launch
    let (hq, hk, hd) = (8, 2, 128);
    let (qv, kv) = (rng.vec(rows * hq * hd, 1.0), rng.vec(rows * hk * hd, 1.0));
    let (mut qg, mut kg, mut qc, mut kc) = (g.upload(&qv), g.upload(&kv), qv.clone(), kv.clone());
    g.rope_qk(&mut qg, &mut kg, hq, hk, hd, &positions, 10000.0);
    c.rope_qk(&mut qc, &mut kc, hq, hk, hd, &positions, 10000.0);
    check("rope_qk q", &g.download(&qg), &qc, F32_TOL);
    check("rope_qk k", &g.download(&kg), &kc, F32_TOL);
    check(
        "rms_norm_weight_grad",
        &g.download(&g.rms_norm_weight_grad(&xg, d, &yg, 1e-5)),
        &c.rms_norm_weight_grad(&x, d, &y, 1e-5),
        F32_TOL,
    );
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
    ] {
        check(
            &format!("activation_backward {act:?}"),
            &g.download(&g.activation_backward(&xg, &yg, act)),
            &c.activation_backward(&x, &y, act),
            F32_TOL,
        );
    }
    check(
        "col_sum",
        &g.download(&g.col_sum(&xg, rows, d)),
        &c.col_sum(&x, rows, d),
        F32_TOL,
    );
    let idx: Vec<usize> = (0..rows).map(|i| (i * 7) % 50).collect(); // repeats add up
    let (mut ga, mut ca) = (g.upload(&vec![0.5; 50 * d]), vec![0.5f32; 50 * d]);
    g.scatter_add_rows(&mut ga, d, &idx, &xg);
    c.scatter_add_rows(&mut ca, d, &idx, &x);
    check("scatter_add_rows", &g.download(&ga), &ca, F32_TOL);
    // no rows at all (a prompt without images: its image features scatter nowhere; an empty index
    // array is still an allocation of one element)
    let before = g.download(&ga);
    g.scatter_rows(&mut ga, d, &[], &g.upload(&[]));
    check("scatter_rows of no rows", &g.download(&ga), &before, 0.0);
    let table = g.matrix(&tensor("table", 50, d, &ca)).unwrap();
    assert_eq!(g.len(&g.embed(&[], &table)), 0, "embed of no ids");
    // norms of no rows launch nothing (a block for none would write past the one-element buffers)
    let (mut none, empty) = (g.upload(&[]), g.upload(&[]));
    assert_eq!(g.len(&g.rms_norm(&none, d, &wg, 1e-5)), 0, "rms_norm of no rows");
    assert_eq!(
        g.len(&g.add_rms_norm(&mut none, &empty, d, &wg, 1e-5)),
        0,
        "add_rms_norm of no rows"
    );
    assert_eq!(
        g.len(&g.layer_norm(&none, d, &wg, &wg, 1e-5)),
        0,
        "layer_norm of no rows"
    );
    // the vision tower's images side by side and back: copies, so exact (odd sizes, not of a block)
    for (a, b, dd) in [(3, 50, 96), (5, 577, 64), (1, 7, 33)] {
        let xv = rng.vec(a * b * dd, 1.0);
        let tg = g.transpose_rows(&g.upload(&xv), a, b, dd);
        check(
            &format!("transpose_rows {a}x{b}x{dd}"),
            &g.download(&tg),
            &c.transpose_rows(&xv, a, b, dd),
            0.0,
        );
        check(
            &format!("transpose_rows {a}x{b}x{dd} and back"),
            &g.download(&g.transpose_rows(&tg, b, a, dd)),
            &xv,
            0.0,
        );
    }
    // the mask is a function of (key, index): bit-identical on both sides
    assert_eq!(
        g.download(&g.dropout(&xg, 0.1, 7)),
        c.dropout(&x, 0.1, 7),
        "dropout mask"
    );
}

/// Every attention variant (variant 4 on sm_90a only) against the CPU twin: causal and bidirectional, head dims 16/64/128, GQA
/// 1 and 4, lengths that are not multiples of the 64-row tiles, a chunk of queries after a prefix
/// (q_pos0 > 0), the prefix-shared DPO hole, T up to 8192, decode steps of 1 and 3 rows; the per-span
/// mass against the CPU's materialised softmax; the backward of both variants (the plain one where its
/// shared memory and atomics allow, T <= 1024).
#[test]
fn attention_variants_forward_mass_and_backward() {
    let Some(mut g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(3);
    struct Case {
        tq: usize,
        tk: usize,
        heads: usize,
        kv: usize,
        d: usize,
        causal: bool,
        hole: Option<(usize, usize, usize)>,
    }
    let case = |tq, tk, heads, kv, d, causal, hole| Case {
        tq,
        tk,
        heads,
        kv,
        d,
        causal,
        hole,
    };
    for x in [
        case(128, 128, 8, 8, 64, true, None),
        case(333, 333, 8, 2, 128, true, None),
        case(515, 515, 4, 4, 128, true, Some((400, 300, 400))),
        case(1000, 1000, 4, 1, 64, false, None),
        case(77, 77, 4, 4, 16, true, None),
        case(97, 297, 8, 2, 128, true, None),
        case(8192, 8192, 8, 2, 128, true, None),
        // decode steps (the fused variant's flash-decoding kernel): one or a few rows, long caches
        case(1, 4097, 32, 8, 128, true, None),
        case(3, 700, 8, 2, 64, true, None),
        case(1, 77, 4, 4, 16, true, None),
    ] {
        let s = AttnShape {
            tq: x.tq,
            tk: x.tk,
            heads: x.heads,
            kv_heads: x.kv,
            head_dim: x.d,
            causal: x.causal,
            q_pos0: x.tk - x.tq,
            hole: x.hole,
        };
        let (q, k, v) = (
            rng.vec(x.tq * x.heads * x.d, 1.0),
            rng.vec(x.tk * x.kv * x.d, 1.0),
            rng.vec(x.tk * x.kv * x.d, 1.0),
        );
        // group 0: two ranges in different key tiles; 1 and 2: one range each; 3: every key (overlaps
        // the others)
        let (t4, t2) = (x.tk / 4, x.tk / 2);
        let ranges = [
            (1, t4, 0),
            (t2 + 1, t2 + 4, 0),
            (t4, t2 + 1, 1),
            (t2 + 7, x.tk, 2),
            (0, x.tk, 3),
        ];
        let groups = KeyGroups::new(&ranges, 4).unwrap();
        let (qg, kg, vg) = (g.upload(&q), g.upload(&k), g.upload(&v));
        let (oc, mc) = c.attention(&q, &k, &v, s, Some(&groups));
        let mc = mc.unwrap();
        let name = format!(
            "t={}/{} h={}/{} d={} {}{}",
            x.tq,
            x.tk,
            x.heads,
            x.kv,
            x.d,
            if x.causal { "causal" } else { "bidir" },
            if x.hole.is_some() { " hole" } else { "" }
        );
        // plain: f32 throughout; the others: Q, K, V and the probabilities enter the tensor cores as
        // bf16 (variant 4 on sm_90a only; its head dims 16 and 32 run as variant 3)
        let mut variants = vec![(AttnKernel::Plain, F32_TOL)];
        variants.extend(tensor_core_variants(&g));
        for (variant, tol) in variants {
            g.set_attention(variant);
            let (og, mg) = g.attention(&qg, &kg, &vg, s, Some(&groups));
            check(
                &format!("attention {variant:?} {name}"),
                &g.download(&og),
                &oc,
                tol,
            );
            check(
                &format!("attention {variant:?} {name} mass"),
                &mg.unwrap(),
                &mc,
                tol,
            );
            // and without the mass output (other kernels)
            let (og2, none) = g.attention(&qg, &kg, &vg, s, None);
            assert!(none.is_none());
            check(
                &format!("attention {variant:?} {name} no mass"),
                &g.download(&og2),
                &oc,
                tol,
            );
        }
        // the CPU's output as `o`, so the check is of the backward alone; the plain backward holds two
        // rows of scores in 48 KB of shared memory, and its atomics make long sequences slow
        let dout = rng.vec(x.tq * x.heads * x.d, 1.0);
        let (cq, ck, cv) = c.attention_backward(&q, &k, &v, &oc, &dout, None, s);
        let (og, dg) = (g.upload(&oc), g.upload(&dout));
        // variant 2's backward (Fused), and variant 3's (bf16-packed Q and dO, double-buffered: every
        // later variant's), fed the log-sum-exp of each variant's forward
        let mut variants = vec![
            (AttnKernel::Plain, F32_TOL),
            (AttnKernel::Fused, GEMM_TOL),
            (AttnKernel::Pipelined, GEMM_TOL),
        ];
        // (variant 4's two tile widths share their log-sum-exp code: the 64-key one is enough here)
        variants.extend(
            wgmma_variants(&g)
                .into_iter()
                .filter(|&k| k != AttnKernel::WgmmaWide)
                .map(|k| (k, GEMM_TOL)),
        );
        for (variant, tol) in variants {
            if variant == AttnKernel::Plain && x.tk > 1024 {
                continue;
            }
            g.set_attention(variant);
            // the log-sum-exp recomputed by the backward, and handed over by attention_train
            let (o_train, lse) = g.attention_train(&qg, &kg, &vg, s);
            assert_eq!(lse.is_some(), variant != AttnKernel::Plain);
            check(
                &format!("attention_train {variant:?} {name}"),
                &g.download(&o_train),
                &oc,
                tol,
            );
            for given in [None, lse.as_ref()].into_iter().take(1 + lse.is_some() as usize) {
                let (dq, dk, dv) = g.attention_backward(&qg, &kg, &vg, &og, &dg, given, s);
                let how = if given.is_some() {
                    "lse given"
                } else {
                    "lse recomputed"
                };
                let name = format!("attention backward {variant:?} {name} {how}");
                check(&format!("{name} dq"), &g.download(&dq), &cq, tol);
                check(&format!("{name} dk"), &g.download(&dk), &ck, tol);
                check(&format!("{name} dv"), &g.download(&dv), &cv, tol);
            }
        }
    }
    // what each kernel's speed rests on: blocks per SM (registers, shared memory, barriers)
    for o in g.occupancy() {
        eprintln!(
            "occupancy {}: {} threads, {} B shared: {} blocks per SM",
            o.kernel, o.threads, o.smem, o.blocks_per_sm
        );
        assert!(o.blocks_per_sm >= 1, "{} cannot be resident on an SM", o.kernel);
    }
}

/// The optimizer on the backend (LoRA training's update): the global gradient norm's Σ g², AdamW
/// and SGD with and without the clipping factor over three steps, and the updated master as a
/// weight matrix, against the CPU's (the host update of `train::optim`, bit for bit what it was).
#[test]
fn optimizer_on_the_backend_matches_the_host_update() {
    use miadpo::backend::BufState;
    use miadpo::train::optim::{OptimConfig, OptimizerKind};
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(21);
    let sizes = [128 * 1024, 1000, 4096 * 128 + 3];
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.vec(n, 1e-2)).collect();
    let gg: Vec<_> = grads.iter().map(|x| g.upload(x)).collect();
    let (sc, sg) = (
        c.sum_squares(&grads.iter().collect::<Vec<_>>()),
        g.sum_squares(&gg.iter().collect::<Vec<_>>()),
    );
    // f64 sums of 650 k squares in another order than the CPU's f64 sum: ~1e-15 relative
    let e = (sc - sg).abs() / sc;
    eprintln!("{:<40} rel err {e:.2e} (tol 1e-12)", "sum_squares");
    assert!(e <= 1e-12, "sum_squares: cpu {sc} vs gpu {sg}");
    // a gradient element of 1e20: its square overflows f32, not the f64 sums (the host clips it)
    let big = [1e20f32, 3.0];
    let (bc, bg) = (c.sum_squares(&[&big.to_vec()]), g.sum_squares(&[&g.upload(&big)]));
    assert!(
        bg.is_finite() && ((bc - bg) / bc).abs() <= 1e-12,
        "sum_squares of 1e20: cpu {bc} vs gpu {bg}"
    );
    for (kind, gscale) in [
        (OptimizerKind::AdamW, 1.0),
        (OptimizerKind::AdamW, 0.37),
        (OptimizerKind::Sgd, 0.5),
    ] {
        let cfg = OptimConfig {
            kind,
            weight_decay: 0.01,
            ..Default::default()
        };
        let (rows, cols) = (128, 1024);
        let p0 = rng.vec(rows * cols, 0.1);
        let (mut pc, mut pg) = (p0.clone(), g.upload(&p0));
        let (mut stc, mut stg) = (BufState::default(), BufState::default());
        for step in 0..3 {
            let grad = rng.vec(rows * cols, 1e-2);
            let (mut gc, mut ggr) = (grad.clone(), g.upload(&grad));
            c.optim_update(&cfg, &mut pc, &mut gc, gscale, &mut stc, 1e-3);
            g.optim_update(&cfg, &mut pg, &mut ggr, gscale, &mut stg, 1e-3);
            // f32 on both sides (the GPU scales g in f32, the host in f64; FMA contraction and
            // sqrtf): a few ulps of p per step
            check(
                &format!("optim_update {kind:?} gscale {gscale} step {step}"),
                &g.download(&pg),
                &pc,
                F32_TOL,
            );
            assert_eq!(
                stg.step, stc.step,
                "{kind:?}: the step count of the bias corrections"
            );
            if let (Some(mg), Some(mc)) = (&stg.m, &stc.m) {
                check(
                    &format!("optim_update {kind:?} m step {step}"),
                    &g.download(mg),
                    mc,
                    F32_TOL,
                );
            }
            if let (Some(vg), Some(vc)) = (&stg.v, &stc.v) {
                check(
                    &format!("optim_update {kind:?} v step {step}"),
                    &g.download(vg),
                    vc,
                    F32_TOL,
                );
            }
            assert_eq!(
                stg.m.is_some(),
                stc.m.is_some(),
                "{kind:?}: moments on one side only"
            );
        }
        // the master as the model's matrix: the product with it as with the CPU's f32 matrix
        let (mc, mg) = (
            c.to_mat(&pc, rows, cols).unwrap(),
            g.to_mat(&pg, rows, cols).unwrap(),
        );
        let x = rng.vec(16 * cols, 1.0);
        check(
            &format!("to_mat {kind:?} product"),
            &g.download(&g.linear(&g.upload(&x), 16, &mg, None)),
            &c.linear(&x, 16, &mc, None),
            GEMM_TOL,
        );
    }
    assert_eq!(g.download(&g.zeros(1000)), vec![0.0; 1000], "zeros");
}

/// `train` on the GPU, the optimizer there too (only Σ g² and, at a sync, the weights and states come
/// back), against the CPU: three steps on the fixture's pairs. The first step's loss is ln 2 on both
/// (the LoRA starts as the identity) and its gradient norm agrees within the bf16 chain's bound; the
/// host copies after the run are those of three updates (AdamW's step counts, moments of the
/// masters' sizes) and they moved the weights.
#[test]
fn dpo_training_steps_on_the_gpu() {
    use miadpo::model::llava::Llava;
    use miadpo::model::lora::Proj;
    use miadpo::train::adapter::LoraWeights;
    use miadpo::train::backward::{pair_forward, PassOptions};
    use miadpo::train::optim::{OptimConfig, Schedule};
    use miadpo::train::trainer::{train, LoopConfig, StepMetrics, TrainConfig, TrainPair, TrainState};
    let Some(g) = gpu() else { return };
    fn run<B: Backend>(mut m: Llava<B>) -> (Vec<StepMetrics>, LoraWeights, LoraWeights, TrainState) {
        let dir = common::fixture_dir();
        let pass = PassOptions::default();
        let pairs: Vec<TrainPair> = common::cases()["score"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (prompt, px) = common::case_inputs(&m, &dir, c, "prompt");
                let feats = m.image_features(&px);
                let (chosen, rejected) = (
                    m.tokenizer.response(c["chosen"].as_str().unwrap()).unwrap(),
                    m.tokenizer.response(c["rejected"].as_str().unwrap()).unwrap(),
                );
                let refs = pair_forward(&m, &prompt.ids, &chosen, &rejected, &feats, pass, 0)
                    .unwrap()
                    .logps();
                TrainPair {
                    id: format!("pair{i}"),
                    prompt: prompt.ids,
                    features: m.be.download(&feats),
                    chosen,
                    rejected,
                    ref_chosen: refs.0,
                    ref_rejected: refs.1,
                }
            })
            .collect();
        let t = m.cfg.text.clone();
        let init = LoraWeights::init(t.num_layers, &Proj::ALL, 4, 8.0, 1, |_, p| p.shape(&t));
        let mut w = init.clone();
        let cfg = TrainConfig {
            dpo: Default::default(),
            pass,
            run: LoopConfig {
                optim: OptimConfig::default(),
                lr: 5e-3,
                schedule: Schedule::Constant,
                warmup_ratio: 0.0,
                max_grad_norm: 0.3, // below the fixture's first gradient norm (~0.44): clipping runs
                batch_size: 3,
                grad_accum: 1,
                steps: 3,
                seed: 0,
                sync_every: 0,
            },
        };
        let mut state = TrainState::default();
        let never = std::sync::atomic::AtomicBool::new(false);
        let out = train(
            &mut m,
            &mut w,
            &mut state,
            &pairs,
            &cfg,
            &never,
            &mut |_, _, _| Ok(()),
        )
        .unwrap();
        (out.history, init, w, state)
    }
    let dir = common::fixture_dir();
    let (hc, _, wc, _) = run(Llava::load(&dir.join("model"), CpuBackend::new()).unwrap());
    let (hg, init, wg, sg) = run(Llava::load(&dir.join("model"), g).unwrap());
    assert_eq!(hg.len(), 3);
    let e = (hg[0].loss - std::f64::consts::LN_2).abs();
    eprintln!("{:<40} rel err {e:.2e} (tol 1e-6)", "train step 1 loss vs ln 2");
    assert!(e <= 1e-6, "step 1 loss {} on the GPU", hg[0].loss);
    // the gradient's norm through the bf16 chain: within the fixture DPO test's part bound
    let e = (hg[0].grad_norm - hc[0].grad_norm).abs() / hc[0].grad_norm;
    eprintln!(
        "{:<40} rel err {e:.2e} (tol 1.5e-1)",
        "train step 1 gradient norm"
    );
    assert!(
        e <= 1.5e-1,
        "gradient norm cpu {} vs gpu {}",
        hc[0].grad_norm,
        hg[0].grad_norm
    );
    for s in &hg {
        assert!(
            s.loss.is_finite() && s.grad_norm.is_finite() && !s.skipped,
            "step {}: {s:?}",
            s.step
        );
    }
    // the host copies: three AdamW updates of every tensor, synced when the run returned
    assert_eq!(sg.step, 3);
    assert_eq!(sg.optim.len(), 2 * wg.modules.len());
    for (st, (n, mw)) in sg.optim.iter().zip(
        wg.modules
            .iter()
            .flat_map(|mw| [(mw.a.len(), mw), (mw.b.len(), mw)]),
    ) {
        assert_eq!(
            (st.step, st.m.len(), st.v.len()),
            (3, n, n),
            "layer {} {:?}",
            mw.layer,
            mw.proj
        );
    }
    let moved = |w: &LoraWeights| {
        w.modules
            .iter()
            .zip(&init.modules)
            .map(|(a, b)| {
                a.b.iter()
                    .zip(&b.b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max)
            })
            .fold(0f32, f32::max)
    };
    // B starts at 0 and each AdamW step moves an element by about lr = 5e-3
    assert!(
        moved(&wg) > 1e-3 && moved(&wc) > 1e-3,
        "the updates moved B: gpu {} cpu {}",
        moved(&wg),
        moved(&wc)
    );
}

/// Batched greedy generation with the image attention (what `select` runs) on the GPU against the
/// CPU, on the fixture's three generation prompts in one batch. The fixture's first picks are near
/// ties (top two logits 0.15 to 0.24 apart on the CPU), which bf16 may round either way, so the
/// decode steps are compared teacher-forced: both backends feed the CPU's generated tokens through
/// packed decode steps (the batched append and flash-decoding launches, the gemv products, the mass
/// at the captured layer read after the step) and must agree on every step's logits and attention
/// rows; on the CPU the teacher-forced rows are `generate_batch`'s exactly. The GPU's own
/// `generate_batch` runs too, its tokens reported against the CPU's.
#[test]
fn batched_generation_on_the_gpu_matches_the_cpu() {
    use miadpo::model::llama::{MassCapture, Segment};
    use miadpo::model::llava::{GenerateOptions, Generation, Llava};
    let Some(g) = gpu() else { return };
    const LAYER: usize = 1;
    struct Steps {
        /// per decode step: the logits (sequences, vocab) and each sequence's attention row
        logits: Vec<Vec<f32>>,
        rows: Vec<Vec<Vec<f32>>>,
    }
    // `generate_batch` of the fixture's prompts, then (with `tokens`) the teacher-forced steps
    fn run<B: Backend>(m: &Llava<B>, tokens: Option<&[Vec<u32>]>) -> (Vec<Generation>, Option<Steps>) {
        let inputs = common::GenerateInputs::load(m, &common::fixture_dir());
        let items = inputs.items();
        let opts = GenerateOptions {
            max_new_tokens: 8,
            attn_layer: Some(LAYER),
            use_adapter: false,
        };
        let gens = m.generate_batch(&items, &opts, &mut |_| {}).unwrap();
        let steps = tokens.map(|tokens| {
            let be = &m.be;
            let mut caches: Vec<_> = inputs
                .prompts
                .iter()
                .zip(&inputs.feats)
                .map(|(p, f)| m.prefill(&p.ids, f, false).unwrap().0)
                .collect();
            let captures: Vec<MassCapture> = inputs
                .groups
                .iter()
                .map(|g| MassCapture {
                    groups: g,
                    layers: vec![LAYER],
                })
                .collect();
            let segs: Vec<Segment> = captures
                .iter()
                .map(|c| Segment {
                    rows: 1,
                    capture: Some(c),
                })
                .collect();
            let (mut logits, mut rows) = (Vec::new(), Vec::new());
            // every generated token but the last is fed back (as generate_batch does)
            for s in 0..tokens[0].len() - 1 {
                let feed: Vec<u32> = tokens.iter().map(|t| t[s]).collect();
                let x = be.embed(&feed, &m.decoder.embed);
                let (hid, masses) = m.decoder.forward_packed(be, x, &segs, &mut caches, false);
                logits.push(be.download(&m.decoder.logits(be, &hid, feed.len())));
                rows.push(be.read_masses(masses.into_iter().flatten().collect()));
            }
            Steps { logits, rows }
        });
        (gens, steps)
    }
    let dir = common::fixture_dir();
    let mc = Llava::load(&dir.join("model"), CpuBackend::new()).unwrap();
    let (cpu, _) = run(&mc, None);
    let tokens: Vec<Vec<u32>> = cpu.iter().map(|g| g.token_ids.clone()).collect();
    assert!(
        tokens.iter().all(|t| t.len() == 8),
        "the fixture generates no EOS in 8 tokens"
    );
    let (_, sc) = run(&mc, Some(&tokens));
    let (gpu, sg) = run(&Llava::load(&dir.join("model"), g).unwrap(), Some(&tokens));
    let (sc, sg) = (sc.unwrap(), sg.unwrap());
    // the harness: on the CPU the teacher-forced rows are generate_batch's
    for (i, c) in cpu.iter().enumerate() {
        for (s, row) in c.attention_rows.iter().enumerate() {
            let want: Vec<f32> = row.iter().map(|&x| x as f32).collect();
            assert_eq!(
                sc.rows[s][i], want,
                "cpu generation {i} step {s}: teacher-forced row"
            );
        }
    }
    for s in 0..sc.logits.len() {
        // logits through bf16 weights: the product tolerance; the masses are probabilities through
        // the same products
        check(
            &format!("teacher-forced step {s} logits"),
            &sg.logits[s],
            &sc.logits[s],
            GEMM_TOL,
        );
        for i in 0..tokens.len() {
            check(
                &format!("teacher-forced step {s} sequence {i} attention row"),
                &sg.rows[s][i],
                &sc.rows[s][i],
                GEMM_TOL,
            );
        }
    }
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let same = c
            .token_ids
            .iter()
            .zip(&g.token_ids)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "generation {i} on the GPU: {same} of {} tokens as on the CPU (cpu {:?}, gpu {:?})",
            c.token_ids.len(),
            c.token_ids,
            g.token_ids
        );
    }
}

/// Greedy decoding's pick on the device against the host's: the same first index of the maximum
/// (ties planted: a row's maximum repeated later in the row), and its log-softmax.
#[test]
fn greedy_rows_at_vocab_32000() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(23);
    let (rows, vocab) = (37, 32000);
    let mut logits = rng.vec(rows * vocab, 4.0);
    for r in (0..rows).step_by(3) {
        // the row's maximum again at a later index: the first one must win
        let row = &mut logits[r * vocab..(r + 1) * vocab];
        let (at, &mx) = row
            .iter()
            .enumerate()
            .fold((0, &f32::MIN), |a, b| if b.1 > a.1 { b } else { a });
        if at + 1 < vocab {
            row[at + 1 + (r * 97) % (vocab - at - 1)] = mx;
        }
    }
    let want = c.greedy_rows(&c.upload(&logits), rows, vocab);
    let got = g.greedy_rows(&g.upload(&logits), rows, vocab);
    for (r, (gp, wp)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            gp.0, wp.0,
            "row {r}: device picked {} against the host's {}",
            gp.0, wp.0
        );
    }
    // the softmax sums of 32000 exponentials in f32 on the device (a tree over 256 threads), f64 on
    // the host: ~1e-6 of the log-sum-exp, against log-probs of about -10
    let (gl, wl): (Vec<f32>, Vec<f32>) = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a.1 as f32, b.1 as f32))
        .unzip();
    check("greedy_rows log-prob", &gl, &wl, 1e-5);
    // a row without a maximum (every logit -inf) picks token 0 on both, not an id past the vocabulary
    let dead = vec![f32::NEG_INFINITY; 2 * vocab];
    assert_eq!(
        g.greedy_rows(&g.upload(&dead), 2, vocab)[1].0,
        0,
        "device, a row of -inf"
    );
    assert_eq!(
        c.greedy_rows(&c.upload(&dead), 2, vocab)[1].0,
        0,
        "host, a row of -inf"
    );
}

#[test]
fn fused_logprobs_at_vocab_32000() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(4);
    let (rows, h, vocab) = (97, 4096, 32000);
    let w = tensor("lm_head", vocab, h, &rng.vec(vocab * h, 0.02));
    let (wc, wg) = (c.matrix(&w).unwrap(), g.matrix(&w).unwrap());
    let hid = rng.vec(rows * h, 1.0);
    let targets: Vec<u32> = (0..rows).map(|i| (i * 7919 % vocab) as u32).collect();
    let (lg, sg) = g.fused_logprobs(&g.upload(&hid), rows, &wg, &targets);
    let (lc, sc) = c.fused_logprobs(&hid, rows, &wc, &targets);
    check("fused_logprobs logp", &lg, &lc, GEMM_TOL);
    check("fused_logprobs lse", &sg, &sc, GEMM_TOL);
    let dl = rng.vec(rows, 1.0);
    let dh = g.download(&g.fused_logprobs_backward(&g.upload(&hid), rows, &wg, &targets, &sg, &dl));
    check(
        "fused_logprobs_backward",
        &dh,
        &c.fused_logprobs_backward(&hid, rows, &wc, &targets, &sc, &dl),
        GEMM_TOL,
    );
    let (mut gg, mut gc) = (g.upload(&vec![0.0; vocab * h]), vec![0f32; vocab * h]);
    g.fused_logprobs_weight_grad(&g.upload(&hid), rows, &wg, &targets, &sg, &dl, &mut gg);
    c.fused_logprobs_weight_grad(&hid, rows, &wc, &targets, &sc, &dl, &mut gc);
    check("fused_logprobs_weight_grad", &g.download(&gg), &gc, GEMM_TOL);
}

/// The fixture end to end: the policy pass (log-probs and LoRA gradients) on both backends, in both
/// layouts of a pair (prefix-shared `[prompt | chosen | rejected]`, the default, and two sequences),
/// and the GPU's two layouts against each other.
#[test]
fn dpo_pass_on_the_fixture_matches_the_cpu() {
    use miadpo::model::llava::Llava;
    use miadpo::train::backward::PassOptions;
    let Some(g) = gpu() else { return };
    let dir = common::fixture_dir();
    let mut mc = Llava::load(&dir.join("model"), CpuBackend::new()).unwrap();
    let mut mg = Llava::load(&dir.join("model"), g).unwrap();
    mc.load_adapter(&dir.join("adapter")).unwrap();
    mg.load_adapter(&dir.join("adapter")).unwrap();
    let shared = PassOptions::default();
    let separate = PassOptions {
        prefix_sharing: false,
        ..shared
    };
    assert!(shared.prefix_sharing, "the default layout is prefix-shared");
    let (ls, gs) = fixture_pair_on_both(&mc, &mg, shared, "prefix-shared");
    let (lt, gt) = fixture_pair_on_both(&mc, &mg, separate, "two sequences");
    // The GPU's two layouts round the same values to bf16, except where a product's blocking or an
    // attention tile edge depends on the packed length (f32 sums in another order, then a 1-ulp flip
    // here and there), so they differ by less than the whole bf16 chain does from the CPU (1.4e-3
    // measured on an H100 by `score`): 5e-3. A wrong hole, a rejected answer that sees the chosen
    // one, moves the fixture's rejected log-prob by ~1e-1 (measured on the CPU: -123.1 against
    // -109.5 after the chosen answer), twenty times the tolerance.
    const LAYOUT_LOGP_TOL: f64 = 5e-3;
    for (x, y, which) in [(ls.0, lt.0, "chosen"), (ls.1, lt.1, "rejected")] {
        let e = (x - y).abs() / y.abs();
        eprintln!(
            "{:<40} rel err {e:.2e} (tol {LAYOUT_LOGP_TOL:.0e})",
            format!("gpu layouts: {which} log-prob")
        );
        assert!(
            e <= LAYOUT_LOGP_TOL,
            "gpu {which} log-prob: prefix-shared {x} vs two sequences {y}"
        );
    }
    // Their DPO gradients against each other, at the bound each meets against the CPU.
    let mut failed = Vec::new();
    for ((name, a, tol), (_, b, _)) in gs.iter().zip(&gt) {
        let (e, cos) = (rel(a, b), cosine(a, b));
        eprintln!(
            "{:<40} rel err {e:.2e} (tol {tol:.1e})  cosine {cos:.5}",
            format!("gpu layouts: {name} DPO")
        );
        if e > *tol || cos < MIN_COSINE {
            failed.push(format!("{name}: {e:.2e}, cosine {cos:.5}"));
        }
    }
    assert!(failed.is_empty(), "the GPU's two layouts disagree: {failed:#?}");
    mc.decoder.detach_lora();
    mg.decoder.detach_lora();
}

// One sequence's log-prob gradient on this fixture is sensitive: rounding the image features alone to
// bf16 (one rounding of one input, 2^-9 relative) moves the CPU's LoRA gradients by up to 1.7e-2 of
// their largest entry (measured on the CPU). The GPU rounds the inputs of every product (~25 in the
// chain forward and back, vision tower included) and of the attention's tensor-core tiles:
// √25 · 1.7e-2 ≈ 8.5e-2, so 1.5e-1 relative to the largest entry (two device runs on an H100 measured
// up to 1.1e-1 and 1.15e-1). A wrong kernel shows up as a direction error, which the cosine catches:
// ≥ 0.99 (a normwise error under ~14%).
const PART_TOL: f64 = 1.5e-1;
const MIN_COSINE: f64 = 0.99;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt().max(1e-300)
}

/// The fixture's first pair through the policy pass in layout `o` on the CPU and the GPU: the
/// log-probs and the LoRA gradients (chosen part, rejected part, DPO sum) compared, each named with
/// `layout`. Returns the GPU's (chosen, rejected) log-probs and its DPO gradients by name, each
/// with the bound it was checked at.
#[allow(clippy::type_complexity)]
fn fixture_pair_on_both(
    mc: &miadpo::model::llava::Llava<CpuBackend>,
    mg: &miadpo::model::llava::Llava<CudaBackend>,
    o: miadpo::train::backward::PassOptions,
    layout: &str,
) -> ((f64, f64), Vec<(String, Vec<f32>, f64)>) {
    use miadpo::model::lora::Proj;
    use miadpo::train::backward::{pair_backward, pair_forward, LoraGrads};
    let dir = common::fixture_dir();
    let case = &common::cases()["score"][0];
    let (prompt, px) = common::case_inputs(mc, &dir, case, "prompt");
    let (chosen, rejected) = (
        mc.tokenizer.response(case["chosen"].as_str().unwrap()).unwrap(),
        mc.tokenizer.response(case["rejected"].as_str().unwrap()).unwrap(),
    );
    let fc = mc.image_features(&px);
    let fg = mg.image_features(&px);
    check("image features", &mg.be.download(&fg), &fc, GEMM_TOL);
    let pc = pair_forward(mc, &prompt.ids, &chosen, &rejected, &fc, o, 0).unwrap();
    let pg = pair_forward(mg, &prompt.ids, &chosen, &rejected, &fg, o, 0).unwrap();
    let (a, b) = (pc.logps(), pg.logps());
    // summed log-probs of ~-100 through bf16 products: 1e-2 relative
    for (x, y) in [(a.0, b.0), (a.1, b.1)] {
        assert!(
            (x - y).abs() <= 1e-2 * x.abs(),
            "{layout}: log-prob cpu {x} vs gpu {y}"
        );
    }
    // The DPO gradient is −½·∇logp(chosen) + ½·∇logp(rejected): the two parts share the prompt and
    // largely cancel, so its error is bounded by the parts' errors, not by its own (smaller) size.
    // Each part is checked alone, and the sum against the bound the parts give.
    let grads = |coef: (f64, f64)| {
        let (mut gc, mut gg) = (LoraGrads::default(), LoraGrads::default());
        pair_backward(mc, &pc, coef.0, coef.1, o, &mut gc);
        pair_backward(mg, &pg, coef.0, coef.1, o, &mut gg);
        let mut out = Vec::new();
        for layer in 0..mc.cfg.text.num_layers {
            for proj in Proj::ALL {
                let (ca, cb) = gc.host(&mc.be, layer, proj).unwrap();
                let (ga, gb) = gg.host(&mg.be, layer, proj).unwrap();
                out.push((format!("layer {layer} {proj:?} A"), ga, ca));
                out.push((format!("layer {layer} {proj:?} B"), gb, cb));
            }
        }
        out
    };
    let max_abs = |v: &[f32]| v.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let (chosen_part, rejected_part, dpo) = (grads((-0.5, 0.0)), grads((0.0, 0.5)), grads((-0.5, 0.5)));
    let mut failed = Vec::new();
    let mut out = Vec::new();
    for ((c, r), d) in chosen_part.iter().zip(&rejected_part).zip(&dpo) {
        let bound = PART_TOL * (max_abs(&c.2) + max_abs(&r.2)) / max_abs(&d.2).max(1e-30);
        out.push((d.0.clone(), d.1.clone(), bound));
        for (what, got, want, tol) in [
            ("chosen part", &c.1, &c.2, PART_TOL),
            ("rejected part", &r.1, &r.2, PART_TOL),
            ("DPO", &d.1, &d.2, bound),
        ] {
            let (e, cos) = (rel(got, want), cosine(got, want));
            eprintln!(
                "grad {:<28} rel err {e:.2e} (tol {tol:.1e})  cosine {cos:.5}",
                format!("{layout}: {} {what}", c.0)
            );
            if e > tol || cos < MIN_COSINE {
                failed.push(format!(
                    "{layout}: {} {what}: {e:.2e} (tol {tol:.1e}), cosine {cos:.5}",
                    c.0
                ));
            }
        }
    }
    assert!(failed.is_empty(), "gradients off: {failed:#?}");
    (b, out)
}

/// A decode step over a packed batch (`attention_cached`): every sequence's new K/V rows appended to
/// its own cache and its rows attended to that cache, in one launch per kind on the GPU, against the
/// CPU's one `attention` per sequence. Caches of different lengths (one empty, one past a 4096-key
/// split boundary), 1 to 3 new rows, key groups on some sequences only, GQA 1 and 4, two steps (the
/// second appends into caches grown by the first), and 35 sequences (two launches of at most 32).
/// The GPU's caches are bf16: the CPU is given the same K and V rounded to bf16 on the host, so the
/// two differ by f32 arithmetic only, and the GPU's caches must hold exactly the rounded rows.
#[test]
fn attention_cached_decode_batch_matches_the_cpu() {
    use miadpo::backend::{attention_cached_each, CachedSeq, Heads};
    // sequence i of a step: its caches, earlier rows, new rows and groups
    fn seqs<'a, B: Backend>(
        k: &'a mut [B::Kv],
        v: &'a mut [B::Kv],
        len: &[usize],
        rows: &[usize],
        groups: &'a [Option<KeyGroups>],
    ) -> Vec<CachedSeq<'a, B>> {
        k.iter_mut()
            .zip(v.iter_mut())
            .enumerate()
            .map(|(i, (k, v))| CachedSeq {
                k,
                v,
                len: len[i],
                rows: rows[i],
                groups: groups[i].as_ref(),
            })
            .collect()
    }
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(11);
    let few: Vec<(usize, usize)> = vec![(700, 1), (0, 1), (4097, 1), (77, 3), (300, 2)];
    let many: Vec<(usize, usize)> = (0..35).map(|i| (20 + 13 * i, 1 + i % 2)).collect();
    for (h, lens) in [
        ((8, 2, 128), &few),
        ((4, 4, 64), &few),
        ((4, 4, 16), &few),
        ((8, 2, 64), &many),
    ] {
        let h = Heads {
            heads: h.0,
            kv_heads: h.1,
            dim: h.2,
        };
        let (qd, kvd) = (h.heads * h.dim, h.kv_heads * h.dim);
        let kf: Vec<Vec<f32>> = lens.iter().map(|&(len, _)| rng.vec(len * kvd, 1.0)).collect();
        let vf: Vec<Vec<f32>> = lens.iter().map(|&(len, _)| rng.vec(len * kvd, 1.0)).collect();
        let mut kc: Vec<Vec<f32>> = kf.iter().map(|x| bf16_round(x)).collect();
        let mut vc: Vec<Vec<f32>> = vf.iter().map(|x| bf16_round(x)).collect();
        let cache = |x: &Vec<f32>| {
            let mut kv = g.kv_new();
            g.kv_append(&mut kv, &g.upload(x));
            kv
        };
        let mut kg: Vec<_> = kf.iter().map(cache).collect();
        let mut vg: Vec<_> = vf.iter().map(cache).collect();
        let mut len: Vec<usize> = lens.iter().map(|l| l.0).collect();
        for step in 0..2 {
            let rows: Vec<usize> = lens.iter().map(|l| l.1).collect();
            let total: usize = rows.iter().sum();
            // groups on every other sequence: two ranges in group 0, the whole prefix in group 1
            let groups: Vec<Option<KeyGroups>> = len
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    (i % 2 == 0 && n >= 8)
                        .then(|| KeyGroups::new(&[(1, n / 3, 0), (n / 2, n - 2, 0), (0, n, 1)], 2).unwrap())
                })
                .collect();
            let (q, k, v) = (
                rng.vec(total * qd, 1.0),
                rng.vec(total * kvd, 1.0),
                rng.vec(total * kvd, 1.0),
            );
            let mut cs = seqs::<CpuBackend>(&mut kc, &mut vc, &len, &rows, &groups);
            let (oc, mc) = attention_cached_each(&c, &q, &bf16_round(&k), &bf16_round(&v), h, &mut cs);
            let mut gs = seqs::<CudaBackend>(&mut kg, &mut vg, &len, &rows, &groups);
            let (og, mg) = g.attention_cached(&g.upload(&q), &g.upload(&k), &g.upload(&v), h, &mut gs);
            let name = format!(
                "attention_cached {} seqs h={}/{} d={} step {step}",
                lens.len(),
                h.heads,
                h.kv_heads,
                h.dim
            );
            // the decode kernels are f32 throughout (no tensor cores): summation order and exp2f
            check(&name, &g.download(&og), &oc, F32_TOL);
            assert_eq!(mg.len(), lens.len(), "{name}: a mass entry per sequence");
            let (has_g, has_c): (Vec<bool>, Vec<bool>) = mg
                .iter()
                .zip(&mc)
                .map(|(a, b)| (a.is_some(), b.is_some()))
                .unzip();
            assert_eq!(has_g, has_c, "{name}: the sequences with a mass");
            // read together, as a decode step reads them (one copy of the shared buffer)
            let (rg, rc) = (
                g.read_masses(mg.into_iter().flatten().collect()),
                c.read_masses(mc.into_iter().flatten().collect()),
            );
            for (i, (a, b)) in rg.iter().zip(&rc).enumerate() {
                check(&format!("{name} mass {i}"), a, b, F32_TOL);
            }
            // the appended caches: the rows rounded as the host rounds them, so exactly equal
            for i in 0..lens.len() {
                assert_eq!(
                    g.download(&g.kv_read(&kg[i])),
                    kc[i],
                    "{name}: K cache of sequence {i}"
                );
                assert_eq!(
                    g.download(&g.kv_read(&vg[i])),
                    vc[i],
                    "{name}: V cache of sequence {i}"
                );
            }
            for (n, r) in len.iter_mut().zip(&rows) {
                *n += r;
            }
        }
    }
}

/// The KV cache's growth: rows appended one block at a time (the allocation grows geometrically, the
/// cache's length must not) hold the concatenation rounded to bf16 (round to nearest even, as the
/// host's `half` rounds), read back as an f32 buffer that still works as an op input; truncation
/// keeps the first rows and appending after it overwrites the rest.
#[test]
fn kv_append_grows_the_bf16_cache_in_place() {
    let Some(g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(9);
    let d = 96;
    let (mut gc, mut cc) = (g.kv_new(), c.kv_new());
    for rows in [5, 1, 1, 17, 1, 64, 1] {
        let block = rng.vec(rows * d, 1.0);
        g.kv_append(&mut gc, &g.upload(&block));
        c.kv_append(&mut cc, &block);
        assert_eq!(gc.len(), cc.len());
        check(
            &format!("kv_append to {} rows", cc.len() / d),
            &g.download(&g.kv_read(&gc)),
            &bf16_round(&cc),
            0.0,
        );
    }
    let w = rng.vec(cc.len(), 1.0);
    let (mut a, mut b) = (g.kv_read(&gc).into_owned(), bf16_round(&cc));
    g.add(&mut a, &g.upload(&w));
    c.add(&mut b, &w);
    check("add on a cache read back", &g.download(&a), &b, F32_TOL);
    let (keep, block) = (7 * d, rng.vec(3 * d, 1.0));
    g.kv_truncate(&mut gc, keep);
    c.kv_truncate(&mut cc, keep);
    g.kv_append(&mut gc, &g.upload(&block));
    c.kv_append(&mut cc, &block);
    check(
        "kv_append after kv_truncate",
        &g.download(&g.kv_read(&gc)),
        &bf16_round(&cc),
        0.0,
    );
}

/// More groups than the fused kernels hold in registers (16: a sequence prompt of 20 images), and
/// a group of more ranges than they hold in shared memory (64): the host splits them over launches,
/// and every group's mass must still come out.
#[test]
fn attention_mass_over_more_than_16_groups_or_64_ranges() {
    let Some(mut g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(11);
    let (tk, heads, kv, d) = (700, 8, 2, 64);
    let spans: Vec<(usize, usize)> = (0..20).map(|i| (5 + i * 30, 5 + i * 30 + 24)).collect();
    let per_image = KeyGroups::per_span(&spans).unwrap();
    // 80 ranges of 3 keys every 8 in group 1, the whole cache in group 0
    let mut ranges: Vec<(usize, usize, usize)> = (0..80).map(|i| (10 + i * 8, 13 + i * 8, 1)).collect();
    ranges.push((0, tk, 0));
    let many = KeyGroups::new(&ranges, 2).unwrap();
    // the tensor-core variants (the plain kernel has no group limit): bf16 probabilities (module
    // comment)
    let variants = tensor_core_variants(&g);
    for (what, groups) in [("20 groups", &per_image), ("80 ranges", &many)] {
        for tq in [1, 200] {
            let s = decode_shape(tq, tk, heads, kv, d);
            check_group_mass(&mut g, &c, &mut rng, s, groups, what, &variants);
        }
    }
}

/// tq causal query rows at the end of tk keys (a decode step, or a prefill's last rows).
fn decode_shape(tq: usize, tk: usize, heads: usize, kv_heads: usize, head_dim: usize) -> AttnShape {
    AttnShape {
        tq,
        tk,
        heads,
        kv_heads,
        head_dim,
        causal: true,
        q_pos0: tk - tq,
        hole: None,
    }
}

/// Random Q, K, V of shape `s`: the output and the mass on `groups` of every variant in `variants`
/// (with its tolerance) against the CPU twin.
fn check_group_mass(
    g: &mut CudaBackend,
    c: &CpuBackend,
    rng: &mut TestRng,
    s: AttnShape,
    groups: &KeyGroups,
    what: &str,
    variants: &[(AttnKernel, f64)],
) {
    let (q, k, v) = (
        rng.vec(s.tq * s.heads * s.head_dim, 1.0),
        rng.vec(s.tk * s.kv_heads * s.head_dim, 1.0),
        rng.vec(s.tk * s.kv_heads * s.head_dim, 1.0),
    );
    let (oc, mc) = c.attention(&q, &k, &v, s, Some(groups));
    let mc = mc.expect("groups given");
    for &(variant, tol) in variants {
        g.set_attention(variant);
        let (og, mg) = g.attention(&g.upload(&q), &g.upload(&k), &g.upload(&v), s, Some(groups));
        let name = format!("attention {variant:?} tq={} {what}", s.tq);
        check(&name, &g.download(&og), &oc, tol);
        check(&format!("{name} mass"), &mg.expect("groups given"), &mc, tol);
    }
}

/// Select's groups, one launch each: pic-in-pic (the whole 24×24 image, and its 16×16 centre as 16
/// ranges of one group) and a grid cell (3×3 collage: 8 patch rows of 8), at prefill and decode
/// sizes, every variant against the CPU twin.
#[test]
fn attention_mass_of_grid_and_pip_groups() {
    let Some(mut g) = gpu() else { return };
    let c = CpuBackend::new();
    let mut rng = TestRng(13);
    let (tk, heads, kv, d) = (700, 8, 2, 128);
    let image = (35, 35 + 576); // after a short text prefix, as in a prompt
    let region = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        let mut r = vec![(image.0, image.1, 0)];
        r.extend(rows.map(|row| (image.0 + row * 24 + cols.start, image.0 + row * 24 + cols.end, 1)));
        KeyGroups::new(&r, 2).unwrap()
    };
    let pip = region(4..20, 4..20);
    let cell = region(8..16, 16..24); // block 6 of a 3×3 collage
                                      // plain: f32 throughout; the tensor-core variants: bf16 probabilities (module comment); the
                                      // masses are sums of those probabilities, bounded by 1
    let mut variants = vec![(AttnKernel::Plain, F32_TOL)];
    variants.extend(tensor_core_variants(&g));
    for (what, groups) in [("pip", &pip), ("grid cell", &cell)] {
        for tq in [1, 3, 200] {
            let s = decode_shape(tq, tk, heads, kv, d);
            check_group_mass(&mut g, &c, &mut rng, s, groups, what, &variants);
        }
    }
}

/// The natural log-sum-exp per (row, head) of the scaled scores over the visible keys, in f64: what
/// the fused forwards hand to the backward. (tq, heads)
fn lse_reference(q: &[f32], k: &[f32], s: AttnShape) -> Vec<f32> {
    let (d, group) = (s.head_dim, s.heads / s.kv_heads);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; s.tq * s.heads];
    for i in 0..s.tq {
        let qpos = s.q_pos0 + i;
        for h in 0..s.heads {
            let qr = &q[(i * s.heads + h) * d..][..d];
            let kvh = h / group;
            let scores: Vec<f64> = (0..s.tk)
                .filter(|&j| {
                    let in_hole = s
                        .hole
                        .is_some_and(|(first, a, b)| qpos >= first && j >= a && j < b);
                    !in_hole && (!s.causal || j <= qpos)
                })
                .map(|j| {
                    let kr = &k[(j * s.kv_heads + kvh) * d..][..d];
                    scale * qr.iter().zip(kr).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            out[i * s.heads + h] = (m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32;
        }
    }
    out
}

/// Variants 4 to 6 (wgmma, sm_90a) against the CPU twin where their tiles meet the edges: fewer rows than a
/// warpgroup or a block (77, 130), key counts that are no multiple of the 64- or 128-key tiles,
/// queries after a prefix (q_pos0), the DPO hole across and along tile edges, causal and
/// bidirectional, head dims 64 and 128, GQA 1 and 4; both tile widths, with and without the mass
/// output, and the log-sum-exp against an f64 reference and through variant 2's backward. Queries
/// are scaled up (scores of a few units) so that the running maximum moves between tiles.
#[test]
fn attention_wgmma_variant_4() {
    let Some(mut g) = gpu() else { return };
    if !test_variant_4(&g) {
        eprintln!(
            "skipped: variant 4 (wgmma) needs sm_90a and MIADPO_TEST_NO_WGMMA unset; this GPU is {}",
            g.device()
        );
        return;
    }
    let c = CpuBackend::new();
    let mut rng = TestRng(17);
    // (tq, tk, heads, kv heads, d, causal, hole, f64 log-sum-exp and backward checked)
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        Option<(usize, usize, usize)>,
        bool,
    );
    let cases: [Case; 9] = [
        (77, 77, 4, 4, 64, true, None, true),
        (77, 77, 4, 1, 128, false, None, true),
        (130, 700, 8, 2, 128, true, None, true),
        (200, 777, 4, 4, 64, false, Some((650, 100, 300)), true),
        (1000, 1000, 4, 4, 64, true, Some((600, 200, 450)), true),
        (640, 640, 8, 8, 128, false, Some((300, 128, 384)), true),
        (515, 515, 4, 1, 128, true, Some((400, 300, 400)), false),
        (2048, 2048, 8, 2, 64, true, None, false),
        (4096, 4096, 4, 4, 64, false, None, false),
    ];
    for (tq, tk, heads, kv, d, causal, hole, deep) in cases {
        let s = AttnShape {
            tq,
            tk,
            heads,
            kv_heads: kv,
            head_dim: d,
            causal,
            q_pos0: tk - tq,
            hole,
        };
        let (q, k, v) = (
            rng.vec(tq * heads * d, 3.0),
            rng.vec(tk * kv * d, 1.0),
            rng.vec(tk * kv * d, 1.0),
        );
        // group 0: a range inside the first 64-key tile and one across tile edges; 1: the rest up to
        // the end; 2: every key
        let (t3, t5) = (tk / 3, tk / 2 + tk / 8);
        let ranges = [(5, 20, 0), (t3, t5, 0), (t5 + 1, tk, 1), (0, tk, 2)];
        let groups = KeyGroups::new(&ranges, 3).unwrap();
        let (qg, kg, vg) = (g.upload(&q), g.upload(&k), g.upload(&v));
        let (oc, mc) = c.attention(&q, &k, &v, s, Some(&groups));
        let mc = mc.unwrap();
        let name = format!(
            "t={tq}/{tk} h={heads}/{kv} d={d} {}{}",
            if causal { "causal" } else { "bidir" },
            if hole.is_some() { " hole" } else { "" }
        );
        // the f64 log-sum-exp and the CPU backward (the CPU's output as `o`: the check is of the
        // backward given variant 4's log-sum-exp)
        let deep_ref = deep.then(|| {
            let dout = rng.vec(tq * heads * d, 1.0);
            let grads = c.attention_backward(&q, &k, &v, &oc, &dout, None, s);
            (lse_reference(&q, &k, s), dout, grads)
        });
        for variant in wgmma_variants(&g) {
            g.set_attention(variant);
            let (og, mg) = g.attention(&qg, &kg, &vg, s, Some(&groups));
            let what = format!("attention {variant:?} {name}");
            // bf16 operands on the tensor cores (module comment)
            check(&what, &g.download(&og), &oc, GEMM_TOL);
            check(&format!("{what} mass"), &mg.unwrap(), &mc, GEMM_TOL);
            let (og, none) = g.attention(&qg, &kg, &vg, s, None);
            assert!(none.is_none());
            check(&format!("{what} no mass"), &g.download(&og), &oc, GEMM_TOL);
            let (ot, lse) = g.attention_train(&qg, &kg, &vg, s);
            let what = format!("attention_train {variant:?} {name}");
            check(&what, &g.download(&ot), &oc, GEMM_TOL);
            let lse = lse.expect("variant 4 writes the log-sum-exp");
            if let Some((lse_ref, dout, (cq, ck, cv))) = &deep_ref {
                // scores from bf16 Q and K: ~1e-3 of a few units, against a log-sum-exp of ~log(tk)
                check(&format!("{what} lse"), &g.download(&lse), lse_ref, GEMM_TOL);
                let (og, dg) = (g.upload(&oc), g.upload(dout));
                let (dq, dk, dv) = g.attention_backward(&qg, &kg, &vg, &og, &dg, Some(&lse), s);
                let what = format!("attention backward {variant:?} {name} lse given");
                check(&format!("{what} dq"), &g.download(&dq), cq, GEMM_TOL);
                check(&format!("{what} dk"), &g.download(&dk), ck, GEMM_TOL);
                check(&format!("{what} dv"), &g.download(&dv), cv, GEMM_TOL);
            }
        }
    }
}

/// The vision tower's attention over several images in one call (`transpose_rows` side by side,
/// each image's heads as heads of their own, and back) against one call per image, on the GPU, for
/// every tensor-core variant and the plain kernel: bit for bit, as each head's rows are computed
/// alone either way (CLIP-B/14 at 224 px: 257 rows, 12 heads of 64; five images).
#[test]
fn attention_of_images_side_by_side_equals_one_call_per_image() {
    let Some(mut g) = gpu() else { return };
    let mut rng = TestRng(21);
    let dims = (5, 257, 12, 64); // images, rows, heads, head dim
    let len = dims.0 * dims.1 * dims.2 * dims.3;
    let (q, k, v) = (
        g.upload(&rng.vec(len, 1.0)),
        g.upload(&rng.vec(len, 1.0)),
        g.upload(&rng.vec(len, 1.0)),
    );
    let mut variants = vec![AttnKernel::Plain];
    variants.extend(tensor_core_variants(&g).into_iter().map(|(k, _)| k));
    for variant in variants {
        g.set_attention(variant);
        let (together, apart) = common::images_attention_two_ways(&g, (&q, &k, &v), dims);
        check(
            &format!("{variant:?}: {} images side by side", dims.0),
            &together,
            &apart,
            0.0,
        );
    }
}
