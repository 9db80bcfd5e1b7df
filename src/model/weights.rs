//! Checkpoint weights: HF safetensors files, memory-mapped and validated once at open time.
//!
//! Why mmap and views: a LLaVA checkpoint is several GB; copying it into owned buffers would double
//! the resident memory and the start-up time. A [`Tensor`] is a cheap (`Arc`) view into the mapped
//! file, and conversion to f32 happens only for the rows a caller asks for ([`Tensor::rows_f32`]),
//! e.g. the embedding rows of a prompt.
//!
//! Why validate ourselves before the `safetensors` crate does: its errors are terse ("invalid
//! offset", "header too large") and name neither the file nor always the tensor, and its JSON
//! parsing into a map silently keeps the last of two entries with the same name. Every check here
//! produces an error naming the file and, where relevant, the tensor, and says what is wrong. The
//! crate's own validation then runs as a second line of defence.
//!
//! Only F16, BF16 and F32 are accepted: the runtime computes in f32 on the CPU and reads these three
//! (see DESIGN.md, "few dtypes"); anything else is refused at open time rather than at first use.
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The largest header the safetensors format allows (the reference implementation's limit).
/// A larger length prefix is almost certainly a corrupt file or not a safetensors file at all.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Single-file checkpoint name written by `save_pretrained`.
const SINGLE_FILE: &str = "model.safetensors";
/// Shard index name written by `save_pretrained` for sharded checkpoints.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tensors at least this large are converted to f32 in parallel; below it the thread hand-off
/// costs more than the conversion (which runs at memory bandwidth).
const PAR_MIN_ELEMS: usize = 1 << 20;
/// Elements per parallel work item / per stack buffer for unaligned half-precision data.
const CHUNK_ELEMS: usize = 1 << 14;

/// Element type of a checkpoint tensor; the only three the runtime reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F16,
    BF16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }

    /// Parses the dtype string of a safetensors header; `None` for the types we do not read.
    fn from_safetensors(s: &str) -> Option<Self> {
        match s {
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "F32" => Some(DType::F32),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    /// Spelled as in safetensors headers, so messages match what `safetensors` tools print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
        })
    }
}

/// A zero-copy view of one tensor inside a memory-mapped safetensors file.
///
/// Cloning is cheap (two `Arc` bumps plus the name and shape); the mapping stays alive as long as
/// any view of it does. The byte range was validated against shape and dtype when the file was
/// opened, so the accessors below cannot go out of bounds.
#[derive(Clone)]
pub struct Tensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    mmap: Arc<Mmap>,
    /// Absolute byte range in the file (header included), `end - start == numel * dtype.size()`.
    start: usize,
    end: usize,
    file: Arc<PathBuf>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("file", &self.file)
            .finish()
    }
}

