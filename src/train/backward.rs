//! The backward pass of the LLaMA decoder by hand, for LoRA gradients (CPU reference).
//!
//! For one sequence (prompt + response) it runs the forward keeping every activation the backward
//! needs, computes the summed log-prob of the response tokens, and adds `scale` × ∂logp/∂θ to the
//! gradients of every LoRA A and B. The vision tower, projector and base weights are frozen.
//! Shapes: T rows, h hidden, H heads of D, KV kv-heads, I intermediate, r LoRA rank.
use crate::backend::cpu::CpuBackend;
use crate::model::llama::{Linear, LlamaLayer};
use crate::model::llava::Llava;
use crate::model::lora::Proj;
use crate::Result;

/// The gradients of one LoRA module.
#[derive(Clone, Debug)]
pub struct ModuleGrad {
    pub layer: usize,
    pub proj: Proj,
    /// (r, in)
    pub da: Vec<f32>,
    /// (out, r)
    pub db: Vec<f32>,
}

/// Gradients of every LoRA module.
#[derive(Clone, Debug, Default)]
pub struct LoraGrads {
    pub modules: Vec<ModuleGrad>,
}

impl LoraGrads {
    fn slot(&mut self, key: (usize, Proj), a_len: usize, b_len: usize) -> (&mut Vec<f32>, &mut Vec<f32>) {
        let i = match self.modules.iter().position(|m| (m.layer, m.proj) == key) {
            Some(i) => i,
            None => {
                let (layer, proj) = key;
                self.modules.push(ModuleGrad {
                    layer,
                    proj,
                    da: vec![0.0; a_len],
                    db: vec![0.0; b_len],
                });
                self.modules.len() - 1
            }
        };
        let m = &mut self.modules[i];
        (&mut m.da, &mut m.db)
    }

    pub fn get(&self, layer: usize, proj: Proj) -> Option<(&[f32], &[f32])> {
        self.modules
            .iter()
            .find(|m| (m.layer, m.proj) == (layer, proj))
            .map(|m| (m.da.as_slice(), m.db.as_slice()))
    }
}

// ---- small row-major products (matrixmultiply)

/// c (m, n) = a (m, k) · b (k, n)
fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    // SAFETY: a, b, c are (m,k), (k,n), (m,n) row-major.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    };
    c
}

/// c (m, n) = a (m, k) · bᵀ, b (n, k)
fn mm_nt(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    // SAFETY: b read transposed through its strides.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    };
    c
}

/// c (m, n) += alpha · aᵀ · b, a (k, m), b (k, n)
fn mm_tn_acc(c: &mut [f32], alpha: f32, a: &[f32], b: &[f32], k: usize, m: usize, n: usize) {
    // SAFETY: a read transposed through its strides; c accumulated (beta 1).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            n as isize,
            1,
            1.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    };
}

