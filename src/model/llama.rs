//! LLaMA decoder: RMSNorm, RoPE, GQA attention with a KV cache, SwiGLU MLP, optional unmerged LoRA.
use super::config::{Activation, TextConfig};
use super::lora::{LoraAdapter, Proj as ProjKind};
use super::weights::WeightStore;
use crate::backend::{Backend, CachedSeq, Heads, KeyGroups, Mass};
use crate::{Error, Result};

/// A low-rank update `scale · B A` kept beside its base weight (never merged into it).
pub struct LoraPair<B: Backend> {
    pub a: B::Mat, // (r, in)
    pub b: B::Mat, // (out, r)
    pub scale: f32,
}

/// One linear layer of the decoder.
pub struct Linear<B: Backend> {
    pub w: B::Mat, // (out, in)
    pub bias: Option<B::Buf>,
    pub lora: Option<LoraPair<B>>,
}

impl<B: Backend> Linear<B> {
    /// y (m, out) = x (m, in) · Wᵀ + bias [+ scale · (x Aᵀ) Bᵀ when `use_lora`]
    pub fn forward(&self, be: &B, x: &B::Buf, m: usize, use_lora: bool) -> B::Buf {
        Self::forward_many(be, &[self], x, m, use_lora)
            .pop()
            .expect("one layer")
    }

    /// `forward` of several layers that read the same x (q, k and v; gate and up): their products
    /// with x, the LoRA down-projections included, go to the backend together (`linears`, which
    /// rounds x to bf16 once on the GPU).
    pub fn forward_many(be: &B, layers: &[&Self], x: &B::Buf, m: usize, use_lora: bool) -> Vec<B::Buf> {
        let lora: Vec<Option<&LoraPair<B>>> = layers
            .iter()
            .map(|l| l.lora.as_ref().filter(|_| use_lora))
            .collect();
        let mut ws: Vec<(&B::Mat, Option<&B::Buf>)> =
            layers.iter().map(|l| (&l.w, l.bias.as_ref())).collect();
        ws.extend(lora.iter().flatten().map(|l| (&l.a, None)));
        let mut products = be.linears(x, m, &ws).into_iter();
        let mut ys: Vec<B::Buf> = products.by_ref().take(layers.len()).collect();
        for (y, l) in ys.iter_mut().zip(&lora) {
            if let Some(l) = l {
                let t = products.next().expect("a LoRA down-projection"); // (m, r)
                be.axpy(y, l.scale, &be.linear(&t, m, &l.b, None));
            }
        }
        ys
    }
}

pub struct LlamaLayer<B: Backend> {
    pub input_norm: B::Buf,
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    pub post_norm: B::Buf,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
}

impl<B: Backend> LlamaLayer<B> {
    pub fn proj(&self, p: ProjKind) -> &Linear<B> {
        match p {
            ProjKind::Q => &self.q,
            ProjKind::K => &self.k,
            ProjKind::V => &self.v,
            ProjKind::O => &self.o,
            ProjKind::Gate => &self.gate,
            ProjKind::Up => &self.up,
            ProjKind::Down => &self.down,
        }
    }

    pub fn proj_mut(&mut self, p: ProjKind) -> &mut Linear<B> {
        match p {
            ProjKind::Q => &mut self.q,
            ProjKind::K => &mut self.k,
            ProjKind::V => &mut self.v,
            ProjKind::O => &mut self.o,
            ProjKind::Gate => &mut self.gate,
            ProjKind::Up => &mut self.up,
            ProjKind::Down => &mut self.down,
        }
    }
}

pub struct Decoder<B: Backend> {
    pub cfg: TextConfig,
    pub embed: B::Mat, // (vocab, hidden)
    pub layers: Vec<LlamaLayer<B>>,
    pub norm: B::Buf,
    pub lm_head: B::Mat, // (vocab, hidden)
}

/// Keys and values of every layer for the positions seen so far: per layer (len, kv_heads·head_dim),
/// in the backend's cache storage (`Backend::Kv`: bf16 on CUDA).
pub struct KvCache<B: Backend> {
    pub k: Vec<B::Kv>,
    pub v: Vec<B::Kv>,
    pub len: usize,
}

impl<B: Backend> Clone for KvCache<B> {
    fn clone(&self) -> Self {
        KvCache {
            k: self.k.clone(),
            v: self.v.clone(),
            len: self.len,
        }
    }
}

/// One sequence of a packed batch: how many new rows it has, and what attention it records.
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    pub rows: usize,
    pub capture: Option<&'a MassCapture<'a>>,
}

/// Which attention masses a forward pass records: for each layer in `layers`, the mass of every query
/// row on every key group, heads averaged.
pub struct MassCapture<'a> {
    pub groups: &'a KeyGroups,
    pub layers: Vec<usize>,
}

