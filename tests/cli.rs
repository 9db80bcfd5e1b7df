//! The `generate` and `score` command-line contracts, run through the built binary.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn miadpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_miadpo"))
        // the CPU, whose numbers the fixtures hold, also on a machine with a GPU
        .env("MIADPO_DEVICE", "cpu")
        .args(args)
        .output()
        .expect("run miadpo")
}

fn ok_stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "miadpo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The `generate --json` keys, in the order of the contract.
const GENERATE_KEYS: [&str; 6] = [
    "prompt_tokens",
    "token_ids",
    "text",
    "image_attention",
    "attn_layer",
    "max_softmax_ppl",
];

#[test]
fn generate_json_follows_the_contract_and_the_oracle() {
    let model = model_dir();
    let imgs = fixture_dir().join("images");
    for c in cases()["generate"].as_array().unwrap() {
        let mut args = vec!["generate".to_string(), "--model".into(), s(&model).into()];
        for n in c["images"].as_array().unwrap() {
            args.extend(["--image".into(), s(&imgs.join(n.as_str().unwrap())).to_string()]);
        }
        let n_new = c["generated_ids"].as_array().unwrap().len().to_string();
        // no --attn-layer: the default is num_layers / 2 = 1, the fixture's layer
        args.extend([
            "--prompt".into(),
            c["question"].as_str().unwrap().into(),
            "--max-new-tokens".into(),
            n_new,
        ]);
        args.push("--json".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ok_stdout(miadpo(&argv));
        assert_eq!(out.lines().count(), 1, "one JSON line: {out}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut sorted = GENERATE_KEYS.to_vec();
        sorted.sort(); // serde_json's map is sorted; the order on the line is checked below
        assert_eq!(keys, sorted);
        let order: Vec<usize> = GENERATE_KEYS
            .iter()
            .map(|k| out.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key order on the line: {out}"
        );
        assert_eq!(
            v["prompt_tokens"].as_u64().unwrap() as usize,
            c["prompt_ids"].as_array().unwrap().len()
        );
        assert_eq!(ids(&v["token_ids"]), ids(&c["generated_ids"]));
        assert_eq!(v["attn_layer"], c["image_attention_layer"]);
        for (a, b) in v["image_attention"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["image_attention"].as_array().unwrap())
        {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4 * b, "image_attention {a} vs {b}");
        }
        let (p, q) = (
            v["max_softmax_ppl"].as_f64().unwrap(),
            c["max_softmax_ppl"].as_f64().unwrap(),
        );
        assert!((p - q).abs() <= 1e-4 * q, "ppl {p} vs {q}");
    }
}

/// Writes the fixture's score cases as a data file (JSON list or JSONL) with relative image paths.
fn write_pairs(dir: &Path, jsonl: bool) -> std::path::PathBuf {
    let recs: Vec<Value> = cases()["score"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let imgs = c["images"].as_array().unwrap();
            // a single image as a plain string, several as a list: both forms are accepted
            let image = if imgs.len() == 1 {
                imgs[0].clone()
            } else {
                Value::Array(imgs.clone())
            };
            serde_json::json!({"id": format!("pair{i}"), "image": image, "prompt": c["prompt"],
                               "chosen": c["chosen"], "rejected": c["rejected"]})
        })
        .collect();
    let p = dir.join(if jsonl { "pairs.jsonl" } else { "pairs.json" });
    let text = if jsonl {
        recs.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n")
    } else {
        Value::Array(recs).to_string()
    };
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn score_json_gives_policy_and_reference_logps_in_input_order() {
    let tmp = tempfile::tempdir().unwrap();
    let empty_root = tmp.path().join("nothing-here");
    std::fs::create_dir(&empty_root).unwrap();
    let imgs = fixture_dir().join("images");
    let adapter = fixture_dir().join("adapter");
    let model = model_dir();
    for (jsonl, with_adapter) in [(true, true), (false, false)] {
        let data = write_pairs(tmp.path(), jsonl);
        let mut args = vec!["score", "--model", s(&model), "--data", s(&data)];
        // the first root lacks the images: roots are tried in order
        args.extend(["--image-root", s(&empty_root), "--image-root", s(&imgs), "--json"]);
        if with_adapter {
            args.extend(["--adapter", s(&adapter)]);
        }
        let out = ok_stdout(miadpo(&args));
        let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let all = cases();
        let want = all["score"].as_array().unwrap();
        assert_eq!(lines.len(), want.len());
        let tag = if with_adapter { "policy" } else { "reference" };
        for (i, (l, c)) in lines.iter().zip(want).enumerate() {
            let keys: Vec<&str> = l.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                [
                    "chosen_logp",
                    "chosen_tokens",
                    "id",
                    "rejected_logp",
                    "rejected_tokens"
                ]
            );
            assert_eq!(l["id"], format!("pair{i}"));
            for which in ["chosen", "rejected"] {
                let got = l[format!("{which}_logp")].as_f64().unwrap();
                let w = c[format!("{tag}_{which}_logp")].as_f64().unwrap();
                assert!(
                    (got - w).abs() <= 1e-4 * w.abs(),
                    "pair{i} {tag} {which}: {got} vs {w}"
                );
                assert_eq!(
                    l[format!("{which}_tokens")].as_u64().unwrap() as usize,
                    c[format!("{which}_ids")].as_array().unwrap().len()
                );
            }
        }
    }
}

