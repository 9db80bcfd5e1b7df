//! Bad checkpoints must be refused with an error that names the file (and the tensor where there
//! is one) and says what is wrong; good ones (the tiny-llava fixture, a sharded checkpoint) open.
//! Each bad case crafts its file byte by byte, because a correct writer cannot produce them.
use std::fs;
use std::path::{Path, PathBuf};

use miadpo::model::weights::{DType, WeightStore};

/// One header entry: (name, dtype, shape, data_offsets).
type Spec<'a> = (&'a str, &'a str, &'a [usize], [usize; 2]);

/// Builds a safetensors byte buffer from raw header entries followed by `data_len` data bytes.
/// The header JSON is written by hand so that it can hold what a correct writer never produces
/// (duplicate names, bad offsets, unknown dtypes). Data bytes repeat f16 1.0 (0x3C00), which is
/// also a finite f32 and bf16, so positive tests get finite non-zero values.
fn build(entries: &[Spec], data_len: usize) -> Vec<u8> {
    let body: Vec<String> = entries
        .iter()
        .map(|(name, dtype, shape, [b, e])| {
            format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{b},{e}]}}"#)
        })
        .collect();
    let mut header = format!(r#"{{"__metadata__":{{"format":"pt"}},{}}}"#, body.join(","));
    // Writers pad the header with spaces to 8 bytes so the data section is aligned.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut buf = (header.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(header.as_bytes());
    buf.extend((0..data_len).map(|i| if i % 2 == 0 { 0x00 } else { 0x3C }));
    buf
}

/// Writes `bytes` as `dir/name` and returns the path.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

/// Opens a crafted single-file checkpoint through `open_dir` and returns the error message.
fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "model.safetensors", bytes);
    let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors"),
        "error must name the file: {err}"
    );
    err
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "expected `{p}` in: {msg}");
    }
}

#[test]
fn header_length_past_end_of_file() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    let err = open_err(&bytes);
    assert_has(&err, &["header length 1000", "past the end of the file"]);
}

#[test]
fn header_over_100_mb() {
    let mut bytes = 100_000_001u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    let err = open_err(&bytes);
    assert_has(&err, &["header length 100000001", "100 MB"]);
}

#[test]
fn offsets_out_of_bounds() {
    let bytes = build(&[("w", "F32", &[4], [0, 16])], 8);
    let err = open_err(&bytes);
    assert_has(&err, &["`w`", "out of bounds", "8 bytes"]);
}

#[test]
fn overlapping_offsets() {
    let bytes = build(&[("a", "F32", &[4], [0, 16]), ("b", "F32", &[4], [8, 24])], 24);
    let err = open_err(&bytes);
    assert_has(&err, &["`b`", "overlap", "`a`"]);
}

#[test]
fn gap_between_tensors() {
    let bytes = build(&[("a", "F32", &[2], [0, 8]), ("b", "F32", &[2], [12, 20])], 20);
    let err = open_err(&bytes);
    assert_has(&err, &["`b`", "gap of 4 bytes", "`a`"]);
}

#[test]
fn trailing_bytes_after_last_tensor() {
    let bytes = build(&[("a", "F32", &[2], [0, 8])], 12);
    let err = open_err(&bytes);
    assert_has(&err, &["4 trailing bytes"]);
}

#[test]
fn shape_times_dtype_not_matching_bytes() {
    let bytes = build(&[("w", "F16", &[3, 4], [0, 20])], 20);
    let err = open_err(&bytes);
    assert_has(
        &err,
        &["`w`", "[3, 4]", "F16", "24 bytes", "does not match", "20 bytes"],
    );
}

#[test]
fn duplicate_names_in_header() {
    let bytes = build(&[("w", "F32", &[2], [0, 8]), ("w", "F32", &[2], [8, 16])], 16);
    let err = open_err(&bytes);
    assert_has(&err, &["`w`", "duplicate"]);
}

