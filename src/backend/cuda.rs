//! The CUDA backend: every `Backend` op as a handwritten kernel of `kernels/*.cu` (compiled by NVRTC
//! for the device's own arch, cached on disk), matrix products through cuBLAS (bf16 inputs, f32
//! accumulate and output). Buffers are f32 device memory (`act` in the kernels); weight matrices are
//! uploaded once as bf16. The CPU backend is the reference it is tested against (tests/gpu.rs).
//!
//! Device errors inside an op (out of memory, a failed launch) panic with the op's name: the trait's
//! ops return values, as the CPU's do; creating the backend returns every error of the setup.
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};

use super::{
    attention_cached_each, AttnShape, Backend, BufState, CachedSeq, Heads, KeyGroups, KeyRange, Mass,
};
use crate::cuda::{nvrtc, FAMILIES};
use crate::model::config::Activation;
use crate::model::weights::Tensor;
use crate::train::optim::{OptimConfig, OptimizerKind};
use crate::{Error, Result};

/// An f32 device buffer and its length (`n` may be 0: the allocation then holds one unused element,
/// as CUDA allocations cannot be empty).
#[derive(Clone)]
pub struct DBuf {
    s: CudaSlice<f32>,
    n: usize,
}

impl DBuf {
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// One layer's keys or values of a sequence's KV cache in bf16: (n / (kv_heads·D), kv_heads·D). The
/// allocation grows geometrically (`reserve`); `n` is the cache's length in elements.
#[derive(Clone)]
pub struct DKv {
    s: CudaSlice<u16>,
    n: usize,
}

impl DKv {
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Consumer of one vocabulary chunk of d logits: (first row of the LM head, rows in the chunk, the
/// hidden states in bf16, the d logits (rows, chunk) in bf16).
type ChunkSink<'a> = dyn FnMut(usize, usize, &CudaSlice<u16>, &CudaSlice<u16>) + 'a;

/// A weight matrix on the device in bf16: (rows, cols).
pub struct CudaMat {
    w: CudaSlice<u16>,
    rows: usize,
    cols: usize,
}

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    device: String,
    arch: String,
    /// dynamic shared memory a block may opt into (the plain attention kernels keep a row of scores)
    smem_optin: usize,
    /// Fill every op's output with NaN before its kernel runs, so an element a kernel misses fails the
    /// comparison with the CPU twin instead of passing as stale memory: on for the GPU tests
    /// (`with_poison`) or with `MIADPO_POISON=1`; off otherwise, as it costs a write pass per output.
    poison: bool,
    /// The attention kernel family (`AttnKernel`, `MIADPO_ATTENTION=plain|fused|pipelined|wgmma|
    /// wgmma128|wgmma-bulk|wgmma-overlap`): by default variant 5 (`WgmmaBulk`) on sm_90a and variant
    /// 3 (`Pipelined`) elsewhere, the fastest forwards measured on a device that passed the GPU
    /// tests; decode steps take variant 2's flash-decoding, the backward variant 3's (variant 2's
    /// where its shared memory does not fit), and variants 4 to 6 take variant 3's forward for head
    /// dims 16 and 32. `Plain`, the first, unfused version, is kept as variant 1 for the benchmarks
    /// and as a second opinion.
    attn: AttnKernel,
    /// the device's default memory pool, where every buffer lives (None: no stream-ordered allocator)
    pool: Option<cudarc::driver::sys::CUmemoryPool>,
    /// The last few index arrays uploaded (`ints`), by content, newest last. A decode step used to
    /// upload the same positions for each of its 24 RoPE calls and an empty group layout for each
    /// attention call, every one a copy from pageable memory, which the driver may make wait for the
    /// stream; now one upload serves them all. Kernels only read these buffers.
    ints_cache: Mutex<Vec<CachedInts>>,
    /// the attention forward and backward kernels launched so far, each (kernel, threads, shared
    /// memory) once
    occupancy: Mutex<Vec<Occupancy>>,
}

/// A kernel's launch shape and how many of its blocks an SM holds at once, by the driver's occupancy
/// calculator (registers, shared memory, barriers): what the attention benchmarks' figures rest on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub kernel: String,
    pub threads: u32,
    /// dynamic shared memory, bytes
    pub smem: u32,
    pub blocks_per_sm: u32,
}

/// An index array's content and its device copy.
type CachedInts = (Vec<i32>, Arc<CudaSlice<i32>>);

/// How many index arrays `ints_cache` keeps (a step's positions, a prompt's group layout, the empty
/// one, a few spare).
const INTS_CACHE: usize = 8;

/// The attention kernels (numbered variants in kernels/attention.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// variant 1: a block per (row, head), unfused
    Plain,
    /// variant 2: tensor-core flash attention (and flash-decoding, and the backward)
    Fused,
    /// variant 3: variant 2's forward with K/V packed to bf16 once and the tiles pipelined by cp.async;
    /// decode as variant 2; its backward (`attention_bwd3_d*`, also with variants 4 to 6) packs Q and
    /// dO to bf16 and double-buffers their tiles (variant 2's where that does not fit shared memory)
    Pipelined,
    /// variant 4: the forward on Hopper's `wgmma` (sm_90a only), K/V packed as for variant 3, 64-key
    /// tiles; head dims 64 and 128 (others as variant 3), decode as variant 2, backward as variant 3.
    /// It also serves `attention_train` (with the log-sum-exp for the backward).
    Wgmma,
    /// variant 4 with 128-key tiles (`attention_fwd4w_d*`); mass requests take the 64-key kernels
    WgmmaWide,
    /// variant 5: variant 4 with each tile packed as its shared-memory image and moved by bulk
    /// copies (`cp.async.bulk`) that complete on per-stage mbarriers, so the two warpgroups no longer
    /// wait for each other at every tile (`attention_fwd5[_mass]_d*`)
    WgmmaBulk,
    /// variant 6: variant 5 with 128-key tiles, one block per SM, and each tile's Q Kᵀ issued with
    /// the previous tile's P V so that the softmax runs under it (`attention_fwd6[_mass]_d*`; the
    /// mass kernels keep the group accumulators in shared memory)
    WgmmaOverlap,
}

// SAFETY: cuBLAS handles may be used from any thread as long as calls do not overlap; the backend's
// ops are issued from one thread at a time (rayon is not used on this side).
unsafe impl Send for CudaBackend {}
unsafe impl Sync for CudaBackend {}

/// Makes the device's default memory pool keep freed memory instead of handing it back to the driver
/// at every synchronisation (its default release threshold is 0): each op allocates its output with
/// `cuMemAllocAsync`, and re-mapping those pages every step cost ~4x on a 256 MB copy (H100).
fn keep_freed_memory(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys;
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    let mut threshold = u64::MAX;
    // SAFETY: the pool handle is written by the driver before it is read; the attribute takes a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device())
            .result()
            .map_err(|e| dev_err("default memory pool", e))?;
        sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| dev_err("memory pool release threshold", e))?;
        Ok(pool.assume_init())
    }
}

/// Whether the CUDA driver library can be loaded (probed without cudarc's panic).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn dev_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Invalid(format!("CUDA: {what}: {e:?}"))
}

const BLOCK: u32 = 256;
/// Vocabulary rows of the LM head per logits chunk in the fused log-prob ops: (T, 8192) f32.
const VOCAB_CHUNK: usize = 8192;

fn grid1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A block per row. There must be rows: a block launched for none would read and write a row past
/// buffers of one unused element (ops on no rows return before their launch).
fn per_row(rows: usize, threads: u32, smem: u32) -> LaunchConfig {
    assert!(rows > 0, "a launch of a block per row for no rows");
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// The name of an attention kernel built per head dim (16, 32, 64 or 128; see kernels/attention.cu):
/// `attention_fwd_mass_d128` for ("attention_fwd", true, 128).
fn attention_kernel(base: &str, mass: bool, d: usize) -> String {
    format!("{base}{}_d{d}", if mass { "_mass" } else { "" })
}

/// What one launch of the fused attention kernels holds: mass accumulators of 16 groups in registers
/// and 64 ranges in shared memory (`FA_MAX_GROUPS`, `FA_MAX_RANGES` in kernels/attention.cu).
const FA_MAX_GROUPS: usize = 16;
/// Floats per query row of variant 5's group-mass accumulators (`FA4_QM_STRIDE` in
/// kernels/attention.cu: 16 groups and a pad).
const FA4_QM_STRIDE: usize = 17;
const FA_MAX_RANGES: usize = 64;

/// Sequences one batched decode launch takes (`DEC_MAX_SEQS` in kernels/attention.cu).
const DEC_MAX_SEQS: usize = 32;

/// `DecodeSeqs` of kernels/attention.cu, passed by value to the append and the decode launches:
/// every sequence's bf16 caches (`DKv`), rows, keys and group layout.
#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeSeqs {
    k: [u64; DEC_MAX_SEQS],
    v: [u64; DEC_MAX_SEQS],
    row0: [i32; DEC_MAX_SEQS + 1],
    tk: [i32; DEC_MAX_SEQS],
    goff: [i32; DEC_MAX_SEQS],
    ng: [i32; DEC_MAX_SEQS],
    n: i32,
}

// SAFETY: plain #[repr(C)] data of integers, laid out as the kernel's struct (pointers first, 8-byte
// aligned, then 4-byte ints), which the launch copies into the kernel's parameters.
unsafe impl DeviceRepr for DecodeSeqs {}

/// Weight matrices one `gemv_bf16_m*` launch takes (`GEMV_MAX_MATS` in kernels/gemv.cu).
const GEMV_MAX_MATS: usize = 4;
/// Rows up to which `linears` runs as `gemv_bf16_m*` instead of cuBLAS (decode steps).
const GEMV_MAX_ROWS: usize = 8;

/// `GemvMats` of kernels/gemv.cu, passed by value: each matrix's weights, bias (0: none), output and
/// first feature.
#[repr(C)]
#[derive(Clone, Copy)]
struct GemvMats {
    w: [u64; GEMV_MAX_MATS],
    bias: [u64; GEMV_MAX_MATS],
    y: [u64; GEMV_MAX_MATS],
    n0: [i32; GEMV_MAX_MATS + 1],
    count: i32,
}

// SAFETY: as DecodeSeqs.
unsafe impl DeviceRepr for GemvMats {}

/// Output features one warp of `gemv_bf16_m{rows}` computes (`gemv_rows<rows, F>` in
/// kernels/gemv.cu): more rows of x re-read from L1 for every weight, so more features share them.
fn gemv_features_per_warp(rows: usize) -> usize {
    match rows {
        1 | 2 => 1,
        4 => 2,
        _ => 4,
    }
}

/// The keys of a decode step split over blocks: (splits, keys per split) for `rows_heads` (query
/// row, head) pairs against `tk` keys. ~8 blocks (32 warps) per SM of an H100 (132), at least 64
/// keys per block: the loop is latency-bound, so the more rows in flight the better (2 blocks per SM
/// read 0.8 TB/s).
fn decode_splits(rows_heads: usize, tk: usize) -> (usize, usize) {
    let splits = 1056usize.div_ceil(rows_heads).clamp(1, tk.div_ceil(64).max(1));
    let chunk = tk.div_ceil(splits).max(1);
    (tk.div_ceil(chunk).max(1), chunk)
}

/// Key groups as the kernels read them (kernels/attention.cu): the (n_groups + 1) offsets of each
/// group's ranges, then (start, end) per range, sorted by group; ends clipped to i32.
fn group_layout(groups: &KeyGroups) -> Vec<usize> {
    let clip = |x: usize| x.min(i32::MAX as usize);
    let mut v = groups.offsets().to_vec();
    v.extend(groups.ranges().iter().flat_map(|&(a, b, _)| [clip(a), clip(b)]));
    v
}

/// `groups` cut into pieces that one fused launch holds (≤ FA_MAX_GROUPS groups, ≤ FA_MAX_RANGES
/// ranges), each with the group of `groups` that each of its groups counts for. A group of more
/// ranges than fit is split over pieces: its ranges do not overlap, so the pieces' masses add up.
/// Groups without ranges are left out (their mass is 0).
fn group_pieces(groups: &KeyGroups) -> Vec<(KeyGroups, Vec<usize>)> {
    let mut pieces = Vec::new();
    let (mut ranges, mut of): (Vec<KeyRange>, Vec<usize>) = (Vec::new(), Vec::new());
    let mut flush = |ranges: &mut Vec<KeyRange>, of: &mut Vec<usize>| {
        if !of.is_empty() {
            let g = KeyGroups::new(ranges, of.len()).expect("the ranges of valid groups");
            pieces.push((g, std::mem::take(of)));
            ranges.clear();
        }
    };
    for g in 0..groups.n_groups() {
        let mut rest = groups.group(g);
        while !rest.is_empty() {
            if of.len() == FA_MAX_GROUPS || ranges.len() == FA_MAX_RANGES {
                flush(&mut ranges, &mut of);
            }
            let (part, more) = rest.split_at(rest.len().min(FA_MAX_RANGES - ranges.len()));
            let local = of.len();
            ranges.extend(part.iter().map(|&(a, b, _)| (a, b, local)));
            of.push(g);
            rest = more;
        }
    }
    flush(&mut ranges, &mut of);
    pieces
}