/// `MIADPO_DEVICE=` (empty) is unset: the default `auto` runs (on the CPU here, or a GPU), not an
/// error about a device named ``.
#[test]
fn empty_device_variable_means_the_default() {
    let img = fixture_dir().join("images/sq0.png");
    let out = Command::new(env!("CARGO_BIN_EXE_miadpo"))
        .env("MIADPO_DEVICE", "")
        .args([
            "generate",
            "--model",
            s(&model_dir()),
            "--image",
            s(&img),
            "--prompt",
            "<image>",
            "--max-new-tokens",
            "2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
/// `--device cuda` without a usable GPU fails with one line naming what is missing (never a panic).
fn device_cuda_without_a_gpu_fails_with_one_line() {
    let img = fixture_dir().join("images/sq0.png");
    let out = miadpo(&[
        "generate",
        "--model",
        s(&model_dir()),
        "--image",
        s(&img),
        "--prompt",
        "<image>",
        "--device",
        "cuda",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprintln!(
            "skipped: a GPU is present here and the command ran on it ({})",
            err.trim()
        );
        return;
    }
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("CUDA") && !err.contains("panicked"), "{err}");
}

#[test]
fn augment_writes_three_files_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("aug");
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/llava_mini.json");
    let root = fixture_dir();
    let args = [
        "augment",
        "--data",
        s(&data),
        "--image-root",
        s(&root),
        "--out",
        s(&out),
        "--seed",
        "4",
    ];
    let o = miadpo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("9 samples read, 8 used, 1 skipped") && err.contains("no image"),
        "{err}"
    );
    for kind in ["sequence", "grid", "pip"] {
        let recs: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(out.join(format!("{kind}.json"))).unwrap())
                .unwrap();
        assert_eq!(recs.len(), 8, "{kind}");
        assert!(err.contains(&format!("{kind:<9}       8 records")), "{err}");
    }
    // a second run into the same folder is refused, and --overwrite replaces
    let again = miadpo(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let mut args2 = args.to_vec();
    args2.push("--overwrite");
    assert!(miadpo(&args2).status.success());
}

/// `miadpo train` on the fixture model and images with a rank-4 LoRA, plus `extra` flags.
fn train_args(data: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let (model, imgs) = (model_dir(), fixture_dir().join("images"));
    let mut v: Vec<String> = [
        "train",
        "--model",
        s(&model),
        "--data",
        s(data),
        "--image-root",
        s(&imgs),
        "--out",
        s(out),
    ]
    .map(String::from)
    .to_vec();
    v.extend(["--lora-r", "4", "--lora-alpha", "8"].map(String::from));
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

#[test]
fn train_writes_metrics_and_a_peft_adapter_that_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), true);
    let out = tmp.path().join("run");
    let (model, imgs) = (model_dir(), fixture_dir().join("images"));
    let owned = train_args(
        &data,
        &out,
        &["--lr", "5e-3", "--steps", "3", "--batch-size", "3"],
    );
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let o = miadpo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("step ")).count(),
        3,
        "{stdout}"
    );
    let metrics: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 3);
    for key in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "step_time_s",
    ] {
        assert!(metrics[2].get(key).is_some(), "metric {key} missing");
    }
    // the adapter is a PEFT folder that generate/score load
    let adapter = out.join("adapter");
    let scored = miadpo(&[
        "score",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--data",
        s(&data),
        "--image-root",
        s(&imgs),
        "--json",
    ]);
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    // a second run into the same folder is refused
    assert!(!miadpo(&args).status.success());
}