fn add_to(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// A decoder linear in f32 with its LoRA update: forward keeps x·Aᵀ for the backward.
struct Lin {
    w: Vec<f32>,                             // (out, in)
    lora: Option<(Vec<f32>, Vec<f32>, f32)>, // A (r, in), B (out, r), scale
    out: usize,
    inp: usize,
}

impl Lin {
    fn new(l: &Linear<CpuBackend>) -> Self {
        let (out, inp) = l.w.shape();
        assert!(
            l.bias.is_none(),
            "decoder biases are not supported by the trainer yet"
        );
        Lin {
            w: l.w.to_f32(),
            lora: l.lora.as_ref().map(|p| (p.a.to_f32(), p.b.to_f32(), p.scale)),
            out,
            inp,
        }
    }
    fn rank(&self) -> usize {
        self.lora.as_ref().map_or(0, |(a, _, _)| a.len() / self.inp)
    }
    /// x (t, in) -> (y (t, out), x·Aᵀ (t, r))
    fn fwd(&self, x: &[f32], t: usize) -> (Vec<f32>, Vec<f32>) {
        let mut y = mm_nt(x, &self.w, t, self.inp, self.out);
        let mut xa = Vec::new();
        if let Some((a, b, s)) = &self.lora {
            let r = self.rank();
            xa = mm_nt(x, a, t, self.inp, r);
            let u = mm_nt(&xa, b, t, r, self.out);
            y.iter_mut().zip(&u).for_each(|(y, u)| *y += s * u);
        }
        (y, xa)
    }
    /// dy (t, out) -> dx (t, in); adds dA, dB into `g`
    fn bwd(
        &self,
        x: &[f32],
        xa: &[f32],
        dy: &[f32],
        t: usize,
        key: (usize, Proj),
        g: &mut LoraGrads,
    ) -> Vec<f32> {
        let mut dx = mm(dy, &self.w, t, self.out, self.inp);
        if let Some((a, b, s)) = &self.lora {
            let r = self.rank();
            let (da, db) = g.slot(key, r * self.inp, self.out * r);
            // dB (out, r) += s · dyᵀ (x Aᵀ)
            mm_tn_acc(db, *s, dy, xa, t, self.out, r);
            // d(xAᵀ) (t, r) = s · dy B
            let dxa: Vec<f32> = mm(dy, b, t, self.out, r).iter().map(|v| v * s).collect();
            // dA (r, in) += d(xAᵀ)ᵀ x
            mm_tn_acc(da, 1.0, &dxa, x, t, r, self.inp);
            add_to(&mut dx, &mm(&dxa, a, t, r, self.inp));
        }
        dx
    }
}

/// y = w ⊙ x / rms(x) per row; returns (y, 1/rms per row)
fn rms_fwd(x: &[f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    let mut inv = Vec::with_capacity(x.len() / d);
    for (yr, xr) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
        inv.push(r);
        for i in 0..d {
            yr[i] = w[i] * (xr[i] * r);
        }
    }
    (y, inv)
}

/// dx of y = w ⊙ x·inv: dx = inv·g − x·inv³·(g·x)/d with g = w ⊙ dy
fn rms_bwd(x: &[f32], inv: &[f32], w: &[f32], dy: &[f32], d: usize) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    for (((dxr, xr), dyr), &r) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(dy.chunks_exact(d))
        .zip(inv)
    {
        let dot: f32 = (0..d).map(|i| w[i] * dyr[i] * xr[i]).sum();
        for i in 0..d {
            dxr[i] = r * w[i] * dyr[i] - xr[i] * r * r * r * dot / d as f32;
        }
    }
    dx
}