impl Tensor {
    /// An f32 tensor held in memory (weights being trained): an anonymous map, frozen read-only, so it
    /// is used exactly like a tensor of a checkpoint. `origin` names where it comes from in errors.
    pub fn from_f32(name: &str, shape: Vec<usize>, data: &[f32], origin: &Path) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::tensor(
                origin,
                name,
                format!("shape {shape:?} holds {n} values, got {}", data.len()),
            ));
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).map_err(|e| Error::io(origin, e))?;
        map[..bytes.len()].copy_from_slice(bytes);
        let mmap = map.make_read_only().map_err(|e| Error::io(origin, e))?;
        Ok(Tensor {
            name: name.to_string(),
            dtype: DType::F32,
            shape,
            mmap: Arc::new(mmap),
            start: 0,
            end: bytes.len(),
            file: Arc::new(origin.to_path_buf()),
        })
    }

    /// The tensor's name in the checkpoint (e.g. `language_model.model.embed_tokens.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The safetensors file this tensor lives in (for error messages).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Number of elements (1 for a 0-d tensor).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes, exactly `numel() * dtype().size()` of them.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap[self.start..self.end]
    }

    /// The whole tensor converted to f32, in row-major order.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        convert_to_f32(self.dtype, self.bytes(), &mut out);
        out
    }

    /// (rows, cols) as seen by [`Tensor::rows_f32`]: the first axis is the row axis and the others
    /// are flattened into columns; a 1-D tensor is one row, a 0-d tensor one row of one column.
    fn rows_cols(&self) -> (usize, usize) {
        match self.shape.split_first() {
            None => (1, 1),
            Some((_, [])) => (1, self.shape[0]),
            Some((&rows, rest)) => (rows, rest.iter().product()),
        }
    }

    /// Converts rows `[r0, r1)` to f32 into `out` (`(r1 - r0) * cols` elements), without
    /// converting the rest of the tensor: an embedding lookup or a row block of a weight matrix
    /// touches only the pages it needs.
    ///
    /// A 2-D tensor `[rows, cols]` is used as is; a 1-D tensor `[n]` is one row of `n` columns; an
    /// N-D tensor `[d0, d1, ..]` is `d0` rows of `d1 * ..` columns.
    ///
    /// # Panics
    /// If `r0 > r1`, `r1` is past the last row, or `out` has the wrong length: these are bugs in
    /// the caller, not properties of the file, and are reported like slice indexing errors.
    pub fn rows_f32(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (rows, cols) = self.rows_cols();
        assert!(
            r0 <= r1 && r1 <= rows,
            "tensor `{}`: rows {r0}..{r1} out of range for {rows} rows (shape {:?})",
            self.name,
            self.shape
        );
        let n = (r1 - r0) * cols;
        assert_eq!(
            out.len(),
            n,
            "tensor `{}`: output holds {} f32 but rows {r0}..{r1} have {n}",
            self.name,
            out.len()
        );
        let size = self.dtype.size();
        let bytes = &self.bytes()[r0 * cols * size..r1 * cols * size];
        convert_to_f32(self.dtype, bytes, out);
    }

    /// Converts the column block `[c0, c1)` of rows `[r0, r1)` to f32 into `out` ((r1 - r0) · (c1 - c0)
    /// elements, row-major): the transposed products of the backward pass read weights by columns.
    pub fn block_f32(&self, r0: usize, r1: usize, c0: usize, c1: usize, out: &mut [f32]) {
        let (rows, cols) = self.rows_cols();
        assert!(
            r0 <= r1 && r1 <= rows && c0 <= c1 && c1 <= cols,
            "tensor `{}`: block rows {r0}..{r1}, columns {c0}..{c1} out of range for shape {:?}",
            self.name,
            self.shape
        );
        let (w, size) = (c1 - c0, self.dtype.size());
        assert_eq!(
            out.len(),
            (r1 - r0) * w,
            "tensor `{}`: block output length",
            self.name
        );
        let bytes = self.bytes();
        for (r, o) in (r0..r1).zip(out.chunks_exact_mut(w.max(1))) {
            convert_to_f32(
                self.dtype,
                &bytes[(r * cols + c0) * size..(r * cols + c1) * size],
                o,
            );
        }
    }

    /// Checks the shape against what the model config implies, so a wrong checkpoint or config is
    /// reported at load time with both shapes, instead of as a wrong answer or an index panic later.
    pub fn expect_shape(&self, shape: &[usize]) -> Result<&Self> {
        if self.shape == shape {
            Ok(self)
        } else {
            Err(Error::tensor(
                self.file.as_path(),
                &self.name,
                format!(
                    "expected shape {:?}, found {:?} ({})",
                    shape, self.shape, self.dtype
                ),
            ))
        }
    }
}

/// Converts little-endian `bytes` of `dtype` into `out` (`out.len() * dtype.size() == bytes.len()`).
/// Large inputs are split over the rayon pool; each piece is converted by [`convert_serial`].
fn convert_to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    let size = dtype.size();
    debug_assert_eq!(bytes.len(), out.len() * size);
    if out.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(CHUNK_ELEMS)
            .zip(bytes.par_chunks(CHUNK_ELEMS * size))
            .for_each(|(o, b)| convert_serial(dtype, b, o));
    } else {
        convert_serial(dtype, bytes, out);
    }
}

