//! CLIP vision tower as LLaVA uses it: patch embedding, CLS + positions, pre-LN, the encoder layers up
//! to `vision_feature_layer` (the layers after it are never run), CLS dropped under strategy `default`.
use super::config::{FeatureSelect, LlavaConfig, VisionConfig};
use super::weights::WeightStore;
use crate::backend::{AttnShape, Backend};
use crate::Result;

struct ClipLayer<B: Backend> {
    ln1: (B::Buf, B::Buf),
    q: (B::Mat, B::Buf),
    k: (B::Mat, B::Buf),
    v: (B::Mat, B::Buf),
    out: (B::Mat, B::Buf),
    ln2: (B::Buf, B::Buf),
    fc1: (B::Mat, B::Buf),
    fc2: (B::Mat, B::Buf),
}

pub struct VisionTower<B: Backend> {
    cfg: VisionConfig,
    select: FeatureSelect,
    patch: B::Mat,   // (hidden, C·P·P) = conv weight (hidden, C, P, P) flattened
    class: Vec<f32>, // (hidden)
    pos: Vec<f32>,   // (1 + patches, hidden)
    pre_ln: (B::Buf, B::Buf),
    layers: Vec<ClipLayer<B>>, // the first `vision_feature_layer` layers only
}

impl<B: Backend> VisionTower<B> {
    /// `p`: the tower's tensor-name prefix (see `super::Prefixes`).
    pub fn load(be: &B, w: &WeightStore, cfg: &LlavaConfig, p: &str) -> Result<Self> {
        let v = &cfg.vision;
        let (h, i) = (v.hidden_size, v.intermediate_size);
        let vec = |name: &str, n: usize| -> Result<B::Buf> {
            be.vector(w.get(&format!("{p}.{name}"))?.expect_shape(&[n])?)
        };
        let mat = |name: &str, shape: &[usize]| -> Result<B::Mat> {
            be.matrix(w.get(&format!("{p}.{name}"))?.expect_shape(shape)?)
        };
        let lin = |name: &str, o: usize, i: usize| -> Result<(B::Mat, B::Buf)> {
            Ok((
                mat(&format!("{name}.weight"), &[o, i])?,
                vec(&format!("{name}.bias"), o)?,
            ))
        };
        let n_pos = v.num_patches() + 1;
        let patch = mat(
            "embeddings.patch_embedding.weight",
            &[h, v.num_channels, v.patch_size, v.patch_size],
        )?;
        let class = w
            .get(&format!("{p}.embeddings.class_embedding"))?
            .expect_shape(&[h])?
            .to_f32();
        let pos = w
            .get(&format!("{p}.embeddings.position_embedding.weight"))?
            .expect_shape(&[n_pos, h])?
            .to_f32();
        let pre_ln = (vec("pre_layrnorm.weight", h)?, vec("pre_layrnorm.bias", h)?);
        let mut layers = Vec::new();
        for l in 0..cfg.vision_feature_layer {
            let n = |s: &str| format!("encoder.layers.{l}.{s}");
            layers.push(ClipLayer {
                ln1: (vec(&n("layer_norm1.weight"), h)?, vec(&n("layer_norm1.bias"), h)?),
                q: lin(&n("self_attn.q_proj"), h, h)?,
                k: lin(&n("self_attn.k_proj"), h, h)?,
                v: lin(&n("self_attn.v_proj"), h, h)?,
                out: lin(&n("self_attn.out_proj"), h, h)?,
                ln2: (vec(&n("layer_norm2.weight"), h)?, vec(&n("layer_norm2.bias"), h)?),
                fc1: lin(&n("mlp.fc1"), i, h)?,
                fc2: lin(&n("mlp.fc2"), h, i)?,
            });
        }
        Ok(VisionTower {
            cfg: v.clone(),
            select: cfg.feature_select,
            patch,
            class,
            pos,
            pre_ln,
            layers,
        })
    }

    /// Tokens per image handed to the projector.
    pub fn tokens_per_image(&self) -> usize {
        self.cfg.num_patches() + usize::from(self.select == FeatureSelect::Full)
    }