#[test]
fn duplicate_names_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.safetensors",
        &build(&[("w", "F32", &[2], [0, 8])], 8),
    );
    let b = write(
        dir.path(),
        "b.safetensors",
        &build(&[("w", "F32", &[2], [0, 8])], 8),
    );
    let err = WeightStore::open_files(&[a, b]).unwrap_err().to_string();
    assert_has(&err, &["b.safetensors", "`w`", "duplicate", "a.safetensors"]);
}

#[test]
fn truncated_file() {
    let bytes = build(
        &[("a", "F16", &[2, 4], [0, 16]), ("b", "F16", &[4], [16, 24])],
        24,
    );
    let err = open_err(&bytes[..bytes.len() - 5]);
    assert_has(&err, &["`b`", "out of bounds", "truncated"]);
    // Cut inside the header, then inside the length prefix.
    let err = open_err(&bytes[..20]);
    assert_has(&err, &["past the end of the file", "truncated"]);
    let err = open_err(&bytes[..5]);
    assert_has(&err, &["5 bytes", "truncated"]);
}

#[test]
fn pickle_bin_only_is_refused_with_hint() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "pytorch_model.bin", b"\x80\x02not really a pickle");
    let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
    assert_has(
        &err,
        &[
            &dir.path().display().to_string(),
            "pytorch_model.bin",
            "safetensors",
            "save_pretrained",
            "convert",
        ],
    );
}

#[test]
fn empty_directory_says_what_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
    assert_has(
        &err,
        &[
            &dir.path().display().to_string(),
            "model.safetensors.index.json",
            "model.safetensors",
        ],
    );
}

#[test]
fn index_naming_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "model-00001-of-00002.safetensors",
        &build(&[("a", "F32", &[2], [0, 8])], 8),
    );
    let index = r#"{"metadata":{"total_size":16},"weight_map":{
        "a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    write(dir.path(), "model.safetensors.index.json", index.as_bytes());
    let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
    assert_has(
        &err,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "does not exist",
        ],
    );
}

#[test]
fn index_tensor_absent_from_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "model-00001-of-00002.safetensors",
        &build(&[("a", "F32", &[2], [0, 8])], 8),
    );
    write(
        dir.path(),
        "model-00002-of-00002.safetensors",
        &build(&[("b", "F32", &[2], [0, 8])], 8),
    );
    let index = r#"{"weight_map":{"a":"model-00001-of-00002.safetensors",
        "b":"model-00002-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}}"#;
    write(dir.path(), "model.safetensors.index.json", index.as_bytes());
    let err = WeightStore::open_dir(dir.path()).unwrap_err().to_string();
    assert_has(
        &err,
        &[
            "model-00002-of-00002.safetensors",
            "`c`",
            "absent",
            "model.safetensors.index.json",
        ],
    );
}

#[test]
fn unsupported_dtype() {
    let bytes = build(&[("ok", "F16", &[4], [0, 8]), ("ids", "I64", &[2], [8, 24])], 24);
    let err = open_err(&bytes);
    assert_has(&err, &["`ids`", "unsupported dtype I64", "F16, BF16, F32"]);
}

#[test]
fn missing_tensor_lookup_names_checkpoint_and_suggests() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "model.safetensors",
        &build(&[("language_model.model.norm.weight", "F16", &[4], [0, 8])], 8),
    );
    let store = WeightStore::open_dir(dir.path()).unwrap();
    let err = store.get("model.norm.weight").unwrap_err().to_string();
    assert_has(
        &err,
        &[
            &dir.path().display().to_string(),
            "`model.norm.weight`",
            "not found",
            "did you mean `language_model.model.norm.weight`",
        ],
    );
}