/// Rotates (t, heads·D) rows by position (`sign` +1 forward, −1 for the backward's inverse rotation).
fn rope(x: &mut [f32], heads: usize, d: usize, theta: f64, sign: f32) {
    let half = d / 2;
    for (p, row) in x.chunks_exact_mut(heads * d).enumerate() {
        for i in 0..half {
            let a = p as f64 * theta.powf(-((2 * i) as f64) / d as f64);
            let (c, s) = (a.cos() as f32, sign * a.sin() as f32);
            for hv in row.chunks_exact_mut(d) {
                let (x1, x2) = (hv[i], hv[i + half]);
                hv[i] = x1 * c - x2 * s;
                hv[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

/// Summed log-prob of `ids[response_start..]` after the rest, and `scale · ∂/∂θ` of it added to `grads`.
/// `features`: the prompt's image features (n·image_seq_length, hidden).
pub fn sequence_logp_backward(
    m: &Llava<CpuBackend>,
    ids: &[u32],
    features: &Vec<f32>,
    response_start: usize,
    scale: f64,
    grads: &mut LoraGrads,
) -> Result<f64> {
    let c = &m.cfg.text;
    let (t, h, hd, nh, nkv) = (ids.len(), c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let (qd, kvd, group) = (nh * hd, nkv * hd, nh / nkv);
    let att_scale = 1.0 / (hd as f32).sqrt();
    let mut x = m.input_embeddings(ids, features)?; // (t, h)

    struct Saved {
        x: Vec<f32>,
        inv1: Vec<f32>,
        a1: Vec<f32>,
        xa: [Vec<f32>; 7],
        q: Vec<f32>, // roped (t, H·D)
        k: Vec<f32>, // roped (t, KV·D)
        v: Vec<f32>,
        p: Vec<f32>, // (H, t, t) probabilities
        o: Vec<f32>, // (t, H·D)
        x2: Vec<f32>,
        inv2: Vec<f32>,
        a2: Vec<f32>,
        g: Vec<f32>,
        u: Vec<f32>,
        mid: Vec<f32>,
    }
    let layers: Vec<[Lin; 7]> = m
        .decoder
        .layers
        .iter()
        .map(|l: &LlamaLayer<CpuBackend>| {
            [
                Lin::new(&l.q),
                Lin::new(&l.k),
                Lin::new(&l.v),
                Lin::new(&l.o),
                Lin::new(&l.gate),
                Lin::new(&l.up),
                Lin::new(&l.down),
            ]
        })
        .collect();
    let norms: Vec<(Vec<f32>, Vec<f32>)> = m
        .decoder
        .layers
        .iter()
        .map(|l| (l.input_norm.clone(), l.post_norm.clone()))
        .collect();
    let mut saved = Vec::with_capacity(layers.len());
    for (lin, (n1, n2)) in layers.iter().zip(&norms) {
        let (a1, inv1) = rms_fwd(&x, n1, h, c.rms_norm_eps);
        let (mut q, xa_q) = lin[0].fwd(&a1, t);
        let (mut k, xa_k) = lin[1].fwd(&a1, t);
        let (v, xa_v) = lin[2].fwd(&a1, t);
        rope(&mut q, nh, hd, c.rope_theta, 1.0);
        rope(&mut k, nkv, hd, c.rope_theta, 1.0);
        let mut p = vec![0f32; nh * t * t];
        let mut o = vec![0f32; t * qd];
        for hh in 0..nh {
            let kh = hh / group;
            for i in 0..t {
                let row = &mut p[(hh * t + i) * t..][..t];
                for j in 0..=i {
                    row[j] = att_scale
                        * (0..hd)
                            .map(|e| q[i * qd + hh * hd + e] * k[j * kvd + kh * hd + e])
                            .sum::<f32>();
                }
                let mx = row[..=i].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut z = 0f32;
                for r in row[..=i].iter_mut() {
                    *r = (*r - mx).exp();
                    z += *r;
                }
                row[..=i].iter_mut().for_each(|r| *r /= z);
                for j in 0..=i {
                    for e in 0..hd {
                        o[i * qd + hh * hd + e] += row[j] * v[j * kvd + kh * hd + e];
                    }
                }
            }
        }
        let (y, xa_o) = lin[3].fwd(&o, t);
        let mut x2 = x.clone();
        add_to(&mut x2, &y);
        let (a2, inv2) = rms_fwd(&x2, n2, h, c.rms_norm_eps);
        let (g, xa_g) = lin[4].fwd(&a2, t);
        let (u, xa_u) = lin[5].fwd(&a2, t);
        let mid: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let (dn, xa_d) = lin[6].fwd(&mid, t);
        let mut x3 = x2.clone();
        add_to(&mut x3, &dn);
        saved.push(Saved {
            x,
            inv1,
            a1,
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
            q,
            k,
            v,
            p,
            o,
            x2,
            inv2,
            a2,
            g,
            u,
            mid,
        });
        x = x3;
    }
    // final norm, LM head on the rows that predict response tokens, log-softmax
    let wn = &m.decoder.norm;
    let (hf, inv_f) = rms_fwd(&x, wn, h, c.rms_norm_eps);
    let lm = m.decoder.lm_head.to_f32(); // (vocab, h)
    let vocab = c.vocab_size;
    let rows: Vec<usize> = (response_start.saturating_sub(1)..t - 1).collect();
    let mut dhf = vec![0f32; t * h];
    let mut total = 0f64;
    for &i in &rows {
        let logits = mm_nt(&hf[i * h..(i + 1) * h], &lm, 1, h, vocab);
        let lse = crate::backend::cpu::log_sum_exp(&logits);
        let target = ids[i + 1] as usize;
        total += (logits[target] - lse) as f64;
        // ∂logp/∂logits = onehot − softmax
        let mut dl: Vec<f32> = logits.iter().map(|&l| -(l - lse).exp() * scale as f32).collect();
        dl[target] += scale as f32;
        let dh = mm(&dl, &lm, 1, vocab, h);
        dhf[i * h..(i + 1) * h].copy_from_slice(&dh);
    }
    let mut dx = rms_bwd(&x, &inv_f, wn, &dhf, h);

    for (li, ((lin, (n1, n2)), s)) in layers.iter().zip(&norms).zip(&saved).enumerate().rev() {
        // MLP: x3 = x2 + down(silu(gate(a2)) · up(a2))
        let dmid = lin[6].bwd(&s.mid, &s.xa[6], &dx, t, (li, Proj::Down), grads);
        let mut dg = vec![0f32; dmid.len()];
        let mut du = vec![0f32; dmid.len()];
        for i in 0..dmid.len() {
            let sg = 1.0 / (1.0 + (-s.g[i]).exp());
            let silu = s.g[i] * sg;
            du[i] = dmid[i] * silu;
            dg[i] = dmid[i] * s.u[i] * (sg * (1.0 + s.g[i] * (1.0 - sg)));
        }
        let mut da2 = lin[4].bwd(&s.a2, &s.xa[4], &dg, t, (li, Proj::Gate), grads);
        add_to(
            &mut da2,
            &lin[5].bwd(&s.a2, &s.xa[5], &du, t, (li, Proj::Up), grads),
        );
        let mut dx2 = dx; // residual
        add_to(&mut dx2, &rms_bwd(&s.x2, &s.inv2, n2, &da2, h));
        // attention: x2 = x + o_proj(attn)
        let do_ = lin[3].bwd(&s.o, &s.xa[3], &dx2, t, (li, Proj::O), grads);
        let mut dq = vec![0f32; t * qd];
        let mut dk = vec![0f32; t * kvd];
        let mut dv = vec![0f32; t * kvd];
        for hh in 0..nh {
            let kh = hh / group;
            for i in 0..t {
                let prow = &s.p[(hh * t + i) * t..][..t];
                let dorow = &do_[i * qd + hh * hd..][..hd];
                // dP_ij = do_i · v_j ; dv_j += P_ij do_i
                let dp: Vec<f32> = (0..=i)
                    .map(|j| (0..hd).map(|e| dorow[e] * s.v[j * kvd + kh * hd + e]).sum())
                    .collect();
                for j in 0..=i {
                    for e in 0..hd {
                        dv[j * kvd + kh * hd + e] += prow[j] * dorow[e];
                    }
                }
                // softmax backward: dS = P ⊙ (dP − Σ P dP), then the 1/√D scale
                let dot: f32 = (0..=i).map(|j| prow[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = prow[j] * (dp[j] - dot) * att_scale;
                    for e in 0..hd {
                        dq[i * qd + hh * hd + e] += ds * s.k[j * kvd + kh * hd + e];
                        dk[j * kvd + kh * hd + e] += ds * s.q[i * qd + hh * hd + e];
                    }
                }
            }
        }
        rope(&mut dq, nh, hd, c.rope_theta, -1.0);
        rope(&mut dk, nkv, hd, c.rope_theta, -1.0);
        let mut da1 = lin[0].bwd(&s.a1, &s.xa[0], &dq, t, (li, Proj::Q), grads);
        add_to(
            &mut da1,
            &lin[1].bwd(&s.a1, &s.xa[1], &dk, t, (li, Proj::K), grads),
        );
        add_to(
            &mut da1,
            &lin[2].bwd(&s.a1, &s.xa[2], &dv, t, (li, Proj::V), grads),
        );
        let mut dxl = dx2; // residual
        add_to(&mut dxl, &rms_bwd(&s.x, &s.inv1, n1, &da1, h));
        dx = dxl;
    }
    Ok(total)
}