impl<B: Backend> Decoder<B> {
    /// `p`: the decoder's prefix (`language_model.model.` or `model.language_model.`); `lm_head`:
    /// the LM head's full name, empty for tied embeddings.
    pub fn load(be: &B, w: &WeightStore, cfg: &TextConfig, p: &str, lm_head: &str) -> Result<Self> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        if cfg.act != Activation::Silu {
            return Err(Error::Invalid(format!(
                "decoder activation {:?} is not supported (SwiGLU needs silu)",
                cfg.act
            )));
        }
        let vec = |name: &str, n: usize| be.vector(w.get(&format!("{p}{name}"))?.expect_shape(&[n])?);
        let lin = |name: &str, o: usize, i: usize, bias: bool| -> Result<Linear<B>> {
            Ok(Linear {
                w: be.matrix(w.get(&format!("{p}{name}.weight"))?.expect_shape(&[o, i])?)?,
                bias: if bias {
                    Some(vec(&format!("{name}.bias"), o)?)
                } else {
                    None
                },
                lora: None,
            })
        };
        let embed = be.matrix(
            w.get(&format!("{p}embed_tokens.weight"))?
                .expect_shape(&[cfg.vocab_size, h])?,
        )?;
        let lm_head = if lm_head.is_empty() {
            if !cfg.tie_word_embeddings {
                return Err(Error::Invalid(format!(
                    "{}: no LM head (`language_model.lm_head.weight` or `lm_head.weight`) and tie_word_embeddings is false",
                    w.source().display()
                )));
            }
            be.matrix(w.get(&format!("{p}embed_tokens.weight"))?)?
        } else {
            be.matrix(w.get(lm_head)?.expect_shape(&[cfg.vocab_size, h])?)?
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let n = |s: &str| format!("layers.{l}.{s}");
            let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
            layers.push(LlamaLayer {
                input_norm: vec(&n("input_layernorm.weight"), h)?,
                q: lin(&n("self_attn.q_proj"), qd, h, ab)?,
                k: lin(&n("self_attn.k_proj"), kvd, h, ab)?,
                v: lin(&n("self_attn.v_proj"), kvd, h, ab)?,
                o: lin(&n("self_attn.o_proj"), h, qd, ab)?,
                post_norm: vec(&n("post_attention_layernorm.weight"), h)?,
                gate: lin(&n("mlp.gate_proj"), i, h, mb)?,
                up: lin(&n("mlp.up_proj"), i, h, mb)?,
                down: lin(&n("mlp.down_proj"), h, i, mb)?,
            });
        }
        let norm = vec("norm.weight", h)?;
        Ok(Decoder {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Attaches (unmerged) the adapter's low-rank updates to their linear layers.
    pub fn attach_lora(&mut self, be: &B, adapter: &LoraAdapter) -> Result<()> {
        for m in &adapter.modules {
            let layer = self.layers.get_mut(m.layer).ok_or_else(|| {
                Error::tensor(
                    &adapter.file,
                    &m.a_name,
                    format!("layer {} does not exist in the model", m.layer),
                )
            })?;
            let lin = layer.proj_mut(m.proj);
            let (out, inp) = be.mat_shape(&lin.w);
            let a = m.a.expect_shape(&[adapter.r, inp])?;
            let b = m.b.expect_shape(&[out, adapter.r])?;
            lin.lora = Some(LoraPair {
                a: be.matrix(a)?,
                b: be.matrix(b)?,
                scale: adapter.scale,
            });
        }
        Ok(())
    }

    /// Whether any linear carries a LoRA update.
    pub fn has_lora(&self) -> bool {
        self.layers
            .iter()
            .any(|l| ProjKind::ALL.iter().any(|&p| l.proj(p).lora.is_some()))
    }

    /// Removes every LoRA update.
    pub fn detach_lora(&mut self) {
        for l in &mut self.layers {
            for p in ProjKind::ALL {
                l.proj_mut(p).lora = None;
            }
        }
    }

    pub fn new_cache(&self, be: &B) -> KvCache<B> {
        KvCache {
            k: (0..self.cfg.num_layers).map(|_| be.kv_new()).collect(),
            v: (0..self.cfg.num_layers).map(|_| be.kv_new()).collect(),
            len: 0,
        }
    }

    /// x (t, hidden) of the positions `cache.len..cache.len+t` -> final-normed hidden states (t, hidden).
    /// Appends the new keys/values to `cache`. Returns also the captured masses, per captured layer
    /// (t, n_groups) in the order of `capture.layers`.
    pub fn forward(
        &self,
        be: &B,
        x: B::Buf,
        t: usize,
        cache: &mut KvCache<B>,
        use_lora: bool,
        capture: Option<&MassCapture>,
    ) -> (B::Buf, Vec<Vec<f32>>) {
        let seg = Segment { rows: t, capture };
        let (h, mut masses) = self.forward_packed(be, x, &[seg], std::slice::from_mut(cache), use_lora);
        (h, be.read_masses(masses.pop().unwrap_or_default()))
    }

    /// A packed batch: x holds the rows of several sequences back to back (segment i: `segs[i].rows`
    /// rows continuing `caches[i]`). The linear layers run once over all rows (one weight read for the
    /// batch); RoPE and attention run per sequence. Returns the final-normed hidden states of all rows
    /// and, per segment, its captured masses (per captured layer: (rows, n_groups)), left where the
    /// backend put them: read them with `Backend::read_masses` after the step's last wait (on the
    /// GPU a read in the middle of the step stalls the issue of the layers after it).
    pub fn forward_packed(
        &self,
        be: &B,
        mut x: B::Buf,
        segs: &[Segment],
        caches: &mut [KvCache<B>],
        use_lora: bool,
    ) -> (B::Buf, Vec<Vec<Mass<B>>>) {
        assert_eq!(segs.len(), caches.len(), "one cache per segment");
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let heads = Heads {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            dim: hd,
        };
        let t: usize = segs.iter().map(|s| s.rows).sum();
        let positions: Vec<usize> = segs
            .iter()
            .zip(caches.iter())
            .flat_map(|(s, kv)| kv.len..kv.len + s.rows)
            .collect();
        let mut masses: Vec<Vec<(usize, Mass<B>)>> = (0..segs.len()).map(|_| Vec::new()).collect();
        // each layer's input norm is taken with the residual add that ends the layer before
        let first = self.layers.first().map_or(&self.norm, |l| &l.input_norm);
        let mut a = be.rms_norm(&x, h, first, c.rms_norm_eps);
        for (li, l) in self.layers.iter().enumerate() {
            // q (t, heads·hd), k and v (t, kv_heads·hd)
            let [mut q, mut k, v]: [B::Buf; 3] =
                Linear::forward_many(be, &[&l.q, &l.k, &l.v], &a, t, use_lora)
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("three products"));
            be.rope_qk(
                &mut q,
                &mut k,
                c.num_heads,
                c.num_kv_heads,
                hd,
                &positions,
                c.rope_theta,
            );
            let mut seqs: Vec<CachedSeq<B>> = segs
                .iter()
                .zip(caches.iter_mut())
                .map(|(seg, kv)| CachedSeq {
                    k: &mut kv.k[li],
                    v: &mut kv.v[li],
                    len: kv.len,
                    rows: seg.rows,
                    groups: seg
                        .capture
                        .filter(|cp| cp.layers.contains(&li))
                        .map(|cp| cp.groups),
                })
                .collect();
            let (o, got) = be.attention_cached(&q, &k, &v, heads, &mut seqs);
            for (si, mass) in got.into_iter().enumerate() {
                if let Some(m) = mass {
                    masses[si].push((li, m));
                }
            }
            let a2 = be.add_rms_norm(
                &mut x,
                &l.o.forward(be, &o, t, use_lora),
                h,
                &l.post_norm,
                c.rms_norm_eps,
            );
            // gate and up (t, intermediate)
            let [mut g, up]: [B::Buf; 2] = Linear::forward_many(be, &[&l.gate, &l.up], &a2, t, use_lora)
                .try_into()
                .unwrap_or_else(|_| unreachable!("two products"));
            be.swiglu(&mut g, &up);
            let next = self.layers.get(li + 1).map_or(&self.norm, |n| &n.input_norm);
            a = be.add_rms_norm(
                &mut x,
                &l.down.forward(be, &g, t, use_lora),
                h,
                next,
                c.rms_norm_eps,
            );
        }
        for (seg, kv) in segs.iter().zip(caches.iter_mut()) {
            kv.len += seg.rows;
        }
        // per segment, the captured layers in the order asked for
        let ordered = segs
            .iter()
            .zip(masses)
            .map(|(seg, mut got)| match seg.capture {
                Some(cp) => cp
                    .layers
                    .iter()
                    .map(|want| match got.iter().position(|(li, _)| li == want) {
                        Some(i) => got.swap_remove(i).1,
                        None => Mass::Host(Vec::new()),
                    })
                    .collect(),
                None => Vec::new(),
            })
            .collect();
        (a, ordered)
    }

    /// hidden (t, hidden) -> logits (t, vocab)
    pub fn logits(&self, be: &B, hidden: &B::Buf, t: usize) -> B::Buf {
        be.linear(hidden, t, &self.lm_head, None)
    }
}
