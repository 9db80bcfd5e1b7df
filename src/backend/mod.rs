//! The small set of operations the LLaVA forward pass needs, with plain shapes and no strides.
//!
//! Every buffer is a row-major f32 matrix whose shape the caller knows (shape comments at each call
//! site). Weight matrices stay in their stored dtype (f16/bf16/f32) and are read by `linear`; the
//! backend decides how (the CPU converts tiles to f32 on the fly; the CUDA backend of a later issue
//! uploads them once). `cpu.rs` is the readable reference every other backend is tested against.
pub mod cpu;
pub mod cuda;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::model::config::Activation;
use crate::model::weights::Tensor;
use crate::train::optim::{OptimConfig, ParamState};
use crate::{Error, Result};

/// `--device`: where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// GPU 0 when a driver and a GPU are there (the CUDA backend), else the CPU with one line saying why
    #[default]
    Auto,
    Cpu,
    /// the CUDA backend on GPU 0 (an error naming what is missing when there is none)
    Cuda,
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            _ => Err(format!("unknown device `{s}` (expected auto, cpu or cuda)")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// Key positions `[start, end)`.
pub type KeySpan = (usize, usize);

/// Key positions `[start, end)` counted in group `group`: `(start, end, group)`.
pub type KeyRange = (usize, usize, usize);

/// The key groups whose attention probability mass `attention` reports: each group is a list of key
/// ranges, so a region of many patch rows (a grid cell, the pic-in-pic centre) is one group and one
/// mass column. Ranges of one group never overlap (their mass would count twice); ranges of
/// different groups may (the pic-in-pic centre lies inside the whole-image group). Ranges past the
/// keys of a call count nothing. Any number of groups: the CUDA kernels hold 16 groups and 64 ranges
/// per launch, and the backend splits bigger sets over launches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyGroups {
    /// sorted by (group, start), adjacent ranges of a group merged: a group's ranges are the
    /// contiguous run `ranges[offsets[g]..offsets[g + 1]]`, the layout the kernels walk
    ranges: Vec<KeyRange>,
    /// (n_groups + 1) CSR offsets into `ranges`
    offsets: Vec<usize>,
}

