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
use crate::{Error, Result};

/// How the policy pass runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassOptions {
    /// keep only layer inputs and recompute each layer in the backward
    pub checkpointing: bool,
    /// PEFT's `lora_dropout`: dropout on the input of every LoRA A
    pub lora_dropout: f32,
    /// encode a pair's prompt once for both answers (`[prompt | chosen | rejected]`, rejected not
    /// seeing chosen) instead of two sequences
    pub prefix_sharing: bool,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            checkpointing: true,
            lora_dropout: 0.0,
            prefix_sharing: true,
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
    fn position(&self, layer: usize, proj: Proj) -> Option<usize> {
        self.modules
            .iter()
            .position(|m| (m.layer, m.proj) == (layer, proj))
    }

    /// The index of one module's gradients; an error naming it when no backward reached it.
    fn index(&self, layer: usize, proj: Proj) -> Result<usize> {
        self.position(layer, proj)
            .ok_or_else(|| Error::Invalid(format!("no gradient for layer {layer} {proj:?}")))
    }

    /// The gradients of one module (an error when no backward reached it).
    pub fn module(&self, layer: usize, proj: Proj) -> Result<&ModuleGrad<B>> {
        Ok(&self.modules[self.index(layer, proj)?])
    }

    /// As `module`, to update them in place (the optimizer may scale them).
    pub fn module_mut(&mut self, layer: usize, proj: Proj) -> Result<&mut ModuleGrad<B>> {
        let i = self.index(layer, proj)?;
        Ok(&mut self.modules[i])
    }

    fn slot(&mut self, be: &B, key: (usize, Proj), a_len: usize, b_len: usize) -> &mut ModuleGrad<B> {
        let i = match self.position(key.0, key.1) {
            Some(i) => i,
            None => {
                self.modules.push(ModuleGrad {
                    layer: key.0,
                    proj: key.1,
                    da: be.zeros(a_len),
                    db: be.zeros(b_len),
                });
                self.modules.len() - 1
            }
        };
        &mut self.modules[i]
    }

    /// (dA, dB) of one module, copied to the host.
    pub fn host(&self, be: &B, layer: usize, proj: Proj) -> Option<(Vec<f32>, Vec<f32>)> {
        let m = &self.modules[self.position(layer, proj)?];
        Some((be.download(&m.da), be.download(&m.db)))
    }
}

/// Gradients of the base weights, for full-parameter training (the SFT stage): every decoder linear
/// (and its bias where the config has one), the norms, the LM head, the embedding rows of the text
/// tokens, and the image-feature rows (whose gradient the projector's backward continues from).
pub struct FullGrads<B: Backend> {
    /// (layer, module) -> dW (out, in)
    pub linears: Vec<((usize, Proj), B::Buf)>,
    /// (layer, module) -> d bias (out), for the linears that have one (`attention_bias`, `mlp_bias`)
    pub biases: Vec<((usize, Proj), B::Buf)>,
    /// (layer, 0 = input_layernorm / 1 = post_attention_layernorm) -> dw (hidden)
    pub norms: Vec<((usize, u8), B::Buf)>,
    /// the final norm's dw (hidden)
    pub final_norm: Option<B::Buf>,
    /// dW of the LM head (vocab, hidden)
    pub lm_head: Option<B::Buf>,
    /// d embedding table (vocab, hidden), text rows only
    pub embed: Option<B::Buf>,
    /// d image features (image rows of the prompt in order, hidden), summed over calls
    pub features: Option<B::Buf>,
}

impl<B: Backend> Default for FullGrads<B> {
    fn default() -> Self {
        FullGrads {
            linears: Vec::new(),
            biases: Vec::new(),
            norms: Vec::new(),
            final_norm: None,
            lm_head: None,
            embed: None,
            features: None,
        }
    }
}

/// `slot` of a keyed list of gradient buffers, created as zeros of `len` on first use.
fn keyed<'a, B: Backend, K: PartialEq + Copy>(
    be: &B,
    list: &'a mut Vec<(K, B::Buf)>,
    key: K,
    len: usize,
) -> &'a mut B::Buf {
    let i = match list.iter().position(|(k, _)| *k == key) {
        Some(i) => i,
        None => {
            list.push((key, be.upload(&vec![0.0; len])));
            list.len() - 1
        }
    };
    &mut list[i].1
}

