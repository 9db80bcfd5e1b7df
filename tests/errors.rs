//! Bad input gets one clear error line naming the file, tensor or sample, never a panic.
//! (Safetensors-level cases are in weights_errors.rs, image decoding cases in preprocess.rs.)
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Runs miadpo, expects failure, returns stderr (checked to hold no panic).
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_miadpo"))
        // the CPU, whose numbers the fixtures hold, also on a machine with a GPU
        .env("MIADPO_DEVICE", "cpu")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure for {args:?}");
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of the tiny model folder that a test may break.
fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(model_dir()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, m.join(f.file_name().unwrap())).unwrap();
    }
    m
}

fn score_with(data: &str, roots: &[&Path]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("pairs.json");
    std::fs::write(&p, data).unwrap();
    let mut args: Vec<String> = vec![
        "score".into(),
        "--model".into(),
        s(&model_dir()).into(),
        "--data".into(),
        s(&p).into(),
    ];
    for r in roots {
        args.extend(["--image-root", s(r)].map(String::from));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&argv);
    assert!(err.contains("pairs.json"), "the data file is named: {err}");
    err
}

#[test]
fn data_that_is_not_a_list_of_samples() {
    let err = score_with("[1, 2]", &[]);
    assert!(
        err.contains("`#0`") && err.contains("expected an object"),
        "{err}"
    );
    let err = score_with("{\n  \"id\": \"a\"\n}", &[]);
    assert!(err.contains("JSON list"), "{err}");
}

#[test]
fn data_sample_missing_a_field() {
    let err = score_with(
        r#"[{"id": "s7", "image": "sq0.png", "prompt": "<image>", "chosen": "a"}]"#,
        &[],
    );
    assert!(err.contains("s7") && err.contains("rejected"), "{err}");
}

#[test]
fn data_sample_with_a_wrongly_typed_field() {
    let err = score_with(
        r#"[{"id": "s8", "image": 3, "prompt": "<image>", "chosen": "a", "rejected": "b"}]"#,
        &[],
    );
    assert!(err.contains("s8") && err.contains("image"), "{err}");
}

#[test]
fn image_count_not_matching_the_placeholders() {
    let imgs = fixture_dir().join("images");
    let err = fails(&[
        "score",
        "--model",
        s(&model_dir()),
        "--data",
        s(&write(
            r#"[{"id": "two", "image": ["sq0.png", "sq1.png"], "prompt": "<image>\nQ", "chosen": "a", "rejected": "b"}]"#,
        )),
        "--image-root",
        s(&imgs),
    ]);
    assert!(
        err.contains("`two`") && err.contains("1 `<image>`") && err.contains("2 image"),
        "{err}"
    );
    let err = fails(&[
        "generate",
        "--model",
        s(&model_dir()),
        "--image",
        s(&imgs.join("sq0.png")),
        "--prompt",
        "no placeholder",
    ]);
    assert!(err.contains("--prompt has 0 `<image>`"), "{err}");
}

fn write(text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("miadpo-err-{}-{}.json", std::process::id(), text.len()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn image_path_that_does_not_resolve() {
    let imgs = fixture_dir().join("images");
    let err = score_with(
        r#"[{"id": "lost", "image": "coco/missing.jpg", "prompt": "<image>", "chosen": "a", "rejected": "b"}]"#,
        &[&imgs],
    );
    assert!(
        err.contains("`lost`") && err.contains("coco/missing.jpg") && err.contains("tried"),
        "{err}"
    );
}

#[test]
fn image_that_is_a_text_file() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("photo.png");
    std::fs::write(&fake, "not a picture").unwrap();
    let err = fails(&[
        "generate",
        "--model",
        s(&model_dir()),
        "--image",
        s(&fake),
        "--prompt",
        "<image>",
    ]);
    assert!(err.contains("photo.png"), "{err}");
}

#[test]
fn config_json_of_the_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    std::fs::write(m.join("config.json"), "[1, 2]").unwrap();
    let err = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        "x.png",
        "--prompt",
        "<image>",
    ]);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn tensor_missing_from_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gone = "language_model.model.layers.1.mlp.up_proj.weight";
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != gone).collect();
    safetensors::serialize_to_file(kept, None, &m.join("model.safetensors")).unwrap();
    let img = fixture_dir().join("images/sq0.png");
    let err = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&img),
        "--prompt",
        "<image>",
    ]);
    assert!(err.contains(gone) && err.contains(s(&m)), "{err}");
}

#[test]
fn tensor_mis_shaped_against_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let img = fixture_dir().join("images/sq0.png");
    let err = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&img),
        "--prompt",
        "<image>",
    ]);
    assert!(
        err.contains("gate_proj.weight") && err.contains("[96, 64]") && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn pickle_weights_are_refused_with_a_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path());
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("pytorch_model.bin"), b"PK\x03\x04 pickle").unwrap();
    let err = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        "x.png",
        "--prompt",
        "<image>",
    ]);
    assert!(err.contains("pytorch_model.bin") || err.contains(".bin"), "{err}");
    assert!(err.contains("safetensors"), "hint to convert: {err}");
}

#[test]
fn adapter_with_a_tensor_outside_the_decoder() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("adapter");
    std::fs::create_dir(&a).unwrap();
    std::fs::copy(
        fixture_dir().join("adapter/adapter_config.json"),
        a.join("adapter_config.json"),
    )
    .unwrap();
    let data = vec![0u8; 4 * 4 * 32];
    let name = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight";
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 32], &data).unwrap();
    safetensors::serialize_to_file(vec![(name, v)], None, &a.join("adapter_model.safetensors")).unwrap();
    let img = fixture_dir().join("images/sq0.png");
    let err = fails(&[
        "generate",
        "--model",
        s(&model_dir()),
        "--adapter",
        s(&a),
        "--image",
        s(&img),
        "--prompt",
        "<image>",
    ]);
    assert!(
        err.contains(name) && err.contains("adapter_model.safetensors"),
        "{err}"
    );
}