impl KeyGroups {
    /// `n_groups` ≥ 1 groups from `(start, end, group)` ranges in any order; a group without ranges
    /// has mass 0. Errors: a group index ≥ `n_groups`, an empty range (start ≥ end), two overlapping
    /// ranges of the same group.
    pub fn new(ranges: &[KeyRange], n_groups: usize) -> Result<Self> {
        if n_groups == 0 {
            return Err(Error::Invalid("key groups: at least one group is needed".into()));
        }
        for &(a, b, g) in ranges {
            if g >= n_groups {
                return Err(Error::Invalid(format!(
                    "key groups: range {a}..{b} is in group {g}, but there are {n_groups} groups"
                )));
            }
            if a >= b {
                return Err(Error::Invalid(format!(
                    "key groups: range {a}..{b} of group {g} is empty"
                )));
            }
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable_by_key(|&(a, b, g)| (g, a, b));
        let mut merged: Vec<KeyRange> = Vec::with_capacity(sorted.len());
        for (a, b, g) in sorted {
            match merged.last_mut() {
                Some(last) if last.2 == g && last.1 > a => {
                    return Err(Error::Invalid(format!(
                        "key groups: ranges {}..{} and {a}..{b} of group {g} overlap (their mass would count twice)",
                        last.0, last.1
                    )))
                }
                // adjacent ranges of a group: one range, the same mass, fewer ranges for the kernels
                Some(last) if last.2 == g && last.1 == a => last.1 = b,
                _ => merged.push((a, b, g)),
            }
        }
        let mut offsets = vec![0; n_groups + 1];
        for &(_, _, g) in &merged {
            offsets[g + 1] += 1;
        }
        for g in 0..n_groups {
            offsets[g + 1] += offsets[g];
        }
        Ok(KeyGroups {
            ranges: merged,
            offsets,
        })
    }

    /// One group per span, in order (the image spans of a sequence prompt, `generate`'s image
    /// attention). Spans may overlap one another; none may be empty, and at least one is needed.
    pub fn per_span(spans: &[KeySpan]) -> Result<Self> {
        let ranges: Vec<KeyRange> = spans.iter().enumerate().map(|(g, &(a, b))| (a, b, g)).collect();
        Self::new(&ranges, spans.len())
    }

    pub fn n_groups(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Every range, sorted by (group, start).
    pub fn ranges(&self) -> &[KeyRange] {
        &self.ranges
    }

    /// The ranges of group `g`, sorted by start.
    pub fn group(&self, g: usize) -> &[KeyRange] {
        &self.ranges[self.offsets[g]..self.offsets[g + 1]]
    }

    /// The (n_groups + 1) offsets of each group's ranges in [`Self::ranges`].
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// query rows
    pub tq: usize,
    /// key rows (cache included)
    pub tk: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// causal masking with query i at absolute position `q_pos0 + i` (keys are at 0..tk)
    pub causal: bool,
    pub q_pos0: usize,
    /// `(first, start, end)`: queries at positions ≥ `first` do not see keys `[start, end)` — the
    /// prefix-shared DPO layout `[prompt | chosen | rejected]`, where rejected must not see chosen
    pub hole: Option<(usize, usize, usize)>,
}

/// A trained tensor's optimizer state on a backend (`Backend::optim_update`): AdamW's moments
/// (none for SGD, or before the first update) and the step count of its bias corrections.
#[derive(Clone, Debug)]
pub struct BufState<T> {
    pub m: Option<T>,
    pub v: Option<T>,
    pub step: u64,
}

impl<T> Default for BufState<T> {
    fn default() -> Self {
        BufState {
            m: None,
            v: None,
            step: 0,
        }
    }
}

/// `Backend::optim_update` on host vectors: the clipping scale (as `clip_grad_norm` applies it),
/// then `optim::update`.
pub fn host_update(
    cfg: &OptimConfig,
    p: &mut [f32],
    g: &mut [f32],
    gscale: f64,
    st: &mut ParamState,
    lr: f32,
) {
    if gscale < 1.0 {
        g.iter_mut().for_each(|x| *x = (*x as f64 * gscale) as f32);
    }
    crate::train::optim::update(cfg, p, g, st, lr);
}

/// The heads of an attention layer: query heads, key/value heads (GQA), and the head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

/// One sequence's attention mass, (rows, n_groups), as `Backend::attention_cached` leaves it: on the
/// host, or rows of a backend buffer of `stride` columns (a batched decode step's, shared by its
/// sequences) that `Backend::read_masses` copies back later, so that the step's captured layer does
/// not wait for the device between layers.
pub enum Mass<B: Backend + ?Sized> {
    Host(Vec<f32>),
    Device {
        buf: std::sync::Arc<B::Buf>,
        row0: usize,
        rows: usize,
        stride: usize,
        n_groups: usize,
    },
}

/// One sequence of a packed attention call against KV caches (`Backend::attention_cached`).
pub struct CachedSeq<'a, B: Backend + ?Sized> {
    /// this layer's keys of the sequence, (len, kv_heads·D): its new rows are appended
    pub k: &'a mut B::Kv,
    /// this layer's values, as `k`
    pub v: &'a mut B::Kv,
    /// rows in the cache before the call: the new rows are at positions `len..len + rows`
    pub len: usize,
    /// new rows
    pub rows: usize,
    /// the key groups whose attention mass to report for this sequence's rows
    pub groups: Option<&'a KeyGroups>,
}

pub trait Backend: Send + Sync {
    /// A device buffer of f32.
    type Buf: Send + Sync + Clone;
    /// A weight matrix resident for this backend, rows = output features.
    type Mat: Send + Sync;
    /// One layer's keys (or values) of one sequence's KV cache, (len, kv_heads·D), grown by
    /// `kv_append`: f32 on the CPU; bf16 on CUDA, which halves the bytes a decode step reads (the
    /// prefill's attention kernels round K and V to bf16 for the tensor cores anyway).
    type Kv: Send + Sync + Clone;
    /// Bytes per element of `Kv` (what a decode step reads per cached key element).
    const KV_BYTES: usize;