fn zeros_or<'a, B: Backend>(be: &B, g: &'a mut Option<B::Buf>, len: usize) -> &'a mut B::Buf {
    g.get_or_insert_with(|| be.upload(&vec![0.0; len]))
}

/// Where a backward pass puts its gradients: always the LoRA's, and the base weights' when asked.
struct Sink<'a, B: Backend> {
    lora: &'a mut LoraGrads<B>,
    full: Option<&'a mut FullGrads<B>>,
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

/// dy (t, out) -> dx (t, in); adds dA += s · (dy B)ᵀ drop(x) and dB += s · dyᵀ (drop(x) Aᵀ), and
/// dW += dyᵀ x when the sink takes base-weight gradients.
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
    grads: &mut Sink<B>,
) -> B::Buf {
    let mut dx = be.linear_backward(dy, t, &l.w);
    if let Some(full) = grads.full.as_deref_mut() {
        // dW (out, in) += dyᵀ x
        let (out, inp) = be.mat_shape(&l.w);
        be.matmul_tn_acc(
            keyed(be, &mut full.linears, key, out * inp),
            1.0,
            dy,
            x,
            t,
            out,
            inp,
        );
        if l.bias.is_some() {
            // d bias (out) += Σ_rows dy
            be.add(keyed(be, &mut full.biases, key, out), &be.col_sum(dy, t, out));
        }
    }
    if let (Some(lp), Some(xa)) = (&l.lora, xa) {
        let ((r, inp), (out, _)) = (be.mat_shape(&lp.a), be.mat_shape(&lp.b));
        let g = grads.lora.slot(be, key, r * inp, out * r);
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
    /// the attention's log-sum-exp per (row, head) where the backend keeps one (the GPU's)
    lse: Option<B::Buf>,
    x2: B::Buf,
    a2: B::Buf,
    g: B::Buf, // gate before the activation (t, I)
    u: B::Buf,
    mid: B::Buf,
}

/// One packed sequence after the forward: the log-prob of each response and what the backward needs.
pub struct SeqForward<B: Backend> {
    ids: Vec<u32>,
    layout: Layout,
    key: u64,
    /// each layer's input (t, h)
    inputs: Vec<B::Buf>,
    /// every layer's activations (empty with gradient checkpointing)
    acts: Vec<LayerActs<B>>,
    /// the last layer's output, before the final norm
    x_last: B::Buf,
    /// per response: the rows that predict its tokens, and the tokens
    rows: Vec<(Vec<usize>, Vec<u32>)>,
    /// the final-normed hidden states of those rows, all responses in order (n, h)
    rows_hidden: B::Buf,
    lse: Vec<f32>,
    /// summed log-prob of each response's tokens
    pub logps: Vec<f64>,
}

impl<B: Backend> SeqForward<B> {
    /// rows of the packed sequence
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

/// Where the rows of a packed sequence sit: `[prompt | response 1 | response 2 ...]`, every response
/// continuing the prompt's positions, and the second response not seeing the first (the
/// prefix-shared DPO layout: the prompt is encoded once for both answers).
struct Layout {
    t: usize,
    positions: Vec<usize>,
    hole: Option<(usize, usize, usize)>,
}

impl Layout {
    fn new(prompt: usize, responses: &[usize]) -> Self {
        assert!(responses.len() <= 2, "at most two responses share a prompt");
        let mut positions: Vec<usize> = (0..prompt).collect();
        for &n in responses {
            positions.extend(prompt..prompt + n);
        }
        let hole = (responses.len() == 2).then(|| {
            let first = prompt + responses[0];
            (first, prompt, first)
        });
        Layout {
            t: positions.len(),
            positions,
            hole,
        }
    }

    fn attn(&self, m: &Llava<impl Backend>) -> AttnShape {
        let c = &m.cfg.text;
        AttnShape {
            tq: self.t,
            tk: self.t,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            causal: true,
            q_pos0: 0,
            hole: self.hole,
        }
    }
}

fn layer_fwd<B: Backend>(
    m: &Llava<B>,
    li: usize,
    x: &B::Buf,
    lay: &Layout,
    o: PassOptions,
    key: u64,
) -> (B::Buf, LayerActs<B>) {
    let (be, c, l) = (&m.be, &m.cfg.text, &m.decoder.layers[li]);
    let (t, positions) = (lay.t, &lay.positions);
    let drop = |p: Proj| (o.lora_dropout, module_key(key, li, p));
    let a1 = be.rms_norm(x, c.hidden_size, &l.input_norm, c.rms_norm_eps);
    let (mut q, xa_q) = lin_fwd(be, &l.q, &a1, t, drop(Proj::Q));
    let (mut k, xa_k) = lin_fwd(be, &l.k, &a1, t, drop(Proj::K));
    let (v, xa_v) = lin_fwd(be, &l.v, &a1, t, drop(Proj::V));
    be.rope(&mut q, c.num_heads, c.head_dim, positions, c.rope_theta);
    be.rope(&mut k, c.num_kv_heads, c.head_dim, positions, c.rope_theta);
    let (att, lse) = be.attention_train(&q, &k, &v, lay.attn(m));
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
        lse,
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
    lay: &Layout,
    o: PassOptions,
    key: u64,
    grads: &mut Sink<B>,
) -> B::Buf {
    let (be, c, l) = (&m.be, &m.cfg.text, &m.decoder.layers[li]);
    let (h, t, positions) = (c.hidden_size, lay.t, &lay.positions);
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
    if let Some(full) = grads.full.as_deref_mut() {
        be.add(
            keyed(be, &mut full.norms, (li, 1), h),
            &be.rms_norm_weight_grad(&s.x2, h, &da2, c.rms_norm_eps),
        );
    }
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
    let (mut dq, mut dk, dv) =
        be.attention_backward(&s.q, &s.k, &s.v, &s.o, &datt, s.lse.as_ref(), lay.attn(m));
    be.rope_backward(&mut dq, c.num_heads, c.head_dim, positions, c.rope_theta);
    be.rope_backward(&mut dk, c.num_kv_heads, c.head_dim, positions, c.rope_theta);
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
    if let Some(full) = grads.full.as_deref_mut() {
        be.add(
            keyed(be, &mut full.norms, (li, 0), h),
            &be.rms_norm_weight_grad(x, h, &da1, c.rms_norm_eps),
        );
    }
    dx
}

/// The forward of `prompt` followed by one response, or by two sharing the prompt (packed as
/// `[prompt | first | second]`, the second not seeing the first: the prompt is encoded once). Returns
/// each response's summed log-prob and what the backward needs. `features`: the prompt's image
/// features; `key` draws the LoRA-dropout masks (the backward reuses them).
pub fn forward<B: Backend>(
    m: &Llava<B>,
    prompt: &[u32],
    responses: &[&[u32]],
    features: &B::Buf,
    o: PassOptions,
    key: u64,
) -> Result<SeqForward<B>> {
    let (be, c) = (&m.be, &m.cfg.text);
    assert!(
        !prompt.is_empty() && responses.iter().all(|r| !r.is_empty()),
        "a response needs a prompt before it and at least one token"
    );
    let layout = Layout::new(
        prompt.len(),
        &responses.iter().map(|r| r.len()).collect::<Vec<_>>(),
    );
    let mut ids = prompt.to_vec();
    // per response: row prompt-1 predicts its first token, its own rows the rest
    let mut rows = Vec::with_capacity(responses.len());
    for r in responses {
        let start = ids.len();
        let idx: Vec<usize> = std::iter::once(prompt.len() - 1)
            .chain(start..start + r.len() - 1)
            .collect();
        rows.push((idx, r.to_vec()));
        ids.extend_from_slice(r);
    }
    let mut x = m.input_embeddings(&ids, features)?; // (t, h)
    let mut inputs = Vec::with_capacity(c.num_layers);
    let mut acts = Vec::new();
    for li in 0..c.num_layers {
        let (next, a) = layer_fwd(m, li, &x, &layout, o, key);
        if !o.checkpointing {
            acts.push(a);
        }
        inputs.push(std::mem::replace(&mut x, next));
    }
    let h = c.hidden_size;
    let hidden = be.rms_norm(&x, h, &m.decoder.norm, c.rms_norm_eps);
    let parts: Vec<B::Buf> = rows
        .iter()
        .flat_map(|(idx, _)| {
            // idx = [prompt-1, start..start+n-1]: contiguous unless the response is not the first
            let (first, rest) = (idx[0], &idx[1..]);
            let mut v = vec![be.slice_rows(&hidden, h, first, first + 1)];
            if let (Some(&a), Some(&b)) = (rest.first(), rest.last()) {
                v.push(be.slice_rows(&hidden, h, a, b + 1));
            }
            v
        })
        .collect();
    let rows_hidden = be.concat_rows(&parts); // (n, h)
    let targets: Vec<u32> = rows.iter().flat_map(|(_, t)| t.iter().copied()).collect();
    let (lp, lse) = be.fused_logprobs(&rows_hidden, targets.len(), &m.decoder.lm_head, &targets);
    let mut logps = Vec::with_capacity(rows.len());
    let mut at = 0;
    for (_, t) in &rows {
        logps.push(lp[at..at + t.len()].iter().map(|&v| v as f64).sum());
        at += t.len();
    }
    Ok(SeqForward {
        ids,
        layout,
        key,
        inputs,
        acts,
        x_last: x,
        rows,
        rows_hidden,
        lse,
        logps,
    })
}

impl<B: Backend> SeqForward<B> {
    /// Per response: how many of its tokens are the model's greedy choice (argmax of the logits,
    /// first index on ties) — the SFT stage's token accuracy. Recomputes the logits of the response
    /// rows only.
    pub fn greedy_hits(&self, m: &Llava<B>) -> Vec<usize> {
        let be = &m.be;
        let n: usize = self.rows.iter().map(|(_, t)| t.len()).sum();
        let vocab = m.cfg.text.vocab_size;
        // the pick per row on the backend (on the GPU, two numbers per row come back, not the row)
        let picks = be.greedy_rows(&m.decoder.logits(be, &self.rows_hidden, n), n, vocab);
        let mut picks = picks.iter();
        self.rows
            .iter()
            .map(|(_, targets)| {
                targets
                    .iter()
                    .zip(picks.by_ref())
                    .filter(|(&t, &(pick, _))| pick == t)
                    .count()
            })
            .collect()
    }
}

/// Adds `Σ_r scales[r] · ∂logp_r/∂θ` of the responses to `grads` (every LoRA A and B).
pub fn backward<B: Backend>(
    m: &Llava<B>,
    f: &SeqForward<B>,
    scales: &[f64],
    o: PassOptions,
    grads: &mut LoraGrads<B>,
) {
    backward_into(
        m,
        f,
        scales,
        o,
        Sink {
            lora: grads,
            full: None,
        },
    );
}

/// [`backward`], and the base weights' gradients into `full` (full-parameter training).
pub fn backward_full<B: Backend>(
    m: &Llava<B>,
    f: &SeqForward<B>,
    scales: &[f64],
    o: PassOptions,
    lora: &mut LoraGrads<B>,
    full: &mut FullGrads<B>,
) {
    backward_into(
        m,
        f,
        scales,
        o,
        Sink {
            lora,
            full: Some(full),
        },
    );
}

fn backward_into<B: Backend>(
    m: &Llava<B>,
    f: &SeqForward<B>,
    scales: &[f64],
    o: PassOptions,
    mut grads: Sink<B>,
) {
    let (be, c) = (&m.be, &m.cfg.text);
    let (t, h) = (f.layout.t, c.hidden_size);
    assert_eq!(scales.len(), f.rows.len(), "one scale per response");
    let dlogp: Vec<f32> = f
        .rows
        .iter()
        .zip(scales)
        .flat_map(|((_, tg), &s)| std::iter::repeat_n(s as f32, tg.len()))
        .collect();
    let targets: Vec<u32> = f.rows.iter().flat_map(|(_, t)| t.iter().copied()).collect();
    let lm = &m.decoder.lm_head;
    let drows = be.fused_logprobs_backward(&f.rows_hidden, targets.len(), lm, &targets, &f.lse, &dlogp); // (n, h)
    if let Some(full) = grads.full.as_deref_mut() {
        let (vocab, _) = be.mat_shape(lm);
        let g = zeros_or(be, &mut full.lm_head, vocab * h);
        be.fused_logprobs_weight_grad(&f.rows_hidden, targets.len(), lm, &targets, &f.lse, &dlogp, g);
    }
    // back to the rows of the sequence; the prompt's last row serves every response, so add
    let mut dhidden = be.upload(&vec![0.0; t * h]);
    let rows: Vec<usize> = f.rows.iter().flat_map(|(idx, _)| idx.iter().copied()).collect();
    be.scatter_add_rows(&mut dhidden, h, &rows, &drows);
    let mut dx = be.rms_norm_backward(&f.x_last, h, &m.decoder.norm, &dhidden, c.rms_norm_eps);
    if let Some(full) = grads.full.as_deref_mut() {
        let g = zeros_or(be, &mut full.final_norm, h);
        be.add(
            g,
            &be.rms_norm_weight_grad(&f.x_last, h, &dhidden, c.rms_norm_eps),
        );
    }
    for li in (0..c.num_layers).rev() {
        let x = &f.inputs[li];
        dx = if o.checkpointing {
            let (_, a) = layer_fwd(m, li, x, &f.layout, o, f.key);
            layer_bwd(m, li, x, &a, dx, &f.layout, o, f.key, &mut grads)
        } else {
            layer_bwd(m, li, x, &f.acts[li], dx, &f.layout, o, f.key, &mut grads)
        };
    }
    if let Some(full) = grads.full.as_deref_mut() {
        // dx: the gradient of the input embeddings; text rows go to the table, image rows to the features
        let image = m.cfg.image_token_id;
        let (text, img): (Vec<usize>, Vec<usize>) = (0..t).partition(|&i| f.ids[i] != image);
        let (vocab, _) = be.mat_shape(&m.decoder.embed);
        let table = zeros_or(be, &mut full.embed, vocab * h);
        let text_ids: Vec<usize> = text.iter().map(|&i| f.ids[i] as usize).collect();
        be.scatter_add_rows(table, h, &text_ids, &gather_rows(be, &dx, h, &text));
        if !img.is_empty() {
            let feats = zeros_or(be, &mut full.features, img.len() * h);
            be.add(feats, &gather_rows(be, &dx, h, &img));
        }
    }
}

/// The listed rows of x (rows, d), in order, copied run by run of consecutive rows.
fn gather_rows<B: Backend>(be: &B, x: &B::Buf, d: usize, rows: &[usize]) -> B::Buf {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let start = rows[i];
        let mut end = start + 1;
        while i + 1 < rows.len() && rows[i + 1] == end {
            i += 1;
            end += 1;
        }
        parts.push(be.slice_rows(x, d, start, end));
        i += 1;
    }
    be.concat_rows(&parts)
}

/// Forward and backward of `prompt` + `response`: its summed log-prob, and `scale · ∂/∂θ` of it added
/// to `grads`. `features`: the prompt's image features (n·image_seq_length, hidden).
#[allow(clippy::too_many_arguments)]
pub fn sequence_logp_backward<B: Backend>(
    m: &Llava<B>,
    prompt: &[u32],
    response: &[u32],
    features: &B::Buf,
    scale: f64,
    o: PassOptions,
    grads: &mut LoraGrads<B>,
) -> Result<f64> {
    let f = forward(m, prompt, &[response], features, o, 0)?;
    backward(m, &f, &[scale], o, grads);
    Ok(f.logps[0])
}

/// Both answers of a preference pair after the forward: one packed sequence (prefix sharing) or two.
pub struct PairForward<B: Backend> {
    seqs: Vec<SeqForward<B>>,
}

impl<B: Backend> PairForward<B> {
    /// (chosen, rejected) summed log-probs
    pub fn logps(&self) -> (f64, f64) {
        let all: Vec<f64> = self.seqs.iter().flat_map(|s| s.logps.iter().copied()).collect();
        (all[0], all[1])
    }
    /// rows the forward ran over
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens()).sum()
    }
}