/// Any cut or single-byte corruption of a valid file is either opened or refused: never a panic.
#[test]
fn corrupted_files_never_panic() {
    let good = build(
        &[("a", "BF16", &[2, 3], [0, 12]), ("b", "F32", &[1], [12, 16])],
        16,
    );
    let dir = tempfile::tempdir().unwrap();
    for cut in 0..good.len() {
        let path = write(dir.path(), "cut.safetensors", &good[..cut]);
        assert!(WeightStore::open_files(&[path]).is_err(), "cut at {cut}");
    }
    for i in 0..good.len() {
        for v in [0x00, b'9', b'"', b'{', 0xFF] {
            let mut bad = good.clone();
            bad[i] = v;
            let path = write(dir.path(), "flip.safetensors", &bad);
            if let Ok(store) = WeightStore::open_files(&[path]) {
                for name in store.names() {
                    let t = store.get(name).unwrap();
                    assert_eq!(t.to_f32().len(), t.numel());
                }
            }
        }
    }
}

#[test]
fn opens_tiny_llava_fixture() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llava/model");
    let store = WeightStore::open_dir(&dir).unwrap();
    assert!(!store.is_empty());
    assert_eq!(store.len(), 80);
    assert_eq!(store.names().count(), store.len());
    let embed = store.get("language_model.model.embed_tokens.weight").unwrap();
    assert_eq!(embed.shape(), &[32064, 64]);
    assert_eq!(embed.dtype(), DType::F16);
    assert_eq!(embed.bytes().len(), 32064 * 64 * 2);
    assert!(embed.expect_shape(&[32064, 64]).is_ok());
    assert!(store.contains("vision_tower.post_layernorm.weight"));

    let norm = store.get("language_model.model.norm.weight").unwrap();
    let vals = norm.to_f32();
    assert_eq!(vals.len(), 64);
    assert!(vals.iter().all(|v| v.is_finite()), "{vals:?}");
    assert!(vals.iter().any(|&v| v != 0.0), "{vals:?}");

    // Rows of the embedding agree with the whole-tensor conversion.
    let q = store
        .get("language_model.model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let all = q.to_f32();
    let mut rows = vec![0f32; 3 * 64];
    q.rows_f32(5, 8, &mut rows);
    assert_eq!(rows, all[5 * 64..8 * 64]);
    assert!(all.iter().all(|v| v.is_finite()) && all.iter().any(|&v| v != 0.0));
}

#[test]
fn opens_sharded_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // Tensor names are ASCII here so byte order equals the index's sorted order.
    write(
        dir.path(),
        "model-00001-of-00002.safetensors",
        &build(
            &[
                ("a.weight", "F16", &[2, 4], [0, 16]),
                ("b.weight", "BF16", &[4], [16, 24]),
            ],
            24,
        ),
    );
    write(
        dir.path(),
        "model-00002-of-00002.safetensors",
        &build(&[("c.weight", "F32", &[3], [0, 12])], 12),
    );
    let index = r#"{"metadata":{"total_size":36},"weight_map":{
        "a.weight":"model-00001-of-00002.safetensors",
        "b.weight":"model-00001-of-00002.safetensors",
        "c.weight":"model-00002-of-00002.safetensors"}}"#;
    write(dir.path(), "model.safetensors.index.json", index.as_bytes());

    let store = WeightStore::open_dir(dir.path()).unwrap();
    assert_eq!(store.len(), 3);
    assert_eq!(
        store.names().collect::<Vec<_>>(),
        ["a.weight", "b.weight", "c.weight"]
    );
    let a = store.get("a.weight").unwrap();
    assert_eq!((a.dtype(), a.shape()), (DType::F16, &[2usize, 4][..]));
    assert_eq!(a.to_f32(), vec![1.0; 8]);
    assert!(a.file().ends_with("model-00001-of-00002.safetensors"));
    let b = store.get("b.weight").unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    assert!(b.to_f32().iter().all(|v| v.is_finite() && *v != 0.0));
    let c = store.get("c.weight").unwrap();
    assert_eq!(c.dtype(), DType::F32);
    assert!(c.file().ends_with("model-00002-of-00002.safetensors"));
    assert!(c.to_f32().iter().all(|v| v.is_finite() && *v != 0.0));
}
