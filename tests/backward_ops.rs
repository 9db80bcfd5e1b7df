//! Every backward op of the CPU backend against central finite differences of its forward.
//!
//! For an op y = f(x) and a random upstream gradient w, the backward gives g = ∂(w·y)/∂x; we check
//! g·v against (L(x + εv) − L(x − εv)) / 2ε along a random direction v, with L = w·f(x) accumulated
//! in f64. The forward ops are f32 (the backend's only compute type), so the difference quotient
//! carries ~1e-7·|L|/ε of rounding; ε = 1e-2 keeps that and the O(ε²) curvature term near 1e-4
//! relative, and the checks allow 2e-3. Inputs are random and non-zero, with odd sizes.
mod common;

use common::TestRng;
use miadpo::backend::cpu::CpuBackend;
use miadpo::backend::{AttnShape, Backend};
use miadpo::model::config::Activation;
use miadpo::model::weights::Tensor;

const EPS: f32 = 1e-2;
/// see the module comment
const TOL: f64 = 2e-3;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Checks `grad` (∂(w·f)/∂x at x) along a random direction.
fn check(name: &str, x: &[f32], w: &[f32], grad: &[f32], f: impl Fn(&[f32]) -> Vec<f32>, rng: &mut TestRng) {
    assert_eq!(grad.len(), x.len(), "{name}: gradient shape");
    let v = rng.vec(x.len(), 1.0);
    let at = |s: f32| {
        let xs: Vec<f32> = x.iter().zip(&v).map(|(x, v)| x + s * EPS * v).collect();
        dot(&f(&xs), w)
    };
    let numeric = (at(1.0) - at(-1.0)) / (2.0 * EPS as f64);
    common::assert_directional(name, grad, &v, numeric, TOL);
}

fn mat(be: &CpuBackend, name: &str, rows: usize, cols: usize, data: &[f32]) -> miadpo::backend::cpu::CpuMat {
    let t = Tensor::from_f32(name, vec![rows, cols], data, std::path::Path::new("<test>")).unwrap();
    be.matrix(&t).unwrap()
}

#[test]
fn linear_backward_is_the_input_gradient() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(1));
    // 37 rows: the sgemm path (more than DOT_ROWS); 3 rows: the decode-sized dot path
    for m in [37, 3] {
        let (n, k) = (45, 29);
        let wd = rng.vec(n * k, 0.3);
        let w = mat(&be, "w", n, k, &wd);
        let x = rng.vec(m * k, 1.0);
        let up = rng.vec(m * n, 1.0);
        let dx = be.linear_backward(&up, m, &w);
        check(
            &format!("linear m={m}"),
            &x,
            &up,
            &dx,
            |x| be.linear(&x.to_vec(), m, &w, None),
            &mut rng,
        );
    }
}

#[test]
fn matmul_tn_acc_accumulates_a_transposed_product() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(2));
    let (k, m, n) = (19, 7, 33);
    let (a, b) = (rng.vec(k * m, 1.0), rng.vec(k * n, 1.0));
    let g0 = rng.vec(m * n, 1.0);
    let mut g = g0.clone();
    be.matmul_tn_acc(&mut g, 0.5, &a, &b, k, m, n);
    for i in 0..m {
        for j in 0..n {
            let want = g0[i * n + j] as f64
                + 0.5
                    * (0..k)
                        .map(|r| a[r * m + i] as f64 * b[r * n + j] as f64)
                        .sum::<f64>();
            // a 19-term f32 sum: a few ulp of the largest term
            assert!(
                (g[i * n + j] as f64 - want).abs() < 1e-5,
                "({i}, {j}): {} vs {want}",
                g[i * n + j]
            );
        }
    }
}

#[test]
fn rms_norm_backward() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(3));
    let (rows, d) = (5, 24);
    let x = rng.vec(rows * d, 1.5);
    let w = rng.vec(d, 1.0);
    let up = rng.vec(rows * d, 1.0);
    let dx = be.rms_norm_backward(&x, d, &w, &up, 1e-5);
    check(
        "rms_norm",
        &x,
        &up,
        &dx,
        |x| be.rms_norm(&x.to_vec(), d, &w, 1e-5),
        &mut rng,
    );
}

#[test]
fn rope_backward_is_the_inverse_rotation() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(4));
    let (heads, hd) = (3, 8);
    let positions = [0, 1, 7, 300, 4095];
    let x = rng.vec(positions.len() * heads * hd, 1.0);
    let up = rng.vec(x.len(), 1.0);
    let mut dx = up.clone();
    be.rope_backward(&mut dx, heads, hd, &positions, 10000.0);
    let f = |x: &[f32]| {
        let mut y = x.to_vec();
        be.rope(&mut y, heads, hd, &positions, 10000.0);
        y
    };
    check("rope", &x, &up, &dx, f, &mut rng);
}