    fn name(&self) -> &'static str;
    /// The hardware, for labelling numbers: the CPU model, or the GPU and its arch.
    fn hardware(&self) -> String;
    fn upload(&self, x: &[f32]) -> Self::Buf;
    /// Waits until every op issued so far has finished (timing); the CPU's ops are synchronous.
    fn synchronize(&self) {}
    /// The most device memory in use at once so far, MiB (the GPU's buffers; None for the CPU, whose
    /// figure is the process's peak RSS).
    fn peak_memory_mib(&self) -> Option<f64> {
        None
    }
    /// Device memory in use now, MiB (None for the CPU).
    fn memory_in_use_mib(&self) -> Option<f64> {
        None
    }
    /// Starts a new high-water mark for `peak_memory_mib` at the memory in use now.
    fn reset_peak_memory(&self) {}
    fn download(&self, x: &Self::Buf) -> Vec<f32>;
    /// Elements in a buffer (without copying it to the host).
    fn len(&self, x: &Self::Buf) -> usize;
    /// A checkpoint tensor as a matrix of `shape[0]` rows (later dims flattened).
    fn matrix(&self, t: &Tensor) -> Result<Self::Mat>;
    fn mat_shape(&self, m: &Self::Mat) -> (usize, usize);
    /// A 1-D parameter (bias, norm weight) converted to f32.
    fn vector(&self, t: &Tensor) -> Result<Self::Buf> {
        Ok(self.upload(&t.to_f32()))
    }

