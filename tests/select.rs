//! The select stage on the tiny fixture: parity with the HF oracle, resume, shards, bad records.
mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use common::*;
use miadpo::backend::cpu::CpuBackend;
use miadpo::model::llava::{GenerateOptions, Llava};
use miadpo::select::{run, SelectOptions, Shard};
use miadpo::text::Template;
use miadpo::vision::preprocess::AspectMode;
use serde_json::{json, Value};

/// The fixture's generate cases as augment-style sequence records (target = the last image), plus
/// two copies with other ids so that batches and shards have something to split.
fn records(dir: &Path) -> PathBuf {
    let mut recs = Vec::new();
    for copy in 0..3 {
        for c in cases()["generate"].as_array().unwrap() {
            let imgs = c["images"].as_array().unwrap();
            recs.push(json!({
                "id": format!("{}-{copy}", c["name"].as_str().unwrap()),
                "image": imgs,
                "conversations": [{"from": "human", "value": c["question"]}, {"from": "gpt", "value": "A square."}],
                "mia": {"kind": "sequence", "target": imgs.len(), "n_images": imgs.len(), "source_id": "x"}
            }));
        }
    }
    let p = dir.join("records.json");
    std::fs::write(&p, serde_json::to_string(&recs).unwrap()).unwrap();
    p
}

/// Thresholds that keep every answer (the fixture's answers are random tokens): the oracle check
/// needs every record in the output.
fn options(data: &Path, out: &Path, batch: usize) -> SelectOptions {
    SelectOptions {
        data: vec![data.to_path_buf()],
        image_roots: vec![fixture_dir().join("images")],
        out: out.to_path_buf(),
        template: Template::VicunaV1,
        aspect: AspectMode::Pad,
        generate: GenerateOptions {
            max_new_tokens: 10,
            attn_layer: Some(1),
            use_adapter: false,
        },
        ratio_threshold: Some(1.0),
        ppl_threshold: 0.0,
        post: None,
        max_gt_chars: 512,
        batch_size: batch,
        shard: Shard::default(),
        skip_bad: false,
    }
}

fn model() -> Llava<CpuBackend> {
    Llava::load(&model_dir(), CpuBackend::new()).unwrap()
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn rejected_answers_ratio_and_ppl_match_hf() {
    let tmp = tempfile::tempdir().unwrap();
    let data = records(tmp.path());
    let m = model();
    let mut outputs = Vec::new();
    for batch in [1, 4] {
        let out = tmp.path().join(format!("pairs-{batch}.jsonl"));
        let s = run(&m, &options(&data, &out, batch), &mut |_| {}).unwrap();
        assert_eq!((s.seen, s.answers, s.kept.values().sum::<usize>()), (9, 9, 9));
        outputs.push(std::fs::read_to_string(&out).unwrap());
        for line in lines(&out) {
            let name = line["id"]
                .as_str()
                .unwrap()
                .split('-')
                .next()
                .unwrap()
                .to_string();
            let all = cases();
            let c = all["generate"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name.as_str())
                .unwrap();
            assert_eq!(
                line["rejected"],
                c["generated_text"].as_str().unwrap().trim(),
                "{name}: rejected = HF greedy text"
            );
            assert_eq!(line["chosen"], "A square.");
            let n = c["images"].as_array().unwrap().len();
            let want = c["image_attention"][n - 1].as_f64().unwrap();
            let got = line["mia"]["ratio"].as_f64().unwrap();
            assert!((got - want).abs() <= 1e-4 * want, "{name}: ratio {got} vs {want}");
            let (got, want) = (
                line["mia"]["ppl"].as_f64().unwrap(),
                c["max_softmax_ppl"].as_f64().unwrap(),
            );
            assert!((got - want).abs() <= 1e-4 * want, "{name}: ppl {got} vs {want}");
            assert_eq!(line["mia"]["n_images"], n);
        }
    }
    assert_eq!(outputs[0], outputs[1], "batch 1 and batch 4 write the same pairs");
}

#[test]
fn thresholds_drop_to_the_sidecar_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let data = records(tmp.path());
    let out = tmp.path().join("pairs.jsonl");
    let mut o = options(&data, &out, 8);
    o.ratio_threshold = Some(0.01); // every target gets more than 1% of the attention
    let s = run(&model(), &o, &mut |_| {}).unwrap();
    assert!(s.kept.is_empty());
    assert_eq!(s.dropped.len(), 1, "{:?}", s.dropped);
    assert!(s
        .dropped
        .keys()
        .next()
        .unwrap()
        .contains("attention ratio above threshold (0.01)"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "");
    let dropped = lines(&miadpo::select::run::dropped_path(&out));
    assert_eq!(dropped.len(), 9);
    assert!(dropped[0]["answer"].as_str().is_some() && dropped[0]["ratio"].as_f64().is_some());
}

#[test]
fn a_killed_run_resumes_without_duplicates_or_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = records(tmp.path());
    let m = model();
    let full = tmp.path().join("full.jsonl");
    run(&m, &options(&data, &full, 2), &mut |_| {}).unwrap();
    let full_text = std::fs::read_to_string(&full).unwrap();
    // the state a kill leaves: four whole lines and half of the fifth
    let cut = tmp.path().join("cut.jsonl");
    let keep: Vec<&str> = full_text.lines().take(5).collect();
    let partial = format!("{}\n{}", keep[..4].join("\n"), &keep[4][..keep[4].len() / 2]);
    std::fs::write(&cut, partial).unwrap();
    let s = run(&m, &options(&data, &cut, 2), &mut |_| {}).unwrap();
    assert_eq!((s.resumed, s.answers), (4, 5));
    let got: Vec<String> = std::fs::read_to_string(&cut)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let ids: Vec<&str> = got
        .iter()
        .map(|l| l.split("\"id\":\"").nth(1).unwrap().split('"').next().unwrap())
        .collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        9,
        "no duplicate: {ids:?}"
    );
    let mut a: Vec<&str> = full_text.lines().collect();
    let mut b: Vec<&str> = got.iter().map(String::as_str).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "no loss: the resumed file holds the same pairs");
    // a finished run decides nothing new
    let s = run(&m, &options(&data, &cut, 2), &mut |_| {}).unwrap();
    assert_eq!((s.resumed, s.answers), (9, 0));
}