/// 4 steps straight equal 2 steps + 2 resumed steps, bit for bit (adapter bytes and metrics).
#[test]
fn train_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), true);
    let (model, imgs) = (model_dir(), fixture_dir().join("images"));
    let run = |out: &std::path::Path, steps: &str, extra: &[&str]| {
        let mut fixed = vec![
            "--lr",
            "5e-3",
            "--steps",
            steps,
            "--batch-size",
            "2",
            "--schedule",
            "constant",
        ];
        // bco_pair carries a running mean and dropout draws masks: both must resume exactly
        fixed.extend_from_slice(&["--loss", "bco_pair", "--lora-dropout", "0.1"]);
        fixed.extend_from_slice(extra);
        let owned = train_args(&data, out, &fixed);
        let args: Vec<&str> = owned.iter().map(String::as_str).collect();
        let o = miadpo(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run(&a, "4", &[]);
    run(&b, "2", &[]);
    assert!(
        !miadpo(&[
            "train",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--image-root",
            s(&imgs),
            "--out",
            s(&b)
        ])
        .status
        .success(),
        "refused without --resume"
    );
    let owned = train_args(&data, &b, &["--steps", "4", "--loss", "bco_pair", "--resume"]);
    let o = miadpo(&owned.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "other settings are refused on resume");
    assert!(
        err.contains("--lr was 0.005, now 0.00005") && err.contains("--lora-dropout was 0.1, now 0"),
        "{err}"
    );
    assert!(
        !miadpo(&[
            "train",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--lora-dropout",
            "1"
        ])
        .status
        .success(),
        "--lora-dropout 1 is refused"
    );
    let err = run(&b, "4", &["--resume"]);
    assert!(err.contains("resuming from") && err.contains("step 2"), "{err}");
    assert!(err.contains("reference log-probs of 3 pairs read from"), "{err}");
    for f in [
        "adapter/adapter_model.safetensors",
        "checkpoint-4/optimizer.safetensors",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    // metrics equal but for the timings
    let strip = |p: std::path::PathBuf| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                v.as_object_mut()
                    .unwrap()
                    .retain(|k, _| k != "tokens_per_s" && k != "step_time_s");
                v
            })
            .collect()
    };
    let (ma, mb) = (strip(a.join("metrics.jsonl")), strip(b.join("metrics.jsonl")));
    assert_eq!(ma.len(), 4);
    assert_eq!(ma, mb);
}

/// The adapter bytes and the step metrics (timings dropped) of a finished run.
fn run_result(out: &Path) -> (Vec<u8>, Vec<Value>) {
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| k != "tokens_per_s" && k != "step_time_s");
            v
        })
        .collect();
    (
        std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
        metrics,
    )
}

/// Starts `miadpo train` and waits until it has printed `lines` step lines.
fn spawn_train_until(args: &[String], lines: usize) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_miadpo"))
        // the CPU, whose numbers the fixtures hold, also on a machine with a GPU
        .env("MIADPO_DEVICE", "cpu")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = 0;
    let mut line = String::new();
    while seen < lines {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "train ended before step {lines}"
        );
        seen += line.starts_with("step ") as usize;
    }
    // keep draining stdout so the child never blocks on a full pipe
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

const LONG_RUN: [&str; 8] = [
    "--lr",
    "5e-3",
    "--steps",
    "24",
    "--batch-size",
    "1",
    "--lora-dropout",
    "0.1",
];