    /// y (m, n) = x (m, k) · wᵀ (k, n) + bias (n)
    fn linear(&self, x: &Self::Buf, m: usize, w: &Self::Mat, bias: Option<&Self::Buf>) -> Self::Buf;
    /// Several `linear`s of one input x (m, k): [x · wᵢᵀ + biasᵢ]. The CUDA backend rounds x to bf16
    /// once for all of them (a decode step's q, k and v; gate and up).
    fn linears(&self, x: &Self::Buf, m: usize, ws: &[(&Self::Mat, Option<&Self::Buf>)]) -> Vec<Self::Buf> {
        ws.iter().map(|&(w, b)| self.linear(x, m, w, b)).collect()
    }
    /// rows of `table` (vocab, d) picked by `ids` -> (len, d)
    fn embed(&self, ids: &[u32], table: &Self::Mat) -> Self::Buf;
    /// x (rows, d) -> LayerNorm(x) * w + b
    fn layer_norm(&self, x: &Self::Buf, d: usize, w: &Self::Buf, b: &Self::Buf, eps: f32) -> Self::Buf;
    /// x (rows, d) -> x / rms(x) * w  (HF LlamaRMSNorm)
    fn rms_norm(&self, x: &Self::Buf, d: usize, w: &Self::Buf, eps: f32) -> Self::Buf;
    fn activation(&self, x: &mut Self::Buf, act: Activation);
    /// The SwiGLU of LLaMA's MLP in place: gate = silu(gate) ⊙ up (`activation` then `mul`; one
    /// kernel on the GPU).
    fn swiglu(&self, gate: &mut Self::Buf, up: &Self::Buf) {
        self.activation(gate, Activation::Silu);
        self.mul(gate, up);
    }
    /// The residual add and the next RMSNorm: x += y, then rms_norm(x) (`add` then `rms_norm`; one
    /// kernel on the GPU).
    fn add_rms_norm(&self, x: &mut Self::Buf, y: &Self::Buf, d: usize, w: &Self::Buf, eps: f32) -> Self::Buf {
        self.add(x, y);
        self.rms_norm(x, d, w, eps)
    }
    /// x += y
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// x += alpha * y
    fn axpy(&self, x: &mut Self::Buf, alpha: f32, y: &Self::Buf);
    /// x *= y, elementwise
    fn mul(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// Rotary embedding (HF rotate_half layout) on x (rows, heads·head_dim), row i at `positions[i]`.
    fn rope(&self, x: &mut Self::Buf, heads: usize, head_dim: usize, positions: &[usize], theta: f64);
    /// `rope` of q (rows, heads·head_dim) and k (rows, kv_heads·head_dim) at the same positions (one
    /// launch on the GPU).
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        positions: &[usize],
        theta: f64,
    ) {
        self.rope(q, heads, head_dim, positions, theta);
        self.rope(k, kv_heads, head_dim, positions, theta);
    }
    /// Scaled dot-product attention: q (tq, heads·D), k and v (tk, kv_heads·D) -> (tq, heads·D).
    /// With `groups`, also returns the attention probability mass that each query row puts on each
    /// group (the sum over its ranges), averaged over heads: (tq, n_groups) — the per-image attention
    /// of MIA-DPO.
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        groups: Option<&KeyGroups>,
    ) -> (Self::Buf, Option<Vec<f32>>);
    /// One layer's attention over a packed batch of sequences that each continue a KV cache: q
    /// (Σ rows, heads·D), k and v (Σ rows, kv_heads·D) hold every sequence's new rows, in order.
    /// Appends each sequence's rows of k and v to its cache, then attends its query rows (causal, at
    /// positions `len..len + rows`) to its whole cache. Returns the output (Σ rows, heads·D) and,
    /// per sequence, its mass (rows, n_groups) as `attention` gives it when it has groups (read it
    /// with `read_masses`). The default is one `attention` per sequence (`attention_cached_each`);
    /// the CUDA backend takes a decode step's sequences in one launch.
    fn attention_cached(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        heads: Heads,
        seqs: &mut [CachedSeq<'_, Self>],
    ) -> (Self::Buf, Vec<Option<Mass<Self>>>) {
        attention_cached_each(self, q, k, v, heads, seqs)
    }
    /// The masses on the host, (rows, n_groups) each: every backend buffer among them copied back
    /// once.
    fn read_masses(&self, masses: Vec<Mass<Self>>) -> Vec<Vec<f32>> {
        let mut read: Vec<(std::sync::Arc<Self::Buf>, Vec<f32>)> = Vec::new();
        masses
            .into_iter()
            .map(|m| match m {
                Mass::Host(v) => v,
                Mass::Device {
                    buf,
                    row0,
                    rows,
                    stride,
                    n_groups,
                } => {
                    let i = match read.iter().position(|(b, _)| std::sync::Arc::ptr_eq(b, &buf)) {
                        Some(i) => i,
                        None => {
                            let host = self.download(&buf);
                            read.push((buf, host));
                            read.len() - 1
                        }
                    };
                    let host = &read[i].1;
                    (row0..row0 + rows)
                        .flat_map(|r| host[r * stride..r * stride + n_groups].iter().copied())
                        .collect()
                }
            })
            .collect()
    }
    /// The rows of every part, in order (packed batches).
    fn concat_rows(&self, parts: &[Self::Buf]) -> Self::Buf;
    /// An empty KV cache buffer.
    fn kv_new(&self) -> Self::Kv;
    /// Rows of `src` (rows, kv_heads·D) appended to the cache `kv` (in its storage type).
    fn kv_append(&self, kv: &mut Self::Kv, src: &Self::Buf);
    /// The cache as an f32 buffer (len, kv_heads·D): itself where it is one, else a converted copy.
    fn kv_read<'a>(&self, kv: &'a Self::Kv) -> Cow<'a, Self::Buf>;
    /// Keeps the cache's first `n` elements (a benchmark that decodes against a fixed length).
    fn kv_truncate(&self, kv: &mut Self::Kv, n: usize);
    /// x (a, b, d) -> (b, a, d): row j·a + i of the result is row i·b + j of x. The vision tower's
    /// images (n, T, heads·D) become (T, n·heads·D), one attention over n·heads heads.
    fn transpose_rows(&self, x: &Self::Buf, a: usize, b: usize, d: usize) -> Self::Buf;
    /// Rows `[r0, r1)` of x (rows, d).
    fn slice_rows(&self, x: &Self::Buf, d: usize, r0: usize, r1: usize) -> Self::Buf;
    /// Overwrites the rows of `x` (rows, d) listed in `rows` with the rows of `src` (rows.len(), d).
    fn scatter_rows(&self, x: &mut Self::Buf, d: usize, rows: &[usize], src: &Self::Buf);
    /// Per row of logits (rows, vocab): log-softmax at `targets[row]`.
    fn token_logprobs(&self, logits: &Self::Buf, vocab: usize, targets: &[u32]) -> Vec<f32>;

    // ---- training: each op is the backward of a forward op above, or a fused pair