#[test]
fn shards_partition_the_records() {
    let tmp = tempfile::tempdir().unwrap();
    let data = records(tmp.path());
    let m = model();
    let mut seen = Vec::new();
    for i in 0..3 {
        let out = tmp.path().join(format!("shard{i}.jsonl"));
        let mut o = options(&data, &out, 8);
        o.shard = Shard { index: i, count: 3 };
        run(&m, &o, &mut |_| {}).unwrap();
        seen.extend(
            lines(&out)
                .into_iter()
                .map(|l| l["id"].as_str().unwrap().to_string()),
        );
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (9, 9));
    assert!(
        "3/3".parse::<Shard>().is_err() && "1/0".parse::<Shard>().is_err() && "2/3".parse::<Shard>().is_ok()
    );
}

/// Writes one bad record beside a good one and returns the error (or, with skip_bad, the skip reasons).
fn with_bad(bad: Value, skip_bad: bool) -> Result<Vec<String>, String> {
    let tmp = tempfile::tempdir().unwrap();
    let good = json!({"id": "ok", "image": ["sq0.png"], "conversations": [{"from": "human", "value": "<image>\nQ?"},
        {"from": "gpt", "value": "A."}], "mia": {"kind": "sequence", "target": 1, "n_images": 1, "source_id": "s"}});
    let data = tmp.path().join("records.json");
    std::fs::write(&data, serde_json::to_string(&json!([good, bad])).unwrap()).unwrap();
    let mut o = options(&data, &tmp.path().join("p.jsonl"), 8);
    o.skip_bad = skip_bad;
    match run(&model(), &o, &mut |_| {}) {
        Ok(s) => Ok(s.skipped.keys().cloned().collect()),
        Err(e) => Err(e.to_string()),
    }
}

fn bad_record(mia: Value, image: Value, question: &str) -> Value {
    json!({"id": "broken", "image": image, "conversations": [{"from": "human", "value": question},
        {"from": "gpt", "value": "A."}], "mia": mia})
}

#[test]
fn record_without_mia() {
    let mut r = bad_record(json!(null), json!(["sq1.png"]), "<image>\nQ");
    r.as_object_mut().unwrap().remove("mia");
    let e = with_bad(r.clone(), false).unwrap_err();
    assert!(
        e.contains("records.json") && e.contains("`broken`") && e.contains("mia"),
        "{e}"
    );
    assert_eq!(with_bad(r, true).unwrap().len(), 1);
}

#[test]
fn target_outside_the_images() {
    let mia = json!({"kind": "sequence", "target": 3, "n_images": 2, "source_id": "s"});
    let e = with_bad(
        bad_record(mia, json!(["sq1.png", "sq2.png"]), "<image>\n<image>\nQ"),
        false,
    )
    .unwrap_err();
    assert!(
        e.contains("`broken`") && e.contains("target 3 is outside 1..=2"),
        "{e}"
    );
    let mia = json!({"kind": "grid", "target": 5, "n_images": 4, "rows": 2, "cols": 2, "sources": [], "source_id": "s"});
    let e = with_bad(bad_record(mia, json!("sq1.png"), "<image>\nQ"), false).unwrap_err();
    assert!(e.contains("target 5 is outside 1..=4"), "{e}");
}

#[test]
fn image_that_is_missing() {
    let mia = json!({"kind": "sequence", "target": 1, "n_images": 1, "source_id": "s"});
    let r = bad_record(mia, json!(["nowhere/x.png"]), "<image>\nQ");
    let e = with_bad(r.clone(), false).unwrap_err();
    assert!(e.contains("`broken`") && e.contains("nowhere/x.png"), "{e}");
    assert_eq!(with_bad(r, true).unwrap(), ["image not found"]);
}

#[test]
fn placeholder_count_not_matching_the_images() {
    let mia = json!({"kind": "sequence", "target": 1, "n_images": 2, "source_id": "s"});
    let e = with_bad(
        bad_record(mia, json!(["sq1.png", "sq2.png"]), "<image>\nQ"),
        false,
    )
    .unwrap_err();
    assert!(
        e.contains("`broken`") && e.contains("1 `<image>` placeholder(s) for 2 image(s)"),
        "{e}"
    );
}

#[test]
fn long_ground_truths_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = records(tmp.path());
    let mut o = options(&data, &tmp.path().join("p.jsonl"), 8);
    o.max_gt_chars = 5; // "A square." has 9
    let s = run(&model(), &o, &mut |_| {}).unwrap();
    assert_eq!(s.answers, 0);
    assert_eq!(s.skipped.get("ground truth longer than 5 chars"), Some(&9));
}
