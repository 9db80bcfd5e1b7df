//! The CPU backend against the HF transformers oracle (float64) on the tiny LLaVA fixtures (f16 MHA and
//! bf16 GQA).
//! Tolerances are DESIGN.md's: CPU f32 vs f64 oracle, relative 1e-4 on logits and log-probs, greedy
//! tokens identical.
mod common;

use std::path::Path;

use common::*;
use miadpo::backend::cpu::CpuBackend;
use miadpo::model::llava::{GenerateOptions, Llava};
use miadpo::text::Template;
use miadpo::vision::preprocess::AspectMode;

fn model(dir: &Path) -> Llava<CpuBackend> {
    Llava::load(&dir.join("model"), CpuBackend::new()).expect("load the fixture model")
}

#[test]
fn tokenizer_matches_hf() {
    let m = model(&fixture_dir());
    for c in cases()["tokenize"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            m.tokenizer.encode(text).unwrap(),
            ids(&c["ids"]),
            "tokenize {text:?}"
        );
    }
}

#[test]
fn generate_cases_match_hf() {
    for fx in FIXTURES {
        generate_cases(&fixture(fx));
    }
}

fn generate_cases(dir: &Path) {
    let m = model(dir);
    let refs = reference(dir);
    let all = cases_of(dir);
    for c in all["generate"].as_array().unwrap() {
        let name = &format!(
            "{}/{}",
            dir.file_name().unwrap().to_str().unwrap(),
            c["name"].as_str().unwrap()
        );
        let paths = case_images(dir, &c["images"]);
        let prompt = m
            .prompt(
                Template::VicunaV1,
                c["question"].as_str().unwrap(),
                paths.len(),
                name,
            )
            .unwrap();
        assert_eq!(prompt.ids, ids(&c["prompt_ids"]), "{name}: prompt ids");
        let spans: Vec<(usize, usize)> = c["image_spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize))
            .collect();
        assert_eq!(prompt.image_spans, spans, "{name}: image spans");
        let pixels: Vec<Vec<f32>> = paths
            .iter()
            .map(|p| m.pixels(p, AspectMode::Pad).unwrap())
            .collect();
        let feats = m.image_features(&pixels);

        // whole-prompt pass: logits of the last row, per-token log-probs, per-layer image mass
        let pass = m.prompt_pass(&prompt, &feats, false).unwrap();
        let vocab = m.cfg.text.vocab_size;
        let t = prompt.ids.len();
        let (_, want) = &refs[&format!("generate/{}/logits_last", c["name"].as_str().unwrap())];
        let got = &pass.logits[(t - 1) * vocab..];
        let e = rel_err_inf(got, want);
        eprintln!("{name}: logits_last relative error {e:.3e}");
        assert!(e < 1e-4, "{name}: logits_last relative error {e:.3e} {REGEN}");
        let (_, want) = &refs[&format!("generate/{}/prompt_token_logps", c["name"].as_str().unwrap())];
        for i in 0..t - 1 {
            let row = &pass.logits[i * vocab..(i + 1) * vocab];
            let lp = row[prompt.ids[i + 1] as usize] - miadpo::backend::cpu::log_sum_exp(row);
            let w = want[i];
            // relative 1e-4 per token, floored at |1| so a near-certain token (log-prob ~ 0) is held to 1e-4 absolute
            assert!(
                (lp - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{name}: token {i} log-prob {lp} vs {w}"
            );
        }
        let (shape, want) = &refs[&format!("generate/{}/prompt_image_mass", c["name"].as_str().unwrap())];
        assert_eq!(shape, &vec![m.cfg.text.num_layers, t, spans.len()]);
        let got: Vec<f32> = pass.image_mass.concat();
        let diff = got.iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // probabilities summed over <= 16 keys in f32: 1e-5 absolute is ~100 f32 ulps of a mass near 1
        eprintln!("{name}: prompt_image_mass max abs diff {diff:.3e}");
        assert!(diff < 1e-5, "{name}: prompt_image_mass max abs diff {diff:.3e}");

        // greedy generation: tokens exact, statistics to 1e-4 relative
        let opts = GenerateOptions {
            max_new_tokens: c["generated_ids"].as_array().unwrap().len(),
            attn_layer: Some(c["image_attention_layer"].as_u64().unwrap() as usize),
            use_adapter: false,
        };
        let g = m
            .generate_ids(&prompt, &feats, &prompt.image_spans, &opts)
            .unwrap();
        assert_eq!(
            g.token_ids,
            ids(&c["generated_ids"]),
            "{name}: greedy tokens {REGEN}"
        );
        let want: Vec<f64> = c["image_attention"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(g.image_attention.len(), want.len(), "{name}");
        for (a, b) in g.image_attention.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{name}: image_attention {:?} vs {want:?}",
                g.image_attention
            );
        }
        let ppl = c["max_softmax_ppl"].as_f64().unwrap();
        assert!(
            (g.max_softmax_ppl - ppl).abs() <= 1e-4 * ppl,
            "{name}: max_softmax_ppl {} vs {ppl}",
            g.max_softmax_ppl
        );
        assert_eq!(
            g.text,
            c["generated_text"].as_str().unwrap().trim(),
            "{name}: text"
        );
    }
}

#[test]
fn score_cases_match_hf_policy_and_reference() {
    for fx in FIXTURES {
        score_cases(&fixture(fx));
    }
}

fn score_cases(dir: &Path) {
    let mut m = model(dir);
    m.load_adapter(&dir.join("adapter")).unwrap();
    for (i, c) in cases_of(dir)["score"].as_array().unwrap().iter().enumerate() {
        let i = format!("{}/{i}", dir.file_name().unwrap().to_str().unwrap());
        let paths = case_images(dir, &c["images"]);
        let prompt = m
            .prompt(
                Template::VicunaV1,
                c["prompt"].as_str().unwrap(),
                paths.len(),
                "score",
            )
            .unwrap();
        assert_eq!(prompt.ids, ids(&c["prompt_ids"]), "pair {i}: prompt ids");
        let chosen = m.tokenizer.response(c["chosen"].as_str().unwrap()).unwrap();
        let rejected = m.tokenizer.response(c["rejected"].as_str().unwrap()).unwrap();
        assert_eq!(chosen, ids(&c["chosen_ids"]), "pair {i}: chosen ids");
        assert_eq!(rejected, ids(&c["rejected_ids"]), "pair {i}: rejected ids");
        let pixels: Vec<Vec<f32>> = paths
            .iter()
            .map(|p| m.pixels(p, AspectMode::Pad).unwrap())
            .collect();
        let feats = m.image_features(&pixels);
        let resp = [chosen, rejected];
        for (adapter, tag) in [(true, "policy"), (false, "reference")] {
            let got = m.sequence_logps(&prompt, &feats, &resp, adapter).unwrap();
            for (g, which) in got.iter().zip(["chosen", "rejected"]) {
                let w = c[format!("{tag}_{which}_logp")].as_f64().unwrap();
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs(),
                    "pair {i}: {tag} {which} log-prob {g} vs {w}"
                );
            }
        }
    }
}