    /// The input gradient of `linear`: dx (m, k) = dy (m, n) · w (n, k).
    fn linear_backward(&self, dy: &Self::Buf, m: usize, w: &Self::Mat) -> Self::Buf;
    /// Weight gradients: g (m, n) += alpha · aᵀ · b, with a (k, m) and b (k, n).
    #[allow(clippy::too_many_arguments)]
    fn matmul_tn_acc(
        &self,
        g: &mut Self::Buf,
        alpha: f32,
        a: &Self::Buf,
        b: &Self::Buf,
        k: usize,
        m: usize,
        n: usize,
    );
    /// The input gradient of `rms_norm` (weights frozen): x, dy (rows, d) -> dx (rows, d).
    fn rms_norm_backward(
        &self,
        x: &Self::Buf,
        d: usize,
        w: &Self::Buf,
        dy: &Self::Buf,
        eps: f32,
    ) -> Self::Buf;
    /// The backward of `rope`: rotates the gradient back by the same angles.
    fn rope_backward(
        &self,
        dx: &mut Self::Buf,
        heads: usize,
        head_dim: usize,
        positions: &[usize],
        theta: f64,
    );
    /// The backward of SwiGLU `mid = silu(gate) ⊙ up`: (d gate, d up), gate taken before the activation.
    fn swiglu_backward(&self, gate: &Self::Buf, up: &Self::Buf, dmid: &Self::Buf) -> (Self::Buf, Self::Buf);
    /// The training forward of `attention` (no mass): the output and, where the backend's backward
    /// can use it, the log-sum-exp of each (row, head), (tq, heads), to hand back to
    /// `attention_backward` so that it does not recompute it. The CPU keeps none (its backward
    /// recomputes the probabilities block by block anyway).
    fn attention_train(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> (Self::Buf, Option<Self::Buf>) {
        (self.attention(q, k, v, shape, None).0, None)
    }
    /// The backward of `attention` (same shapes, no mass): recomputes the probabilities from q and k
    /// block by block and returns (dq, dk, dv); `out` is the forward's output, `lse` what
    /// `attention_train` returned with it (None: recomputed).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        lse: Option<&Self::Buf>,
        shape: AttnShape,
    ) -> (Self::Buf, Self::Buf, Self::Buf);
    /// Greedy decoding's pick per row of `logits` (rows, vocab): the first index of the maximum and
    /// its log-softmax value (for max_softmax_ppl). By default on the host ([`greedy`]); the CUDA
    /// backend picks on the device, so that only two numbers per row come back instead of the row.
    fn greedy_rows(&self, logits: &Self::Buf, rows: usize, vocab: usize) -> Vec<(u32, f64)> {
        let host = self.download(logits);
        assert_eq!(
            host.len(),
            rows * vocab,
            "greedy_rows: logits are not (rows, vocab)"
        );
        host.chunks_exact(vocab).map(greedy).collect()
    }
    /// Log-probabilities of `targets` from hidden states (rows, hidden) through the LM head w (vocab,
    /// hidden), a block of rows at a time so the (rows, vocab) logits never exist whole. Returns
    /// (log-prob, log-sum-exp) per row; the log-sum-exp is what the backward needs.
    fn fused_logprobs(
        &self,
        hidden: &Self::Buf,
        rows: usize,
        w: &Self::Mat,
        targets: &[u32],
    ) -> (Vec<f32>, Vec<f32>);
    /// d hidden (rows, hidden) of Σ_r `dlogp[r]` · logp_r, recomputing the logits block by block:
    /// ∂logp/∂logits = onehot(target) − softmax.
    #[allow(clippy::too_many_arguments)]
    fn fused_logprobs_backward(
        &self,
        hidden: &Self::Buf,
        rows: usize,
        w: &Self::Mat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
    ) -> Self::Buf;
    /// The weight gradient of `rms_norm`: dw (d) = Σ_rows dy ⊙ x / rms(x).
    fn rms_norm_weight_grad(&self, x: &Self::Buf, d: usize, dy: &Self::Buf, eps: f32) -> Self::Buf;
    /// The input gradient of `activation`, from the input it was applied to.
    fn activation_backward(&self, x: &Self::Buf, dy: &Self::Buf, act: Activation) -> Self::Buf;
    /// Column sums of x (rows, cols) -> (cols): bias gradients.
    fn col_sum(&self, x: &Self::Buf, rows: usize, cols: usize) -> Self::Buf;
    /// Adds the rows of `src` (rows.len(), d) into the rows of `g` listed in `rows` (repeats add up):
    /// embedding gradients, and gradients of rows that serve several packed responses.
    fn scatter_add_rows(&self, g: &mut Self::Buf, d: usize, rows: &[usize], src: &Self::Buf);
    /// The LM head's weight gradient of Σ_r `dlogp[r]` · logp_r: g (vocab, hidden) += d logitsᵀ ·
    /// hidden, the logits recomputed block by block as in `fused_logprobs_backward`.
    #[allow(clippy::too_many_arguments)]
    fn fused_logprobs_weight_grad(
        &self,
        hidden: &Self::Buf,
        rows: usize,
        w: &Self::Mat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        g: &mut Self::Buf,
    );
    /// Inverted dropout with the mask of [`dropout_keep`]: x / (1 − p) where kept, 0 elsewhere. The
    /// same key gives the same mask (the backward reapplies it to the gradient).
    fn dropout(&self, x: &Self::Buf, p: f32, key: u64) -> Self::Buf;

