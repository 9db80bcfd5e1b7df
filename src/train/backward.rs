//! The policy pass of DPO training, on any backend: a forward over one sequence (prompt + response)
//! that returns the response's summed log-prob and keeps what the backward needs, and a backward that
//! adds `scale · ∂logp/∂θ` to the gradients of every LoRA A and B. The vision tower, projector and
//! base weights are frozen. With gradient checkpointing the forward keeps only each layer's input and
//! the backward recomputes the layer; without it, every activation stays until the backward.
//!
//! Every op is a backend op whose backward sits next to its forward in the backend (`linear` /
//! `linear_backward`, `attention` / `attention_backward`, ...). Shapes: t rows, h hidden, H heads of
//! D, KV kv-heads, I intermediate, r LoRA rank, n response tokens.
use crate::backend::{AttnShape, Backend};
use crate::model::config::Activation;
use crate::model::llama::Linear;
use crate::model::llava::Llava;
use crate::model::lora::Proj;
use crate::Result;

/// How the policy pass runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassOptions {
    /// keep only layer inputs and recompute each layer in the backward
    pub checkpointing: bool,
    /// PEFT's `lora_dropout`: dropout on the input of every LoRA A
    pub lora_dropout: f32,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            checkpointing: true,
            lora_dropout: 0.0,
        }
    }
}

/// The gradients of one LoRA module.
pub struct ModuleGrad<B: Backend> {
    pub layer: usize,
    pub proj: Proj,
    /// (r, in)
    pub da: B::Buf,
    /// (out, r)
    pub db: B::Buf,
}

/// Gradients of every LoRA module, accumulated on the backend.
pub struct LoraGrads<B: Backend> {
    pub modules: Vec<ModuleGrad<B>>,
}

impl<B: Backend> Default for LoraGrads<B> {
    fn default() -> Self {
        LoraGrads { modules: Vec::new() }
    }
}

impl<B: Backend> LoraGrads<B> {
    fn slot(&mut self, be: &B, key: (usize, Proj), a_len: usize, b_len: usize) -> &mut ModuleGrad<B> {
        let i = match self.modules.iter().position(|m| (m.layer, m.proj) == key) {
            Some(i) => i,
            None => {
                self.modules.push(ModuleGrad {
                    layer: key.0,
                    proj: key.1,
                    da: be.upload(&vec![0.0; a_len]),
                    db: be.upload(&vec![0.0; b_len]),
                });
                self.modules.len() - 1
            }
        };
        &mut self.modules[i]
    }

    /// (dA, dB) of one module, copied to the host.
    pub fn host(&self, be: &B, layer: usize, proj: Proj) -> Option<(Vec<f32>, Vec<f32>)> {
        self.modules
            .iter()
            .find(|m| (m.layer, m.proj) == (layer, proj))
            .map(|m| (be.download(&m.da), be.download(&m.db)))
    }
}

