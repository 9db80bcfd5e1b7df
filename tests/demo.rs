//! `miadpo demo --quick` end to end through the built binary: every stage runs, `summary.json` has
//! the fields with numbers in range, `report.png` is a picture, an earlier run is not
//! overwritten unless asked, and the ablations (`--sft-from`, `--selection random`,
//! `--no-post-select`) run on its SFT model.
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn miadpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_miadpo"))
        .env("MIADPO_DEVICE", "cpu")
        .args(args)
        .output()
        .expect("run miadpo")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn accuracy_block(v: &Value, which: &str) {
    let b = &v[which];
    for key in [
        "single_image_accuracy",
        "multi_image_accuracy",
        "sequence",
        "grid",
        "pip",
    ] {
        let x = b[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{which}.{key} missing: {b}"));
        assert!((0.0..=1.0).contains(&x), "{which}.{key} = {x}");
    }
    for key in ["single_by_question", "multi_by_question"] {
        let m = b[key].as_object().unwrap_or_else(|| panic!("{which}.{key}: {b}"));
        assert_eq!(
            m.keys().map(String::as_str).collect::<Vec<_>>(),
            ["caption", "colour", "count", "presence", "shape"],
            "{which}.{key}"
        );
        for x in m.values() {
            assert!((0.0..=1.0).contains(&x.as_f64().unwrap()));
        }
    }
    assert!(b["single_questions"].as_u64().unwrap() > 0);
    assert_eq!(
        b["multi_questions"].as_u64().unwrap(),
        3 * b["single_questions"].as_u64().unwrap(),
        "each held-out question in the three multi-image kinds"
    );
}

#[test]
fn quick_demo_runs_every_stage_and_writes_summary_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let t0 = std::time::Instant::now();
    let o = miadpo(&["demo", "--quick", "--out", s(&out), "--seed", "1"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "demo failed: {stderr}");
    let secs = t0.elapsed().as_secs_f64();
    // one line per stage
    for stage in [
        "world",
        "init",
        "sft",
        "eval_before",
        "augment",
        "select",
        "dpo",
        "eval_after",
        "report",
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(stage)),
            "no line for stage {stage}: {stderr}"
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("multi-image") && stdout.contains("DPO pairs"),
        "{stdout}"
    );

    let v: Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    accuracy_block(&v, "before");
    accuracy_block(&v, "after");
    let pairs = v["pairs"].as_u64().unwrap();
    let by_kind = v["pairs_by_kind"].as_object().unwrap();
    assert_eq!(
        by_kind.keys().map(String::as_str).collect::<Vec<_>>(),
        ["grid", "pip", "sequence"]
    );
    assert_eq!(
        by_kind.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        pairs,
        "{v}"
    );
    assert!(pairs > 0, "the quick run trains DPO on some pairs: {v}");
    let stages = v["stages"].as_object().unwrap();
    assert_eq!(stages.len(), 9, "{v}");
    let total = v["seconds"].as_f64().unwrap();
    let sum: f64 = stages.values().map(|x| x.as_f64().unwrap()).sum();
    assert!(sum > 0.0 && sum <= total + 1e-6 && total <= secs, "{v}");
    assert!(v["device"].as_str().unwrap().starts_with("cpu"), "{v}");
    assert_eq!(v["selection"], "attention");
    assert_eq!(v["post_select"], true);
    assert_eq!(v["seed"], 1);

    // the report: a 1500x900 PNG
    let png = std::fs::read(out.join("report.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (1500, 900));
    // `miadpo plot RUN` redraws it from summary.json and the metrics
    let again = out.join("again.png");
    let p = miadpo(&["plot", s(&out), "--png", s(&again)]);
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let img2 = image::open(&again).unwrap();
    assert_eq!(
        img2.to_rgb8().as_raw(),
        img.to_rgb8().as_raw(),
        "the same picture"
    );
    // every stage's files
    for f in [
        "world/train.json",
        "world/eval_multi/grid.json",
        "sft/model/model.safetensors",
        "sft/metrics.jsonl",
        "eval_before.jsonl",
        "select/pairs.jsonl",
        "dpo/adapter/adapter_config.json",
        "dpo/metrics.jsonl",
        "eval_after.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // a second run into the same folder is refused
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    let again = miadpo(&["demo", "--quick", "--out", s(&out)]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("mine.txt")).unwrap(), "keep");

    // the ablations on this run's SFT model: random selection without post-selection
    let abl = tmp.path().join("ablation");
    let args = [
        "demo",
        "--quick",
        "--out",
        s(&abl),
        "--seed",
        "1",
        "--sft-from",
        s(&out),
        "--selection",
        "random",
        "--no-post-select",
    ];
    let o = miadpo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a: Value = serde_json::from_slice(&std::fs::read(abl.join("summary.json")).unwrap()).unwrap();
    assert_eq!(a["selection"], "random");
    assert_eq!(a["post_select"], false);
    assert_eq!(a["sft_from"], s(&out));
    assert_eq!(
        a["before"], v["before"],
        "the same SFT model on the same questions"
    );
    let (pairs, pool) = (
        a["pairs"].as_u64().unwrap(),
        a["select_candidates"].as_u64().unwrap(),
    );
    assert!(0 < pairs && pairs <= pool, "{a}");
    assert!(!abl.join("init").exists(), "no model was initialised");
    assert!(
        abl.join("sft/metrics.jsonl").is_file(),
        "the SFT curves are copied"
    );

    // --overwrite replaces only the demo's own files
    std::fs::write(abl.join("mine.txt"), "keep").unwrap();
    let o = miadpo(&[&args[..], &["--overwrite"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(abl.join("mine.txt")).unwrap(), "keep");

    // an SFT model of another seed is refused, naming the difference
    let o = miadpo(&[
        "demo",
        "--quick",
        "--out",
        s(&tmp.path().join("other")),
        "--seed",
        "2",
        "--sft-from",
        s(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("seed 1 (here 2)"), "{err}");
}

#[test]
fn demo_settings_can_be_overridden_by_name_only() {
    let tmp = tempfile::tempdir().unwrap();
    let o = miadpo(&[
        "demo",
        "--quick",
        "--out",
        s(&tmp.path().join("d")),
        "--set",
        "sft_stepz=3",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("sft_stepz") && err.contains("sft_steps"), "{err}");
    let o = miadpo(&[
        "demo",
        "--quick",
        "--out",
        s(&tmp.path().join("e")),
        "--selection",
        "best",
    ]);
    assert!(!o.status.success());
}

/// Same seed, same bytes, whatever the thread count: the SFT model, the pairs, the adapter and every
/// answer (what a reproducibility study compares).
#[test]
fn demo_is_bit_identical_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |threads: &str| {
        let out = tmp.path().join(format!("t{threads}"));
        let o = miadpo(&[
            "--threads",
            threads,
            "demo",
            "--quick",
            "--out",
            s(&out),
            "--seed",
            "3",
            "--set",
            "train_scenes=12",
            "--set",
            "eval_scenes=6",
            "--set",
            "sft_steps=4",
            "--set",
            "augment_per_kind=6",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (a, b) = (run("1"), run("2"));
    for f in [
        "sft/model/model.safetensors",
        "select/pairs.jsonl",
        "dpo/adapter/adapter_model.safetensors",
        "eval_before.jsonl",
        "eval_after.jsonl",
    ] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between 1 and 2 threads"
        );
    }
}