/// SIGTERM mid-run: the step in progress is abandoned, a checkpoint written, exit 0 with a line
/// saying how to resume; resuming then ends exactly where an uninterrupted run ends.
#[test]
fn sigterm_checkpoints_and_resume_finishes_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), true);
    let (straight, stopped) = (tmp.path().join("straight"), tmp.path().join("stopped"));
    let o = miadpo(
        &train_args(&data, &straight, &LONG_RUN)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let args = train_args(&data, &stopped, &LONG_RUN);
    let child = spawn_train_until(&args, 3);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit 0 after SIGTERM: {:?} {err}", o.status);
    assert!(
        err.contains("interrupted after step") && err.contains("--resume"),
        "{err}"
    );
    assert!(
        !stopped.join("adapter").exists(),
        "an interrupted run writes no final adapter"
    );
    let ckpt = miadpo::train::checkpoint::latest(&stopped).expect("a checkpoint after SIGTERM");
    let step: usize = ckpt.file_name().unwrap().to_str().unwrap()["checkpoint-".len()..]
        .parse()
        .unwrap();
    assert!((3..24).contains(&step), "stopped at step {step}");

    let mut resume = args.clone();
    resume.push("--resume".into());
    let o = miadpo(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(run_result(&stopped), run_result(&straight));
}

/// SIGKILL (no chance to clean up) while checkpoints are being written every step, plus the
/// half-written folder a kill inside `checkpoint::save` leaves: resume takes the newest complete
/// checkpoint and still ends exactly where an uninterrupted run ends.
#[test]
fn a_kill_during_checkpointing_leaves_a_usable_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_pairs(tmp.path(), true);
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    let mut flags = LONG_RUN.to_vec();
    flags.extend(["--save-every", "1"]);
    let o = miadpo(
        &train_args(&data, &straight, &flags)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let args = train_args(&data, &killed, &flags);
    let mut child = spawn_train_until(&args, 4);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let newest = miadpo::train::checkpoint::latest(&killed).expect("checkpoints before the kill");
    let step: usize = newest.file_name().unwrap().to_str().unwrap()["checkpoint-".len()..]
        .parse()
        .unwrap();
    // what a kill between the first file and the rename leaves: a partial folder for the next step
    let partial = killed.join(format!(".checkpoint-{}.partial", step + 1));
    std::fs::create_dir_all(partial.join("adapter")).unwrap();
    std::fs::write(partial.join("adapter/adapter_config.json"), "{").unwrap();
    assert_eq!(miadpo::train::checkpoint::latest(&killed), Some(newest));

    let mut resume = args.clone();
    resume.push("--resume".into());
    let o = miadpo(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("step {step})")),
        "resumed from the newest complete checkpoint: {err}"
    );
    assert_eq!(run_result(&killed), run_result(&straight));
    assert!(
        !partial.exists(),
        "the next save of that step replaces the partial folder"
    );
}

/// Every kind of bad training pair is skipped and reported by id with its reason; the good pairs
/// train; data with no usable pair is an error naming the file.
#[test]
fn train_reports_bad_pairs_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let good = cases()["score"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["images"].as_array().unwrap().len() == 1)
        .expect("a one-image case")
        .clone();
    let pair = |id: &str, image: &str, chosen: &str, rejected: &str| {
        serde_json::json!({"id": id, "image": image, "prompt": good["prompt"], "chosen": chosen,
                           "rejected": rejected})
    };
    let img = good["images"][0].as_str().unwrap();
    let (c, r) = (
        good["chosen"].as_str().unwrap(),
        good["rejected"].as_str().unwrap(),
    );
    let long = "word ".repeat(400);
    let recs = [
        pair("ok", img, c, r),
        pair("empty-chosen", img, "  ", r),
        pair("empty-rejected", img, c, ""),
        pair("same", img, c, &format!(" {c} ")),
        pair("no-image", "missing/nowhere.png", c, r),
        pair("too-long", img, &long, r),
    ];
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        recs.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let args = train_args(&data, &out, &["--steps", "1", "--max-length", "300"]);
    let o = miadpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for (id, why) in [
        ("empty-chosen", "empty chosen or rejected answer"),
        ("empty-rejected", "empty chosen or rejected answer"),
        ("same", "chosen equals rejected"),
        ("no-image", "missing/nowhere.png"),
        ("too-long", "exceed --max-length 300"),
    ] {
        let line = err.lines().find(|l| l.starts_with(&format!("skipped `{id}`:")));
        assert!(
            line.is_some_and(|l| l.contains(why)),
            "`{id}` reported with `{why}`: {err}"
        );
    }
    assert!(err.contains("1 pairs (5 skipped)"), "{err}");

    let only_bad = tmp.path().join("only_bad.jsonl");
    std::fs::write(
        &only_bad,
        recs[1..]
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let args = train_args(
        &only_bad,
        &tmp.path().join("run2"),
        &["--steps", "1", "--max-length", "300"],
    );
    let o = miadpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("only_bad.jsonl: no usable pair"), "{err}");
}