    /// n images, each pixels (C, S, S) -> features (n·tokens_per_image, hidden). The linear layers run
    /// over the rows of all images at once (bigger, more efficient products), and so does the
    /// attention, with each image's heads as heads of their own.
    pub fn forward(&self, be: &B, images: &[&[f32]]) -> B::Buf {
        let c = &self.cfg;
        let (h, g, ps) = (c.hidden_size, c.grid(), c.patch_size);
        let s = c.image_size;
        let (n, t) = (images.len(), g * g + 1);
        // im2col: patches (n·g·g, C·P·P), each row in the conv weight's (C, P, P) order
        let cpp = c.num_channels * ps * ps;
        let mut cols = vec![0f32; n * g * g * cpp];
        for (pixels, img_cols) in images.iter().zip(cols.chunks_exact_mut(g * g * cpp)) {
            assert_eq!(pixels.len(), c.num_channels * s * s, "vision tower: pixel shape");
            for py in 0..g {
                for px in 0..g {
                    let row = &mut img_cols[(py * g + px) * cpp..][..cpp];
                    for ch in 0..c.num_channels {
                        for i in 0..ps {
                            let src = &pixels[ch * s * s + (py * ps + i) * s + px * ps..][..ps];
                            row[ch * ps * ps + i * ps..][..ps].copy_from_slice(src);
                        }
                    }
                }
            }
        }
        let patches = be.download(&be.linear(&be.upload(&cols), n * g * g, &self.patch, None)); // (n·g·g, h)
        let mut emb = Vec::with_capacity(n * t * h); // (n·t, h): per image [CLS; patches] + positions
        for img in patches.chunks_exact(g * g * h) {
            let start = emb.len();
            emb.extend_from_slice(&self.class);
            emb.extend_from_slice(img);
            emb[start..].iter_mut().zip(&self.pos).for_each(|(e, p)| *e += p);
        }
        let mut x = be.layer_norm(
            &be.upload(&emb),
            h,
            &self.pre_ln.0,
            &self.pre_ln.1,
            c.layer_norm_eps,
        );
        let shape = AttnShape {
            tq: t,
            tk: t,
            heads: c.num_heads,
            kv_heads: c.num_heads,
            head_dim: c.head_dim(),
            causal: false,
            q_pos0: 0,
            hole: None,
        };
        let rows = n * t;
        for l in &self.layers {
            let a = be.layer_norm(&x, h, &l.ln1.0, &l.ln1.1, c.layer_norm_eps);
            // q, k, v (rows, h): one input, rounded to bf16 once on the GPU
            let [q, k, v]: [B::Buf; 3] = be
                .linears(
                    &a,
                    rows,
                    &[
                        (&l.q.0, Some(&l.q.1)),
                        (&l.k.0, Some(&l.k.1)),
                        (&l.v.0, Some(&l.v.1)),
                    ],
                )
                .try_into()
                .unwrap_or_else(|_| unreachable!("three products"));
            let o = images_attention(be, (&q, &k, &v), n, shape); // (rows, h)
            be.add(&mut x, &be.linear(&o, rows, &l.out.0, Some(&l.out.1)));
            let a = be.layer_norm(&x, h, &l.ln2.0, &l.ln2.1, c.layer_norm_eps);
            let mut m = be.linear(&a, rows, &l.fc1.0, Some(&l.fc1.1));
            be.activation(&mut m, c.act);
            be.add(&mut x, &be.linear(&m, rows, &l.fc2.0, Some(&l.fc2.1)));
        }
        match self.select {
            FeatureSelect::Default => {
                let per: Vec<B::Buf> = (0..n)
                    .map(|i| be.slice_rows(&x, h, i * t + 1, (i + 1) * t))
                    .collect();
                be.concat_rows(&per)
            }
            FeatureSelect::Full => x,
        }
    }
}

/// The vision tower's attention over n images of `shape.tq` rows each (q, k, v: (n·t, heads·D), not
/// causal) in one call: the images side by side, (n, t, heads·D) -> (t, n·heads·D), so that image
/// i's heads are heads i·heads.. of one call, which attend within their own image (a launch for all
/// the images, and n times the blocks of one image's rows to fill a GPU), then back. Each head's rows
/// are computed alone, so this equals one `attention` per image bit for bit (tests/parity.rs).
pub fn images_attention<B: Backend>(
    be: &B,
    (q, k, v): (&B::Buf, &B::Buf, &B::Buf),
    n: usize,
    shape: AttnShape,
) -> B::Buf {
    if n == 1 {
        return be.attention(q, k, v, shape, None).0;
    }
    let (t, h) = (shape.tq, shape.heads * shape.head_dim);
    let side = |m: &B::Buf| be.transpose_rows(m, n, t, h);
    let wide = AttnShape {
        heads: n * shape.heads,
        kv_heads: n * shape.kv_heads,
        ..shape
    };
    let o = be.attention(&side(q), &side(k), &side(v), wide, None).0; // (t, n·h)
    be.transpose_rows(&o, t, n, h)
}
