//! The CPU reference backend: f32 compute, weights read in their stored dtype, rayon over output
//! tiles, matrix products by `matrixmultiply`'s sgemm (runtime-detected AVX/FMA kernels).
use std::borrow::Cow;

use rayon::prelude::*;

use super::{AttnShape, Backend, KeyGroups};
use crate::model::config::Activation;
use crate::model::weights::{DType, Tensor};
use crate::{Error, Result};

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// A checkpoint matrix, still in its mmapped stored dtype: (rows, cols).
#[derive(Clone)]
pub struct CpuMat {
    t: Tensor,
    rows: usize,
    cols: usize,
}

impl CpuMat {
    /// The whole matrix in f32, row-major (rows, cols).
    pub fn to_f32(&self) -> Vec<f32> {
        self.t.to_f32()
    }
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// A raw pointer handed to rayon tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not its raw field.
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer the pointer was taken from.
        unsafe { self.0.add(i) }
    }
}

/// Products with at most this many rows (decode steps of up to 16 sequences) take the fused
/// convert-and-dot path: each output element is then computed by the same code whatever the batch, so
/// batched greedy decoding gives bit-identical tokens to one sequence at a time.
pub const DOT_ROWS: usize = 16;

/// Attention blocks of at most this many query rows (decode steps) use dot products over the cache
/// instead of sgemm, which would first copy (pack) the whole cache of the head.
const DECODE_ROWS: usize = 4;

/// Rows of logits the fused log-prob ops hold at once: (64, vocab) f32 is 8 MB for a 32k vocabulary.
const LOGIT_ROWS: usize = 64;

/// Output features per rayon task: a few tasks per thread so the threads stay balanced, and enough
/// columns that sgemm's packing of x is amortised.
fn col_block(n: usize, m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    if m <= DOT_ROWS {
        // streaming weights: small tiles keep the threads balanced
        n.div_ceil(threads * 2).next_multiple_of(16).clamp(16, 64)
    } else {
        // sgemm packs all of x for every tile: one tile per thread packs it least often
        n.div_ceil(threads).next_multiple_of(16).max(16)
    }
}

/// e^x in f32 to ~2 ulp (Cephes' expf: range reduction by ln 2 in two parts, degree-6 polynomial,
/// scaling by 2^n through the exponent bits). Plain arithmetic, so loops over it vectorise; libm's
/// expf is a call per element.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4; // x - n·ln2, ln2 split in a high and a low part
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 5e-1);
    let y = (p * r).mul_add(r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// x[i] = f(x[i]) over rayon chunks, compiled for AVX2+FMA where the CPU has them so that `f`
/// (plain arithmetic) vectorises.
fn map_in_place<F: Fn(f32) -> f32 + Sync + Send + Copy>(x: &mut [f32], f: F) {
    x.par_chunks_mut(4096).for_each(|c| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected at run time.
                return unsafe { map_avx2(c, f) };
            }
        }
        c.iter_mut().for_each(|v| *v = f(*v));
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_avx2<F: Fn(f32) -> f32>(x: &mut [f32], f: F) {
    x.iter_mut().for_each(|v| *v = f(*v));
}

/// The scores of one (head, query block): p (rows, tk) = q[i0..i0+rows, head h] · k[..tk, kv head kvh]ᵀ
/// / √D, through sgemm (forward and backward compute them the same way).
fn head_scores(
    q: &[f32],
    k: &[f32],
    s: &AttnShape,
    (h, kvh): (usize, usize),
    (i0, rows, tk): (usize, usize, usize),
    p: &mut [f32],
) {
    let d = s.head_dim;
    let (qs, ks) = (s.heads * d, s.kv_heads * d);
    assert!(
        q.len() >= (i0 + rows) * qs && k.len() >= tk * ks && p.len() >= rows * tk,
        "head_scores: shapes"
    );
    // SAFETY: q rows i0..i0+rows at column h·d (row stride qs); k (tk, kv_heads·d) read transposed
    // at column kvh·d; p is (rows, tk) contiguous — all inside the buffers checked above.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            d,
            tk,
            1.0 / (d as f32).sqrt(),
            q.as_ptr().add(i0 * qs + h * d),
            qs as isize,
            1,
            k.as_ptr().add(kvh * d),
            1,
            ks as isize,
            0.0,
            p.as_mut_ptr(),
            tk as isize,
            1,
        )
    };
}

/// The keys `[start, end)` that query row `i` of an attention call must not see, if any.
fn hole_of(s: &AttnShape, i: usize) -> Option<(usize, usize)> {
    s.hole
        .filter(|&(first, _, _)| s.q_pos0 + i >= first)
        .map(|(_, a, b)| (a, b))
}

/// Softmax of the scores `row[..visible]` except the keys of `hole`, which get probability 0, as do
/// `row[visible..]`. The visible keys are first packed together, so the probabilities are the same
/// bits as the same keys laid out without the hole (the prefix-shared DPO layout then equals the
/// two-sequence one).
fn softmax_visible(row: &mut [f32], visible: usize, hole: Option<(usize, usize)>) {
    match hole {
        Some((a, b)) if a < visible => {
            let b = b.min(visible);
            let n = visible - (b - a);
            row.copy_within(b..visible, a);
            softmax_in_place(&mut row[..n]);
            row.copy_within(a..n, b);
            row[a..b].fill(0.0);
        }
        _ => softmax_in_place(&mut row[..visible]),
    }
    row[visible..].fill(0.0);
}

/// Numerically stable softmax of one row, in place.
fn softmax_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return unsafe { softmax_avx2(x) };
        }
    }
    softmax_portable(x)
}

#[inline(always)]
fn softmax_portable(x: &mut [f32]) {
    let mx = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    x.iter_mut().for_each(|v| *v = fast_exp(*v - mx));
    // 8 partial sums: the additions vectorise and the rounding stays that of a short tree
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let inv = 1.0 / (acc.iter().sum::<f32>() + tail);
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32]) {
    softmax_portable(x)
}

