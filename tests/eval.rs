//! `eval`: exact-match accuracy of greedy answers, per file and per task, on the tiny fixture model.
mod common;

use miadpo::backend::cpu::CpuBackend;
use miadpo::eval::{evaluate, table, EvalOptions};
use miadpo::model::llava::{GenerateItem, GenerateOptions, Llava};
use miadpo::text::Template;
use miadpo::vision::preprocess::AspectMode;
use serde_json::json;

#[test]
fn accuracy_counts_matching_answers_per_set_and_task() {
    let dir = common::fixture_dir();
    let m = Llava::load(&dir.join("model"), CpuBackend::new()).unwrap();
    let images = dir.join("images");
    // the model's own greedy answers (random weights: some token soup) are the gold for half the
    // questions, something else for the other half
    let asks = [
        ("a", vec!["sq0.png"], "<image>\nWhat colour is the square?"),
        ("b", vec!["sq1.png"], "<image>\nHow many shapes are there?"),
        (
            "c",
            vec!["sq2.png", "sq3.png"],
            "Image 1: <image>\nImage 2: <image>\nIn Image 2, what is there?",
        ),
        ("d", vec!["wide.png"], "<image>\nDescribe the image."),
    ];
    let gen = GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let own: Vec<String> = asks
        .iter()
        .map(|(id, ims, q)| {
            let p = m.prompt(Template::VicunaV1, q, ims.len(), id).unwrap();
            let px: Vec<Vec<f32>> = ims
                .iter()
                .map(|f| m.pixels(&images.join(f), AspectMode::Pad).unwrap())
                .collect();
            let f = m.image_features(&px);
            let item = GenerateItem {
                prompt: &p,
                features: &f,
                groups: None,
            };
            m.generate_batch(&[item], &gen, &mut |_| {}).unwrap()[0]
                .text
                .trim()
                .to_string()
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let rec = |i: usize, gold: String, task: &str| {
        let (id, ims, q) = &asks[i];
        json!({"id": id, "image": if ims.len() == 1 { json!(ims[0]) } else { json!(ims) }, "task": task,
               "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": gold}]})
    };
    // set one: a right (with other case and a final full stop), b wrong; set two: c right, d wrong
    let one = json!([
        rec(0, format!("{}.", own[0].to_uppercase()), "colour"),
        rec(1, "Forty-two".into(), "count")
    ]);
    let two = json!([
        rec(2, own[2].clone(), "colour"),
        rec(3, "Nothing at all".into(), "caption")
    ]);
    let (p1, p2) = (tmp.path().join("single.json"), tmp.path().join("multi.json"));
    std::fs::write(&p1, one.to_string()).unwrap();
    std::fs::write(&p2, two.to_string()).unwrap();
    let o = EvalOptions {
        data: vec![p1, p2],
        image_roots: vec![images],
        template: Template::VicunaV1,
        aspect: AspectMode::Pad,
        max_new_tokens: 6,
        batch_size: 3, // batches of 3 and 1: batched decoding must give the one-at-a-time answers
        use_adapter: false,
    };
    let mut calls = 0;
    let s = evaluate(&m, &o, &mut |_, n| {
        calls += 1;
        assert_eq!(n, 4);
    })
    .unwrap();
    assert!(calls >= 2);
    assert_eq!((s.overall.correct, s.overall.total), (2, 4), "{s:#?}");
    assert_eq!((s.sets["single"].correct, s.sets["single"].total), (1, 2));
    assert_eq!(s.tasks["multi"]["colour"].correct, 1);
    assert_eq!(s.tasks["multi"]["caption"].correct, 0);
    let answers: Vec<&str> = s.predictions.iter().map(|p| p.answer.as_str()).collect();
    assert_eq!(answers, own.iter().map(String::as_str).collect::<Vec<_>>());
    let t = table(&s);
    assert!(t.contains("single") && t.contains("50.0%"), "{t}");
}

#[test]
fn a_question_without_its_placeholders_names_the_record() {
    let dir = common::fixture_dir();
    let m = Llava::load(&dir.join("model"), CpuBackend::new()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.json");
    let bad = json!([{"id": "q7", "image": ["sq0.png", "sq1.png"],
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}]);
    std::fs::write(&p, bad.to_string()).unwrap();
    let o = EvalOptions {
        data: vec![p],
        image_roots: vec![dir.join("images")],
        template: Template::VicunaV1,
        aspect: AspectMode::Pad,
        max_new_tokens: 4,
        batch_size: 2,
        use_adapter: false,
    };
    let e = evaluate(&m, &o, &mut |_, _| {}).unwrap_err().to_string();
    assert!(
        e.contains("bad.json") && e.contains("q7") && e.contains("placeholder"),
        "{e}"
    );
}