/// One-thread conversion. Safetensors gives no alignment guarantee for a tensor's data inside the
/// file (the data section starts at `8 + header_len`, and offsets are byte offsets), so each dtype
/// has a fast path for naturally aligned data — a reinterpreting cast, then SIMD (F16C for f16) or
/// a memcpy — and a byte-wise path for unaligned data. The casts assume a little-endian host, as
/// the file format is little-endian; big-endian hosts always take the byte-wise path.
fn convert_serial(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    const LE: bool = cfg!(target_endian = "little");
    match dtype {
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(bytes) {
            Ok(halves) if LE => halves.convert_to_f32_slice(out),
            _ => {
                // Copy through an aligned stack buffer so the SIMD conversion still applies.
                let mut tmp = [f16::ZERO; 1024];
                for (o, b) in out.chunks_mut(tmp.len()).zip(bytes.chunks(tmp.len() * 2)) {
                    let t = &mut tmp[..o.len()];
                    for (h, c) in t.iter_mut().zip(b.chunks_exact(2)) {
                        *h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                    }
                    t.convert_to_f32_slice(o);
                }
            }
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(bytes) {
            Ok(halves) if LE => halves.convert_to_f32_slice(out),
            _ => {
                // bf16 is the top half of an f32: a shift, which the compiler vectorizes.
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
                }
            }
        },
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(floats) if LE => out.copy_from_slice(floats),
            _ => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
    }
}

/// All tensors of one checkpoint (one file or several shards), by name.
pub struct WeightStore {
    /// What was opened: the checkpoint directory, or the single file given to `open_files`.
    source: PathBuf,
    /// Sorted by name so that `names()` is deterministic (logs, tests, diffs).
    tensors: BTreeMap<String, Tensor>,
}