/// The prefix-shared DPO hole as kernel arguments: (first query position, key start, key end), or
/// first = -1 for none.
fn hole_args(s: AttnShape) -> (i32, i32, i32) {
    s.hole
        .map_or((-1, 0, 0), |(f, a, b)| (f as i32, a as i32, b as i32))
}

/// Dynamic shared memory of the attention backward at head dim d (`attention_bwd_d*`, or the packed
/// `attention_bwd3_d*`): K, Kᵀ, V, then Q, Qᵀ, dO, dOᵀ tiles (two of each, double-buffered, when
/// packed), the dS tile in bf16, then the log-sum-exp and Δ of 64 rows.
fn bwd_smem(d: usize, packed: bool) -> usize {
    let nb = if packed { 2 } else { 1 };
    ((2 + 2 * nb) * 64 * (d + 8) + (1 + 2 * nb) * d * 72 + 64 * 72) * 2 + 2 * 64 * 4
}

/// f32 -> bf16 bits, round to nearest even (the kernels' `f2bf`).
fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl CudaBackend {
    /// The GPU `ordinal`: context, stream, cuBLAS, and every kernel family compiled (or read from
    /// the cache) for its arch. Fails with one clear line when the driver, NVRTC or a GPU is missing.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::Invalid(
                "CUDA: no driver library (libcuda.so.1) on this machine".into(),
            ));
        }
        if !nvrtc::available() {
            return Err(Error::Invalid(
                "CUDA: NVRTC (libnvrtc.so.13) not found: install nvidia-cuda-nvrtc==13.0.88 and add its lib folder to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        // SAFETY: only tries to dlopen the candidate names (cudarc panics on first use otherwise).
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Invalid(
                "CUDA: cuBLAS (libcublas.so.13) not found: add the CUDA toolkit's lib64 (or the nvidia-cublas wheel's lib) to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let n = CudaContext::device_count().map_err(|e| dev_err("counting devices", e))?;
        if ordinal as i32 >= n {
            return Err(Error::Invalid(format!("CUDA: no GPU {ordinal} ({n} found)")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("creating the context", e))?;
        // cudarc gives every allocation a read and a write event by default (created with it,
        // destroyed with it: four driver calls per op output on top of the allocation) to order
        // uses across streams. Everything here runs on the context's one default stream, in order.
        // SAFETY: no other stream is created, so no buffer is used on a stream other than the one
        // that allocated it, and stream order alone orders every use and free.
        unsafe { ctx.disable_event_tracking() };
        let pool = if ctx.has_async_alloc() {
            Some(keep_freed_memory(&ctx)?)
        } else {
            None
        };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| dev_err("compute capability", e))?;
        // Hopper's arch-specific features (wgmma, TMA) need the `a` target
        let arch = format!("sm_{major}{minor}{}", if major == 9 { "a" } else { "" });
        let device = ctx.name().map_err(|e| dev_err("device name", e))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("cuBLAS", e))?;
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| dev_err("shared memory limit", e))? as usize;
        let mut funcs = HashMap::new();
        for f in FAMILIES {
            let cubin = nvrtc::compile_cached(f, &arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .map_err(|e| dev_err(&format!("loading kernels/{}.cu", f.name), e))?;
            for &k in f.kernels {
                let func = module
                    .load_function(k)
                    .map_err(|e| dev_err(&format!("kernel {}/{k}", f.name), e))?;
                if f.name == "attention" {
                    // static + dynamic may not exceed the opt-in limit (cuFuncSetAttribute fails
                    // with CUDA_ERROR_INVALID_VALUE otherwise): the pack and decode kernels hold
                    // 1–16 KB of static shared memory, the others at most the 1 KB reserved here
                    // SAFETY: `func` was just loaded from `module`, which outlives this call.
                    let static_smem = unsafe {
                        cudarc::driver::result::function::get_function_attribute(
                            func.cu_function(),
                            CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                        )
                    }
                    .map_err(|e| dev_err(&format!("static shared memory of {k}"), e))?
                        as usize;
                    func.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem_optin.saturating_sub(static_smem.max(1024)) as i32,
                    )
                    .map_err(|e| dev_err(&format!("shared memory of {k}"), e))?;
                }
                if ["attention_fwd4", "attention_fwd5", "attention_fwd6"]
                    .iter()
                    .any(|v| k.starts_with(v))
                {
                    // variants 4 to 6 hold 96 KB (64-key tiles at d128; 105 KB with variant 5's
                    // mass) to 192 KB per block: ask for the whole carveout as shared memory, so
                    // that two blocks of variants 4 and 5 can share an SM (variant 5 had gone
                    // without it)
                    func.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                        100,
                    )
                    .map_err(|e| dev_err(&format!("shared memory carveout of {k}"), e))?;
                }
                funcs.insert(k, func);
            }
        }
        Ok(CudaBackend {
            stream,
            blas,
            funcs,
            device,
            smem_optin,
            poison: std::env::var("MIADPO_POISON").is_ok_and(|v| v == "1"),
            pool,
            ints_cache: Mutex::new(Vec::new()),
            occupancy: Mutex::new(Vec::new()),
            attn: match std::env::var("MIADPO_ATTENTION").as_deref() {
                Ok("plain") => AttnKernel::Plain,
                // the fastest that has passed the GPU tests on a device (docs/attention-notes.md):
                // variant 5 on Hopper (H200, 2026-11-27), variant 3 elsewhere
                Err(_) if arch == "sm_90a" => AttnKernel::WgmmaBulk,
                Err(_) => AttnKernel::Pipelined,
                Ok("fused") => AttnKernel::Fused,
                Ok("pipelined") => AttnKernel::Pipelined,
                Ok(w @ ("wgmma" | "wgmma128" | "wgmma-bulk" | "wgmma-overlap")) if arch != "sm_90a" => {
                    return Err(Error::Invalid(format!(
                        "MIADPO_ATTENTION={w}: wgmma needs a Hopper GPU (sm_90a); this one is {arch}"
                    )))
                }
                Ok("wgmma") => AttnKernel::Wgmma,
                Ok("wgmma128") => AttnKernel::WgmmaWide,
                Ok("wgmma-bulk") => AttnKernel::WgmmaBulk,
                Ok("wgmma-overlap") => AttnKernel::WgmmaOverlap,
                Ok(other) => {
                    return Err(Error::Invalid(format!(
                        "MIADPO_ATTENTION={other}: expected plain, fused, pipelined, wgmma, wgmma128, wgmma-bulk or wgmma-overlap"
                    )))
                }
            },
            arch,
        })
    }

    /// Poisons every op's output with NaN before its kernel runs (the GPU tests).
    pub fn with_poison(mut self, on: bool) -> Self {
        self.poison = on;
        self
    }

    /// Picks the attention kernels (benchmarks of the numbered variants, tests of both). Variant 4
    /// (`Wgmma*`) on a GPU other than sm_90a runs as variant 3.
    pub fn set_attention(&mut self, k: AttnKernel) {
        self.attn = k;
    }

    /// The arch the kernels were compiled for (`sm_90a` on Hopper).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether variant 4 (wgmma) serves this shape: picked, on sm_90a, head dim 64 or 128, a prefill
    /// (decode steps take flash-decoding).
    fn wgmma_attention(&self, s: AttnShape) -> bool {
        matches!(
            self.attn,
            AttnKernel::Wgmma | AttnKernel::WgmmaWide | AttnKernel::WgmmaBulk | AttnKernel::WgmmaOverlap
        ) && self.arch == "sm_90a"
            && matches!(s.head_dim, 64 | 128)
            && s.tq >= 16
    }

    /// Whether the tensor-core kernels (variants 2 and 3) serve this shape: a head dim they are built
    /// for.
    fn fused_attention(&self, s: AttnShape) -> bool {
        self.attn != AttnKernel::Plain && matches!(s.head_dim, 16 | 32 | 64 | 128)
    }

    /// One attention forward launch: `fused` picks variant 2 (which can also write the log-sum-exp
    /// per row and head, for the backward) over the plain kernel. Returns the output, the per-head
    /// group mass (tq, heads, n_groups) when groups are given (at most FA_MAX_GROUPS groups and
    /// FA_MAX_RANGES ranges for the fused kernel), and the log-sum-exp (tq, heads) if asked.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        s: AttnShape,
        groups: Option<&KeyGroups>,
        fused: bool,
        want_lse: bool,
    ) -> (DBuf, Option<DBuf>, Option<DBuf>) {
        let n_groups = groups.map_or(0, |g| g.n_groups());
        let d = s.head_dim;
        assert!(
            fused || !want_lse,
            "only the fused forward writes the log-sum-exp"
        );
        let (name, cfg) = if fused {
            let name = attention_kernel("attention_fwd", n_groups > 0, d);
            // Q and K tiles of 64 rows (row stride D + 8), V transposed (D rows of 64 + 8), bf16
            let smem = ((64 + 64) * (d + 8) + d * 72) * 2;
            let cfg = LaunchConfig {
                grid_dim: (s.tq.div_ceil(64) as u32, s.heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            (name, cfg)
        } else {
            let smem = s.tk * 4;
            assert!(
                smem + 1024 <= self.smem_optin,
                "the plain attention kernel holds a row of {} keys in shared memory (at most {} on this GPU)",
                s.tk,
                (self.smem_optin - 1024) / 4
            );
            let cfg = LaunchConfig {
                grid_dim: (s.tq as u32, s.heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            ("attention_plain".to_string(), cfg)
        };
        let mut out = self.poisoned(s.tq * s.heads * d);
        let mut lse = want_lse.then(|| self.poisoned(s.tq * s.heads));
        let groups_dev = self.group_ints(groups);
        let mut mass = (n_groups > 0).then(|| self.zeros(s.tq * s.heads * n_groups));
        let (hf, ha, hb) = hole_args(s);
        let ints = [s.tq, s.tk, s.heads, s.kv_heads].map(|x| x as i32);
        let (causal, q0, ng, dd) = (s.causal as i32, s.q_pos0 as i32, n_groups as i32, d as i32);
        let null: u64 = 0; // for the outputs not asked for
        let mut b = self.stream.launch_builder(self.f(&name));
        b.arg(&q.s).arg(&k.s).arg(&v.s).arg(&mut out.s);
        if fused {
            match lse.as_mut() {
                Some(l) => b.arg(&mut l.s),
                None => b.arg(&null),
            };
        }
        for x in &ints {
            b.arg(x);
        }
        if !fused {
            b.arg(&dd);
        }
        b.arg(&causal)
            .arg(&q0)
            .arg(&hf)
            .arg(&ha)
            .arg(&hb)
            .arg(&*groups_dev)
            .arg(&ng);
        match mass.as_mut() {
            Some(m) => b.arg(&mut m.s),
            None => b.arg(&null),
        };
        self.note_occupancy(&name, &cfg);
        // SAFETY: shapes asserted by the callers (AttnShape); the kernels' argument lists are the ones
        // pushed above (kernels/attention.cu), smem sized for the chosen kernel.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA: {name}: {e:?}"));
        (out, mass, lse)
    }

    /// Variant 3's forward: K and V packed to bf16 (V transposed) once, then 128 query rows per block
    /// with the key tiles double-buffered by cp.async. Returns the output and the per-head group mass
    /// (at most FA_MAX_GROUPS groups and FA_MAX_RANGES ranges).
    fn attention_fwd_pipelined(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        s: AttnShape,
        groups: Option<&KeyGroups>,
    ) -> (DBuf, Option<DBuf>) {
        let (d, n_groups) = (s.head_dim, groups.map_or(0, |g| g.n_groups()));
        let name = attention_kernel("attention_fwd3", n_groups > 0, d);
        // Q tile of 128 rows, two K tiles (64 rows, stride d + 8) and two Vᵀ tiles (d rows of 64 + 8)
        let smem = (128 * (d + 8) + 2 * 64 * (d + 8) + 2 * d * 72) * 2;
        let cfg = LaunchConfig {
            grid_dim: (s.tq.div_ceil(128) as u32, s.heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let tpad = s.tk.div_ceil(64).max(1) * 64;
        let (kb, vt) = self.pack_kv(k, v, s, tpad, 0);
        let (out, mass, _) = self.attention_fwd_packed(&name, cfg, q, (&kb, &vt), s, tpad, groups, false);
        (out, mass)
    }

    /// The launch of variants 3 and 4 (one argument list): K and V packed to bf16 with `tpad` rows,
    /// then kernel `name` with `cfg`. Returns the output, the per-head group mass when groups are
    /// given, and the log-sum-exp if asked.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd_packed(
        &self,
        name: &str,
        cfg: LaunchConfig,
        q: &DBuf,
        (kb, vt): (&CudaSlice<u16>, &CudaSlice<u16>),
        s: AttnShape,
        tpad: usize,
        groups: Option<&KeyGroups>,
        want_lse: bool,
    ) -> (DBuf, Option<DBuf>, Option<DBuf>) {
        let (d, n_groups) = (s.head_dim, groups.map_or(0, |g| g.n_groups()));
        let mut out = self.poisoned(s.tq * s.heads * d);
        let mut lse = want_lse.then(|| self.poisoned(s.tq * s.heads));
        let mut mass = (n_groups > 0).then(|| self.zeros(s.tq * s.heads * n_groups));
        let groups_dev = self.group_ints(groups);
        let (hf, ha, hb) = hole_args(s);
        let (tq, tk, tp, heads, kvh) = (
            s.tq as i32,
            s.tk as i32,
            tpad as i32,
            s.heads as i32,
            s.kv_heads as i32,
        );
        let (causal, q0, ng) = (s.causal as i32, s.q_pos0 as i32, n_groups as i32);
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&q.s).arg(kb).arg(vt).arg(&mut out.s);
        match lse.as_mut() {
            Some(l) => b.arg(&mut l.s),
            None => b.arg(&null),
        };
        b.arg(&tq).arg(&tk).arg(&tp).arg(&heads).arg(&kvh);
        b.arg(&causal)
            .arg(&q0)
            .arg(&hf)
            .arg(&ha)
            .arg(&hb)
            .arg(&*groups_dev)
            .arg(&ng);
        match mass.as_mut() {
            Some(m) => b.arg(&mut m.s),
            None => b.arg(&null),
        };
        self.note_occupancy(name, &cfg);
        // SAFETY: shapes of AttnShape; the argument list of attention_fwd3_* and attention_fwd4*
        // (kernels/attention.cu); smem and grid sized by the caller for its kernel.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA: {name}: {e:?}"));
        (out, mass, lse)
    }

    /// K (tk, kv_heads·d) and V as bf16 for variants 3 and 4 (`tiles` 0): K as (kv_heads, tpad, d), V
    /// transposed as (kv_heads, d, tpad), rows tk..tpad zero (tpad a multiple of 64, at least tk). For
    /// variants 5 and 6 (`tiles` 64 or 128, dividing tpad), each tile of that many keys as the image
    /// their kernels copy into shared memory in one piece: K as (kv_heads, tpad / tiles, tiles·d), Vᵀ
    /// as (kv_heads, tpad / tiles, d·tiles), head dims 64 and 128.
    fn pack_kv(
        &self,
        k: &DBuf,
        v: &DBuf,
        s: AttnShape,
        tpad: usize,
        tiles: usize,
    ) -> (CudaSlice<u16>, CudaSlice<u16>) {
        let d = s.head_dim;
        let bn = if tiles == 0 { 64 } else { tiles };
        assert!(tpad.is_multiple_of(bn) && tpad >= s.tk && matches!(tiles, 0 | 64 | 128));
        let alloc16 = |n: usize| {
            // SAFETY: the pack kernel writes every element (rows past tk as zeros) before any read.
            unsafe { self.stream.alloc::<u16>(n) }.expect("CUDA: out of memory")
        };
        let (mut kb, mut vt) = (alloc16(s.kv_heads * tpad * d), alloc16(s.kv_heads * tpad * d));
        let (tk, tp, kvh) = (s.tk as i32, tpad as i32, s.kv_heads as i32);
        let base = match tiles {
            0 => "attention_pack_kv",
            64 => "attention_pack_kv_tiles",
            _ => "attention_pack_kv_tiles128",
        };
        let pack = attention_kernel(base, false, d);
        let mut b = self.stream.launch_builder(self.f(&pack));
        b.arg(&k.s)
            .arg(&v.s)
            .arg(&mut kb)
            .arg(&mut vt)
            .arg(&tk)
            .arg(&tp)
            .arg(&kvh);
        let cfg = LaunchConfig {
            grid_dim: ((tpad / bn) as u32, s.kv_heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: k, v (tk, kv_heads·d); kb, vt (kv_heads·tpad·d elements) written in full.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA: {pack}: {e:?}"));
        (kb, vt)
    }

    /// The per-head group mass (tq, heads, ng) averaged over the heads: (tq, ng).
    fn mass_over_heads(&self, per_head: &DBuf, tq: usize, heads: usize, ng: usize) -> DBuf {
        assert_eq!(per_head.len(), tq * heads * ng);
        let mut avg = self.poisoned(tq * ng);
        let (t, h, g) = (tq as i32, heads as i32, ng as i32);
        let mut b = self.stream.launch_builder(self.f("attention_mass_heads"));
        b.arg(&per_head.s).arg(&mut avg.s).arg(&t).arg(&h).arg(&g);
        // SAFETY: per_head (tq, heads, ng), avg (tq, ng): a thread per element of avg.
        unsafe { b.launch(LaunchConfig::for_num_elems((tq * ng) as u32)) }
            .expect("CUDA: attention_mass_heads");
        avg
    }

    /// Variant 4's forward (sm_90a, head dim 64 or 128): K and V packed as for variant 3, then 128
    /// query rows per block of two warpgroups, S = QKᵀ and O += PV on `wgmma`, the key tiles (64, or
    /// 128 for `WgmmaWide` without mass) double-buffered by cp.async. Returns the output, the per-head
    /// group mass (at most FA_MAX_GROUPS groups and FA_MAX_RANGES ranges) and the log-sum-exp if asked.
    fn attention_fwd_wgmma(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        s: AttnShape,
        groups: Option<&KeyGroups>,
        want_lse: bool,
    ) -> (DBuf, Option<DBuf>, Option<DBuf>) {
        let (d, n_groups) = (s.head_dim, groups.map_or(0, |g| g.n_groups()));
        assert!(
            self.arch == "sm_90a" && matches!(d, 64 | 128),
            "variant 4 is sm_90a, d 64 or 128"
        );
        let tpad = s.tk.div_ceil(128).max(1) * 128; // a whole number of tiles of either width
        let mass = n_groups > 0;
        // (kernel, key tile width, K/V packed as tile images)
        let (base, bn, tiles) = match self.attn {
            AttnKernel::WgmmaOverlap => ("attention_fwd6", 128, true),
            AttnKernel::WgmmaBulk => ("attention_fwd5", 64, true),
            AttnKernel::WgmmaWide if !mass => ("attention_fwd4w", 128, false),
            _ => ("attention_fwd4", 64, false),
        };
        let name = attention_kernel(base, mass, d);
        // the two warpgroups' Q tiles (128 rows), two K tiles (bn rows) and two Vᵀ tiles (d rows of
        // bn keys), bf16; variants 5 and 6 add room for four mbarriers (6 has one per stage's K and
        // one per stage's Vᵀ); their mass kernels the group masses: variant 5 one per (row, group),
        // rows of FA4_QM_STRIDE floats; variant 6 each thread's own (2 rows x FA_MAX_GROUPS)
        let smem = (128 + 4 * bn) * d * 2
            + if tiles { 32 } else { 0 }
            + match self.attn {
                AttnKernel::WgmmaOverlap if mass => 256 * 2 * FA_MAX_GROUPS * 4,
                AttnKernel::WgmmaBulk if mass => 128 * FA4_QM_STRIDE * 4,
                _ => 0,
            };
        let cfg = LaunchConfig {
            grid_dim: (s.tq.div_ceil(128) as u32, s.heads as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (kb, vt) = self.pack_kv(k, v, s, tpad, if tiles { bn } else { 0 });
        // the kernels exist for sm_90a only, checked above
        self.attention_fwd_packed(&name, cfg, q, (&kb, &vt), s, tpad, groups, want_lse)
    }

    /// Variant 2's decode (flash-decoding): a few query rows against a long cache, the keys split
    /// over enough blocks to fill the GPU, then one merge per (row, head). Returns the output and the
    /// per-head group mass (tq, heads, n_groups) when groups are given (at most FA_MAX_GROUPS groups
    /// and FA_MAX_RANGES ranges).
    fn attention_decode(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        s: AttnShape,
        groups: Option<&KeyGroups>,
    ) -> (DBuf, Option<DBuf>) {
        let (d, n_groups) = (s.head_dim, groups.map_or(0, |g| g.n_groups()));
        let rows = s.tq * s.heads;
        let (splits, chunk) = decode_splits(rows, s.tk);
        let p = 2 + d + FA_MAX_GROUPS; // max, sum, d accumulators, 16 group masses
        let mut part = self.poisoned(rows * splits * p);
        let groups_dev = self.group_ints(groups);
        let (hf, ha, hb) = hole_args(s);
        let ints = [s.tq, s.tk, s.heads, s.kv_heads].map(|x| x as i32);
        let (causal, q0, ng, ch) = (s.causal as i32, s.q_pos0 as i32, n_groups as i32, chunk as i32);
        let name = attention_kernel("attention_decode", false, d);
        let mut b = self.stream.launch_builder(self.f(&name));
        b.arg(&q.s).arg(&k.s).arg(&v.s).arg(&mut part.s);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&causal)
            .arg(&q0)
            .arg(&hf)
            .arg(&ha)
            .arg(&hb)
            .arg(&*groups_dev)
            .arg(&ng)
            .arg(&ch);
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, s.heads as u32, s.tq as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: part holds (tq, heads, splits, p) floats, every one written by its block.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA: {name}: {e:?}"));
        let mut out = self.poisoned(rows * d);
        let mass = self.decode_merge(&part, &mut out.s.slice_mut(..), rows, d, splits, n_groups);
        (out, mass)
    }

    /// Flash-decoding's merge of the splits: part (rows_heads, splits, 2 + d + FA_MAX_GROUPS) ->
    /// out (rows_heads, d) and, for `n_groups` > 0, the per-head mass (rows_heads, n_groups).
    fn decode_merge(
        &self,
        part: &DBuf,
        out: &mut CudaViewMut<'_, f32>,
        rows_heads: usize,
        d: usize,
        splits: usize,
        n_groups: usize,
    ) -> Option<DBuf> {
        let mut mass = (n_groups > 0).then(|| self.poisoned(rows_heads * n_groups));
        let (r, dd, sp, ng) = (rows_heads as i32, d as i32, splits as i32, n_groups as i32);
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(self.f("attention_decode_combine"));
        b.arg(&part.s).arg(out);
        match mass.as_mut() {
            Some(m) => b.arg(&mut m.s),
            None => b.arg(&null),
        };
        b.arg(&r).arg(&dd).arg(&sp).arg(&ng);
        // SAFETY: a warp per (row, head), 8 per block; out (rows_heads, d), mass (rows_heads,
        // n_groups), part as above.
        unsafe { b.launch(per_row(rows_heads.div_ceil(8), 256, 0)) }.expect("CUDA: attention_decode_combine");
        mass
    }

    /// `linears` for a few rows (m <= GEMV_MAX_ROWS, k a multiple of 8): up to GEMV_MAX_MATS
    /// matrices per `gemv_bf16_m*` launch, x in f32 (no cast, no cuBLAS call).
    fn gemv(&self, x: &DBuf, m: usize, ws: &[(&CudaMat, Option<&DBuf>)]) -> Vec<DBuf> {
        let k = ws[0].0.cols;
        assert_eq!(x.n, m * k, "linears: x is not ({m}, {k})");
        let mut ys: Vec<DBuf> = ws.iter().map(|(w, _)| self.poisoned(m * w.rows)).collect();
        let rows = [1, 2, 4, 8].into_iter().find(|&r| r >= m).expect("m <= 8");
        let (name, per_warp) = (format!("gemv_bf16_m{rows}"), gemv_features_per_warp(rows));
        for (wc, yc) in ws.chunks(GEMV_MAX_MATS).zip(ys.chunks_mut(GEMV_MAX_MATS)) {
            let mut mats = GemvMats {
                w: [0; GEMV_MAX_MATS],
                bias: [0; GEMV_MAX_MATS],
                y: [0; GEMV_MAX_MATS],
                n0: [0; GEMV_MAX_MATS + 1],
                count: wc.len() as i32,
            };
            let (mut n, mut warps) = (0, 0);
            for (i, ((w, bias), y)) in wc.iter().zip(yc.iter_mut()).enumerate() {
                if let Some(b) = bias {
                    assert_eq!(b.n, w.rows, "linears: bias of {} features", w.rows);
                }
                // cudarc's event tracking is off (`new`): the raw pointers need no guard
                mats.w[i] = w.w.device_ptr(&self.stream).0;
                mats.bias[i] = bias.map_or(0, |b| b.s.device_ptr(&self.stream).0);
                mats.y[i] = y.s.device_ptr_mut(&self.stream).0;
                mats.n0[i] = n as i32;
                n += w.rows;
                warps += w.rows.div_ceil(per_warp);
            }
            mats.n0[wc.len()..].fill(n as i32);
            let (mm, kk) = (m as i32, k as i32);
            let mut b = self.stream.launch_builder(self.f(&name));
            b.arg(&x.s).arg(&mats).arg(&mm).arg(&kk);
            // SAFETY: x (m, k), each W (n_i, k) with k a multiple of 8 (16-byte rows), each y
            // (m, n_i); a warp per `per_warp` features of a matrix, 8 warps per block.
            unsafe { b.launch(per_row(warps.div_ceil(8), 256, 0)) }
                .unwrap_or_else(|e| panic!("CUDA: {name}: {e:?}"));
        }
        ys
    }

    /// Makes room in the cache `kv` for `n` elements, keeping its `kv.n`: its length is `kv.n`, its
    /// capacity the allocation's, which grows geometrically as the cache grows by a row per decode
    /// step, so growing costs O(rows) copied in all instead of the whole cache per step.
    fn reserve(&self, kv: &mut DKv, n: usize) {
        if kv.s.len() >= n {
            return;
        }
        // an empty cache takes exactly its first rows (a prompt's prefill); a growing one a quarter
        // more than it needs (a cache is most of a decode step's memory: doubling it would hold
        // twice the prompt), still O(rows) copied in all
        let cap = if kv.n == 0 { n } else { n + n / 4 };
        // SAFETY: the first kv.n elements are copied in below, the rest lie past the length.
        let mut grown = unsafe { self.stream.alloc::<u16>(cap.max(1)) }.expect("CUDA: out of memory");
        if kv.n > 0 {
            let mut head = grown.slice_mut(..kv.n);
            self.stream
                .memcpy_dtod(&kv.s.slice(..kv.n), &mut head)
                .expect("CUDA: copy");
        }
        kv.s = grown;
    }

    /// `attention_cached` for up to DEC_MAX_SEQS decode sequences whose rows start at row `r0` of
    /// q, k, v and `out`: one launch appends every sequence's new K and V rows to its caches, one
    /// decodes every row against its own cache, one merges the splits into `out`. Returns each
    /// sequence's mass (rows, n_groups) when it has groups (each within one launch's limits).
    fn decode_seqs(
        &self,
        (q, k, v): (&DBuf, &DBuf, &DBuf),
        out: &mut DBuf,
        h: Heads,
        r0: usize,
        seqs: &mut [CachedSeq<'_, Self>],
    ) -> Vec<Option<Mass<Self>>> {
        assert!(seqs.len() <= DEC_MAX_SEQS);
        let (d, qd, kvd) = (h.dim, h.heads * h.dim, h.kv_heads * h.dim);
        let rows: usize = seqs.iter().map(|s| s.rows).sum();
        // the parameters of both launches (the append's lengths are tk less the new rows)
        let mut dec = DecodeSeqs {
            k: [0; DEC_MAX_SEQS],
            v: [0; DEC_MAX_SEQS],
            row0: [rows as i32; DEC_MAX_SEQS + 1],
            tk: [0; DEC_MAX_SEQS],
            goff: [0; DEC_MAX_SEQS],
            ng: [0; DEC_MAX_SEQS],
            n: seqs.len() as i32,
        };
        // the group layouts back to back after a lone 0 (the empty layout of sequences without groups)
        let mut layouts = vec![0usize];
        let (mut at, mut max_tk, mut ng_max) = (0, 1, 0);
        for (i, seq) in seqs.iter_mut().enumerate() {
            let n = (seq.len + seq.rows) * kvd;
            assert_eq!(seq.k.n, seq.len * kvd, "cache {i}: its length is not `len` rows");
            self.reserve(seq.k, n);
            self.reserve(seq.v, n);
            // cudarc's event tracking is off (`new`), so the raw pointers need no guard; the caches
            // outlive the launches
            dec.k[i] = seq.k.s.device_ptr_mut(&self.stream).0;
            dec.v[i] = seq.v.s.device_ptr_mut(&self.stream).0;
            dec.row0[i] = at as i32;
            dec.tk[i] = (seq.len + seq.rows) as i32;
            if let Some(g) = seq.groups {
                dec.goff[i] = layouts.len() as i32;
                dec.ng[i] = g.n_groups() as i32;
                layouts.extend(group_layout(g));
                ng_max = ng_max.max(g.n_groups());
            }
            at += seq.rows;
            max_tk = max_tk.max(seq.len + seq.rows);
        }
        let kvd_i = kvd as i32;
        let (kn, vn) = (k.s.slice(r0 * kvd..), v.s.slice(r0 * kvd..));
        let mut b = self.stream.launch_builder(self.f("kv_append_seqs"));
        b.arg(&kn).arg(&vn).arg(&dec).arg(&kvd_i);
        let cfg = LaunchConfig {
            grid_dim: (kvd.div_ceil(256) as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each cache holds (len + rows) rows of kvd after `reserve`; k and v hold the rows.
        unsafe { b.launch(cfg) }.expect("CUDA: kv_append_seqs");
        for seq in seqs.iter_mut() {
            seq.k.n += seq.rows * kvd;
            seq.v.n += seq.rows * kvd;
        }
        let rows_heads = rows * h.heads;
        let (splits, chunk) = decode_splits(rows_heads, max_tk);
        let mut part = self.poisoned(rows_heads * splits * (2 + d + FA_MAX_GROUPS));
        let groups_dev = self.ints(&layouts);
        let (hh, kvh, ch) = (h.heads as i32, h.kv_heads as i32, chunk as i32);
        let name = attention_kernel("attention_decode_seqs", false, d);
        let qs = q.s.slice(r0 * qd..);
        let mut b = self.stream.launch_builder(self.f(&name));
        b.arg(&qs)
            .arg(&mut part.s)
            .arg(&dec)
            .arg(&hh)
            .arg(&kvh)
            .arg(&*groups_dev)
            .arg(&ch);
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, h.heads as u32, rows as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: part holds (rows, heads, splits, p) floats, every one written by its block; each
        // cache holds tk[s] rows.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA: {name}: {e:?}"));
        let mut o = out.s.slice_mut(r0 * qd..(r0 + rows) * qd);
        let mass = self.decode_merge(&part, &mut o, rows_heads, d, splits, ng_max);
        // (rows, heads, ng_max) averaged over the heads on the device and left there, each
        // sequence's rows and groups read after the step (`read_masses`): no wait between layers
        let avg = mass.map(|m| Arc::new(self.mass_over_heads(&m, rows, h.heads, ng_max)));
        let mut r = 0;
        seqs.iter()
            .map(|seq| {
                let row0 = r;
                r += seq.rows;
                let (g, buf) = (seq.groups?, avg.as_ref()?);
                Some(Mass::Device {
                    buf: Arc::clone(buf),
                    row0,
                    rows: seq.rows,
                    stride: ng_max,
                    n_groups: g.n_groups(),
                })
            })
            .collect()
    }

    /// Variant 2's backward: the forward's log-sum-exp (from `attention_train`, else recomputed by a
    /// forward launch), Δ = rowsum(dO ∘ O), then one block per (64-key tile, kv head).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd_fused(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        out: &DBuf,
        dout: &DBuf,
        lse: Option<&DBuf>,
        s: AttnShape,
    ) -> (DBuf, DBuf, DBuf) {
        let d = s.head_dim;
        let recomputed;
        let lse = match lse {
            Some(l) => l,
            None => {
                recomputed = self
                    .attention_fwd(q, k, v, s, None, true, true)
                    .2
                    .expect("asked for");
                &recomputed
            }
        };
        let rows = s.tq * s.heads;
        let mut delta = self.poisoned(rows);
        let (r, dd) = (rows as i32, d as i32);
        let mut b = self.stream.launch_builder(self.f("attention_bwd_delta"));
        b.arg(&dout.s).arg(&out.s).arg(&mut delta.s).arg(&r).arg(&dd);
        // SAFETY: dout and out hold rows · d elements, delta rows; a warp per row, 8 warps per block.
        unsafe { b.launch(per_row(rows.div_ceil(8), 256, 0)) }.expect("CUDA: attention_bwd_delta");
        let mut dq = self.zeros(q.len()); // accumulated by atomics
        let (mut dk, mut dv) = (self.poisoned(k.len()), self.poisoned(v.len()));
        // variant 3's backward (with variants 3 to 6): Q and dO packed to bf16 once, row-major and
        // transposed, by the K/V pack (Q as both "K" and "V", its heads as the kv heads), their tiles
        // double-buffered; where that does not fit the block's shared memory, variant 2's
        let packed = self.attn != AttnKernel::Fused && bwd_smem(d, true) + 1024 <= self.smem_optin;
        let tqpad = s.tq.div_ceil(64).max(1) * 64;
        let qs = AttnShape {
            tk: s.tq,
            kv_heads: s.heads,
            ..s
        };
        let (qp, dop) = if packed {
            (
                Some(self.pack_kv(q, q, qs, tqpad, 0)),
                Some(self.pack_kv(dout, dout, qs, tqpad, 0)),
            )
        } else {
            (None, None)
        };
        let name = attention_kernel(if packed { "attention_bwd3" } else { "attention_bwd" }, false, d);
        let (hf, ha, hb) = hole_args(s);
        let ints = [s.tq, s.tk, s.heads, s.kv_heads].map(|x| x as i32);
        let (causal, q0) = (s.causal as i32, s.q_pos0 as i32);
        let mut b = self.stream.launch_builder(self.f(&name));
        b.arg(&q.s)
            .arg(&k.s)
            .arg(&v.s)
            .arg(&dout.s)
            .arg(&lse.s)
            .arg(&delta.s)
            .arg(&mut dq.s)
            .arg(&mut dk.s)
            .arg(&mut dv.s);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&causal).arg(&q0).arg(&hf).arg(&ha).arg(&hb);
        let tqp = tqpad as i32;
        if let (Some((qb, qbt)), Some((dob, dobt))) = (&qp, &dop) {
            b.arg(qb).arg(qbt).arg(dob).arg(dobt).arg(&tqp);
        }
        let smem = bwd_smem(d, packed);
        let cfg = LaunchConfig {
            grid_dim: (s.tk.div_ceil(64) as u32, s.kv_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        self.note_occupancy(&name, &cfg);
        // SAFETY: shapes of AttnShape; dq zeroed for the atomics, dk and dv written for every key.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA: {name}: {e:?}"));
        (dq, dk, dv)
    }

    /// A u64 attribute of the device's memory pool, in MiB.
    fn pool_attribute(&self, attr: cudarc::driver::sys::CUmemPool_attribute) -> Option<f64> {
        let pool = self.pool?;
        let mut v: u64 = 0;
        // SAFETY: the device's default pool; the byte-count attributes are u64.
        unsafe { cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
            .result()
            .ok()?;
        Some(v as f64 / (1u64 << 20) as f64)
    }

    /// "NVIDIA H100 80GB HBM3 (sm_90a)"
    pub fn device(&self) -> String {
        format!("{} ({})", self.device, self.arch)
    }

    /// Records `name`'s launch shape and occupancy the first time it is launched so (`occupancy`).
    fn note_occupancy(&self, name: &str, cfg: &LaunchConfig) {
        let mut seen = self.occupancy.lock().expect("occupancy lock");
        let (threads, smem) = (
            cfg.block_dim.0 * cfg.block_dim.1 * cfg.block_dim.2,
            cfg.shared_mem_bytes,
        );
        if seen
            .iter()
            .any(|o| o.kernel == name && o.threads == threads && o.smem == smem)
        {
            return;
        }
        let blocks_per_sm = self
            .f(name)
            .occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
            .unwrap_or(0);
        seen.push(Occupancy {
            kernel: name.to_string(),
            threads,
            smem,
            blocks_per_sm,
        });
    }

    /// The attention kernels launched so far with their occupancy (blocks per SM), in launch order.
    pub fn occupancy(&self) -> Vec<Occupancy> {
        self.occupancy.lock().expect("occupancy lock").clone()
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("kernel `{name}` is not in the kernel table"))
    }

    fn zeros(&self, n: usize) -> DBuf {
        DBuf {
            s: self
                .stream
                .alloc_zeros::<f32>(n.max(1))
                .expect("CUDA: out of memory"),
            n,
        }
    }

    /// An output buffer that a kernel writes in full: NaN when poisoning is on (an element the kernel
    /// misses then stays NaN and fails the comparison with the CPU twin), else left uninitialised.
    fn poisoned(&self, n: usize) -> DBuf {
        if !self.poison {
            // SAFETY: every caller hands the buffer to a kernel that writes all n elements before any
            // read (the poisoned GPU tests check exactly that).
            let s = unsafe { self.stream.alloc::<f32>(n.max(1)) }.expect("CUDA: out of memory");
            return DBuf { s, n };
        }
        let mut x = self.zeros(n);
        let (nn, v) = (n.max(1) as i64, f32::NAN);
        let mut b = self.stream.launch_builder(self.f("fill_f32"));
        b.arg(&mut x.s).arg(&nn).arg(&v);
        // SAFETY: x holds max(n, 1) elements.
        unsafe { b.launch(grid1d(n.max(1))) }.expect("CUDA: fill_f32");
        x
    }

    /// An index array on the device, from `ints_cache` when the same content was uploaded lately.
    /// Evicting a buffer frees it in stream order, after every kernel already issued that reads it.
    fn ints(&self, v: &[usize]) -> Arc<CudaSlice<i32>> {
        let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
        let mut cache = self.ints_cache.lock().expect("index cache lock");
        if let Some(i) = cache.iter().position(|(k, _)| *k == v) {
            let hit = cache.remove(i);
            let dev = Arc::clone(&hit.1);
            cache.push(hit);
            return dev;
        }
        // CUDA allocations cannot be empty: an empty array (no rows, a prompt without images) is
        // one unused element
        let dev = Arc::new(
            self.stream
                .clone_htod(if v.is_empty() { &[0][..] } else { &v[..] })
                .expect("CUDA: upload"),
        );
        if cache.len() == INTS_CACHE {
            cache.remove(0);
        }
        cache.push((v, Arc::clone(&dev)));
        dev
    }

    /// `group_layout` on the device; a lone 0 (no groups, no ranges) when there are none.
    fn group_ints(&self, groups: Option<&KeyGroups>) -> Arc<CudaSlice<i32>> {
        self.ints(&groups.map_or(vec![0], group_layout))
    }

    /// x (f32) -> a bf16 copy, for cuBLAS
    fn to_bf16(&self, x: &DBuf, n: usize) -> CudaSlice<u16> {
        // SAFETY: the cast below writes all n elements before any read.
        let mut y = unsafe { self.stream.alloc::<u16>(n.max(1)) }.expect("CUDA: out of memory");
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("cast_f32_bf16"));
        b.arg(&x.s).arg(&mut y).arg(&nn);
        // SAFETY: x and y hold n elements.
        unsafe { b.launch(grid1d(n)) }.expect("CUDA: cast_f32_bf16");
        y
    }

    /// Column-major GEMM C (m, n) = alpha op(A) op(B) + beta C, C f32, f32 compute.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, a_ty, lda): (u64, cudaDataType, usize),
        (b, b_ty, ldb): (u64, cudaDataType, usize),
        beta: f32,
        (c, ldc): (u64, usize),
    ) {
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // SAFETY: pointers come from live device buffers with the extents the callers describe.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(ta),
                op(tb),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                a as *const _,
                a_ty,
                lda as i32,
                b as *const _,
                b_ty,
                ldb as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                cudaDataType::CUDA_R_32F,
                ldc as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .expect("cuBLAS GemmEx");
    }

    /// Row-major y (m, n) = x (m, k) · w[r0..r0+n]ᵀ (+ beta y), x in bf16.
    #[allow(clippy::too_many_arguments)]
    fn xwt(&self, xb: &CudaSlice<u16>, m: usize, w: &CudaMat, r0: usize, n: usize, y: &mut DBuf, beta: f32) {
        let k = w.cols;
        let (xp, _gx) = xb.device_ptr(&self.stream);
        let (wp, _gw) = w.w.device_ptr(&self.stream);
        let (yp, _gy) = y.s.device_ptr(&self.stream);
        let bf = cudaDataType::CUDA_R_16BF;
        // column-major: yᵀ (n, m) = W_rows (k, n)ᵀ · xᵀ (k, m)
        self.gemm(
            true,
            false,
            (n, m, k),
            1.0,
            (wp + (r0 * k * 2) as u64, bf, k),
            (xp, bf, k),
            beta,
            (yp, n),
        );
    }

    /// Row-major dx (m, k) (+)= dy (m, n) · w[r0..r0+n] (n, k), dy in bf16.
    #[allow(clippy::too_many_arguments)]
    fn dyw(
        &self,
        dyb: &CudaSlice<u16>,
        m: usize,
        w: &CudaMat,
        r0: usize,
        n: usize,
        dx: &mut DBuf,
        beta: f32,
    ) {
        let k = w.cols;
        let (dp, _gd) = dyb.device_ptr(&self.stream);
        let (wp, _gw) = w.w.device_ptr(&self.stream);
        let (xp, _gx) = dx.s.device_ptr(&self.stream);
        let bf = cudaDataType::CUDA_R_16BF;
        // column-major: dxᵀ (k, m) = W_rowsᵀ... W_rows viewed (k, n) times dyᵀ (n, m)
        self.gemm(
            false,
            false,
            (k, m, n),
            1.0,
            (wp + (r0 * k * 2) as u64, bf, k),
            (dp, bf, n),
            beta,
            (xp, k),
        );
    }

    /// token ids on the device (i32)
    fn token_ids(&self, ids: &[u32]) -> Arc<CudaSlice<i32>> {
        self.ints(&ids.iter().map(|&x| x as usize).collect::<Vec<_>>())
    }

    /// For each vocabulary chunk c0..c0+n of the LM head w: the logits recomputed and turned into d
    /// logits (rows, n) in bf16 of Σ_r dlogp[r] · logp_r; `each(c0, n, hidden in bf16, d logits)`
    /// consumes them (the input gradient and the weight gradient share this loop).
    #[allow(clippy::too_many_arguments)]
    fn dlogits_chunks(
        &self,
        hidden: &DBuf,
        rows: usize,
        w: &CudaMat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        each: &mut ChunkSink,
    ) {
        let hb = self.to_bf16(hidden, rows * w.cols);
        let tv = self.token_ids(targets);
        let (lse_d, g_d) = (self.upload(lse), self.upload(dlogp));
        for c0 in (0..w.rows).step_by(VOCAB_CHUNK) {
            let n = VOCAB_CHUNK.min(w.rows - c0);
            let mut logits = self.poisoned(rows * n);
            self.xwt(&hb, rows, w, c0, n, &mut logits, 0.0);
            let mut dl = self
                .stream
                .alloc_zeros::<u16>(rows * n)
                .expect("CUDA: out of memory");
            let (nn, cc) = (n as i32, c0 as i32);
            let mut b = self.stream.launch_builder(self.f("lse_chunk_bwd"));
            b.arg(&logits.s)
                .arg(&nn)
                .arg(&cc)
                .arg(&*tv)
                .arg(&lse_d.s)
                .arg(&g_d.s)
                .arg(&mut dl);
            // SAFETY: one block per row of n logits.
            unsafe { b.launch(per_row(rows, BLOCK, 0)) }.expect("CUDA: lse_chunk_bwd");
            each(c0, n, &hb, &dl);
        }
    }

    fn launch_elementwise(&self, name: &str, bufs: &mut [&mut DBuf], consts: &[&DBuf], n: usize) {
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f(name));
        for x in bufs.iter_mut() {
            b.arg(&mut x.s);
        }
        for y in consts {
            b.arg(&y.s);
        }
        b.arg(&nn);
        // SAFETY: every buffer holds n elements.
        unsafe { b.launch(grid1d(n)) }.unwrap_or_else(|e| panic!("CUDA: {name}: {e:?}"));
    }
}

impl Backend for CudaBackend {
    type Buf = DBuf;
    type Mat = CudaMat;
    type Kv = DKv;
    const KV_BYTES: usize = 2;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn hardware(&self) -> String {
        self.device()
    }

    fn peak_memory_mib(&self) -> Option<f64> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    fn memory_in_use_mib(&self) -> Option<f64> {
        self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    fn reset_peak_memory(&self) {
        use cudarc::driver::sys;
        if let Some(pool) = self.pool {
            let mut zero: u64 = 0; // the driver resets the high-water mark to the current use
                                   // SAFETY: the device's default pool; the attribute takes a u64 that must be 0.
            let _ = unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                )
            };
        }
    }

    fn synchronize(&self) {
        self.stream.synchronize().expect("CUDA: synchronize");
    }

    fn upload(&self, x: &[f32]) -> DBuf {
        if x.is_empty() {
            return self.zeros(0);
        }
        DBuf {
            s: self.stream.clone_htod(x).expect("CUDA: upload"),
            n: x.len(),
        }
    }

    fn download(&self, x: &DBuf) -> Vec<f32> {
        if x.n == 0 {
            return Vec::new();
        }
        // only the first n elements (an allocation may hold more than the buffer's length)
        self.stream.clone_dtoh(&x.s.slice(..x.n)).expect("CUDA: download")
    }

    fn len(&self, x: &DBuf) -> usize {
        x.n
    }

    fn matrix(&self, t: &Tensor) -> Result<CudaMat> {
        let shape = t.shape();
        if shape.is_empty() {
            return Err(Error::tensor(
                t.file(),
                t.name(),
                "expected a matrix, found a scalar",
            ));
        }
        let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
        let bits: Vec<u16> = t.to_f32().into_iter().map(f32_to_bf16).collect();
        let w = self
            .stream
            .clone_htod(&bits)
            .map_err(|e| dev_err(&format!("uploading `{}`", t.name()), e))?;
        Ok(CudaMat { w, rows, cols })
    }

    fn mat_shape(&self, m: &CudaMat) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn linear(&self, x: &DBuf, m: usize, w: &CudaMat, bias: Option<&DBuf>) -> DBuf {
        self.linears(x, m, &[(w, bias)]).pop().expect("one product")
    }

    fn linears(&self, x: &DBuf, m: usize, ws: &[(&CudaMat, Option<&DBuf>)]) -> Vec<DBuf> {
        let Some(k) = ws.first().map(|(w, _)| w.cols) else {
            return Vec::new();
        };
        assert!(ws.iter().all(|(w, _)| w.cols == k), "linears: one input width");
        if m <= GEMV_MAX_ROWS && k % 8 == 0 {
            return self.gemv(x, m, ws);
        }
        let xb = self.to_bf16(x, m * k);
        ws.iter()
            .map(|&(w, bias)| {
                let mut y = self.poisoned(m * w.rows);
                self.xwt(&xb, m, w, 0, w.rows, &mut y, 0.0);
                if let Some(b) = bias {
                    let (rows, cols) = (m as i64, w.rows as i32);
                    let mut l = self.stream.launch_builder(self.f("bias_add"));
                    l.arg(&mut y.s).arg(&b.s).arg(&rows).arg(&cols);
                    // SAFETY: y (m, out), b (out).
                    unsafe { l.launch(grid1d(m * w.rows)) }.expect("CUDA: bias_add");
                }
                y
            })
            .collect()
    }

    fn embed(&self, ids: &[u32], table: &CudaMat) -> DBuf {
        for &id in ids {
            assert!(
                (id as usize) < table.rows,
                "token id {id} outside the embedding table ({})",
                table.rows
            );
        }
        let d = table.cols;
        let mut out = self.poisoned(ids.len() * d);
        let idv = self.token_ids(ids);
        let (n, dd) = (ids.len() as i32, d as i32);
        let mut b = self.stream.launch_builder(self.f("embed_gather"));
        b.arg(&table.w).arg(&*idv).arg(&mut out.s).arg(&n).arg(&dd);
        // SAFETY: ids checked against the table above.
        unsafe { b.launch(grid1d(ids.len() * d)) }.expect("CUDA: embed_gather");
        out
    }

    fn layer_norm(&self, x: &DBuf, d: usize, w: &DBuf, bias: &DBuf, eps: f32) -> DBuf {
        let rows = x.len() / d;
        let mut y = self.poisoned(x.len());
        if rows == 0 {
            return y;
        }
        let dd = d as i32;
        let mut b = self.stream.launch_builder(self.f("layer_norm_fwd"));
        b.arg(&x.s)
            .arg(&w.s)
            .arg(&bias.s)
            .arg(&mut y.s)
            .arg(&dd)
            .arg(&eps);
        // SAFETY: one block per row of d.
        unsafe { b.launch(per_row(rows, BLOCK, 0)) }.expect("CUDA: layer_norm_fwd");
        y
    }

    fn rms_norm(&self, x: &DBuf, d: usize, w: &DBuf, eps: f32) -> DBuf {
        let rows = x.len() / d;
        let mut y = self.poisoned(x.len());
        if rows == 0 {
            return y;
        }
        let dd = d as i32;
        let mut b = self.stream.launch_builder(self.f("rms_norm_fwd"));
        b.arg(&x.s).arg(&w.s).arg(&mut y.s).arg(&dd).arg(&eps);
        // SAFETY: one block per row of d.
        unsafe { b.launch(per_row(rows, BLOCK, 0)) }.expect("CUDA: rms_norm_fwd");
        y
    }

    fn swiglu(&self, gate: &mut DBuf, up: &DBuf) {
        assert_eq!(gate.n, up.n, "swiglu: shapes");
        let n = gate.n as i64;
        let mut b = self.stream.launch_builder(self.f("swiglu_fwd"));
        b.arg(&mut gate.s).arg(&up.s).arg(&n);
        // SAFETY: gate and up hold n elements.
        unsafe { b.launch(grid1d(gate.n)) }.expect("CUDA: swiglu_fwd");
    }

    fn add_rms_norm(&self, x: &mut DBuf, y: &DBuf, d: usize, w: &DBuf, eps: f32) -> DBuf {
        assert_eq!(x.n, y.n, "add_rms_norm: shapes");
        let rows = x.n / d;
        let mut out = self.poisoned(x.n);
        if rows == 0 {
            return out;
        }
        let dd = d as i32;
        let mut b = self.stream.launch_builder(self.f("add_rms_norm_fwd"));
        b.arg(&mut x.s)
            .arg(&y.s)
            .arg(&w.s)
            .arg(&mut out.s)
            .arg(&dd)
            .arg(&eps);
        // SAFETY: one block per row of d.
        unsafe { b.launch(per_row(rows, BLOCK, 0)) }.expect("CUDA: add_rms_norm_fwd");
        out
    }

    fn activation(&self, x: &mut DBuf, act: Activation) {
        let kind: i32 = match act {
            Activation::Silu => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::QuickGelu => 3,
        };
        let n = x.len();
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("activation"));
        b.arg(&x.s).arg(&nn).arg(&kind);
        // SAFETY: x holds n elements.
        unsafe { b.launch(grid1d(n)) }.expect("CUDA: activation");
    }

    fn add(&self, x: &mut DBuf, y: &DBuf) {
        assert_eq!(x.len(), y.len());
        let n = x.len();
        self.launch_elementwise("add", &mut [x], &[y], n);
    }

    fn axpy(&self, x: &mut DBuf, alpha: f32, y: &DBuf) {
        assert_eq!(x.len(), y.len());
        let nn = x.len() as i64;
        let n = x.len();
        let mut b = self.stream.launch_builder(self.f("axpy"));
        b.arg(&x.s).arg(&alpha).arg(&y.s).arg(&nn);
        // SAFETY: x and y hold n elements.
        unsafe { b.launch(grid1d(n)) }.expect("CUDA: axpy");
    }

    fn mul(&self, x: &mut DBuf, y: &DBuf) {
        assert_eq!(x.len(), y.len());
        let n = x.len();
        self.launch_elementwise("mul", &mut [x], &[y], n);
    }

    fn rope(&self, x: &mut DBuf, heads: usize, head_dim: usize, positions: &[usize], theta: f64) {
        rope_launch(self, x, heads, head_dim, positions, theta, 1.0);
    }

    fn rope_qk(
        &self,
        q: &mut DBuf,
        k: &mut DBuf,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        positions: &[usize],
        theta: f64,
    ) {
        let rows = positions.len();
        assert_eq!(
            q.n,
            rows * heads * head_dim,
            "rope_qk: q is not ({rows}, {heads}·{head_dim})"
        );
        assert_eq!(
            k.n,
            rows * kv_heads * head_dim,
            "rope_qk: k is not ({rows}, {kv_heads}·{head_dim})"
        );
        let pv = self.ints(positions);
        let (r, h, kh, d) = (rows as i32, heads as i32, kv_heads as i32, head_dim as i32);
        let mut b = self.stream.launch_builder(self.f("rope_qk"));
        b.arg(&mut q.s)
            .arg(&mut k.s)
            .arg(&*pv)
            .arg(&r)
            .arg(&h)
            .arg(&kh)
            .arg(&d)
            .arg(&theta);
        // SAFETY: q (rows, heads·d) and k (rows, kv_heads·d), positions per row.
        unsafe { b.launch(grid1d(rows * (heads + kv_heads) * head_dim / 2)) }.expect("CUDA: rope_qk");
    }

    fn attention(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        s: AttnShape,
        groups: Option<&KeyGroups>,
    ) -> (DBuf, Option<Vec<f32>>) {
        let n_groups = groups.map_or(0, |g| g.n_groups());
        let fused = self.fused_attention(s);
        // Launches, each with its groups and the group of `groups` each counts for. The fused kernels
        // hold 16 group masses in registers and 64 ranges in shared memory: more (a sequence prompt
        // of 17 images) run as one launch per piece, the first one's output kept. Select's groups
        // (two for grid and pic-in-pic, one per image for sequence) take one launch.
        let launches: Vec<Option<(KeyGroups, Vec<usize>)>> = match groups {
            None => vec![None],
            Some(gr) if !fused => vec![Some((gr.clone(), (0..n_groups).collect()))],
            Some(gr) => {
                let pieces = group_pieces(gr);
                if pieces.is_empty() {
                    vec![None] // no group has a range: every mass is 0
                } else {
                    pieces.into_iter().map(Some).collect()
                }
            }
        };
        let mut out = None;
        let mut m = groups.map(|_| vec![0f32; s.tq * n_groups]); // (tq, n_groups)
        for launch in &launches {
            let piece = launch.as_ref().map(|(g, _)| g);
            let (o, mass) = if fused && s.tq < 16 {
                // decode steps: too few rows for a 64-row tile; keys split over blocks instead
                self.attention_decode(q, k, v, s, piece)
            } else if self.wgmma_attention(s) {
                let (o, mass, _) = self.attention_fwd_wgmma(q, k, v, s, piece, false);
                (o, mass)
            } else if fused && !matches!(self.attn, AttnKernel::Fused) {
                // variant 3, and the fallback of variants 4 to 6 (head dims 16 and 32, GPUs other than sm_90a)
                self.attention_fwd_pipelined(q, k, v, s, piece)
            } else {
                let (o, mass, _) = self.attention_fwd(q, k, v, s, piece, fused, false);
                (o, mass)
            };
            if let (Some(mass), Some(m), Some((_, of))) = (mass, m.as_mut(), launch) {
                // (tq, heads, of.len()) averaged over the heads on the device: only (tq, of.len())
                // is copied back (the per-head download and host loop cost 2 ms at T = 4096 on an
                // H100, more than the kernel)
                let avg = self.download(&self.mass_over_heads(&mass, s.tq, s.heads, of.len()));
                for i in 0..s.tq {
                    for (local, &g) in of.iter().enumerate() {
                        m[i * n_groups + g] += avg[i * of.len() + local];
                    }
                }
            }
            out.get_or_insert(o);
        }
        (out.expect("at least one launch"), m)
    }

    fn attention_cached(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        h: Heads,
        seqs: &mut [CachedSeq<'_, Self>],
    ) -> (DBuf, Vec<Option<Mass<Self>>>) {
        // decode steps (1..15 new rows per sequence) of the fused variants, each sequence's groups
        // within one launch's limits: DEC_MAX_SEQS sequences per launch; anything else one
        // `attention` per sequence
        let shape = AttnShape {
            tq: 1,
            tk: 1,
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.dim,
            causal: true,
            q_pos0: 0,
            hole: None,
        };
        let fits = |g: Option<&KeyGroups>| {
            g.is_none_or(|g| g.n_groups() <= FA_MAX_GROUPS && g.ranges().len() <= FA_MAX_RANGES)
        };
        if !self.fused_attention(shape)
            || seqs
                .iter()
                .any(|s| s.rows == 0 || s.rows >= 16 || !fits(s.groups))
        {
            return attention_cached_each(self, q, k, v, h, seqs);
        }
        let rows: usize = seqs.iter().map(|s| s.rows).sum();
        let mut out = self.poisoned(rows * h.heads * h.dim);
        let (mut masses, mut r0) = (Vec::with_capacity(seqs.len()), 0);
        for chunk in seqs.chunks_mut(DEC_MAX_SEQS) {
            let n: usize = chunk.iter().map(|s| s.rows).sum();
            masses.extend(self.decode_seqs((q, k, v), &mut out, h, r0, chunk));
            r0 += n;
        }
        (out, masses)
    }

    fn concat_rows(&self, parts: &[DBuf]) -> DBuf {
        let n: usize = parts.iter().map(|p| p.n).sum();
        let mut out = self.poisoned(n); // every element copied in below
        let mut at = 0;
        for p in parts.iter().filter(|p| p.n > 0) {
            let src = p.s.slice(..p.n);
            let mut dst = out.s.slice_mut(at..at + p.n);
            self.stream.memcpy_dtod(&src, &mut dst).expect("CUDA: copy");
            at += p.n;
        }
        out
    }

    fn kv_new(&self) -> DKv {
        // SAFETY: an empty cache; its one element lies past the length
        let s = unsafe { self.stream.alloc::<u16>(1) }.expect("CUDA: out of memory");
        DKv { s, n: 0 }
    }

    fn kv_append(&self, kv: &mut DKv, src: &DBuf) {
        let n = kv.n + src.n;
        self.reserve(kv, n);
        if src.n > 0 {
            let mut tail = kv.s.slice_mut(kv.n..n);
            let nn = src.n as i64;
            let mut b = self.stream.launch_builder(self.f("cast_f32_bf16"));
            b.arg(&src.s).arg(&mut tail).arg(&nn);
            // SAFETY: src holds src.n elements, the tail as many after `reserve`.
            unsafe { b.launch(grid1d(src.n)) }.expect("CUDA: cast_f32_bf16");
        }
        kv.n = n;
    }

    fn kv_read<'a>(&self, kv: &'a DKv) -> Cow<'a, DBuf> {
        // SAFETY: the cast below writes all n elements before any read.
        let mut s = unsafe { self.stream.alloc::<f32>(kv.n.max(1)) }.expect("CUDA: out of memory");
        if kv.n > 0 {
            let nn = kv.n as i64;
            let mut b = self.stream.launch_builder(self.f("cast_bf16_f32"));
            b.arg(&kv.s).arg(&mut s).arg(&nn);
            // SAFETY: both hold kv.n elements.
            unsafe { b.launch(grid1d(kv.n)) }.expect("CUDA: cast_bf16_f32");
        }
        Cow::Owned(DBuf { s, n: kv.n })
    }

    fn kv_truncate(&self, kv: &mut DKv, n: usize) {
        kv.n = kv.n.min(n);
    }

    fn transpose_rows(&self, x: &DBuf, a: usize, b: usize, d: usize) -> DBuf {
        let n = a * b * d;
        assert_eq!(x.n, n, "transpose_rows: shape");
        let mut y = self.poisoned(n); // every element written below
        let (aa, bb, dd) = (a as i32, b as i32, d as i32);
        let mut l = self.stream.launch_builder(self.f("transpose_rows"));
        l.arg(&x.s).arg(&mut y.s).arg(&aa).arg(&bb).arg(&dd);
        // SAFETY: x and y hold a·b·d elements.
        unsafe { l.launch(grid1d(n)) }.expect("CUDA: transpose_rows");
        y
    }

    fn slice_rows(&self, x: &DBuf, d: usize, r0: usize, r1: usize) -> DBuf {
        let mut out = self.poisoned((r1 - r0) * d); // every element copied in below
        if r1 > r0 {
            let src = x.s.slice(r0 * d..r1 * d);
            let mut dst = out.s.slice_mut(..);
            self.stream.memcpy_dtod(&src, &mut dst).expect("CUDA: copy");
        }
        out
    }

    fn scatter_rows(&self, x: &mut DBuf, d: usize, rows: &[usize], src: &DBuf) {
        let rv = self.ints(rows);
        let (n, dd) = (rows.len() as i32, d as i32);
        let mut b = self.stream.launch_builder(self.f("scatter_rows"));
        b.arg(&x.s).arg(&*rv).arg(&src.s).arg(&n).arg(&dd);
        // SAFETY: rows index x; src holds rows.len() rows of d.
        unsafe { b.launch(grid1d(rows.len() * d)) }.expect("CUDA: scatter_rows");
    }

    fn token_logprobs(&self, logits: &DBuf, vocab: usize, targets: &[u32]) -> Vec<f32> {
        if targets.is_empty() {
            return Vec::new(); // no rows: nothing to launch
        }
        let mut lse = OnlineLse::new(self, targets);
        lse.fold(self, logits, 0, vocab);
        lse.finish(self).0
    }

    fn linear_backward(&self, dy: &DBuf, m: usize, w: &CudaMat) -> DBuf {
        let mut dx = self.poisoned(m * w.cols);
        let dyb = self.to_bf16(dy, m * w.rows);
        self.dyw(&dyb, m, w, 0, w.rows, &mut dx, 0.0);
        dx
    }

    fn matmul_tn_acc(&self, g: &mut DBuf, alpha: f32, a: &DBuf, b: &DBuf, k: usize, m: usize, n: usize) {
        let (ap, _ga) = a.s.device_ptr(&self.stream);
        let (bp, _gb) = b.s.device_ptr(&self.stream);
        let (gp, _gg) = g.s.device_ptr(&self.stream);
        let f = cudaDataType::CUDA_R_32F;
        // column-major: gᵀ (n, m) += bᵀ... b viewed (n, k) times a viewed (m, k)ᵀ
        self.gemm(
            false,
            true,
            (n, m, k),
            alpha,
            (bp, f, n),
            (ap, f, m),
            1.0,
            (gp, n),
        );
    }

    fn rms_norm_backward(&self, x: &DBuf, d: usize, w: &DBuf, dy: &DBuf, eps: f32) -> DBuf {
        let rows = x.len() / d;
        let mut dx = self.poisoned(x.len());
        if rows == 0 {
            return dx;
        }
        let dd = d as i32;
        let mut b = self.stream.launch_builder(self.f("rms_norm_bwd"));
        b.arg(&x.s).arg(&w.s).arg(&dy.s).arg(&mut dx.s).arg(&dd).arg(&eps);
        // SAFETY: one block per row of d.
        unsafe { b.launch(per_row(rows, BLOCK, 0)) }.expect("CUDA: rms_norm_bwd");
        dx
    }

    fn rope_backward(&self, dx: &mut DBuf, heads: usize, head_dim: usize, positions: &[usize], theta: f64) {
        rope_launch(self, dx, heads, head_dim, positions, theta, -1.0);
    }

    fn swiglu_backward(&self, gate: &DBuf, up: &DBuf, dmid: &DBuf) -> (DBuf, DBuf) {
        let n = gate.len();
        let (mut dg, mut du) = (self.poisoned(n), self.poisoned(n));
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("swiglu_bwd"));
        b.arg(&gate.s)
            .arg(&up.s)
            .arg(&dmid.s)
            .arg(&mut dg.s)
            .arg(&mut du.s)
            .arg(&nn);
        // SAFETY: every buffer holds n elements.
        unsafe { b.launch(grid1d(n)) }.expect("CUDA: swiglu_bwd");
        (dg, du)
    }

    fn attention_train(&self, q: &DBuf, k: &DBuf, v: &DBuf, s: AttnShape) -> (DBuf, Option<DBuf>) {
        if !self.fused_attention(s) {
            return (self.attention(q, k, v, s, None).0, None);
        }
        // variant 4 or 2's forward, which also write the log-sum-exp for the backward
        let (out, _, lse) = if self.wgmma_attention(s) {
            self.attention_fwd_wgmma(q, k, v, s, None, true)
        } else {
            self.attention_fwd(q, k, v, s, None, true, true)
        };
        (out, lse)
    }

    fn attention_backward(
        &self,
        q: &DBuf,
        k: &DBuf,
        v: &DBuf,
        out: &DBuf,
        dout: &DBuf,
        lse: Option<&DBuf>,
        s: AttnShape,
    ) -> (DBuf, DBuf, DBuf) {
        if self.fused_attention(s) {
            return self.attention_bwd_fused(q, k, v, out, dout, lse, s);
        }
        let smem = 2 * s.tk * 4;
        assert!(
            smem <= 48 * 1024,
            "the plain attention backward supports at most 6144 keys"
        );
        let mut dq = self.poisoned(q.len());
        let (mut dk, mut dv) = (self.zeros(k.len()), self.zeros(v.len()));
        let (hf, ha, hb) = hole_args(s);
        let ints = [s.tq, s.tk, s.heads, s.kv_heads, s.head_dim].map(|x| x as i32);
        let (causal, q0) = (s.causal as i32, s.q_pos0 as i32);
        let mut b = self.stream.launch_builder(self.f("attention_plain_bwd"));
        b.arg(&q.s)
            .arg(&k.s)
            .arg(&v.s)
            .arg(&out.s)
            .arg(&dout.s)
            .arg(&mut dq.s)
            .arg(&mut dk.s)
            .arg(&mut dv.s);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&causal).arg(&q0).arg(&hf).arg(&ha).arg(&hb);
        let cfg = LaunchConfig {
            grid_dim: (s.tq as u32, s.heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: shapes of AttnShape; dk, dv zeroed before the atomic accumulation.
        unsafe { b.launch(cfg) }.expect("CUDA: attention_plain_bwd");
        (dq, dk, dv)
    }

    fn greedy_rows(&self, logits: &DBuf, rows: usize, vocab: usize) -> Vec<(u32, f64)> {
        assert_eq!(
            logits.n,
            rows * vocab,
            "greedy_rows: logits are not (rows, vocab)"
        );
        if rows == 0 {
            return Vec::new();
        }
        // one buffer, one copy back (a decode step waits on it): the probabilities, then the ids'
        // bits (i32 and f32 are both 4 bytes)
        let mut out = self.poisoned(2 * rows);
        let (pp, ip) = {
            let p = out.s.device_ptr_mut(&self.stream).0; // event tracking is off (`new`)
            (p, p + 4 * rows as u64)
        };
        let v = vocab as i32;
        let mut b = self.stream.launch_builder(self.f("argmax_maxprob"));
        b.arg(&logits.s).arg(&v).arg(&ip).arg(&pp);
        // SAFETY: a block per row of (rows, vocab) logits; 256 threads (block reductions by warp);
        // `out` holds rows probabilities then rows ids.
        unsafe { b.launch(per_row(rows, 256, 0)) }.expect("CUDA: argmax_maxprob");
        let host = self.download(&out);
        let (prob, ids) = host.split_at(rows);
        // the softmax probability of the maximum as a log (the host twin's max - log-sum-exp)
        ids.iter()
            .zip(prob)
            .map(|(&i, &p)| (i.to_bits() as i32 as u32, (p as f64).ln()))
            .collect()
    }

    fn fused_logprobs(
        &self,
        hidden: &DBuf,
        rows: usize,
        w: &CudaMat,
        targets: &[u32],
    ) -> (Vec<f32>, Vec<f32>) {
        if rows == 0 {
            return (Vec::new(), Vec::new()); // no rows: nothing to launch
        }
        let hb = self.to_bf16(hidden, rows * w.cols);
        let mut lse = OnlineLse::new(self, targets);
        for c0 in (0..w.rows).step_by(VOCAB_CHUNK) {
            let n = VOCAB_CHUNK.min(w.rows - c0);
            let mut logits = self.poisoned(rows * n); // (rows, n) — never (rows, vocab)
            self.xwt(&hb, rows, w, c0, n, &mut logits, 0.0);
            lse.fold(self, &logits, c0, n);
        }
        let (lp, lse, _) = lse.finish(self);
        (lp, lse)
    }

    fn fused_logprobs_backward(
        &self,
        hidden: &DBuf,
        rows: usize,
        w: &CudaMat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
    ) -> DBuf {
        let mut dh = self.zeros(rows * w.cols);
        if rows == 0 {
            return dh;
        }
        self.dlogits_chunks(hidden, rows, w, targets, lse, dlogp, &mut |c0, n, _, dl| {
            // dh (rows, h) (+)= dl (rows, n) · W[c0..c0+n]
            self.dyw(dl, rows, w, c0, n, &mut dh, if c0 == 0 { 0.0 } else { 1.0 });
        });
        dh
    }

    fn rms_norm_weight_grad(&self, x: &DBuf, d: usize, dy: &DBuf, eps: f32) -> DBuf {
        let rows = x.n / d;
        if rows == 0 {
            return self.zeros(d);
        }
        let mut inv = self.poisoned(rows);
        let dd = d as i32;
        let mut b = self.stream.launch_builder(self.f("rms_inv"));
        b.arg(&x.s).arg(&mut inv.s).arg(&dd).arg(&eps);
        // SAFETY: one block per row of d.
        unsafe { b.launch(per_row(rows, BLOCK, 0)) }.expect("CUDA: rms_inv");
        let mut dw = self.poisoned(d);
        let r = rows as i32;
        let mut b = self.stream.launch_builder(self.f("rms_norm_wgrad"));
        b.arg(&x.s).arg(&dy.s).arg(&inv.s).arg(&mut dw.s).arg(&r).arg(&dd);
        // SAFETY: one thread per column of d.
        unsafe { b.launch(grid1d(d)) }.expect("CUDA: rms_norm_wgrad");
        dw
    }

    fn activation_backward(&self, x: &DBuf, dy: &DBuf, act: Activation) -> DBuf {
        let kind: i32 = match act {
            Activation::Silu => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::QuickGelu => 3,
        };
        let n = x.n;
        let mut dx = self.poisoned(n);
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("activation_bwd"));
        b.arg(&x.s).arg(&dy.s).arg(&mut dx.s).arg(&nn).arg(&kind);
        // SAFETY: every buffer holds n elements.
        unsafe { b.launch(grid1d(n)) }.expect("CUDA: activation_bwd");
        dx
    }

    fn col_sum(&self, x: &DBuf, rows: usize, cols: usize) -> DBuf {
        let mut out = self.poisoned(cols);
        let (r, c) = (rows as i32, cols as i32);
        let mut b = self.stream.launch_builder(self.f("col_sum"));
        b.arg(&x.s).arg(&mut out.s).arg(&r).arg(&c);
        // SAFETY: x is (rows, cols); one thread per column.
        unsafe { b.launch(grid1d(cols)) }.expect("CUDA: col_sum");
        out
    }

    fn scatter_add_rows(&self, g: &mut DBuf, d: usize, rows: &[usize], src: &DBuf) {
        let rv = self.ints(rows);
        let (n, dd) = (rows.len() as i32, d as i32);
        let mut b = self.stream.launch_builder(self.f("scatter_add_rows"));
        b.arg(&mut g.s).arg(&*rv).arg(&src.s).arg(&n).arg(&dd);
        // SAFETY: rows index g; src holds rows.len() rows of d.
        unsafe { b.launch(grid1d(rows.len() * d)) }.expect("CUDA: scatter_add_rows");
    }

    fn fused_logprobs_weight_grad(
        &self,
        hidden: &DBuf,
        rows: usize,
        w: &CudaMat,
        targets: &[u32],
        lse: &[f32],
        dlogp: &[f32],
        g: &mut DBuf,
    ) {
        if rows == 0 {
            return; // nothing to add
        }
        let h = w.cols;
        self.dlogits_chunks(hidden, rows, w, targets, lse, dlogp, &mut |c0, n, hb, dl| {
            // g rows c0..c0+n (n, h) += dlᵀ (n, rows) · hidden (rows, h); column-major: the (h, n)
            // block = hiddenᵀ-view (h, rows) · dl-view (n, rows)ᵀ
            let (hp, _gh) = hb.device_ptr(&self.stream);
            let (dp, _gd) = dl.device_ptr(&self.stream);
            let (gp, _gg) = g.s.device_ptr(&self.stream);
            let bf = cudaDataType::CUDA_R_16BF;
            self.gemm(
                false,
                true,
                (h, n, rows),
                1.0,
                (hp, bf, h),
                (dp, bf, n),
                1.0,
                (gp + (c0 * h * 4) as u64, h),
            );
        });
    }

    fn zeros(&self, n: usize) -> DBuf {
        CudaBackend::zeros(self, n)
    }

    fn sum_squares(&self, xs: &[&DBuf]) -> f64 {
        // per tensor, up to 256 blocks' partial sums into one buffer, then one block sums them all:
        // one number comes back (f64 sums, as the CPU's, in another order)
        let blocks: Vec<usize> = xs
            .iter()
            .map(|x| x.n.div_ceil(BLOCK as usize).clamp(1, 256))
            .collect();
        let total: usize = blocks.iter().sum();
        if total == 0 {
            return 0.0;
        }
        // SAFETY: every partial is written by its block below, before the final sum reads it.
        let mut partial = unsafe { self.stream.alloc::<f64>(total) }.expect("CUDA: out of memory");
        let mut at = 0;
        for (x, &nb) in xs.iter().zip(&blocks) {
            let n = x.n as i64;
            let mut part = partial.slice_mut(at..at + nb);
            let mut b = self.stream.launch_builder(self.f("sumsq_partial"));
            b.arg(&x.s).arg(&n).arg(&mut part);
            // SAFETY: x holds n elements; part nb doubles, one per block.
            unsafe { b.launch(per_row(nb, BLOCK, 0)) }.expect("CUDA: sumsq_partial");
            at += nb;
        }
        // SAFETY: written by the one block below.
        let mut out = unsafe { self.stream.alloc::<f64>(1) }.expect("CUDA: out of memory");
        let t = total as i32;
        let mut b = self.stream.launch_builder(self.f("sum_final"));
        b.arg(&partial).arg(&t).arg(&mut out);
        // SAFETY: partial holds total doubles; one block.
        unsafe { b.launch(per_row(1, 1024, 0)) }.expect("CUDA: sum_final");
        self.stream.clone_dtoh(&out).expect("CUDA: download")[0]
    }

    fn optim_update(
        &self,
        cfg: &OptimConfig,
        p: &mut DBuf,
        g: &mut DBuf,
        gscale: f64,
        state: &mut BufState<DBuf>,
        lr: f32,
    ) {
        assert_eq!(p.n, g.n, "parameter and gradient sizes");
        let (n, gs) = (p.n as i64, if gscale < 1.0 { gscale as f32 } else { 1.0 });
        match cfg.kind {
            OptimizerKind::Sgd => {
                let mut b = self.stream.launch_builder(self.f("sgd_step"));
                b.arg(&mut p.s)
                    .arg(&g.s)
                    .arg(&n)
                    .arg(&lr)
                    .arg(&cfg.weight_decay)
                    .arg(&gs);
                // SAFETY: p and g hold n elements.
                unsafe { b.launch(grid1d(p.n)) }.expect("CUDA: sgd_step");
            }
            OptimizerKind::AdamW => {
                // moments of another size (a checkpoint that does not match its adapter) start
                // over, as on the host
                let (mut m, mut v) = match (state.m.take(), state.v.take()) {
                    (Some(m), Some(v)) if m.n == p.n && v.n == p.n => (m, v),
                    _ => (CudaBackend::zeros(self, p.n), CudaBackend::zeros(self, p.n)),
                };
                state.step += 1;
                // the bias corrections as the host computes them (f32 powers)
                let bc1 = 1.0 - cfg.beta1.powi(state.step as i32);
                let bc2 = 1.0 - cfg.beta2.powi(state.step as i32);
                let mut b = self.stream.launch_builder(self.f("adamw_step"));
                b.arg(&mut p.s)
                    .arg(&g.s)
                    .arg(&mut m.s)
                    .arg(&mut v.s)
                    .arg(&n)
                    .arg(&lr)
                    .arg(&cfg.beta1)
                    .arg(&cfg.beta2)
                    .arg(&cfg.eps)
                    .arg(&cfg.weight_decay)
                    .arg(&bc1)
                    .arg(&bc2)
                    .arg(&gs);
                // SAFETY: p, g, m and v hold n elements.
                unsafe { b.launch(grid1d(p.n)) }.expect("CUDA: adamw_step");
                (state.m, state.v) = (Some(m), Some(v));
            }
        }
    }

    fn to_mat(&self, x: &DBuf, rows: usize, cols: usize) -> Result<CudaMat> {
        assert_eq!(x.n, rows * cols, "to_mat: a ({rows}, {cols}) matrix");
        Ok(CudaMat {
            w: self.to_bf16(x, x.n),
            rows,
            cols,
        })
    }

    fn dropout(&self, x: &DBuf, p: f32, key: u64) -> DBuf {
        let n = x.len();
        let mut y = self.poisoned(n);
        let nn = n as i64;
        let mut b = self.stream.launch_builder(self.f("dropout"));
        b.arg(&x.s).arg(&mut y.s).arg(&nn).arg(&p).arg(&key);
        // SAFETY: x and y hold n elements.
        unsafe { b.launch(grid1d(n)) }.expect("CUDA: dropout");
        y
    }
}

fn rope_launch(
    be: &CudaBackend,
    x: &mut DBuf,
    heads: usize,
    hd: usize,
    positions: &[usize],
    theta: f64,
    sign: f32,
) {
    let pv = be.ints(positions);
    let (rows, h, d) = (positions.len() as i32, heads as i32, hd as i32);
    let mut b = be.stream.launch_builder(be.f("rope"));
    b.arg(&x.s)
        .arg(&*pv)
        .arg(&rows)
        .arg(&h)
        .arg(&d)
        .arg(&theta)
        .arg(&sign);
    // SAFETY: x is (rows, heads·hd).
    unsafe { b.launch(grid1d(positions.len() * heads * hd / 2)) }.expect("CUDA: rope");
}

/// The running state of an online log-sum-exp over rows of logits seen one vocabulary chunk at a
/// time: per row the running max, the sum of exp(logit − max), and the target's logit.
struct OnlineLse {
    rows: usize,
    targets: Arc<CudaSlice<i32>>,
    run_max: DBuf,
    run_sum: DBuf,
    target_logit: DBuf,
}

impl OnlineLse {
    fn new(be: &CudaBackend, targets: &[u32]) -> Self {
        let rows = targets.len();
        OnlineLse {
            rows,
            targets: be.token_ids(targets),
            run_max: be.upload(&vec![f32::NEG_INFINITY; rows]),
            run_sum: be.zeros(rows),
            target_logit: be.zeros(rows),
        }
    }

    /// Folds in logits (rows, n) of vocabulary entries c0..c0+n.
    fn fold(&mut self, be: &CudaBackend, logits: &DBuf, c0: usize, n: usize) {
        let (nn, cc) = (n as i32, c0 as i32);
        let mut b = be.stream.launch_builder(be.f("lse_chunk"));
        b.arg(&logits.s)
            .arg(&nn)
            .arg(&cc)
            .arg(&*self.targets)
            .arg(&mut self.run_max.s)
            .arg(&mut self.run_sum.s)
            .arg(&mut self.target_logit.s);
        // SAFETY: one block per row of n logits.
        unsafe { b.launch(per_row(self.rows, BLOCK, 0)) }.expect("CUDA: lse_chunk");
    }

    /// (log p, lse, max softmax prob) per row, on the host.
    fn finish(&self, be: &CudaBackend) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = self.rows;
        let (mut lp, mut lse, mut mp) = (be.poisoned(rows), be.poisoned(rows), be.poisoned(rows));
        let r = rows as i32;
        let mut b = be.stream.launch_builder(be.f("lse_finish"));
        b.arg(&self.run_max.s)
            .arg(&self.run_sum.s)
            .arg(&self.target_logit.s)
            .arg(&r)
            .arg(&mut lp.s)
            .arg(&mut lse.s)
            .arg(&mut mp.s);
        // SAFETY: every buffer holds `rows` entries.
        unsafe { b.launch(grid1d(rows)) }.expect("CUDA: lse_finish");
        (be.download(&lp), be.download(&lse), be.download(&mp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field declarations of `struct NAME { ... };` in kernel family `family`'s source, comments
    /// dropped: what a by-value launch parameter's Rust twin must mirror.
    fn c_struct_fields(family: &str, name: &str) -> Vec<String> {
        let src = FAMILIES.iter().find(|f| f.name == family).unwrap().source;
        let body = src.split(&format!("struct {name} {{")).nth(1).unwrap();
        body.split("};")
            .next()
            .unwrap()
            .lines()
            .filter_map(|l| {
                let decl = l.split("//").next().unwrap().trim();
                decl.strip_suffix(';').map(str::to_string)
            })
            .collect()
    }

    /// The by-value launch parameters of the batched decode (its append and decode launches) have the
    /// layout of the C struct in kernels/attention.cu (x86-64 and CUDA agree: 8-byte pointers first,
    /// then 4-byte ints; the offsets are those gcc gives the C struct).
    #[test]
    fn decode_launch_parameters_match_the_kernels_struct() {
        use std::mem::{offset_of, size_of};
        assert_eq!(
            [
                offset_of!(DecodeSeqs, v),
                offset_of!(DecodeSeqs, row0),
                offset_of!(DecodeSeqs, tk),
                offset_of!(DecodeSeqs, goff),
                offset_of!(DecodeSeqs, ng),
                offset_of!(DecodeSeqs, n),
                size_of::<DecodeSeqs>()
            ],
            [256, 512, 644, 772, 900, 1028, 1032]
        );
        // the kernels' struct must say the same: DEC_MAX_SEQS and the field order
        let src = FAMILIES.iter().find(|f| f.name == "attention").unwrap().source;
        assert!(src.contains(&format!("#define DEC_MAX_SEQS {DEC_MAX_SEQS}\n")));
        assert_eq!(
            c_struct_fields("attention", "DecodeSeqs"),
            [
                "bf16* k[DEC_MAX_SEQS]",
                "bf16* v[DEC_MAX_SEQS]",
                "int row0[DEC_MAX_SEQS + 1]",
                "int tk[DEC_MAX_SEQS]",
                "int goff[DEC_MAX_SEQS]",
                "int ng[DEC_MAX_SEQS]",
                "int n"
            ]
        );
    }

    /// As `decode_launch_parameters_match_the_kernels_struct`, for kernels/gemv.cu's `GemvMats`.
    #[test]
    fn gemv_launch_parameters_match_the_kernels_struct() {
        use std::mem::{offset_of, size_of};
        assert_eq!(
            [
                offset_of!(GemvMats, bias),
                offset_of!(GemvMats, y),
                offset_of!(GemvMats, n0),
                offset_of!(GemvMats, count),
                size_of::<GemvMats>()
            ],
            [32, 64, 96, 116, 120]
        );
        let src = FAMILIES.iter().find(|f| f.name == "gemv").unwrap().source;
        assert!(src.contains(&format!("#define GEMV_MAX_MATS {GEMV_MAX_MATS}\n")));
        assert_eq!(
            c_struct_fields("gemv", "GemvMats"),
            [
                "const bf16* w[GEMV_MAX_MATS]",
                "const float* bias[GEMV_MAX_MATS]",
                "float* y[GEMV_MAX_MATS]",
                "int n0[GEMV_MAX_MATS + 1]",
                "int count"
            ]
        );
        // the features per warp the host sizes the grid by are the kernels'
        for rows in [1, 2, 4, 8] {
            let entry = format!(
                "gemv_rows<{rows}, {}>(x, mats, m, k)",
                gemv_features_per_warp(rows)
            );
            assert!(src.contains(&entry), "kernels/gemv.cu: {entry}");
        }
    }

    /// The packed backward's double buffers fit an H100's blocks (227 KiB opt-in) but not an A100's
    /// (163 KiB) at d128, where the backend takes variant 2's; both fit at d64 (the vision tower).
    #[test]
    fn backward_shared_memory_by_gpu() {
        let (h100, a100) = (232_448, 166_912); // cudaDevAttrMaxSharedMemoryPerBlockOptin
        let fits = |d, packed, optin| bwd_smem(d, packed) + 1024 <= optin;
        assert_eq!(bwd_smem(128, true), 206_336);
        assert_eq!(bwd_smem(128, false), 134_656);
        assert!(fits(128, true, h100) && !fits(128, true, a100) && fits(128, false, a100));
        assert!(fits(64, true, a100));
    }

    #[test]
    fn decode_splits_cover_the_keys() {
        for (rh, tk) in [(32, 1), (32, 4097), (256, 700), (2000, 16384), (1, 64)] {
            let (splits, chunk) = decode_splits(rh, tk);
            assert!(
                splits * chunk >= tk && (splits - 1) * chunk < tk.max(1),
                "{rh} {tk}"
            );
            assert!(chunk >= 64.min(tk), "{rh} {tk}: at least 64 keys per block");
        }
    }

    #[test]
    fn group_layout_is_offsets_then_ranges() {
        let g = KeyGroups::new(&[(9, 12, 1), (0, 4, 0), (5, 7, 1)], 3).unwrap();
        assert_eq!(group_layout(&g), [0, 1, 3, 3, 0, 4, 5, 7, 9, 12]);
    }

    #[test]
    fn pieces_fit_a_launch_and_keep_every_range() {
        // 20 one-range groups, a group of 150 ranges, an empty group, one more
        let mut ranges: Vec<KeyRange> = (0..20).map(|g| (g * 10, g * 10 + 5, g)).collect();
        ranges.extend((0..150).map(|i| (i * 4, i * 4 + 2, 20)));
        ranges.push((3, 1000, 22));
        let groups = KeyGroups::new(&ranges, 23).unwrap();
        let pieces = group_pieces(&groups);
        let mut seen: Vec<KeyRange> = Vec::new();
        for (p, of) in &pieces {
            assert!(p.n_groups() <= FA_MAX_GROUPS && p.ranges().len() <= FA_MAX_RANGES);
            assert_eq!(p.n_groups(), of.len());
            seen.extend(p.ranges().iter().map(|&(a, b, local)| (a, b, of[local])));
        }
        seen.sort_unstable_by_key(|&(a, b, g)| (g, a, b));
        assert_eq!(seen, groups.ranges());
        // 16 + (4 + 60) + 64 + (26 + 1): four launches
        assert_eq!(pieces.len(), 4);
    }
}