/// The LoRA-dropout key of one module of one sequence: each module draws its own mask, like PEFT's
/// separate dropout layers.
fn module_key(seq_key: u64, layer: usize, proj: Proj) -> u64 {
    seq_key ^ ((layer as u64) << 8 | proj as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// A decoder linear with its LoRA: y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ. Returns y and drop(x) Aᵀ (t, r).
fn lin_fwd<B: Backend>(
    be: &B,
    l: &Linear<B>,
    x: &B::Buf,
    t: usize,
    drop: (f32, u64),
) -> (B::Buf, Option<B::Buf>) {
    let mut y = be.linear(x, t, &l.w, l.bias.as_ref());
    let xa = l.lora.as_ref().map(|lp| {
        let dropped;
        let xin = if drop.0 > 0.0 {
            dropped = be.dropout(x, drop.0, drop.1);
            &dropped
        } else {
            x
        };
        let xa = be.linear(xin, t, &lp.a, None); // (t, r)
        be.axpy(&mut y, lp.scale, &be.linear(&xa, t, &lp.b, None));
        xa
    });
    (y, xa)
}

/// dy (t, out) -> dx (t, in); adds dA += s · (dy B)ᵀ drop(x) and dB += s · dyᵀ (drop(x) Aᵀ).
#[allow(clippy::too_many_arguments)]
fn lin_bwd<B: Backend>(
    be: &B,
    l: &Linear<B>,
    x: &B::Buf,
    xa: Option<&B::Buf>,
    dy: &B::Buf,
    t: usize,
    drop: (f32, u64),
    key: (usize, Proj),
    grads: &mut LoraGrads<B>,
) -> B::Buf {
    let mut dx = be.linear_backward(dy, t, &l.w);
    if let (Some(lp), Some(xa)) = (&l.lora, xa) {
        let ((r, inp), (out, _)) = (be.mat_shape(&lp.a), be.mat_shape(&lp.b));
        let g = grads.slot(be, key, r * inp, out * r);
        be.matmul_tn_acc(&mut g.db, lp.scale, dy, xa, t, out, r);
        let dxa = be.linear_backward(dy, t, &lp.b); // (t, r), before the scale s
        let dropped;
        let xin = if drop.0 > 0.0 {
            dropped = be.dropout(x, drop.0, drop.1);
            &dropped
        } else {
            x
        };
        be.matmul_tn_acc(&mut g.da, lp.scale, &dxa, xin, t, r, inp);
        let mut dxin = be.linear_backward(&dxa, t, &lp.a); // (t, in)
        if drop.0 > 0.0 {
            dxin = be.dropout(&dxin, drop.0, drop.1); // the same mask and 1/(1-p)
        }
        be.axpy(&mut dx, lp.scale, &dxin);
    }
    dx
}

/// What one layer's backward needs from its forward (besides the layer input).
struct LayerActs<B: Backend> {
    a1: B::Buf,
    /// drop(x) Aᵀ per module, in `Proj::ALL` order
    xa: [Option<B::Buf>; 7],
    q: B::Buf, // roped (t, H·D)
    k: B::Buf, // roped (t, KV·D)
    v: B::Buf,
    o: B::Buf, // attention output (t, H·D)
    x2: B::Buf,
    a2: B::Buf,
    g: B::Buf, // gate before the activation (t, I)
    u: B::Buf,
    mid: B::Buf,
}

/// One sequence after the forward: its log-prob and what the backward needs.
pub struct SeqForward<B: Backend> {
    ids: Vec<u32>,
    key: u64,
    /// each layer's input (t, h)
    inputs: Vec<B::Buf>,
    /// every layer's activations (empty with gradient checkpointing)
    acts: Vec<LayerActs<B>>,
    /// the last layer's output, before the final norm
    x_last: B::Buf,
    /// the final-normed hidden states of the rows that predict response tokens (n, h)
    rows_hidden: B::Buf,
    first_row: usize,
    lse: Vec<f32>,
    /// summed log-prob of the response tokens
    pub logp: f64,
}

impl<B: Backend> SeqForward<B> {
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

fn shape(m: &Llava<impl Backend>, t: usize) -> AttnShape {
    let c = &m.cfg.text;
    AttnShape {
        tq: t,
        tk: t,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        causal: true,
        q_pos0: 0,
    }
}

fn layer_fwd<B: Backend>(
    m: &Llava<B>,
    li: usize,
    x: &B::Buf,
    t: usize,
    o: PassOptions,
    key: u64,
) -> (B::Buf, LayerActs<B>) {
    let (be, c, l) = (&m.be, &m.cfg.text, &m.decoder.layers[li]);
    let positions: Vec<usize> = (0..t).collect();
    let drop = |p: Proj| (o.lora_dropout, module_key(key, li, p));
    let a1 = be.rms_norm(x, c.hidden_size, &l.input_norm, c.rms_norm_eps);
    let (mut q, xa_q) = lin_fwd(be, &l.q, &a1, t, drop(Proj::Q));
    let (mut k, xa_k) = lin_fwd(be, &l.k, &a1, t, drop(Proj::K));
    let (v, xa_v) = lin_fwd(be, &l.v, &a1, t, drop(Proj::V));
    be.rope(&mut q, c.num_heads, c.head_dim, &positions, c.rope_theta);
    be.rope(&mut k, c.num_kv_heads, c.head_dim, &positions, c.rope_theta);
    let (att, _) = be.attention(&q, &k, &v, shape(m, t), None);
    let (y, xa_o) = lin_fwd(be, &l.o, &att, t, drop(Proj::O));
    let mut x2 = x.clone();
    be.add(&mut x2, &y);
    let a2 = be.rms_norm(&x2, c.hidden_size, &l.post_norm, c.rms_norm_eps);
    let (g, xa_g) = lin_fwd(be, &l.gate, &a2, t, drop(Proj::Gate));
    let (u, xa_u) = lin_fwd(be, &l.up, &a2, t, drop(Proj::Up));
    let mut mid = g.clone();
    be.activation(&mut mid, Activation::Silu);
    be.mul(&mut mid, &u);
    let (dn, xa_d) = lin_fwd(be, &l.down, &mid, t, drop(Proj::Down));
    let mut x3 = x2.clone();
    be.add(&mut x3, &dn);
    let acts = LayerActs {
        a1,
        xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
        q,
        k,
        v,
        o: att,
        x2,
        a2,
        g,
        u,
        mid,
    };
    (x3, acts)
}

/// dx3 (gradient of the layer's output) -> dx (gradient of its input `x`).
#[allow(clippy::too_many_arguments)]
fn layer_bwd<B: Backend>(
    m: &Llava<B>,
    li: usize,
    x: &B::Buf,
    s: &LayerActs<B>,
    dx3: B::Buf,
    t: usize,
    o: PassOptions,
    key: u64,
    grads: &mut LoraGrads<B>,
) -> B::Buf {
    let (be, c, l) = (&m.be, &m.cfg.text, &m.decoder.layers[li]);
    let h = c.hidden_size;
    let positions: Vec<usize> = (0..t).collect();
    let drop = |p: Proj| (o.lora_dropout, module_key(key, li, p));
    let xa = |p: Proj| s.xa[p as usize].as_ref();
    // MLP: x3 = x2 + down(silu(gate(a2)) ⊙ up(a2))
    let dmid = lin_bwd(
        be,
        &l.down,
        &s.mid,
        xa(Proj::Down),
        &dx3,
        t,
        drop(Proj::Down),
        (li, Proj::Down),
        grads,
    );
    let (dg, du) = be.swiglu_backward(&s.g, &s.u, &dmid);
    let mut da2 = lin_bwd(
        be,
        &l.gate,
        &s.a2,
        xa(Proj::Gate),
        &dg,
        t,
        drop(Proj::Gate),
        (li, Proj::Gate),
        grads,
    );
    be.add(
        &mut da2,
        &lin_bwd(
            be,
            &l.up,
            &s.a2,
            xa(Proj::Up),
            &du,
            t,
            drop(Proj::Up),
            (li, Proj::Up),
            grads,
        ),
    );
    let mut dx2 = dx3; // residual
    be.add(
        &mut dx2,
        &be.rms_norm_backward(&s.x2, h, &l.post_norm, &da2, c.rms_norm_eps),
    );
    // attention: x2 = x + o_proj(attention(rope(q(a1)), rope(k(a1)), v(a1)))
    let datt = lin_bwd(
        be,
        &l.o,
        &s.o,
        xa(Proj::O),
        &dx2,
        t,
        drop(Proj::O),
        (li, Proj::O),
        grads,
    );
    let (mut dq, mut dk, dv) = be.attention_backward(&s.q, &s.k, &s.v, &s.o, &datt, shape(m, t));
    be.rope_backward(&mut dq, c.num_heads, c.head_dim, &positions, c.rope_theta);
    be.rope_backward(&mut dk, c.num_kv_heads, c.head_dim, &positions, c.rope_theta);
    let mut da1 = lin_bwd(
        be,
        &l.q,
        &s.a1,
        xa(Proj::Q),
        &dq,
        t,
        drop(Proj::Q),
        (li, Proj::Q),
        grads,
    );
    be.add(
        &mut da1,
        &lin_bwd(
            be,
            &l.k,
            &s.a1,
            xa(Proj::K),
            &dk,
            t,
            drop(Proj::K),
            (li, Proj::K),
            grads,
        ),
    );
    be.add(
        &mut da1,
        &lin_bwd(
            be,
            &l.v,
            &s.a1,
            xa(Proj::V),
            &dv,
            t,
            drop(Proj::V),
            (li, Proj::V),
            grads,
        ),
    );
    let mut dx = dx2; // residual
    be.add(
        &mut dx,
        &be.rms_norm_backward(x, h, &l.input_norm, &da1, c.rms_norm_eps),
    );
    dx
}

/// The forward of one sequence `ids` (prompt then response from `response_start`): summed log-prob of
/// the response and what the backward needs. `features`: the prompt's image features; `key` draws the
/// LoRA-dropout masks (the backward reuses them).
pub fn forward<B: Backend>(
    m: &Llava<B>,
    ids: &[u32],
    features: &B::Buf,
    response_start: usize,
    o: PassOptions,
    key: u64,
) -> Result<SeqForward<B>> {
    let (be, c) = (&m.be, &m.cfg.text);
    let t = ids.len();
    assert!(
        response_start >= 1 && response_start < t,
        "the response needs a prompt before it and at least one token"
    );
    let mut x = m.input_embeddings(ids, features)?; // (t, h)
    let mut inputs = Vec::with_capacity(c.num_layers);
    let mut acts = Vec::new();
    for li in 0..c.num_layers {
        let (next, a) = layer_fwd(m, li, &x, t, o, key);
        if !o.checkpointing {
            acts.push(a);
        }
        inputs.push(std::mem::replace(&mut x, next));
    }
    // rows response_start-1 .. t-1 predict the response tokens
    let first_row = response_start - 1;
    let hidden = be.rms_norm(&x, c.hidden_size, &m.decoder.norm, c.rms_norm_eps);
    let rows_hidden = be.slice_rows(&hidden, c.hidden_size, first_row, t - 1); // (n, h)
    let (lp, lse) = be.fused_logprobs(
        &rows_hidden,
        t - 1 - first_row,
        &m.decoder.lm_head,
        &ids[response_start..],
    );
    Ok(SeqForward {
        ids: ids.to_vec(),
        key,
        inputs,
        acts,
        x_last: x,
        rows_hidden,
        first_row,
        lse,
        logp: lp.iter().map(|&v| v as f64).sum(),
    })
}

/// Adds `scale · ∂logp/∂θ` of the sequence to `grads` (every LoRA A and B).
pub fn backward<B: Backend>(
    m: &Llava<B>,
    f: &SeqForward<B>,
    scale: f64,
    o: PassOptions,
    grads: &mut LoraGrads<B>,
) {
    let (be, c) = (&m.be, &m.cfg.text);
    let (t, h) = (f.ids.len(), c.hidden_size);
    let n = t - 1 - f.first_row;
    let dlogp = vec![scale as f32; n];
    let drows = be.fused_logprobs_backward(
        &f.rows_hidden,
        n,
        &m.decoder.lm_head,
        &f.ids[f.first_row + 1..],
        &f.lse,
        &dlogp,
    ); // (n, h)
    let mut dhidden = be.upload(&vec![0.0; t * h]);
    let rows: Vec<usize> = (f.first_row..t - 1).collect();
    be.scatter_rows(&mut dhidden, h, &rows, &drows);
    let mut dx = be.rms_norm_backward(&f.x_last, h, &m.decoder.norm, &dhidden, c.rms_norm_eps);
    for li in (0..c.num_layers).rev() {
        let x = &f.inputs[li];
        dx = if o.checkpointing {
            let (_, a) = layer_fwd(m, li, x, t, o, f.key);
            layer_bwd(m, li, x, &a, dx, t, o, f.key, grads)
        } else {
            layer_bwd(m, li, x, &f.acts[li], dx, t, o, f.key, grads)
        };
    }
}

/// Forward and backward of one sequence: its summed response log-prob, and `scale · ∂/∂θ` of it added
/// to `grads`. `features`: the prompt's image features (n·image_seq_length, hidden).
pub fn sequence_logp_backward<B: Backend>(
    m: &Llava<B>,
    ids: &[u32],
    features: &B::Buf,
    response_start: usize,
    scale: f64,
    o: PassOptions,
    grads: &mut LoraGrads<B>,
) -> Result<f64> {
    let f = forward(m, ids, features, response_start, o, 0)?;
    backward(m, &f, scale, o, grads);
    Ok(f.logp)
}