impl fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightStore")
            .field("source", &self.source)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl WeightStore {
    /// Opens the checkpoint in an HF model directory: `model.safetensors` if it exists, else the
    /// shards listed in `model.safetensors.index.json`.
    ///
    /// PyTorch pickle checkpoints (`*.bin`) are refused rather than read: unpickling can run
    /// arbitrary code, and every HF checkpoint can be converted to safetensors once.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            let msg = if dir.exists() {
                "not a directory (pass a checkpoint file to `WeightStore::open_files` instead)"
            } else {
                "checkpoint directory does not exist"
            };
            return Err(Error::file(dir, msg));
        }
        // Same precedence as transformers' `from_pretrained`: the single file wins over an index,
        // so that we load exactly what the HF oracle loads from the same directory.
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_with_source(dir.to_path_buf(), &[single]);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(dir, &index);
        }
        Err(no_checkpoint_error(dir))
    }

    /// Opens the given safetensors files as one checkpoint (e.g. an explicit list of shards).
    /// A tensor name present in two files is an error: which copy is meant would be a guess.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let source = match paths {
            [] => return Err(Error::Invalid("no safetensors files given to open".to_string())),
            [one] => one.clone(),
            [first, ..] => first
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| first.clone()),
        };
        Self::open_with_source(source, paths)
    }

    /// Looks a tensor up; the error names the checkpoint and suggests a near name when one
    /// differs only by a prefix (e.g. llava-hf `language_model.` vs a bare LLaMA checkpoint).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        if let Some(t) = self.tensors.get(name) {
            return Ok(t);
        }
        let near = self
            .tensors
            .keys()
            .find(|k| k.ends_with(name) || name.ends_with(k.as_str()));
        let n = self.tensors.len();
        let mut msg = format!(
            "not found in the checkpoint ({n} tensor{})",
            if n == 1 { "" } else { "s" }
        );
        if let Some(k) = near {
            msg.push_str(&format!("; did you mean `{k}`?"));
        }
        Err(Error::tensor(&self.source, name, msg))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The checkpoint directory (from `open_dir`) or file/directory (from `open_files`).
    pub fn source(&self) -> &Path {
        &self.source
    }

    fn open_with_source(source: PathBuf, paths: &[PathBuf]) -> Result<Self> {
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for path in paths {
            for t in open_file(path)? {
                if let Some(prev) = tensors.get(&t.name) {
                    return Err(Error::tensor(
                        path,
                        &t.name,
                        format!("duplicate tensor: also present in {}", prev.file.display()),
                    ));
                }
                tensors.insert(t.name.clone(), t);
            }
        }
        Ok(WeightStore { source, tensors })
    }

    /// Opens a sharded checkpoint and checks it against its index: every shard named in the
    /// `weight_map` must exist, and every tensor must be in the shard the index names, because
    /// a mismatch means an interrupted download or a mixed-up directory.
    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let parsed: Index = serde_json::from_str(&text)
            .map_err(|e| Error::file(index, format!("invalid shard index: {e}")))?;
        if parsed.weight_map.is_empty() {
            return Err(Error::file(index, "shard index has an empty `weight_map`"));
        }
        let mut shards: Vec<&str> = parsed.weight_map.values().map(String::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        let mut paths = Vec::with_capacity(shards.len());
        for shard in &shards {
            // Shard names are plain file names next to the index; anything else would let a
            // downloaded index point outside the checkpoint directory.
            let rel = Path::new(shard);
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(Error::file(
                    index,
                    format!("`weight_map` names shard `{shard}`, which is not a plain file name"),
                ));
            }
            let path = dir.join(rel);
            if !path.is_file() {
                return Err(Error::file(
                    index,
                    format!(
                        "`weight_map` names shard `{shard}`, but {} does not exist \
                         (incomplete download?)",
                        path.display()
                    ),
                ));
            }
            paths.push(path);
        }
        let store = Self::open_with_source(dir.to_path_buf(), &paths)?;
        for (name, shard) in &parsed.weight_map {
            let in_shard = store
                .tensors
                .get(name)
                .is_some_and(|t| t.file.file_name() == Some(std::ffi::OsStr::new(shard)));
            if !in_shard {
                let found = match store.tensors.get(name) {
                    Some(t) => format!(" (it is in {})", t.file.display()),
                    None => String::new(),
                };
                return Err(Error::tensor(
                    dir.join(shard),
                    name,
                    format!(
                        "listed in {} for this shard but absent from it{found}",
                        index.display()
                    ),
                ));
            }
        }
        Ok(store)
    }
}

/// The error for a directory without a safetensors checkpoint: says what was looked for, and
/// refuses pickle checkpoints with the conversion recipe.
fn no_checkpoint_error(dir: &Path) -> Error {
    let mut bins = Vec::new();
    let mut others = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".bin") || name == "pytorch_model.bin.index.json" {
                bins.push(name);
            } else if name.ends_with(".safetensors") {
                others.push(name);
            }
        }
    }
    bins.sort();
    others.sort();
    if !bins.is_empty() {
        return Error::file(
            dir,
            format!(
                "found only PyTorch pickle weights ({}), which are not read (unpickling can run \
                 arbitrary code); convert the checkpoint to safetensors first, e.g. \
                 `python -c \"from transformers import LlavaForConditionalGeneration as M; \
                 M.from_pretrained('{d}', torch_dtype='auto').save_pretrained('{d}', \
                 safe_serialization=True)\"` or the Hugging Face `safetensors/convert` space",
                bins.join(", "),
                d = dir.display()
            ),
        );
    }
    let mut msg = format!("no checkpoint found: looked for {INDEX_FILE} and {SINGLE_FILE}");
    if !others.is_empty() {
        msg.push_str(&format!(
            "; other safetensors files present ({}) can be opened with `WeightStore::open_files`",
            others.join(", ")
        ));
    }
    Error::file(dir, msg)
}

