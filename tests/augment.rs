//! The augment stage end to end on a small synthetic LLaVA data set.
use std::path::{Path, PathBuf};

use miadpo::augment::llava_json::{Mia, Record};
use miadpo::augment::{run, AugmentOptions, Companions, Kind};
use serde_json::{json, Value};

/// A data set: 6 coco and 4 gqa images of different sizes and formats, samples with the placeholder
/// first and last, multi-turn, and samples to skip (no image, several images).
fn dataset(root: &Path) -> PathBuf {
    for (i, (w, h)) in [(64, 48), (50, 70), (80, 80), (33, 61), (90, 40), (45, 45)]
        .iter()
        .enumerate()
    {
        let img = image::RgbImage::from_fn(*w, *h, |x, y| {
            image::Rgb([(x * 7 + i as u32 * 40) as u8, (y * 5) as u8, 90])
        });
        let dir = root.join("coco/train2017");
        std::fs::create_dir_all(&dir).unwrap();
        img.save(dir.join(format!("{i}.jpg"))).unwrap();
    }
    for i in 0..4u32 {
        let img = image::RgbImage::from_fn(40 + i * 10, 30, |x, y| {
            image::Rgb([x as u8, (y * 3) as u8, (i * 60) as u8])
        });
        let dir = root.join("gqa/images");
        std::fs::create_dir_all(&dir).unwrap();
        img.save(dir.join(format!("{i}.png"))).unwrap();
    }
    let mut samples = Vec::new();
    for i in 0..6 {
        samples.push(json!({"id": format!("c{i}"), "image": format!("coco/train2017/{i}.jpg"), "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": format!("Answer {i}.")},
            {"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "No."}]}));
    }
    for i in 0..4 {
        samples.push(json!({"id": format!("g{i}"), "image": [format!("gqa/images/{i}.png")], "conversations": [
            {"from": "human", "value": "Describe the colours.\n<image>"}, {"from": "gpt", "value": "Red and blue."}]}));
    }
    samples.push(json!({"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}));
    samples.push(
        json!({"id": "two", "image": ["coco/train2017/0.jpg", "coco/train2017/1.jpg"], "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}),
    );
    let p = root.join("llava.json");
    std::fs::write(&p, serde_json::to_string_pretty(&samples).unwrap()).unwrap();
    p
}

fn options(root: &Path, data: &Path, out: &str, seed: u64) -> AugmentOptions {
    AugmentOptions {
        data: data.to_path_buf(),
        image_roots: vec![root.to_path_buf()],
        out: root.join(out),
        kinds: Kind::ALL.to_vec(),
        per_kind: None,
        seed,
        companions: Companions::Same,
        jpeg_quality: 95,
        skip_bad: false,
        overwrite: false,
    }
}

fn records(out: &Path, kind: &str) -> Vec<Record> {
    serde_json::from_str(&std::fs::read_to_string(out.join(format!("{kind}.json"))).unwrap()).unwrap()
}

fn no_progress(_: u64, _: u64) {}

#[test]
fn every_kind_follows_the_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let o = options(root, &data, "out", 3);
    let summary = run(&o, &no_progress).unwrap();
    assert_eq!(summary.samples_read, 12);
    assert_eq!(summary.samples_used, 10);
    let reasons: Vec<String> = summary.skipped.iter().map(|s| s.reason.clone()).collect();
    assert!(
        reasons.contains(&"no image".to_string()) && reasons.contains(&"multi-image sample".to_string()),
        "{reasons:?}"
    );
    let src: Value = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    let source_of = |id: &str| {
        src.as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()
            .clone()
    };

    let seq = records(&o.out, "sequence");
    assert_eq!(seq.len(), 10);
    for r in &seq {
        let Mia::Sequence {
            target,
            n_images,
            source_id,
        } = &r.mia
        else {
            panic!("not a sequence record")
        };
        let s = source_of(source_id);
        let imgs: Vec<&str> = r
            .image
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(imgs.len(), *n_images);
        assert!((2..=5).contains(n_images) && (1..=*n_images).contains(target));
        let src_img = s["image"].as_str().or(s["image"][0].as_str()).unwrap();
        assert_eq!(
            imgs[target - 1],
            src_img,
            "the source stands at the target position"
        );
        let distinct: std::collections::HashSet<_> = imgs.iter().collect();
        assert_eq!(distinct.len(), imgs.len(), "distinct images");
        let ds = src_img.split('/').next().unwrap();
        // coco has 6 images, enough for any sequence; gqa's 4 are not, and a 5-image gqa sequence falls back
        if ds == "coco" || imgs.len() <= 4 {
            assert!(
                imgs.iter().all(|p| p.starts_with(ds)),
                "companions from the same dataset: {imgs:?}"
            );
        }
        let header: String = (1..=*n_images).map(|i| format!("Image{i}:<image>\n")).collect();
        let q = if ds == "coco" {
            "what is in the picture?"
        } else {
            "describe the colours."
        };
        assert_eq!(r.conversations[0].value, format!("{header}In Image{target}, {q}"));
        if ds == "coco" {
            assert_eq!(
                r.conversations[2].value,
                format!("In Image{target}, is it large?")
            );
        }
        for (t, orig) in r.conversations.iter().zip(s["conversations"].as_array().unwrap()) {
            if t.from == "gpt" {
                assert_eq!(
                    t.value,
                    orig["value"].as_str().unwrap(),
                    "answers are never changed"
                );
            }
        }
    }

    let grid = records(&o.out, "grid");
    assert_eq!(grid.len(), 10);
    for r in &grid {
        let Mia::Grid {
            target,
            n_images,
            rows,
            cols,
            sources,
            source_id,
        } = &r.mia
        else {
            panic!()
        };
        let s = source_of(source_id);
        assert_eq!((*rows * *cols) as usize, *n_images);
        assert_eq!(
            sources[target - 1],
            s["image"].as_str().or(s["image"][0].as_str()).unwrap()
        );
        let path = o.out.join(r.image.as_str().unwrap());
        assert!(r.image.as_str().unwrap().starts_with("images/"));
        let (w, h) = image::image_dimensions(&path).unwrap();
        assert_eq!(
            (w, h),
            (448 * cols + 40 * (cols - 1), 448 * rows + 40 * rows),
            "canvas of {rows}x{cols}"
        );
        assert!(r.conversations[0]
            .value
            .starts_with(&format!("<image>\nIn Image{target}, ")));
    }
    assert!(
        summary.companion_fallbacks > 0,
        "gqa's 4 images cannot fill every grid: some records fall back"
    );

    let pip = records(&o.out, "pip");
    assert_eq!(pip.len(), 10);
    let phrases = miadpo::augment::run::pip_phrases();
    assert_eq!(phrases.len(), 93);
    for r in &pip {
        let Mia::Pip {
            background,
            foreground,
            ..
        } = &r.mia
        else {
            panic!()
        };
        assert_ne!(background, foreground);
        let (bw, bh) = image::image_dimensions(o.out.join(r.image.as_str().unwrap())).unwrap();
        assert_eq!(
            (bw, bh),
            image::image_dimensions(root.join(background)).unwrap(),
            "pip keeps the background size"
        );
        let q = &r.conversations[0].value;
        let phrase = phrases
            .iter()
            .find(|p| q.starts_with(&format!("<image>\n{p}, ")))
            .expect("a listed phrase");
        if let Some(t) = r.conversations.get(2) {
            assert!(
                t.value.starts_with(&format!("{phrase}, ")),
                "later turns repeat the phrase"
            );
        }
    }
    let leftovers: Vec<_> = walk(&o.out)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    walk(dir)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_seed_is_byte_identical_across_thread_counts_and_another_seed_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    one.install(|| run(&options(root, &data, "a", 11), &no_progress))
        .unwrap();
    two.install(|| run(&options(root, &data, "b", 11), &no_progress))
        .unwrap();
    run(&options(root, &data, "c", 12), &no_progress).unwrap();
    let (a, b, c) = (
        snapshot(&root.join("a")),
        snapshot(&root.join("b")),
        snapshot(&root.join("c")),
    );
    assert!(!a.is_empty());
    assert!(a == b, "seed 11 on 1 and 2 threads differ");
    assert!(a != c, "seed 12 gives the same output as seed 11");
}

#[test]
fn kinds_and_per_kind_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let mut o = options(root, &data, "out", 0);
    o.kinds = vec![Kind::Sequence, Kind::Pip];
    o.per_kind = Some(3);
    let s = run(&o, &no_progress).unwrap();
    assert_eq!(s.records.get(&Kind::Sequence), Some(&3));
    assert_eq!(s.records.get(&Kind::Pip), Some(&3));
    assert!(!o.out.join("grid.json").exists());
    let ids: Vec<String> = records(&o.out, "sequence").into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["c0_sequence", "c1_sequence", "c2_sequence"]);
}

#[test]
fn companions_any_draws_across_datasets() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let mut o = options(root, &data, "out", 5);
    o.companions = Companions::Any;
    o.kinds = vec![Kind::Sequence];
    run(&o, &no_progress).unwrap();
    let mixed = records(&o.out, "sequence").iter().any(|r| {
        let imgs: Vec<&str> = r
            .image
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        imgs.iter().any(|p| p.starts_with("coco")) && imgs.iter().any(|p| p.starts_with("gqa"))
    });
    assert!(mixed, "with --companions any some sequence mixes datasets");
}

// ---- bad input

#[test]
fn invalid_json_names_line_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.json");
    std::fs::write(&p, "[\n  {\"id\": \"a\",\n   \"image\": }\n]").unwrap();
    let e = run(&options(tmp.path(), &p, "out", 0), &no_progress)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.json") && e.contains("line 3") && e.contains("column"),
        "{e}"
    );
}

#[test]
fn missing_image_names_sample_and_path_or_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    std::fs::remove_file(root.join("coco/train2017/4.jpg")).unwrap();
    let e = run(&options(root, &data, "out", 0), &no_progress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`c4`") && e.contains("coco/train2017/4.jpg"), "{e}");
    let mut o = options(root, &data, "out2", 0);
    o.skip_bad = true;
    let s = run(&o, &no_progress).unwrap();
    assert_eq!(s.samples_used, 9);
    let listed = std::fs::read_to_string(o.out.join("skipped.jsonl")).unwrap();
    let line = listed.lines().find(|l| l.contains("\"c4\"")).expect("c4 listed");
    assert!(line.contains("missing image"), "{line}");
}

#[test]
fn undecodable_image_names_sample_and_path() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    std::fs::write(root.join("gqa/images/2.png"), "not a png").unwrap();
    let e = run(&options(root, &data, "out", 0), &no_progress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`g2`") && e.contains("gqa/images/2.png"), "{e}");
}

#[test]
fn output_folder_with_results_is_refused_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let mut o = options(root, &data, "out", 0);
    run(&o, &no_progress).unwrap();
    let e = run(&o, &no_progress).unwrap_err().to_string();
    assert!(
        e.contains("already holds results") && e.contains("--overwrite"),
        "{e}"
    );
    o.overwrite = true;
    run(&o, &no_progress).unwrap();
}

#[test]
fn too_few_images_for_a_grid_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    // keep 3 samples (3 distinct images): any grid of 4 or more cells is impossible
    let all: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    std::fs::write(&data, serde_json::to_string(&all[..3]).unwrap()).unwrap();
    let mut o = options(root, &data, "out", 0);
    o.kinds = vec![Kind::Grid];
    let err = (0..50u64)
        .find_map(|seed| {
            o.seed = seed;
            o.overwrite = true;
            run(&o, &no_progress).err()
        })
        .expect("some seed draws a grid larger than the input")
        .to_string();
    assert!(
        err.contains("grid record needs") && err.contains("only 2 other distinct image"),
        "{err}"
    );
}