    // ---- the optimizer, on the backend that holds the trained tensors (LoRA training): the CPU's
    // are the host update of `train::optim` (`host_update`), so its training keeps its bits

    /// A buffer of n zeros (a gradient accumulator).
    fn zeros(&self, n: usize) -> Self::Buf {
        self.upload(&vec![0.0; n])
    }
    /// Σ x² over every element of `xs` in order, in f64: the global gradient norm's square, as
    /// `optim::clip_grad_norm` sums it.
    fn sum_squares(&self, xs: &[&Self::Buf]) -> f64;
    /// One optimizer update of the f32 master `p` (n) from the gradient `g` (n), as
    /// `optim::update`: first g ← g · `gscale` when `gscale` < 1 (the clipping, in f64 as
    /// `clip_grad_norm` scales; `g` may be left scaled or not), then the step with `state` (created
    /// on the first update).
    fn optim_update(
        &self,
        cfg: &OptimConfig,
        p: &mut Self::Buf,
        g: &mut Self::Buf,
        gscale: f64,
        state: &mut BufState<Self::Buf>,
        lr: f32,
    );
    /// A weight matrix (rows, cols) from an f32 buffer (a trained LoRA matrix after its update): as
    /// `matrix` of the f32 tensor.
    fn to_mat(&self, x: &Self::Buf, rows: usize, cols: usize) -> Result<Self::Mat> {
        let t = Tensor::from_f32(
            "<trained matrix>",
            vec![rows, cols],
            &self.download(x),
            std::path::Path::new("<training>"),
        )?;
        self.matrix(&t)
    }
}