/// One header entry as written by safetensors writers; unknown fields are ignored like the
/// reference implementation does.
#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// The header's top-level entries in file order, duplicates kept: a JSON map parsed into a
/// `HashMap` silently keeps the last of two equal keys, which would hide a corrupt header.
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for HeaderEntries {
    fn deserialize<D: Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to {dtype, shape, data_offsets}")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(HeaderEntries(entries))
            }
        }
        de.deserialize_map(EntriesVisitor)
    }
}

/// A validated header entry: data range relative to the start of the data section.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// Maps one safetensors file and validates its header; returns a view per tensor.
fn open_file(path: &Path) -> Result<Vec<Tensor>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if file_len < 8 {
        return Err(Error::file(
            path,
            format!(
                "file is {file_len} bytes, shorter than the 8-byte header length prefix of a \
                 safetensors file (truncated or not a safetensors file)"
            ),
        ));
    }
    // SAFETY: the mapping is read-only. Another process truncating or rewriting the file while it
    // is mapped would be undefined behaviour; like every mmap-based loader (candle, safetensors'
    // own examples) we accept that checkpoints are not modified while in use.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let entries = validate_header(path, &mmap)?;

    // Second line of defence: the reference parser must agree that the file is well-formed.
    safetensors::SafeTensors::read_metadata(&mmap[..])
        .map_err(|e| Error::file(path, format!("rejected by the safetensors parser: {e}")))?;

    let mmap = Arc::new(mmap);
    let file = Arc::new(path.to_path_buf());
    let data_start = header_end(&mmap);
    Ok(entries
        .into_iter()
        .map(|e| Tensor {
            name: e.name,
            dtype: e.dtype,
            shape: e.shape,
            mmap: Arc::clone(&mmap),
            start: data_start + e.begin,
            end: data_start + e.end,
            file: Arc::clone(&file),
        })
        .collect())
}

/// `8 + header length`, for a buffer already checked by [`validate_header`].
fn header_end(buf: &[u8]) -> usize {
    let mut n = [0u8; 8];
    n.copy_from_slice(&buf[..8]);
    8 + u64::from_le_bytes(n) as usize
}