/// The fixture re-saved as f32 weights in two shards with an index: the f16 -> f32 widening is exact,
/// so logits and greedy tokens must be bit-identical to the f16 checkpoint's.
#[test]
fn f32_sharded_copy_gives_identical_results() {
    let src = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path();
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let widened: Vec<(String, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F16);
            let data: Vec<u8> = t
                .data()
                .chunks_exact(2)
                .flat_map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32().to_le_bytes())
                .collect();
            (n.clone(), t.shape().to_vec(), data)
        })
        .collect();
    let half_point = widened.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&widened[..half_point], &widened[half_point..]]
        .into_iter()
        .enumerate()
    {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|(n, s, d)| {
                weight_map.insert(n.clone(), file.clone().into());
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dst.join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let a = Llava::load(&src, CpuBackend::new()).unwrap();
    let b = Llava::load(dst, CpuBackend::new()).unwrap();
    let c = &cases()["generate"][1];
    let paths = case_images(&fixture_dir(), &c["images"]);
    let q = c["question"].as_str().unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 10,
        attn_layer: None,
        use_adapter: false,
    };
    let run = |m: &Llava<CpuBackend>| {
        let prompt = m.prompt(Template::VicunaV1, q, paths.len(), "seq2").unwrap();
        let px: Vec<Vec<f32>> = paths
            .iter()
            .map(|p| m.pixels(p, AspectMode::Pad).unwrap())
            .collect();
        let feats = m.image_features(&px);
        let pass = m.prompt_pass(&prompt, &feats, false).unwrap();
        (
            pass.logits,
            m.generate_ids(&prompt, &feats, &prompt.image_spans, &opts)
                .unwrap(),
        )
    };
    let ((la, ga), (lb, gb)) = (run(&a), run(&b));
    assert!(la == lb, "f32 shards changed the logits");
    assert_eq!(ga.token_ids, gb.token_ids);
    assert_eq!(ga.image_attention, gb.image_attention);
}

/// The three generate cases decoded as one batch give the same tokens, attention and ppl as one at
/// a time, bit for bit (decode products of up to 16 rows use the same per-row dot product).
#[test]
fn batched_generation_equals_one_at_a_time() {
    let dir = fixture_dir();
    let m = model(&dir);
    let inputs = GenerateInputs::load(&m, &dir);
    let items = inputs.items();
    // two answer lengths; every sequence stays in the batch to the end (no EOS in the fixture)
    for max_new in [10, 3] {
        let opts = GenerateOptions {
            max_new_tokens: max_new,
            attn_layer: Some(1),
            use_adapter: false,
        };
        let mut steps = 0;
        let batch = m.generate_batch(&items, &opts, &mut |k| steps += k).unwrap();
        assert_eq!(steps, 3 * max_new);
        for (p, (f, b)) in inputs.prompts.iter().zip(inputs.feats.iter().zip(&batch)) {
            let one = m.generate_ids(p, f, &p.image_spans, &opts).unwrap();
            assert_eq!(one.token_ids, b.token_ids);
            assert_eq!(one.image_attention, b.image_attention);
            assert_eq!(one.max_softmax_ppl.to_bits(), b.max_softmax_ppl.to_bits());
        }
    }
}

/// The vision tower's attention over several images: the images side by side (`transpose_rows`),
/// each image's heads as heads of their own in one call, and back, give what one call per image
/// gives, bit for bit (each head's rows are computed alone either way). The whole tower against HF
/// on the fixture's two- and three-image prompts is `generate_cases_match_hf`.
#[test]
fn images_side_by_side_in_one_attention_equal_one_call_per_image() {
    use miadpo::model::random::Rng;
    let be = CpuBackend::new();
    let mut rng = Rng::new(5);
    let (n, t, heads, d) = (3, 50, 4, 16);
    let mut rand = || -> Vec<f32> { (0..n * t * heads * d).map(|_| rng.normal() as f32).collect() };
    let (q, k, v) = (rand(), rand(), rand());
    let (together, apart) = images_attention_two_ways(&be, (&q, &k, &v), (n, t, heads, d));
    assert_eq!(together, apart);
}