#[test]
fn swiglu_backward() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(5));
    let n = 5000; // more than one parallel chunk
    let (g, u, up) = (rng.vec(n, 3.0), rng.vec(n, 2.0), rng.vec(n, 1.0));
    let (dg, du) = be.swiglu_backward(&g, &u, &up);
    let mid = |g: &[f32], u: &[f32]| {
        let mut m = g.to_vec();
        be.activation(&mut m, Activation::Silu);
        be.mul(&mut m, &u.to_vec());
        m
    };
    check("swiglu d gate", &g, &up, &dg, |g| mid(g, &u), &mut rng);
    check("swiglu d up", &u, &up, &du, |u| mid(&g, u), &mut rng);
}

#[test]
fn attention_backward_causal_and_not_with_gqa() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(6));
    // 70 rows: two query blocks of the backward, the second partial; 4 heads over 2 or 4 kv heads
    // and the prefix-shared DPO mask: rows from 45 on do not see keys 30..45
    for (causal, kv_heads, hole) in [
        (true, 2, None),
        (false, 2, None),
        (true, 4, None),
        (true, 2, Some((45, 30, 45))),
    ] {
        let (t, heads, d) = (70, 4, 8);
        let s = AttnShape {
            tq: t,
            tk: t,
            heads,
            kv_heads,
            head_dim: d,
            causal,
            q_pos0: 0,
            hole,
        };
        let q = rng.vec(t * heads * d, 1.0);
        let k = rng.vec(t * kv_heads * d, 1.0);
        let v = rng.vec(t * kv_heads * d, 1.0);
        let up = rng.vec(t * heads * d, 1.0);
        let (out, _) = be.attention(&q, &k, &v, s, None);
        let (dq, dk, dv) = be.attention_backward(&q, &k, &v, &out, &up, None, s);
        let name = format!("attention causal={causal} kv_heads={kv_heads} hole={hole:?}");
        if let Some((first, a, b)) = hole {
            // a row past the hole puts no probability on it: its output ignores v there
            let mut v2 = v.clone();
            v2[a * kv_heads * d..b * kv_heads * d]
                .iter_mut()
                .for_each(|x| *x += 1.0);
            let (out2, _) = be.attention(&q, &k, &v2, s, None);
            let row = |o: &[f32], i: usize| o[i * heads * d..(i + 1) * heads * d].to_vec();
            assert_eq!(
                row(&out, first + 3),
                row(&out2, first + 3),
                "{name}: the hole is not seen"
            );
            assert_ne!(
                row(&out, first - 1),
                row(&out2, first - 1),
                "{name}: rows before it see it"
            );
        }
        let att =
            |q: &[f32], k: &[f32], v: &[f32]| be.attention(&q.to_vec(), &k.to_vec(), &v.to_vec(), s, None).0;
        check(&format!("{name} dq"), &q, &up, &dq, |x| att(x, &k, &v), &mut rng);
        check(&format!("{name} dk"), &k, &up, &dk, |x| att(&q, x, &v), &mut rng);
        check(&format!("{name} dv"), &v, &up, &dv, |x| att(&q, &k, x), &mut rng);
    }
}

#[test]
fn fused_logprobs_match_the_full_logits_and_their_gradient() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(7));
    // 70 rows: two blocks of LOGIT_ROWS
    let (rows, h, vocab) = (70, 16, 301);
    let w = mat(&be, "lm_head", vocab, h, &rng.vec(vocab * h, 0.5));
    let hidden = rng.vec(rows * h, 1.0);
    let targets: Vec<u32> = (0..rows).map(|i| (i * 37 % vocab) as u32).collect();
    let (lp, lse) = be.fused_logprobs(&hidden, rows, &w, &targets);
    let full = be.token_logprobs(&be.linear(&hidden, rows, &w, None), vocab, &targets);
    // a block of at most 16 rows takes the fused dot path of `linear` rather than sgemm: the same
    // values up to f32 summation order (|logit| ≲ 10, 16 terms: a few 1e-6)
    let e = common::rel_err_inf(&lp, &full);
    assert!(e < 1e-5, "fused vs full log-probs: {e:.2e}");
    let up = rng.vec(rows, 1.0);
    let dh = be.fused_logprobs_backward(&hidden, rows, &w, &targets, &lse, &up);
    check(
        "fused_logprobs",
        &hidden,
        &up,
        &dh,
        |x| be.fused_logprobs(&x.to_vec(), rows, &w, &targets).0,
        &mut rng,
    );
}