/// The policy forward of a pair's two answers, in the layout `o.prefix_sharing` asks for.
pub fn pair_forward<B: Backend>(
    m: &Llava<B>,
    prompt: &[u32],
    chosen: &[u32],
    rejected: &[u32],
    features: &B::Buf,
    o: PassOptions,
    key: u64,
) -> Result<PairForward<B>> {
    let seqs = if o.prefix_sharing {
        vec![forward(m, prompt, &[chosen, rejected], features, o, key)?]
    } else {
        vec![
            forward(m, prompt, &[chosen], features, o, key)?,
            forward(m, prompt, &[rejected], features, o, key ^ 1)?,
        ]
    };
    Ok(PairForward { seqs })
}

/// Adds `gc · ∂logp_chosen/∂θ + gr · ∂logp_rejected/∂θ` to `grads`.
pub fn pair_backward<B: Backend>(
    m: &Llava<B>,
    f: &PairForward<B>,
    gc: f64,
    gr: f64,
    o: PassOptions,
    grads: &mut LoraGrads<B>,
) {
    match f.seqs.as_slice() {
        [packed] => backward(m, packed, &[gc, gr], o, grads),
        [c, r] => {
            backward(m, c, &[gc], o, grads);
            backward(m, r, &[gr], o, grads);
        }
        _ => unreachable!("a pair is one or two sequences"),
    }
}
