//! Fixture access shared by the integration tests: `tests/fixtures/tiny-llava` (HF transformers + PEFT,
//! float64; regenerate with `python scripts/make_fixtures.py --variant public --out tests/fixtures/tiny-llava
//! --tokenizer <llama tokenizer.json>`, see tests/fixtures/README.md).
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The oracle fixtures: `tiny-llava` (f16 weights, multi-head attention; shared/fixtures) and
/// `tiny-llava-gqa` (bf16 weights, 2 KV heads for 4 query heads; `make_fixtures.py --variant gqa`).
pub const FIXTURES: [&str; 2] = ["tiny-llava", "tiny-llava-gqa"];

/// Appended to parity failures: where the golden numbers come from.
pub const REGEN: &str =
    "(golden numbers: HF transformers 5.24 float64, see tests/fixtures/README.md to regenerate)";

/// `tests/fixtures/NAME` of this checkout; `MIADPO_REPO` overrides the checkout's root (a test binary
/// carried to another machine, see scripts/device-check.sh).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("MIADPO_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/fixtures")
        .join(name)
}

/// The image paths of a fixture case (`images`: its list of file names under `dir/images`).
pub fn case_images(dir: &Path, images: &Value) -> Vec<PathBuf> {
    images
        .as_array()
        .unwrap()
        .iter()
        .map(|n| dir.join("images").join(n.as_str().unwrap()))
        .collect()
}

/// A fixture case's prompt (its text under `key`: "prompt" for score cases, "question" for generate
/// cases; the Vicuna template) and its images' pixels (`pad` mode), as `m` prepares them.
pub fn case_inputs<B: miadpo::backend::Backend>(
    m: &miadpo::model::llava::Llava<B>,
    dir: &Path,
    case: &Value,
    key: &str,
) -> (miadpo::text::tokenizer::PromptIds, Vec<Vec<f32>>) {
    let paths = case_images(dir, &case["images"]);
    let prompt = m
        .prompt(
            miadpo::text::Template::VicunaV1,
            case[key].as_str().unwrap(),
            paths.len(),
            "fixture",
        )
        .unwrap();
    let px = paths
        .iter()
        .map(|p| m.pixels(p, miadpo::vision::preprocess::AspectMode::Pad).unwrap())
        .collect();
    (prompt, px)
}

/// The fixture's generate cases as `generate_batch` takes them: each case's prompt (its "question"),
/// its images' features, and one key group per image span.
pub struct GenerateInputs<B: miadpo::backend::Backend> {
    pub prompts: Vec<miadpo::text::tokenizer::PromptIds>,
    pub feats: Vec<B::Buf>,
    pub groups: Vec<miadpo::backend::KeyGroups>,
}

impl<B: miadpo::backend::Backend> GenerateInputs<B> {
    pub fn load(m: &miadpo::model::llava::Llava<B>, dir: &Path) -> Self {
        let (mut prompts, mut feats) = (Vec::new(), Vec::new());
        for c in cases_of(dir)["generate"].as_array().unwrap() {
            let (prompt, px) = case_inputs(m, dir, c, "question");
            prompts.push(prompt);
            feats.push(m.image_features(&px));
        }
        let groups = prompts
            .iter()
            .map(|p| miadpo::backend::KeyGroups::per_span(&p.image_spans).unwrap())
            .collect();
        GenerateInputs {
            prompts,
            feats,
            groups,
        }
    }

    /// One item per case, with its image groups.
    pub fn items(&self) -> Vec<miadpo::model::llava::GenerateItem<'_, B>> {
        self.prompts
            .iter()
            .zip(&self.feats)
            .zip(&self.groups)
            .map(|((p, f), g)| miadpo::model::llava::GenerateItem {
                prompt: p,
                features: f,
                groups: Some(g),
            })
            .collect()
    }
}

/// The vision tower's attention over n images of t rows (q, k, v: (n·t, heads·d) each, not causal)
/// two ways: `clip::images_attention` (the images side by side in one call, what the tower runs),
/// and one `attention` per image. Returns both, (n·t, heads·d).
pub fn images_attention_two_ways<B: miadpo::backend::Backend>(
    be: &B,
    (q, k, v): (&B::Buf, &B::Buf, &B::Buf),
    (n, t, heads, d): (usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let h = heads * d;
    let shape = miadpo::backend::AttnShape {
        tq: t,
        tk: t,
        heads,
        kv_heads: heads,
        head_dim: d,
        causal: false,
        q_pos0: 0,
        hole: None,
    };
    let per: Vec<f32> = (0..n)
        .flat_map(|i| {
            let rows = |m: &B::Buf| be.slice_rows(m, h, i * t, (i + 1) * t);
            be.download(&be.attention(&rows(q), &rows(k), &rows(v), shape, None).0)
        })
        .collect();
    let together = miadpo::model::clip::images_attention(be, (q, k, v), n, shape);
    (be.download(&together), per)
}

pub fn fixture_dir() -> PathBuf {
    fixture("tiny-llava")
}

pub fn model_dir() -> PathBuf {
    fixture_dir().join("model")
}

pub fn cases() -> Value {
    cases_of(&fixture_dir())
}

pub fn cases_of(dir: &Path) -> Value {
    let p = dir.join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Every tensor of the fixture's reference.safetensors as (shape, f32 values).
pub fn reference(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// max |a - b| / max |b|: the error relative to the vector's scale. Per-element relative error is
/// meaningless for logits near zero, so the contract's "relative 1e-4" is taken against the scale.
pub fn rel_err_inf(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

/// A small deterministic generator of test inputs (an LCG): reproducible across runs and machines.
pub struct TestRng(pub u64);

impl TestRng {
    /// n values uniform in [-scale, scale), never exactly 0
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                scale * (2.0 * (((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32) - 1.0)
            })
            .collect()
    }
}

/// Asserts a directional derivative: the analytic g·v against a central finite difference `numeric`,
/// relative to Σ|g_i v_i| rather than |g·v| — the terms may cancel, and the rounding noise of the
/// difference quotient scales with them, not with their sum.
pub fn assert_directional(name: &str, grad: &[f32], v: &[f32], numeric: f64, tol: f64) {
    assert_eq!(grad.len(), v.len(), "{name}: gradient shape");
    let analytic: f64 = grad.iter().zip(v).map(|(g, v)| *g as f64 * *v as f64).sum();
    let terms: f64 = grad
        .iter()
        .zip(v)
        .map(|(g, v)| (*g as f64 * *v as f64).abs())
        .sum();
    let rel = (numeric - analytic).abs() / terms.max(1e-3);
    assert!(
        rel < tol,
        "{name}: analytic {analytic:.6} vs finite difference {numeric:.6} (relative {rel:.2e})"
    );
}