/// Checks everything about the file's layout and returns its tensor entries (without
/// `__metadata__`). `buf` is the whole file, at least 8 bytes long.
fn validate_header(path: &Path, buf: &[u8]) -> Result<Vec<Entry>> {
    let file_len = buf.len() as u64;
    let mut n_bytes = [0u8; 8];
    n_bytes.copy_from_slice(&buf[..8]);
    let n = u64::from_le_bytes(n_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(Error::file(
            path,
            format!(
                "header length {n} exceeds the 100 MB ({MAX_HEADER_BYTES} bytes) limit of the \
                 safetensors format (corrupt file, or not a safetensors file)"
            ),
        ));
    }
    if 8 + n > file_len {
        return Err(Error::file(
            path,
            format!(
                "header length {n} runs past the end of the file ({file_len} bytes): the file is \
                 truncated or not a safetensors file"
            ),
        ));
    }
    // Both fit in usize: they are at most the length of a mapped buffer.
    let header_end = 8 + n as usize;
    let data_len = buf.len() - header_end;
    let text = std::str::from_utf8(&buf[8..header_end])
        .map_err(|e| Error::file(path, format!("header is not valid UTF-8: {e}")))?;
    let HeaderEntries(raw) = serde_json::from_str(text)
        .map_err(|e| Error::file(path, format!("header is not valid JSON: {e}")))?;

    let mut seen = HashSet::with_capacity(raw.len());
    let mut entries = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if !seen.insert(name.clone()) {
            return Err(Error::tensor(
                path,
                &name,
                "duplicate tensor name in the header (a JSON reader would silently keep only \
                 the last entry)",
            ));
        }
        if name == "__metadata__" {
            continue;
        }
        let info: RawInfo = serde_json::from_value(value).map_err(|e| {
            Error::tensor(
                path,
                &name,
                format!("malformed header entry (expected dtype, shape, data_offsets): {e}"),
            )
        })?;
        let dtype = DType::from_safetensors(&info.dtype).ok_or_else(|| {
            Error::tensor(
                path,
                &name,
                format!("unsupported dtype {} (supported: F16, BF16, F32)", info.dtype),
            )
        })?;
        let (begin, end) = info.data_offsets;
        if begin > end {
            return Err(Error::tensor(
                path,
                &name,
                format!("data_offsets [{begin}, {end}] end before they begin"),
            ));
        }
        let expected = info
            .shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::tensor(
                    path,
                    &name,
                    format!("shape {:?} × {dtype} overflows the byte count", info.shape),
                )
            })?;
        if expected != end - begin {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "shape {:?} × {dtype} is {expected} bytes, which does not match the {} bytes \
                     of its data_offsets [{begin}, {end}]",
                    info.shape,
                    end - begin
                ),
            ));
        }
        if end > data_len {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "data_offsets [{begin}, {end}] are out of bounds: the data section has only \
                     {data_len} bytes (is the file truncated?)"
                ),
            ));
        }
        entries.push(Entry {
            name,
            dtype,
            shape: info.shape,
            begin,
            end,
        });
    }

    // The data section must be tiled exactly: no overlaps (two tensors sharing bytes is either
    // corruption or aliasing we would silently propagate), no gaps, no trailing bytes.
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by_key(|e| (e.begin, e.end));
    let mut covered = 0usize;
    let mut prev: Option<&Entry> = None;
    for e in order {
        if e.begin < covered {
            let p = prev.map_or("", |p| p.name.as_str());
            return Err(Error::tensor(
                path,
                &e.name,
                format!(
                    "data_offsets [{}, {}] overlap those of tensor `{p}` (which end at {covered})",
                    e.begin, e.end
                ),
            ));
        }
        if e.begin > covered {
            let after = prev.map_or_else(
                || "the start of the data section".to_string(),
                |p| format!("tensor `{}`", p.name),
            );
            return Err(Error::tensor(
                path,
                &e.name,
                format!(
                    "data_offsets [{}, {}] leave a gap of {} bytes after {after}",
                    e.begin,
                    e.end,
                    e.begin - covered
                ),
            ));
        }
        covered = e.end;
        prev = Some(e);
    }
    if covered != data_len {
        return Err(Error::file(
            path,
            format!(
                "the tensors cover {covered} bytes but the data section has {data_len}: {} \
                 trailing bytes",
                data_len - covered
            ),
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes a valid safetensors file with one tensor whose data starts `pad` bytes after an
    /// 8-aligned position, to exercise the unaligned conversion paths.
    fn write_one(dir: &Path, dtype: &str, shape: &[usize], data: &[u8], misalign: usize) -> PathBuf {
        let mut header = format!(
            "{{\"t\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[0,{}]}}}}",
            data.len()
        );
        // Pad with spaces (valid JSON whitespace) so that 8 + header ≡ misalign (mod 8).
        while (8 + header.len()) % 8 != misalign {
            header.push(' ');
        }
        let path = dir.join(format!("{dtype}-{misalign}.safetensors"));
        let mut f = File::create(&path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
        path
    }

    fn values() -> Vec<f32> {
        // Exactly representable in f16 and bf16, with a sign change, a zero and a power of two;
        // enough elements (> one stack buffer of 1024) to cover the chunked unaligned path.
        (0..2500).map(|i| ((i % 37) as f32 - 18.0) * 0.5).collect()
    }

    fn open_single(path: &Path) -> Tensor {
        let store = WeightStore::open_files(&[path.to_path_buf()]).unwrap();
        store.get("t").unwrap().clone()
    }

    fn check_round_trip(dtype: DType, encode: impl Fn(f32) -> Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let vals = values();
        let data: Vec<u8> = vals.iter().flat_map(|&v| encode(v)).collect();
        for misalign in [0, 1, 2, 3] {
            let path = write_one(dir.path(), &dtype.to_string(), &[50, 50], &data, misalign);
            let t = open_single(&path);
            assert_eq!(t.dtype(), dtype);
            assert_eq!(t.shape(), &[50, 50]);
            assert_eq!(t.bytes().as_ptr() as usize % 8, misalign);
            assert_eq!(t.to_f32(), vals, "{dtype} misalign {misalign}");
            let mut rows = vec![f32::NAN; 3 * 50];
            t.rows_f32(7, 10, &mut rows);
            assert_eq!(rows, vals[7 * 50..10 * 50], "{dtype} misalign {misalign}");
            let mut none: [f32; 0] = [];
            t.rows_f32(50, 50, &mut none);
        }
    }

    #[test]
    fn f16_round_trip_aligned_and_unaligned() {
        check_round_trip(DType::F16, |v| f16::from_f32(v).to_le_bytes().to_vec());
    }

    #[test]
    fn bf16_round_trip_aligned_and_unaligned() {
        check_round_trip(DType::BF16, |v| bf16::from_f32(v).to_le_bytes().to_vec());
    }

    #[test]
    fn f32_round_trip_aligned_and_unaligned() {
        check_round_trip(DType::F32, |v| v.to_le_bytes().to_vec());
    }

    #[test]
    fn serial_conversion_matches_per_element() {
        // Directly on byte slices starting at every offset mod 4, including odd lengths.
        let vals: Vec<f32> = (0..1031).map(|i| (i as f32 * 0.37).sin() * 100.0).collect();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let expect: Vec<f32> = match dtype {
                DType::F16 => vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
                DType::BF16 => vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                DType::F32 => vals.clone(),
            };
            let enc: Vec<u8> = vals
                .iter()
                .flat_map(|&v| match dtype {
                    DType::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                    DType::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                    DType::F32 => v.to_le_bytes().to_vec(),
                })
                .collect();
            for shift in 0..4 {
                let mut buf = vec![0u8; shift];
                buf.extend_from_slice(&enc);
                let mut out = vec![f32::NAN; vals.len()];
                convert_serial(dtype, &buf[shift..], &mut out);
                assert_eq!(out, expect, "{dtype} shift {shift}");
            }
        }
    }

    #[test]
    fn parallel_conversion_matches_serial() {
        let n = PAR_MIN_ELEMS + 123;
        let enc: Vec<u8> = (0..n)
            .flat_map(|i| f16::from_f32((i % 1000) as f32 * 0.25).to_le_bytes())
            .collect();
        let mut par = vec![0f32; n];
        convert_to_f32(DType::F16, &enc, &mut par);
        let mut ser = vec![0f32; n];
        convert_serial(DType::F16, &enc, &mut ser);
        assert_eq!(par, ser);
    }

    #[test]
    fn expect_shape_names_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = write_one(dir.path(), "F32", &[2], &data, 0);
        let t = open_single(&path);
        assert!(t.expect_shape(&[2]).is_ok());
        let msg = t.expect_shape(&[3, 2]).unwrap_err().to_string();
        assert!(msg.contains("F32-0.safetensors"), "{msg}");
        assert!(
            msg.contains("`t`") && msg.contains("[3, 2]") && msg.contains("[2]"),
            "{msg}"
        );
    }

    #[test]
    fn rows_of_1d_and_0d() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [1.5f32, -2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = open_single(&write_one(dir.path(), "F32", &[3], &data, 0));
        let mut out = [0f32; 3];
        t.rows_f32(0, 1, &mut out);
        assert_eq!(out, [1.5, -2.0, 3.0]);
        let data = 4.0f32.to_le_bytes();
        let t = open_single(&write_one(dir.path(), "F32", &[], &data, 4));
        assert_eq!(t.numel(), 1);
        assert_eq!(t.to_f32(), vec![4.0]);
    }
}