/// `bench` (generate) with `--batch`: decode tok/s counts every sequence's tokens; 0 is refused.
#[test]
fn bench_generate_decodes_a_batch() {
    let out = ok_stdout(miadpo(&[
        "bench",
        "--preset",
        "tiny",
        "--prompt-tokens",
        "24",
        "--new-tokens",
        "3",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--batch",
        "3",
        "--json",
    ]));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["batch"].as_u64(), v["new_tokens"].as_u64()),
        (Some(3), Some(3))
    );
    assert!(v["decode_tok_s"]["median"].as_f64().unwrap() > 0.0);
    let o = miadpo(&["bench", "--preset", "tiny", "--batch", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--batch must be at least 1"));
}

/// `bench --task train` times DPO steps on a random model and reports them as one JSON line.
#[test]
fn bench_train_reports_dpo_step_times() {
    let o = miadpo(&[
        "bench",
        "--task",
        "train",
        "--preset",
        "tiny",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--lora-r",
        "8",
        "--json",
    ]);
    let v: Value = serde_json::from_str(ok_stdout(o).trim()).unwrap();
    let step = v["step_s"]["median"].as_f64().unwrap();
    assert!(step > 0.0 && (v["pairs_per_s"].as_f64().unwrap() - 1.0 / step).abs() < 1e-9 / step);
    assert_eq!(v["lora_r"], 8);
    assert_eq!(v["prefix_sharing"], true);
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 0.0);
}

/// `kernels list` names every kernel of every family; `kernels check` compiles them all through NVRTC
/// without spills where NVRTC is installed (.ci/run installs it), and otherwise fails with one line
/// saying how to install it — never a panic.
#[test]
fn kernels_list_and_check() {
    let list = ok_stdout(miadpo(&["kernels", "list"]));
    let names: Vec<&str> = list.lines().collect();
    for family in [
        "attention",
        "logprob",
        "dpo",
        "norm",
        "rope",
        "elementwise",
        "embed",
        "optim",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(&format!("{family}/"))),
            "{family}: {list}"
        );
    }
    let bad = miadpo(&["kernels", "check", "--arch", "sm_75"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected one of sm_80, sm_90a"));
    let o = miadpo(&["kernels", "check", "--arch", "sm_90a"]);
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.success() {
        let out = String::from_utf8_lossy(&o.stdout);
        for n in &names {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{n} ")))
                .unwrap_or_else(|| panic!("{n} missing: {out}"));
            assert!(line.ends_with("ok") && line.contains("spill=0"), "{line}");
        }
    } else {
        assert!(
            err.contains("NVRTC") && err.contains("not found") && !err.contains("panicked"),
            "{err}"
        );
        eprintln!(
            "skipped: NVRTC is not installed here, so the compile check did not run ({})",
            err.trim()
        );
    }
}

/// `bench --task ops` times the backend's ops and reports them against the run's own ceilings.
#[test]
fn bench_ops_reports_achieved_rates_against_ceilings() {
    let list = ok_stdout(miadpo(&["bench", "--list"]));
    assert!(list.lines().any(|l| l == "attention/causal") && list.lines().any(|l| l == "logprob/fused"));
    let out = ok_stdout(miadpo(&[
        "bench",
        "--task",
        "ops",
        "--filter",
        "rope",
        "--rows",
        "8",
        "--seq-len",
        "16",
        "--repeats",
        "1",
        "--json",
    ]));
    let rows: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["name"], "rope/rope");
    assert_eq!(rows[0]["bound"], "memory");
    let (a, c) = (
        rows[0]["achieved"].as_f64().unwrap(),
        rows[0]["ceiling"].as_f64().unwrap(),
    );
    assert!(a > 0.0 && c > 0.0 && (rows[0]["of_ceiling"].as_f64().unwrap() - a / c).abs() < 1e-9);
    assert!(
        !miadpo(&["bench", "--task", "ops", "--filter", "nothing-like-this"])
            .status
            .success()
    );
}