/// `x · w` where `w` holds `x.len()` weights of one dtype as little-endian bytes, any alignment.
type DotFn = fn(&[f32], &[u8]) -> f32;

/// The fastest dot product for weights of `dtype` on this CPU (AVX2+FMA+F16C when detected).
fn dot_fn(dtype: DType) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return match dtype {
                // SAFETY (all three): the features were detected just above.
                DType::F16 => |x, w| unsafe { simd::dot(x, w, DType::F16) },
                DType::BF16 => |x, w| unsafe { simd::dot(x, w, DType::BF16) },
                DType::F32 => |x, w| unsafe { simd::dot(x, w, DType::F32) },
            };
        }
    }
    match dtype {
        DType::F16 => |x, w| dot_portable(x, w, DType::F16),
        DType::BF16 => |x, w| dot_portable(x, w, DType::BF16),
        DType::F32 => |x, w| dot_portable(x, w, DType::F32),
    }
}

/// Stored weight `i` of `w` as f32.
#[inline(always)]
fn weight_at(w: &[u8], i: usize, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32(),
        DType::BF16 => half::bf16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32(),
        DType::F32 => f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]),
    }
}

fn dot_portable(x: &[f32], w: &[u8], dtype: DType) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.len() / 8;
    for c in 0..chunks {
        for (l, a) in acc.iter_mut().enumerate() {
            let i = c * 8 + l;
            *a = x[i].mul_add(weight_at(w, i, dtype), *a);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (i, xi) in x.iter().enumerate().skip(chunks * 8) {
        s += xi * weight_at(w, i, dtype);
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::weight_at;
    use crate::model::weights::DType;

    /// 8 weights starting at element `i`, as f32 lanes.
    #[inline(always)]
    unsafe fn load8(w: *const u8, i: usize, dtype: DType) -> __m256 {
        match dtype {
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i) as *const __m128i)),
            DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(w.add(2 * i) as *const __m128i)),
                16,
            )),
            DType::F32 => _mm256_loadu_ps(w.add(4 * i) as *const f32),
        }
    }

    /// Fused convert-and-dot with four independent FMA chains.
    /// SAFETY: the CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(x: &[f32], w: &[u8], dtype: DType) -> f32 {
        let k = x.len();
        assert!(w.len() >= k * dtype.size(), "weight row shorter than x");
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= k {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), load8(wp, o, dtype), *a);
            }
            i += 32;
        }
        while i + 8 <= k {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), load8(wp, i, dtype), acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        let mut s: f32 = lanes.iter().sum();
        for (j, xi) in x.iter().enumerate().skip(i) {
            s += xi * weight_at(w, j, dtype);
        }
        s
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }

    /// ∂(Σ dlogp·logp)/∂logits of the block of rows starting at `r0` (hidden rows `hb`):
    /// dlogp ⊙ (onehot(target) − exp(logits − lse)), (block, vocab), the logits recomputed.
    fn dlogits_block(
        &self,
        hb: &[f32],
        r0: usize,
        w: &CpuMat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
    ) -> Vec<f32> {
        let (vocab, h) = (w.rows, w.cols);
        let mut dl = self.linear(&hb.to_vec(), hb.len() / h, w, None);
        dl.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
            let (g, z, t) = (dlogp[r0 + i], lse[r0 + i], targets[r0 + i] as usize);
            row.iter_mut().for_each(|l| *l = -g * fast_exp(*l - z));
            row[t] += g;
        });
        dl
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Mat = CpuMat;
    type Kv = Vec<f32>;
    const KV_BYTES: usize = 4;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn hardware(&self) -> String {
        crate::bench::cpu_model()
    }

    fn upload(&self, x: &[f32]) -> Vec<f32> {
        x.to_vec()
    }

    fn download(&self, x: &Vec<f32>) -> Vec<f32> {
        x.clone()
    }

    fn len(&self, x: &Vec<f32>) -> usize {
        x.len()
    }

    fn matrix(&self, t: &Tensor) -> Result<CpuMat> {
        let shape = t.shape();
        if shape.is_empty() {
            return Err(Error::tensor(
                t.file(),
                t.name(),
                "expected a matrix, found a scalar",
            ));
        }
        let rows = shape[0];
        let cols = shape[1..].iter().product::<usize>();
        Ok(CpuMat {
            t: t.clone(),
            rows,
            cols,
        })
    }

    fn mat_shape(&self, m: &CpuMat) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn linear(&self, x: &Vec<f32>, m: usize, w: &CpuMat, bias: Option<&Vec<f32>>) -> Vec<f32> {
        let (n, k) = (w.rows, w.cols);
        assert_eq!(x.len(), m * k, "linear: x is not ({m}, {k})");
        let mut out = vec![0f32; m * n]; // (m, n)
        let nb = col_block(n, m);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let dot = dot_fn(w.t.dtype());
        let size = w.t.dtype().size();
        (0..n.div_ceil(nb))
            .into_par_iter()
            .for_each_init(Vec::new, |wf, bi| {
                let (n0, n1) = (bi * nb, ((bi + 1) * nb).min(n));
                if m <= DOT_ROWS {
                    // decode-sized: one fused convert-and-dot pass over each stored weight row (read once,
                    // dotted with every row of x while it is in L1)
                    let rows = &w.t.bytes()[n0 * k * size..n1 * k * size];
                    for (j, wr) in rows.chunks_exact(k * size).enumerate() {
                        for r in 0..m {
                            // SAFETY: task bi alone writes columns [n0, n1) of out.
                            unsafe { *out_ptr.at(r * n + n0 + j) = dot(&x[r * k..(r + 1) * k], wr) };
                        }
                    }
                } else {
                    wf.resize((n1 - n0) * k, 0.0);
                    w.t.rows_f32(n0, n1, wf); // (n1-n0, k) in f32
                                              // SAFETY: x, wf and the (m, n1-n0) column block of out (row stride n) are in bounds;
                                              // task bi alone writes columns [n0, n1).
                    unsafe {
                        matrixmultiply::sgemm(
                            m,
                            k,
                            n1 - n0,
                            1.0,
                            x.as_ptr(),
                            k as isize,
                            1,
                            wf.as_ptr(),
                            1,
                            k as isize,
                            0.0,
                            out_ptr.at(n0),
                            n as isize,
                            1,
                        )
                    };
                }
            });
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "linear: bias length");
            out.par_chunks_mut(n)
                .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
        out
    }

    fn embed(&self, ids: &[u32], table: &CpuMat) -> Vec<f32> {
        let d = table.cols;
        let mut out = vec![0f32; ids.len() * d]; // (len, d)
        for (row, &id) in out.chunks_exact_mut(d).zip(ids) {
            let id = id as usize;
            assert!(
                id < table.rows,
                "token id {id} outside the embedding table ({})",
                table.rows
            );
            table.t.rows_f32(id, id + 1, row);
        }
        out
    }

    fn layer_norm(&self, x: &Vec<f32>, d: usize, w: &Vec<f32>, b: &Vec<f32>, eps: f32) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xr)| {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                o[i] = (xr[i] - mean) * inv * w[i] + b[i];
            }
        });
        out
    }

    fn rms_norm(&self, x: &Vec<f32>, d: usize, w: &Vec<f32>, eps: f32) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for i in 0..d {
                o[i] = w[i] * (xr[i] * inv);
            }
        });
        out
    }

    fn activation(&self, x: &mut Vec<f32>, act: Activation) {
        match act {
            Activation::QuickGelu => map_in_place(x, |v| v / (1.0 + fast_exp(-1.702 * v))),
            Activation::Gelu => map_in_place(x, |v| 0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2))),
            Activation::GeluTanh => map_in_place(x, |v| {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            }),
            Activation::Silu => map_in_place(x, |v| v / (1.0 + fast_exp(-v))),
        }
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) {
        assert_eq!(x.len(), y.len());
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    }

    fn axpy(&self, x: &mut Vec<f32>, alpha: f32, y: &Vec<f32>) {
        assert_eq!(x.len(), y.len());
        x.iter_mut().zip(y).for_each(|(a, b)| *a += alpha * b);
    }

    fn mul(&self, x: &mut Vec<f32>, y: &Vec<f32>) {
        assert_eq!(x.len(), y.len());
        x.iter_mut().zip(y).for_each(|(a, b)| *a *= b);
    }

    fn rope(&self, x: &mut Vec<f32>, heads: usize, head_dim: usize, positions: &[usize], theta: f64) {
        rotate(x, heads, head_dim, positions, theta, 1.0);
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: AttnShape,
        groups: Option<&KeyGroups>,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let d = s.head_dim;
        let (qs, ks) = (s.heads * d, s.kv_heads * d); // row strides of q/out and of k/v
        assert_eq!(q.len(), s.tq * qs, "attention: q shape");
        assert_eq!(k.len(), s.tk * ks, "attention: k shape");
        assert_eq!(v.len(), s.tk * ks, "attention: v shape");
        let group = s.heads / s.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let n_groups = groups.map_or(0, |gr| gr.n_groups());
        // Tasks are (head, block of QB query rows): the score matrix of one task is (QB, tk), so memory
        // grows linearly with the sequence, and a causal block only reads the keys it can see.
        const QB: usize = 64;
        let blocks = s.tq.div_ceil(QB);
        let mut out = vec![0f32; s.tq * qs]; // (tq, heads·d)
        let out_ptr = SendPtr(out.as_mut_ptr());
        // per task: (first row, group masses (rows, n_groups)) for the head average below
        let masses: Vec<(usize, Vec<f32>)> = (0..s.heads * blocks)
            .into_par_iter()
            .map(|task| {
                let (h, bi) = (task / blocks, task % blocks);
                let kvh = h / group;
                let (i0, i1) = (bi * QB, ((bi + 1) * QB).min(s.tq));
                let rows = i1 - i0;
                let tk = if s.causal { (s.q_pos0 + i1).min(s.tk) } else { s.tk };
                let mut p = vec![0f32; rows * tk]; // (rows, tk) scores, then probabilities
                if rows <= DECODE_ROWS {
                    // decode: a dot product per key row, no packing of the whole cache for sgemm
                    let dot = dot_fn(DType::F32);
                    for (r, pr) in p.chunks_exact_mut(tk).enumerate() {
                        let qr = &q[(i0 + r) * qs + h * d..][..d];
                        for (j, pj) in pr.iter_mut().enumerate() {
                            let kj: &[f32] = &k[j * ks + kvh * d..][..d];
                            *pj = scale * dot(qr, bytemuck::cast_slice(kj));
                        }
                    }
                } else {
                    head_scores(q, k, &s, (h, kvh), (i0, rows, tk), &mut p);
                }
                let mut mass = vec![0f32; rows * n_groups]; // (rows, n_groups)
                for (r, row) in p.chunks_exact_mut(tk).enumerate() {
                    let visible = if s.causal {
                        (s.q_pos0 + i0 + r + 1).min(tk)
                    } else {
                        tk
                    };
                    softmax_visible(row, visible, hole_of(&s, i0 + r));
                    if let Some(gr) = groups {
                        // a group's mass: the sum over its ranges (which do not overlap); keys past
                        // tk have probability 0 here (causal) or do not exist
                        for &(a, b, g) in gr.ranges() {
                            mass[r * n_groups + g] += row[a.min(tk)..b.min(tk)].iter().sum::<f32>();
                        }
                    }
                }
                if rows <= DECODE_ROWS {
                    for (r, pr) in p.chunks_exact(tk).enumerate() {
                        let mut o = vec![0f32; d];
                        for (j, &pj) in pr.iter().enumerate() {
                            let vj = &v[j * ks + kvh * d..][..d];
                            o.iter_mut().zip(vj).for_each(|(a, b)| *a += pj * b);
                        }
                        // SAFETY: row i0+r, columns h·d..(h+1)·d of out belong to this task alone.
                        unsafe {
                            std::ptr::copy_nonoverlapping(o.as_ptr(), out_ptr.at((i0 + r) * qs + h * d), d)
                        };
                    }
                } else {
                    // SAFETY: p (rows, tk) · v[:, kvh·d..] (tk, d, row stride ks) -> out rows i0..i1,
                    // columns h·d..(h+1)·d (row stride qs): no other task writes that block.
                    unsafe {
                        matrixmultiply::sgemm(
                            rows,
                            tk,
                            d,
                            1.0,
                            p.as_ptr(),
                            tk as isize,
                            1,
                            v.as_ptr().add(kvh * d),
                            ks as isize,
                            1,
                            0.0,
                            out_ptr.at(i0 * qs + h * d),
                            qs as isize,
                            1,
                        )
                    };
                }
                (i0, mass)
            })
            .collect();
        let mass = groups.map(|_| {
            let mut m = vec![0f32; s.tq * n_groups]; // (tq, n_groups), heads averaged
            for (i0, part) in &masses {
                m[i0 * n_groups..i0 * n_groups + part.len()]
                    .iter_mut()
                    .zip(part)
                    .for_each(|(a, b)| *a += b);
            }
            m.iter_mut().for_each(|a| *a /= s.heads as f32);
            m
        });
        (out, mass)
    }

    fn concat_rows(&self, parts: &[Vec<f32>]) -> Vec<f32> {
        parts.concat()
    }

    fn kv_new(&self) -> Vec<f32> {
        Vec::new()
    }

    fn kv_append(&self, kv: &mut Vec<f32>, src: &Vec<f32>) {
        kv.extend_from_slice(src);
    }

    fn kv_read<'a>(&self, kv: &'a Vec<f32>) -> Cow<'a, Vec<f32>> {
        Cow::Borrowed(kv)
    }

    fn kv_truncate(&self, kv: &mut Vec<f32>, n: usize) {
        kv.truncate(n);
    }

    fn transpose_rows(&self, x: &Vec<f32>, a: usize, b: usize, d: usize) -> Vec<f32> {
        assert_eq!(x.len(), a * b * d, "transpose_rows: shape");
        let mut y = vec![0f32; x.len()]; // (b, a, d)
        for (r, row) in y.chunks_exact_mut(d.max(1)).enumerate() {
            let (j, i) = (r / a, r % a);
            row.copy_from_slice(&x[(i * b + j) * d..][..d]);
        }
        y
    }

    fn slice_rows(&self, x: &Vec<f32>, d: usize, r0: usize, r1: usize) -> Vec<f32> {
        x[r0 * d..r1 * d].to_vec()
    }

    fn scatter_rows(&self, x: &mut Vec<f32>, d: usize, rows: &[usize], src: &Vec<f32>) {
        assert_eq!(src.len(), rows.len() * d, "scatter_rows: source shape");
        for (&r, s) in rows.iter().zip(src.chunks_exact(d)) {
            x[r * d..(r + 1) * d].copy_from_slice(s);
        }
    }

    fn token_logprobs(&self, logits: &Vec<f32>, vocab: usize, targets: &[u32]) -> Vec<f32> {
        assert_eq!(
            logits.len(),
            targets.len() * vocab,
            "token_logprobs: logits shape"
        );
        logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| row[t as usize] - log_sum_exp(row))
            .collect()
    }

    fn linear_backward(&self, dy: &Vec<f32>, m: usize, w: &CpuMat) -> Vec<f32> {
        let (n, k) = (w.rows, w.cols);
        assert_eq!(dy.len(), m * n, "linear_backward: dy is not ({m}, {n})");
        let mut dx = vec![0f32; m * k]; // (m, k)
                                        // tasks over column blocks of dx: each converts its (n, kb) block of w once
        let kb = col_block(k, m.max(DOT_ROWS + 1));
        let dx_ptr = SendPtr(dx.as_mut_ptr());
        (0..k.div_ceil(kb))
            .into_par_iter()
            .for_each_init(Vec::new, |wf, bi| {
                let (c0, c1) = (bi * kb, ((bi + 1) * kb).min(k));
                wf.resize(n * (c1 - c0), 0.0);
                w.t.block_f32(0, n, c0, c1, wf); // (n, c1-c0)
                                                 // SAFETY: dy (m, n), wf (n, c1-c0), and columns [c0, c1) of dx (row stride k), which
                                                 // task bi alone writes.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        n,
                        c1 - c0,
                        1.0,
                        dy.as_ptr(),
                        n as isize,
                        1,
                        wf.as_ptr(),
                        (c1 - c0) as isize,
                        1,
                        0.0,
                        dx_ptr.at(c0),
                        k as isize,
                        1,
                    )
                };
            });
        dx
    }

    fn matmul_tn_acc(
        &self,
        g: &mut Vec<f32>,
        alpha: f32,
        a: &Vec<f32>,
        b: &Vec<f32>,
        k: usize,
        m: usize,
        n: usize,
    ) {
        assert_eq!(a.len(), k * m, "matmul_tn_acc: a is not ({k}, {m})");
        assert_eq!(b.len(), k * n, "matmul_tn_acc: b is not ({k}, {n})");
        assert_eq!(g.len(), m * n, "matmul_tn_acc: g is not ({m}, {n})");
        let nb = col_block(n, m.max(DOT_ROWS + 1));
        let g_ptr = SendPtr(g.as_mut_ptr());
        (0..n.div_ceil(nb)).into_par_iter().for_each(|bi| {
            let (c0, c1) = (bi * nb, ((bi + 1) * nb).min(n));
            // SAFETY: a read transposed (m, k); columns [c0, c1) of b (row stride n) and of g, which
            // task bi alone writes.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    c1 - c0,
                    alpha,
                    a.as_ptr(),
                    1,
                    m as isize,
                    b.as_ptr().add(c0),
                    n as isize,
                    1,
                    1.0,
                    g_ptr.at(c0),
                    n as isize,
                    1,
                )
            };
        });
    }

    fn rms_norm_backward(&self, x: &Vec<f32>, d: usize, w: &Vec<f32>, dy: &Vec<f32>, eps: f32) -> Vec<f32> {
        assert_eq!(x.len(), dy.len(), "rms_norm_backward: shapes");
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
            .for_each(|(dxr, (xr, dyr))| {
                // y = w ⊙ x · r with r = 1/√(mean x² + eps): dx = r · (w ⊙ dy) − x · r³ · Σ(w ⊙ dy ⊙ x) / d
                let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
                let dot: f32 = (0..d).map(|i| w[i] * dyr[i] * xr[i]).sum();
                let c = r * r * r * dot / d as f32;
                for i in 0..d {
                    dxr[i] = r * w[i] * dyr[i] - xr[i] * c;
                }
            });
        dx
    }

    fn rope_backward(
        &self,
        dx: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        positions: &[usize],
        theta: f64,
    ) {
        rotate(dx, heads, head_dim, positions, theta, -1.0);
    }

    fn swiglu_backward(&self, gate: &Vec<f32>, up: &Vec<f32>, dmid: &Vec<f32>) -> (Vec<f32>, Vec<f32>) {
        assert!(
            gate.len() == up.len() && up.len() == dmid.len(),
            "swiglu_backward: shapes"
        );
        let (mut dg, mut du) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let o = c * 4096;
                for i in 0..dg.len() {
                    let (g, u, dm) = (gate[o + i], up[o + i], dmid[o + i]);
                    // silu(g) = g·σ(g); silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
                    let sg = 1.0 / (1.0 + fast_exp(-g));
                    du[i] = dm * g * sg;
                    dg[i] = dm * u * sg * (1.0 + g * (1.0 - sg));
                }
            });
        (dg, du)
    }

    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        dout: &Vec<f32>,
        _lse: Option<&Vec<f32>>,
        s: AttnShape,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let d = s.head_dim;
        let (qs, ks) = (s.heads * d, s.kv_heads * d);
        assert_eq!(q.len(), s.tq * qs, "attention_backward: q shape");
        assert_eq!(k.len(), s.tk * ks, "attention_backward: k shape");
        assert_eq!(out.len(), q.len(), "attention_backward: out shape");
        assert_eq!(dout.len(), q.len(), "attention_backward: dout shape");
        let group = s.heads / s.kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        const QB: usize = 64;
        // one task per head: it owns its dq columns and its own dk, dv (tk, d), summed per kv head below
        let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.heads)
            .into_par_iter()
            .map(|h| {
                let kvh = h / group;
                let (mut dq, mut dk, mut dv) =
                    (vec![0f32; s.tq * d], vec![0f32; s.tk * d], vec![0f32; s.tk * d]);
                for i0 in (0..s.tq).step_by(QB) {
                    let i1 = (i0 + QB).min(s.tq);
                    let rows = i1 - i0;
                    let tk = if s.causal { (s.q_pos0 + i1).min(s.tk) } else { s.tk };
                    let mut p = vec![0f32; rows * tk]; // (rows, tk): scores, then probabilities
                    let mut dp = vec![0f32; rows * tk]; // dO · Vᵀ, then dS
                    head_scores(q, k, &s, (h, kvh), (i0, rows, tk), &mut p);
                    // SAFETY (this product and the three further down): dout rows i0..i1 at column h·d with
                    // row stride qs; k, v (tk, d) at column kvh·d with row stride ks; p, dp (rows, tk);
                    // dq (tq, d); dk, dv (tk, d) — every pointer and extent is inside its buffer.
                    unsafe {
                        matrixmultiply::sgemm(
                            rows,
                            d,
                            tk,
                            1.0,
                            dout.as_ptr().add(i0 * qs + h * d),
                            qs as isize,
                            1,
                            v.as_ptr().add(kvh * d),
                            1,
                            ks as isize,
                            0.0,
                            dp.as_mut_ptr(),
                            tk as isize,
                            1,
                        );
                    }
                    for r in 0..rows {
                        let visible = if s.causal {
                            (s.q_pos0 + i0 + r + 1).min(tk)
                        } else {
                            tk
                        };
                        let (pr, dpr) = (&mut p[r * tk..(r + 1) * tk], &mut dp[r * tk..(r + 1) * tk]);
                        softmax_visible(pr, visible, hole_of(&s, i0 + r));
                        // dS = P ⊙ (dP − rowsum(dO ⊙ O)), then the 1/√D of the scores
                        let (o_r, do_r) = (
                            &out[(i0 + r) * qs + h * d..][..d],
                            &dout[(i0 + r) * qs + h * d..][..d],
                        );
                        let di: f32 = o_r.iter().zip(do_r).map(|(a, b)| a * b).sum();
                        for j in 0..tk {
                            dpr[j] = pr[j] * (dpr[j] - di) * scale;
                        }
                    }
                    unsafe {
                        // dq rows = dS · K
                        matrixmultiply::sgemm(
                            rows,
                            tk,
                            d,
                            1.0,
                            dp.as_ptr(),
                            tk as isize,
                            1,
                            k.as_ptr().add(kvh * d),
                            ks as isize,
                            1,
                            0.0,
                            dq.as_mut_ptr().add(i0 * d),
                            d as isize,
                            1,
                        );
                        // dk += dSᵀ · Q
                        matrixmultiply::sgemm(
                            tk,
                            rows,
                            d,
                            1.0,
                            dp.as_ptr(),
                            1,
                            tk as isize,
                            q.as_ptr().add(i0 * qs + h * d),
                            qs as isize,
                            1,
                            1.0,
                            dk.as_mut_ptr(),
                            d as isize,
                            1,
                        );
                        // dv += Pᵀ · dO
                        matrixmultiply::sgemm(
                            tk,
                            rows,
                            d,
                            1.0,
                            p.as_ptr(),
                            1,
                            tk as isize,
                            dout.as_ptr().add(i0 * qs + h * d),
                            qs as isize,
                            1,
                            1.0,
                            dv.as_mut_ptr(),
                            d as isize,
                            1,
                        );
                    }
                }
                (dq, dk, dv)
            })
            .collect();
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; s.tq * qs],
            vec![0f32; s.tk * ks],
            vec![0f32; s.tk * ks],
        );
        for (h, (hq, hk, hv)) in per_head.iter().enumerate() {
            let kvh = h / group;
            for (r, src) in hq.chunks_exact(d).enumerate() {
                dq[r * qs + h * d..][..d].copy_from_slice(src);
            }
            for (r, (sk, sv)) in hk.chunks_exact(d).zip(hv.chunks_exact(d)).enumerate() {
                dk[r * ks + kvh * d..][..d]
                    .iter_mut()
                    .zip(sk)
                    .for_each(|(a, b)| *a += b);
                dv[r * ks + kvh * d..][..d]
                    .iter_mut()
                    .zip(sv)
                    .for_each(|(a, b)| *a += b);
            }
        }
        (dq, dk, dv)
    }

    fn fused_logprobs(
        &self,
        hidden: &Vec<f32>,
        rows: usize,
        w: &CpuMat,
        targets: &[u32],
    ) -> (Vec<f32>, Vec<f32>) {
        assert_eq!(targets.len(), rows, "fused_logprobs: one target per row");
        let h = w.cols;
        let (mut logp, mut lse) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for r0 in (0..rows).step_by(LOGIT_ROWS) {
            let r1 = (r0 + LOGIT_ROWS).min(rows);
            let logits = self.linear(&hidden[r0 * h..r1 * h].to_vec(), r1 - r0, w, None); // (block, vocab)
            let (lp, ls): (Vec<f32>, Vec<f32>) = logits
                .par_chunks(w.rows)
                .zip(targets[r0..r1].par_iter())
                .map(|(row, &t)| {
                    let z = log_sum_exp(row);
                    (row[t as usize] - z, z)
                })
                .unzip();
            logp.extend(lp);
            lse.extend(ls);
        }
        (logp, lse)
    }

    fn fused_logprobs_backward(
        &self,
        hidden: &Vec<f32>,
        rows: usize,
        w: &CpuMat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
    ) -> Vec<f32> {
        assert!(
            targets.len() == rows && lse.len() == rows && dlogp.len() == rows,
            "fused_logprobs_backward: one entry per row"
        );
        let h = w.cols;
        let mut dh = Vec::with_capacity(rows * h);
        for r0 in (0..rows).step_by(LOGIT_ROWS) {
            let r1 = (r0 + LOGIT_ROWS).min(rows);
            let dl = self.dlogits_block(&hidden[r0 * h..r1 * h], r0, w, targets, lse, dlogp);
            dh.extend(self.linear_backward(&dl, r1 - r0, w));
        }
        dh
    }

    fn rms_norm_weight_grad(&self, x: &Vec<f32>, d: usize, dy: &Vec<f32>, eps: f32) -> Vec<f32> {
        assert_eq!(x.len(), dy.len(), "rms_norm_weight_grad: shapes");
        let mut dw = vec![0f32; d];
        for (xr, dyr) in x.chunks_exact(d).zip(dy.chunks_exact(d)) {
            let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            for i in 0..d {
                dw[i] += dyr[i] * xr[i] * r;
            }
        }
        dw
    }

    fn activation_backward(&self, x: &Vec<f32>, dy: &Vec<f32>, act: Activation) -> Vec<f32> {
        assert_eq!(x.len(), dy.len(), "activation_backward: shapes");
        let sig = |v: f32| 1.0 / (1.0 + fast_exp(-v));
        let grad = |v: f32| -> f32 {
            match act {
                // v·σ(v): σ + v·σ(1−σ)
                Activation::Silu => {
                    let s = sig(v);
                    s * (1.0 + v * (1.0 - s))
                }
                // v·σ(1.702 v): σ + 1.702·v·σ(1−σ)
                Activation::QuickGelu => {
                    let s = sig(1.702 * v);
                    s + 1.702 * v * s * (1.0 - s)
                }
                // ½v(1 + erf(v/√2)): Φ(v) + v·φ(v)
                Activation::Gelu => {
                    let phi = (-0.5 * v * v).exp() / (2.0 * std::f32::consts::PI).sqrt();
                    0.5 * (1.0 + erf(v / std::f32::consts::SQRT_2)) + v * phi
                }
                // ½v(1 + tanh(u)), u = c(v + 0.044715 v³)
                Activation::GeluTanh => {
                    let c = (2.0 / std::f32::consts::PI).sqrt();
                    let t = (c * (v + 0.044715 * v * v * v)).tanh();
                    0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * v * v)
                }
            }
        };
        x.par_iter()
            .zip(dy.par_iter())
            .map(|(&v, &g)| g * grad(v))
            .collect()
    }

    fn col_sum(&self, x: &Vec<f32>, rows: usize, cols: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * cols, "col_sum: shape");
        let mut s = vec![0f32; cols];
        for r in x.chunks_exact(cols) {
            s.iter_mut().zip(r).for_each(|(a, b)| *a += b);
        }
        s
    }

    fn scatter_add_rows(&self, g: &mut Vec<f32>, d: usize, rows: &[usize], src: &Vec<f32>) {
        assert_eq!(src.len(), rows.len() * d, "scatter_add_rows: source shape");
        for (&r, s) in rows.iter().zip(src.chunks_exact(d)) {
            g[r * d..(r + 1) * d].iter_mut().zip(s).for_each(|(a, b)| *a += b);
        }
    }

    fn fused_logprobs_weight_grad(
        &self,
        hidden: &Vec<f32>,
        rows: usize,
        w: &CpuMat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        g: &mut Vec<f32>,
    ) {
        let (vocab, h) = (w.rows, w.cols);
        assert_eq!(
            g.len(),
            vocab * h,
            "fused_logprobs_weight_grad: g is not (vocab, hidden)"
        );
        for r0 in (0..rows).step_by(LOGIT_ROWS) {
            let r1 = (r0 + LOGIT_ROWS).min(rows);
            let hb = hidden[r0 * h..r1 * h].to_vec();
            let dl = self.dlogits_block(&hb, r0, w, targets, lse, dlogp);
            self.matmul_tn_acc(g, 1.0, &dl, &hb, r1 - r0, vocab, h);
        }
    }

    fn dropout(&self, x: &Vec<f32>, p: f32, key: u64) -> Vec<f32> {
        let keep_scale = 1.0 / (1.0 - p);
        x.par_iter()
            .enumerate()
            .map(|(i, &v)| {
                if super::dropout_keep(key, i as u64, p) {
                    v * keep_scale
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn sum_squares(&self, xs: &[&Vec<f32>]) -> f64 {
        // in order: the sum `clip_grad_norm` takes
        xs.iter()
            .flat_map(|x| x.iter())
            .map(|&v| v as f64 * v as f64)
            .sum()
    }

    fn optim_update(
        &self,
        cfg: &crate::train::optim::OptimConfig,
        p: &mut Vec<f32>,
        g: &mut Vec<f32>,
        gscale: f64,
        state: &mut super::BufState<Vec<f32>>,
        lr: f32,
    ) {
        // the host update in place: the state's vectors move in and out, nothing is copied
        let mut st = crate::train::optim::ParamState {
            m: state.m.take().unwrap_or_default(),
            v: state.v.take().unwrap_or_default(),
            step: state.step,
        };
        super::host_update(cfg, p, g, gscale, &mut st, lr);
        *state = super::BufState {
            m: (!st.m.is_empty()).then_some(st.m),
            v: (!st.v.is_empty()).then_some(st.v),
            step: st.step,
        };
    }
}

/// RoPE's rotation of x (rows, heads·D) by `sign` × the angles of each row's position (−1: the inverse,
/// which is the backward).
fn rotate(x: &mut [f32], heads: usize, head_dim: usize, positions: &[usize], theta: f64, sign: f64) {
    assert_eq!(x.len(), positions.len() * heads * head_dim, "rope: x shape");
    let half = head_dim / 2;
    // inv_freq[i] = theta^(-2i/D), computed in f64 and rounded once, then angles in f64 so long
    // positions keep their precision (HF computes the angle in f32 from f32 inv_freq; the f64
    // oracle is what we match).
    let inv: Vec<f64> = (0..half)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect();
    x.par_chunks_mut(heads * head_dim)
        .enumerate()
        .for_each(|(r, row)| {
            let pos = positions[r] as f64;
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv
                .iter()
                .map(|f| {
                    let a = pos * f;
                    (a.cos() as f32, (sign * a.sin()) as f32)
                })
                .unzip();
            for h in row.chunks_exact_mut(head_dim) {
                let (lo, hi) = h.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    // rotate_half: (x1, x2) -> (-x2, x1)
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        });
}

/// log Σ exp(x), accumulated in f64 so a 32k-entry vocabulary adds no rounding of its own.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let mx = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s: f64 = x.iter().map(|&v| ((v - mx) as f64).exp()).sum();
    (mx as f64 + s.ln()) as f32
}

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), enough for f32 GELU.
fn erf(x: f32) -> f32 {
    let z = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    let v = 1.0 - r;
    (if x >= 0.0 { v } else { -v }) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, e) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
        ] {
            assert!((erf(x) - e).abs() < 2e-7, "erf({x}) = {} want {e}", erf(x));
        }
    }

    #[test]
    fn fused_dots_match_converted_weights_for_every_dtype_and_alignment() {
        // 75 = 2·32 + 8 + 3: the unrolled loop, the 8-wide loop and the scalar tail all run
        let x: Vec<f32> = (0..75).map(|i| (i as f32 * 0.37).sin()).collect();
        let wv: Vec<f32> = (0..75).map(|i| (i as f32 * 0.11).cos()).collect();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let mut bytes: Vec<u8> = Vec::new();
            for &v in &wv {
                match dtype {
                    DType::F16 => bytes.extend(half::f16::from_f32(v).to_le_bytes()),
                    DType::BF16 => bytes.extend(half::bf16::from_f32(v).to_le_bytes()),
                    DType::F32 => bytes.extend(v.to_le_bytes()),
                }
            }
            let exact: f64 = (0..75)
                .map(|i| x[i] as f64 * weight_at(&bytes, i, dtype) as f64)
                .sum();
            for shift in 0..3 {
                let mut shifted = vec![0u8; shift];
                shifted.extend(&bytes);
                let w = &shifted[shift..];
                for got in [dot_fn(dtype)(&x, w), dot_portable(&x, w, dtype)] {
                    assert!(
                        (got as f64 - exact).abs() < 1e-5,
                        "{dtype:?} shift {shift}: {got} vs {exact}"
                    );
                }
            }
        }
    }

    /// Plain per-row attention in f64, the definition the blocked kernel must match; the mass of
    /// group g is the probability of the keys that some range of g covers, from the raw ranges
    /// (not `KeyGroups`' sorted and merged ones).
    fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
        ranges: &[crate::backend::KeyRange],
        n_groups: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let d = s.head_dim;
        let (qs, ks) = (s.heads * d, s.kv_heads * d);
        let mut out = vec![0f64; s.tq * qs];
        let mut mass = vec![0f64; s.tq * n_groups]; // (tq, n_groups)
        for h in 0..s.heads {
            let kvh = h / (s.heads / s.kv_heads);
            for i in 0..s.tq {
                let vis = if s.causal {
                    (s.q_pos0 + i + 1).min(s.tk)
                } else {
                    s.tk
                };
                let sc: Vec<f64> = (0..vis)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[i * qs + h * d + c] as f64 * k[j * ks + kvh * d + c] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let hole = hole_of(&s, i).unwrap_or((0, 0));
                let e: Vec<f64> = sc
                    .iter()
                    .enumerate()
                    .map(|(j, x)| {
                        if (hole.0..hole.1).contains(&j) {
                            0.0
                        } else {
                            (x - mx).exp()
                        }
                    })
                    .collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for c in 0..d {
                        out[i * qs + h * d + c] += ej / z * v[j * ks + kvh * d + c] as f64;
                    }
                }
                for g in 0..n_groups {
                    let inside = |j: usize| ranges.iter().any(|&(a, b, rg)| rg == g && (a..b).contains(&j));
                    mass[i * n_groups + g] +=
                        (0..vis).filter(|&j| inside(j)).map(|j| e[j] / z).sum::<f64>() / s.heads as f64;
                }
            }
        }
        (out, mass)
    }

    #[test]
    fn blocked_attention_matches_the_plain_definition() {
        let mut rng = crate::model::random::Rng::new(3);
        // GQA (6 query heads on 2 KV heads), 150 query rows (3 blocks) after a 20-row cache, and the
        // non-causal vision case
        // and decode-sized blocks (1 and 3 rows after a long cache), which take the dot-product path
        // and the prefix-shared DPO hole (rows from position 120 on skip keys 60..120)
        let hole = Some((120, 60, 120));
        for (causal, q_pos0, tq, hole) in [
            (true, 20, 150, None),
            (false, 0, 70, None),
            (true, 90, 1, None),
            (true, 57, 3, None),
            (true, 20, 150, hole),
            (true, 130, 2, hole),
        ] {
            let s = AttnShape {
                tq,
                tk: q_pos0 + tq,
                heads: 6,
                kv_heads: 2,
                head_dim: 8,
                causal,
                q_pos0,
                hole,
            };
            let mut rand = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
            let (q, k, v) = (rand(s.tq * 48), rand(s.tk * 16), rand(s.tk * 16));
            // group 0: two ranges in different 64-key tiles; 1: one key; 2: every key (overlaps all
            // others); 3: adjacent ranges (merged) and one past the keys; 4: keys past the end only
            let ranges = [
                (100, 170, 0),
                (3, 40, 0),
                (40, 41, 1),
                (0, 400, 2),
                (20, 30, 3),
                (30, 35, 3),
                (60, 65, 3),
                (165, 300, 3),
                (500, 600, 4),
            ];
            let groups = KeyGroups::new(&ranges, 5).unwrap();
            let (out, mass) = CpuBackend.attention(&q, &k, &v, s, Some(&groups));
            let (want, want_mass) = naive_attention(&q, &k, &v, s, &ranges, 5);
            // f32 sums of <= 170 terms of size ~1: 1e-5 is ~100 ulps
            let e = out
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(e < 1e-5, "causal={causal}: output error {e:e}");
            let e = mass
                .unwrap()
                .iter()
                .zip(&want_mass)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(e < 1e-5, "causal={causal}: mass error {e:e}");
        }
    }

    #[test]
    fn group_mass_is_the_sum_of_its_ranges_one_group_each() {
        // what select did before groups: one span per patch row, summed on the host
        use crate::backend::KeySpan;
        let mut rng = crate::model::random::Rng::new(5);
        let s = AttnShape {
            tq: 70,
            tk: 100 + 70,
            heads: 4,
            kv_heads: 1,
            head_dim: 16,
            causal: true,
            q_pos0: 100,
            hole: None,
        };
        let mut rand = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let (q, k, v) = (rand(s.tq * 64), rand(s.tk * 16), rand(s.tk * 16));
        // a 6×6 patch grid at keys 10..46: the whole image, and rows 1..5, columns 1..5
        let rows: Vec<KeySpan> = (1..5).map(|r| (10 + r * 6 + 1, 10 + r * 6 + 5)).collect();
        let spans: Vec<KeySpan> = std::iter::once((10, 46)).chain(rows.iter().copied()).collect();
        let mut ranges = vec![(10, 46, 0)];
        ranges.extend(rows.iter().map(|&(a, b)| (a, b, 1)));
        let grouped = KeyGroups::new(&ranges, 2).unwrap();
        let (_, per_span) = CpuBackend.attention(&q, &k, &v, s, Some(&KeyGroups::per_span(&spans).unwrap()));
        let (_, mass) = CpuBackend.attention(&q, &k, &v, s, Some(&grouped));
        let (per_span, mass) = (per_span.unwrap(), mass.unwrap());
        for i in 0..s.tq {
            let row = &per_span[i * spans.len()..][..spans.len()];
            // f32 sums of 5 terms ≤ 1 in another order: a few ulps
            assert!((mass[i * 2] - row[0]).abs() < 1e-6);
            assert!((mass[i * 2 + 1] - row[1..].iter().sum::<f32>()).abs() < 1e-6);
        }
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_exp() {
        let mut worst = 0f64;
        for i in -8700..=8830 {
            let x = i as f32 * 0.01;
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        // f32 epsilon is 1.19e-7: 3 ulp
        assert!(worst < 3.6e-7, "max relative error {worst:e}");
        assert_eq!(fast_exp(0.0), 1.0);
    }
}
