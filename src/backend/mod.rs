//! The small set of operations the LLaVA forward pass needs, with plain shapes and no strides.
//!
//! Every buffer is a row-major f32 matrix whose shape the caller knows (shape comments at each call
//! site). Weight matrices stay in their stored dtype (f16/bf16/f32) and are read by `linear`; the
//! backend decides how (the CPU converts tiles to f32 on the fly; the CUDA backend of a later issue
//! uploads them once). `cpu.rs` is the readable reference every other backend is tested against.
pub mod cpu;

use std::fmt;
use std::str::FromStr;

use crate::model::config::Activation;
use crate::model::weights::Tensor;
use crate::{Error, Result};

/// `--device`: where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA when a backend for it is built and a GPU is present, else the CPU
    #[default]
    Auto,
    Cpu,
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

impl Device {
    /// The backend for this device. There is no CUDA backend yet: `cuda` is refused with one clear
    /// line and `auto` takes the CPU.
    pub fn cpu_backend(self) -> Result<cpu::CpuBackend> {
        match self {
            Device::Auto | Device::Cpu => Ok(cpu::CpuBackend::new()),
            Device::Cuda => Err(Error::Invalid(
                "--device cuda: this build of miadpo has no CUDA backend yet; use --device cpu (or auto)"
                    .into(),
            )),
        }
    }
}

/// A group of key positions `[start, end)` whose attention probability mass is reported.
pub type KeySpan = (usize, usize);

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
}

pub trait Backend: Send + Sync {
    /// A device buffer of f32.
    type Buf: Send + Sync + Clone;
    /// A weight matrix resident for this backend, rows = output features.
    type Mat: Send + Sync;

    fn name(&self) -> &'static str;
    fn upload(&self, x: &[f32]) -> Self::Buf;
    fn download(&self, x: &Self::Buf) -> Vec<f32>;
    /// A checkpoint tensor as a matrix of `shape[0]` rows (later dims flattened).
    fn matrix(&self, t: &Tensor) -> Result<Self::Mat>;
    fn mat_shape(&self, m: &Self::Mat) -> (usize, usize);
    /// A 1-D parameter (bias, norm weight) converted to f32.
    fn vector(&self, t: &Tensor) -> Result<Self::Buf> {
        Ok(self.upload(&t.to_f32()))
    }

    /// y (m, n) = x (m, k) · wᵀ (k, n) + bias (n)
    fn linear(&self, x: &Self::Buf, m: usize, w: &Self::Mat, bias: Option<&Self::Buf>) -> Self::Buf;
    /// rows of `table` (vocab, d) picked by `ids` -> (len, d)
    fn embed(&self, ids: &[u32], table: &Self::Mat) -> Self::Buf;
    /// x (rows, d) -> LayerNorm(x) * w + b
    fn layer_norm(&self, x: &Self::Buf, d: usize, w: &Self::Buf, b: &Self::Buf, eps: f32) -> Self::Buf;
    /// x (rows, d) -> x / rms(x) * w  (HF LlamaRMSNorm)
    fn rms_norm(&self, x: &Self::Buf, d: usize, w: &Self::Buf, eps: f32) -> Self::Buf;
    fn activation(&self, x: &mut Self::Buf, act: Activation);
    /// x += y
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// x += alpha * y
    fn axpy(&self, x: &mut Self::Buf, alpha: f32, y: &Self::Buf);
    /// x *= y, elementwise
    fn mul(&self, x: &mut Self::Buf, y: &Self::Buf);
    /// Rotary embedding (HF rotate_half layout) on x (rows, heads·head_dim), row i at `positions[i]`.
    fn rope(&self, x: &mut Self::Buf, heads: usize, head_dim: usize, positions: &[usize], theta: f64);
    /// Scaled dot-product attention: q (tq, heads·D), k and v (tk, kv_heads·D) -> (tq, heads·D).
    /// With `spans`, also returns the attention probability mass that each query row puts on each span,
    /// averaged over heads: (tq, spans.len()) — the per-image attention of MIA-DPO.
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        spans: Option<&[KeySpan]>,
    ) -> (Self::Buf, Option<Vec<f32>>);
    /// The rows of every part, in order (packed batches).
    fn concat_rows(&self, parts: &[Self::Buf]) -> Self::Buf;
    /// Rows of `src` (rows, d) appended to `dst` (KV cache growth).
    fn append_rows(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// Rows `[r0, r1)` of x (rows, d).
    fn slice_rows(&self, x: &Self::Buf, d: usize, r0: usize, r1: usize) -> Self::Buf;
    /// Overwrites the rows of `x` (rows, d) listed in `rows` with the rows of `src` (rows.len(), d).
    fn scatter_rows(&self, x: &mut Self::Buf, d: usize, rows: &[usize], src: &Self::Buf);
    /// Per row of logits (rows, vocab): log-softmax at `targets[row]`.
    fn token_logprobs(&self, logits: &Self::Buf, vocab: usize, targets: &[u32]) -> Vec<f32>;
}