#[test]
fn dropout_keeps_about_1_minus_p_and_repeats_its_mask() {
    let be = CpuBackend::new();
    let x: Vec<f32> = (0..20000).map(|i| 1.0 + (i % 7) as f32).collect();
    let y = be.dropout(&x, 0.25, 42);
    assert_eq!(y, be.dropout(&x, 0.25, 42), "same key, same mask");
    assert_ne!(y, be.dropout(&x, 0.25, 43), "another key, another mask");
    let kept = y.iter().filter(|v| **v != 0.0).count() as f64 / x.len() as f64;
    // binomial: σ = √(0.25·0.75/20000) ≈ 0.003, so ±0.015 is 5σ
    assert!((kept - 0.75).abs() < 0.015, "kept {kept}");
    for (a, b) in x.iter().zip(&y) {
        assert!(
            *b == 0.0 || (*b - a / 0.75).abs() <= 1e-6 * b.abs(),
            "kept values are scaled by 1/(1-p)"
        );
    }
}

/// The column blocks the backward converts are the same values as whole-tensor conversion, for the
/// bf16 weights of the GQA fixture.
#[test]
fn block_conversion_matches_whole_tensor_conversion() {
    let dir = common::fixture("tiny-llava-gqa").join("model");
    let store = miadpo::model::weights::WeightStore::open_dir(&dir).unwrap();
    let name = store
        .names()
        .find(|n| n.ends_with("layers.0.mlp.down_proj.weight"))
        .unwrap()
        .to_string();
    let t = store.get(&name).unwrap();
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    let all = t.to_f32();
    let (c0, c1) = (3, cols - 5);
    let mut block = vec![0f32; (rows - 2) * (c1 - c0)];
    t.block_f32(1, rows - 1, c0, c1, &mut block);
    for (r, row) in block.chunks_exact(c1 - c0).enumerate() {
        assert_eq!(row, &all[(r + 1) * cols + c0..(r + 1) * cols + c1]);
    }
}

#[test]
fn rms_norm_weight_gradient() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(8));
    let (rows, d) = (5, 24);
    let x = rng.vec(rows * d, 1.5);
    let w = rng.vec(d, 1.0);
    let up = rng.vec(rows * d, 1.0);
    let dw = be.rms_norm_weight_grad(&x, d, &up, 1e-5);
    check(
        "rms_norm weight",
        &w,
        &up,
        &dw,
        |w| be.rms_norm(&x, d, &w.to_vec(), 1e-5),
        &mut rng,
    );
}

#[test]
fn activation_backward_for_every_activation() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(9));
    let x = rng.vec(300, 3.0);
    let up = rng.vec(300, 1.0);
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
    ] {
        let dx = be.activation_backward(&x, &up, act);
        let f = |x: &[f32]| {
            let mut y = x.to_vec();
            be.activation(&mut y, act);
            y
        };
        check(&format!("activation {act:?}"), &x, &up, &dx, f, &mut rng);
    }
}

#[test]
fn col_sum_and_scatter_add_rows_add_up() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(10));
    let x = rng.vec(7 * 5, 1.0);
    let s = be.col_sum(&x, 7, 5);
    for c in 0..5 {
        let want: f32 = (0..7).map(|r| x[r * 5 + c]).sum();
        assert!((s[c] - want).abs() < 1e-6);
    }
    let mut g = rng.vec(4 * 3, 1.0);
    let g0 = g.clone();
    let src = rng.vec(3 * 3, 1.0);
    be.scatter_add_rows(&mut g, 3, &[2, 0, 2], &src);
    for i in 0..3 {
        assert_eq!(g[i], g0[i] + src[3 + i], "row 0 gets source row 1");
        assert_eq!(g[3 + i], g0[3 + i], "row 1 untouched");
        assert!(
            (g[6 + i] - (g0[6 + i] + src[i] + src[6 + i])).abs() < 1e-6,
            "row 2 gets rows 0 and 2"
        );
    }
}

#[test]
fn lm_head_weight_gradient() {
    let (be, mut rng) = (CpuBackend::new(), TestRng(11));
    // 70 rows: two blocks
    let (rows, h, vocab) = (70, 8, 53);
    let wd = rng.vec(vocab * h, 0.5);
    let hidden = rng.vec(rows * h, 1.0);
    let targets: Vec<u32> = (0..rows).map(|i| (i * 37 % vocab) as u32).collect();
    let w = mat(&be, "lm_head", vocab, h, &wd);
    let (_, lse) = be.fused_logprobs(&hidden, rows, &w, &targets);
    let up = rng.vec(rows, 1.0);
    let mut g = vec![0f32; vocab * h];
    be.fused_logprobs_weight_grad(&hidden, rows, &w, &targets, &lse, &up, &mut g);
    let f = |wv: &[f32]| {
        be.fused_logprobs(&hidden, rows, &mat(&be, "lm_head", vocab, h, wv), &targets)
            .0
    };
    check("fused_logprobs weight", &wd, &up, &g, f, &mut rng);
}