/// `world` builds the demo's data deterministically: training records, held-out single-image
/// questions, and the three multi-image kinds built from held-out scenes only.
#[test]
fn world_builds_the_same_data_for_a_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let build = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let o = miadpo(&[
            "world",
            "--out",
            s(&out),
            "--seed",
            seed,
            "--train-scenes",
            "12",
            "--eval-scenes",
            "6",
            "--image-size",
            "64",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (a, b, c) = (build("a", "3"), build("b", "3"), build("c", "4"));
    for f in [
        "train.json",
        "eval_single.json",
        "images/train_00007.png",
        "eval_multi/grid.json",
        "eval_multi/pip.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_ne!(
        std::fs::read(a.join("train.json")).unwrap(),
        std::fs::read(c.join("train.json")).unwrap()
    );
    let train: Vec<Value> = serde_json::from_slice(&std::fs::read(a.join("train.json")).unwrap()).unwrap();
    assert_eq!(train.len(), 12 * 5, "five questions per training scene");
    let seq: Vec<Value> =
        serde_json::from_slice(&std::fs::read(a.join("eval_multi/sequence.json")).unwrap()).unwrap();
    assert_eq!(seq.len(), 6);
    let single: Vec<Value> =
        serde_json::from_slice(&std::fs::read(a.join("eval_single.json")).unwrap()).unwrap();
    for (r, q) in seq.iter().zip(&single) {
        assert_eq!(
            r["task"], q["task"],
            "a multi-image question keeps its source's task: {r}"
        );
    }
    for r in &seq {
        for src in r["image"].as_array().unwrap() {
            assert!(
                src.as_str().unwrap().starts_with("images/eval_"),
                "held-out scenes only: {r}"
            );
        }
    }
    assert!(
        !miadpo(&["world", "--out", s(&a)]).status.success(),
        "an existing world is not overwritten"
    );
}

/// `init` writes a random llava-hf checkpoint that the runtime loads and runs; it never overwrites.
#[test]
fn init_writes_a_checkpoint_that_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let out = ok_stdout(miadpo(&[
        "init",
        "--out",
        s(&dir),
        "--preset",
        "tiny",
        "--seed",
        "5",
    ]));
    assert!(out.contains("random `tiny` LLaVA"), "{out}");
    let img = fixture_dir().join("images/sq0.png");
    let g = ok_stdout(miadpo(&[
        "generate",
        "--model",
        s(&dir),
        "--image",
        s(&img),
        "--prompt",
        "<image>\nWhat is it?",
        "--max-new-tokens",
        "3",
        "--json",
    ]));
    let v: Value = serde_json::from_str(g.trim()).unwrap();
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 3);
    assert!(
        !miadpo(&["init", "--out", s(&dir)]).status.success(),
        "an existing checkpoint is kept"
    );
    assert!(
        !miadpo(&["init", "--out", s(&tmp.path().join("x")), "--preset", "huge"])
            .status
            .success()
    );
}

/// `eval` prints a table (or one JSON object) of exact-match accuracy per file and task, and writes
/// every answer with `--predictions`.
#[test]
fn eval_reports_accuracy_per_file_and_task() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = fixture_dir().join("images");
    let q = |id: &str, img: &str, task: &str| {
        serde_json::json!({"id": id, "image": img, "task": task, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "Red."}]})
    };
    let a = tmp.path().join("single.json");
    let b = tmp.path().join("grid.json");
    std::fs::write(
        &a,
        serde_json::json!([q("a0", "sq0.png", "colour"), q("a1", "sq1.png", "count")]).to_string(),
    )
    .unwrap();
    std::fs::write(&b, serde_json::json!([q("b0", "sq2.png", "colour")]).to_string()).unwrap();
    let preds = tmp.path().join("preds.jsonl");
    let args = |json: bool| {
        let mut v = vec![
            "eval".to_string(),
            "--model".into(),
            s(&model_dir()).into(),
            "--data".into(),
            s(&a).into(),
            "--data".into(),
            s(&b).into(),
            "--image-root".into(),
            s(&imgs).into(),
            "--max-new-tokens".into(),
            "3".into(),
            "--batch-size".into(),
            "2".into(),
            "--predictions".into(),
            s(&preds).into(),
        ];
        if json {
            v.push("--json".into());
        }
        v
    };
    let run = |json: bool| {
        let a = args(json);
        ok_stdout(miadpo(&a.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let table = run(false);
    for word in ["single", "grid", "colour", "count", "all"] {
        assert!(table.contains(word), "{table}");
    }
    let v: Value = serde_json::from_str(run(true).trim()).unwrap();
    assert_eq!(v["overall"]["total"], 3);
    assert_eq!(v["sets"]["single"]["total"], 2);
    assert_eq!(v["tasks"]["single"]["count"]["total"], 1);
    let acc = v["overall"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let lines: Vec<Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["id"], "b0");
    assert_eq!(lines[2]["set"], "grid");
    assert_eq!(lines[0]["gold"], "Red.");
    assert!(lines[0]["answer"].is_string() && lines[0]["correct"].is_boolean());
    // a missing file is named
    let o = miadpo(&[
        "eval",
        "--model",
        s(&model_dir()),
        "--data",
        s(&tmp.path().join("nope.json")),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.json"));
}