/// `Backend::attention_cached` as one `attention` call per sequence: its rows of k and v appended to
/// its cache (copied out first when there are several sequences), its rows of q attended to the
/// whole cache as `kv_read` gives it (the cache itself on the CPU; on CUDA an f32 copy of the bf16
/// cache, so that every path attends the same rounded keys).
pub fn attention_cached_each<B: Backend + ?Sized>(
    be: &B,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    h: Heads,
    seqs: &mut [CachedSeq<'_, B>],
) -> (B::Buf, Vec<Option<Mass<B>>>) {
    let (qd, kvd) = (h.heads * h.dim, h.kv_heads * h.dim);
    let one = seqs.len() == 1; // a lone sequence needs no row copies
    let (mut outs, mut masses) = (Vec::with_capacity(seqs.len()), Vec::with_capacity(seqs.len()));
    let mut r0 = 0;
    for seq in seqs.iter_mut() {
        let r1 = r0 + seq.rows;
        // this sequence's new rows (t, kv_heads·D)
        let (kn, vn) = if one {
            (Cow::Borrowed(k), Cow::Borrowed(v))
        } else {
            (
                Cow::Owned(be.slice_rows(k, kvd, r0, r1)),
                Cow::Owned(be.slice_rows(v, kvd, r0, r1)),
            )
        };
        be.kv_append(seq.k, &kn);
        be.kv_append(seq.v, &vn);
        let shape = AttnShape {
            tq: seq.rows,
            tk: seq.len + seq.rows,
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.dim,
            causal: true,
            q_pos0: seq.len,
            hole: None,
        };
        let (kc, vc) = (be.kv_read(seq.k), be.kv_read(seq.v));
        let qs = (!one).then(|| be.slice_rows(q, qd, r0, r1));
        let (o, mass) = be.attention(qs.as_ref().unwrap_or(q), &kc, &vc, shape, seq.groups);
        outs.push(o);
        masses.push(mass.map(Mass::Host));
        r0 = r1;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one sequence")
    } else {
        be.concat_rows(&outs)
    };
    (out, masses)
}

/// Whether element `index` survives dropout of rate `p` under `key`: a counter-based hash
/// (splitmix64 of key and index), so every backend draws the same mask without carrying RNG state,
/// and a resumed run draws what the uninterrupted one would have.
#[inline]
pub fn dropout_keep(key: u64, index: u64, p: f32) -> bool {
    let mut z = key ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 random bits -> [0, 1)
    ((z >> 40) as f32) * (1.0 / (1u64 << 24) as f32) >= p
}

/// The first index of the maximum of one row of logits and its log-softmax value.
pub fn greedy(logits: &[f32]) -> (u32, f64) {
    // the first maximum above -inf, NaNs skipped (as the GPU's argmax does); 0 when there is none
    let (mut best, mut top) = (0, f32::NEG_INFINITY);
    for (i, &v) in logits.iter().enumerate() {
        if v > top {
            (best, top) = (i, v);
        }
    }
    let lse = cpu::log_sum_exp(logits) as f64;
    (best as u32, logits[best] as f64 - lse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first maximum wins ties; NaNs are skipped wherever they stand (the GPU's argmax does the
    /// same); a row with no maximum picks 0.
    #[test]
    fn greedy_picks_the_first_maximum_and_skips_nans() {
        assert_eq!(greedy(&[1.0, 3.0, 3.0, 2.0]).0, 1);
        assert_eq!(greedy(&[f32::NAN, 0.0, 2.0, f32::NAN]).0, 2);
        assert_eq!(greedy(&[f32::NAN, f32::NAN]).0, 0);
        assert_eq!(greedy(&[f32::NEG_INFINITY; 3]).0, 0);
        assert_eq!(greedy(&[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY]).0, 0);
        let (_, lp) = greedy(&[0.0, 0.0]);
        assert!((lp - (0.5f64).ln()).abs() < 1e-6);
    }

    /// A batched decode step's masses, one (Σ rows, stride) buffer shared by its sequences, cut into
    /// each sequence's (rows, n_groups) with host masses among them, and the buffer read once.
    #[test]
    fn masses_are_cut_per_sequence() {
        use super::cpu::CpuBackend;
        use std::sync::Arc;
        let be = CpuBackend::new();
        // three sequences: 2 rows with 2 groups, 1 row with 1 group, 3 rows with 3 groups; stride 3
        let buf = Arc::new((0..6 * 3).map(|x| x as f32).collect::<Vec<f32>>());
        let dev = |row0, rows, n_groups| Mass::<CpuBackend>::Device {
            buf: Arc::clone(&buf),
            row0,
            rows,
            stride: 3,
            n_groups,
        };
        let got = be.read_masses(vec![
            dev(0, 2, 2),
            Mass::Host(vec![7.0]),
            dev(2, 1, 1),
            dev(3, 3, 3),
        ]);
        assert_eq!(
            got,
            [
                vec![0.0, 1.0, 3.0, 4.0],
                vec![7.0],
                vec![6.0],
                (9..18).map(|x| x as f32).collect()
            ]
        );
    }

    #[test]
    fn key_groups_sort_by_group_and_merge_adjacent_ranges() {
        let g = KeyGroups::new(
            &[(50, 60, 1), (0, 100, 0), (10, 20, 1), (20, 30, 1), (40, 45, 2)],
            4,
        )
        .unwrap();
        assert_eq!(g.n_groups(), 4);
        assert_eq!(g.ranges(), [(0, 100, 0), (10, 30, 1), (50, 60, 1), (40, 45, 2)]);
        assert_eq!(g.offsets(), [0, 1, 3, 4, 4]);
        assert_eq!(g.group(1), [(10, 30, 1), (50, 60, 1)]);
        assert!(g.group(3).is_empty());
        let p = KeyGroups::per_span(&[(5, 9), (0, 20)]).unwrap();
        assert_eq!(p.ranges(), [(5, 9, 0), (0, 20, 1)]);
    }

    #[test]
    fn key_groups_reject_bad_ranges() {
        let err = |r: &[KeyRange], n: usize| KeyGroups::new(r, n).unwrap_err().to_string();
        assert!(err(&[], 0).contains("at least one group"));
        assert!(err(&[(0, 4, 2)], 2).contains("group 2, but there are 2 groups"));
        assert!(err(&[(4, 4, 0)], 1).contains("4..4 of group 0 is empty"));
        assert!(err(&[(5, 3, 0)], 1).contains("empty"));
        assert!(err(&[(0, 10, 1), (9, 12, 1)], 2).contains("0..10 and 9..12 of group 1 overlap"));
        assert!(KeyGroups::per_span(&[]).is_err());
        // different groups may overlap
        assert!(KeyGroups::new(&[(0, 10, 0), (5, 12, 1)], 2).is_ok());
    }
}
