//! `miadpo::plot::plot_metrics`: a metrics.jsonl like `miadpo train` writes becomes a PNG with a
//! grid of panels and rendered text; bad input is one error naming the file (and line).
use std::collections::HashSet;
use std::path::Path;

use miadpo::plot::{plot_metrics, GRID, HEIGHT, TITLE_HEIGHT, WIDTH};

/// 20 steps with changing values; step 7's update was skipped, its values are null (as serde_json
/// writes NaN); lines carry a key the plot does not know.
fn synthetic_metrics() -> String {
    let mut out = String::new();
    for step in 1..=20u32 {
        let s = step as f64;
        let line = if step == 7 {
            format!(
                r#"{{"step":{step},"loss":null,"rewards/chosen":null,"rewards/rejected":null,"rewards/accuracies":null,"rewards/margins":null,"logps/chosen":null,"logps/rejected":null,"lr":5e-6,"grad_norm":null,"tokens_per_s":800.0,"step_time_s":0.9,"skipped":true}}"#
            )
        } else {
            let rc = 0.02 * s + 0.01 * (s * 1.3).sin();
            let rr = -0.03 * s + 0.01 * (s * 0.7).cos();
            let lr = 5e-6 * (s / 5.0).min(1.0);
            format!(
                r#"{{"step":{step},"loss":{},"rewards/chosen":{rc},"rewards/rejected":{rr},"rewards/accuracies":{},"rewards/margins":{},"logps/chosen":{},"logps/rejected":{},"lr":{lr},"grad_norm":{},"tokens_per_s":812.0,"step_time_s":0.9,"future/key":[1,2]}}"#,
                std::f64::consts::LN_2 * (-0.04 * s).exp() + 0.02 * (s * 2.1).sin(),
                ((step % 4) as f64) / 4.0,
                rc - rr,
                -80.0 + 0.5 * s,
                -95.0 - 0.8 * s,
                0.3 + 0.1 * (s * 0.9).sin().abs(),
            )
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A pixel of a curve: saturated, unlike the background, the black text and the grey grid.
fn coloured(p: &image::Rgb<u8>) -> bool {
    let [r, g, b] = p.0;
    r.max(g).max(b) - r.min(g).min(b) > 60
}

#[test]
fn plot_draws_every_panel_with_text() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = write(dir.path(), "metrics.jsonl", &synthetic_metrics());
    let png = dir.path().join("metrics.png");
    let summary = plot_metrics(&metrics, &png, "runs/demo").unwrap();
    assert_eq!(summary.steps, 20);
    assert_eq!(summary.skipped, 1);
    assert_eq!(summary.panels, GRID.0 * GRID.1);

    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
    let colours: HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(colours.len() > 50, "only {} colours", colours.len());

    // the title band holds rendered (anti-aliased) text
    let title_ink = (0..WIDTH)
        .flat_map(|x| (0..TITLE_HEIGHT).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0 != [255, 255, 255])
        .count();
    assert!(title_ink > 100, "title: {title_ink} non-white pixels");

    // every panel of the grid (the loss panel is the top-left one) has a coloured curve
    let (rows, cols) = (GRID.0 as u32, GRID.1 as u32);
    let (pw, ph) = (WIDTH / cols, (HEIGHT - TITLE_HEIGHT) / rows);
    for row in 0..rows {
        for col in 0..cols {
            let (x0, y0) = (col * pw, TITLE_HEIGHT + row * ph);
            let mut curve = 0;
            let mut ink = 0;
            for y in y0..y0 + ph {
                for x in x0..x0 + pw {
                    let p = img.get_pixel(x, y);
                    curve += coloured(p) as usize;
                    ink += (p.0 != [255, 255, 255]) as usize;
                }
            }
            assert!(curve > 100, "panel ({row}, {col}): {curve} curve pixels");
            assert!(ink > 2000, "panel ({row}, {col}): {ink} non-background pixels");
        }
    }
}

#[test]
fn plot_of_steps_without_values_draws_empty_panels() {
    let dir = tempfile::tempdir().unwrap();
    let text = "{\"step\":1,\"loss\":null,\"skipped\":true}\n\n{\"step\":2,\"loss\":null,\"skipped\":true}\n";
    let metrics = write(dir.path(), "metrics.jsonl", text);
    let png = dir.path().join("out.png");
    let summary = plot_metrics(&metrics, &png, "all skipped").unwrap();
    assert_eq!((summary.steps, summary.skipped), (2, 2));
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
}

#[test]
fn plot_missing_metrics_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("nowhere").join("metrics.jsonl");
    let err = plot_metrics(&metrics, &dir.path().join("m.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains(&metrics.display().to_string()), "{err}");
    assert!(!dir.path().join("m.png").exists());
}

#[test]
fn plot_empty_metrics_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = write(dir.path(), "metrics.jsonl", "\n  \n");
    let err = plot_metrics(&metrics, &dir.path().join("m.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains(&metrics.display().to_string()), "{err}");
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn plot_malformed_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = synthetic_metrics();
    let mut lines: Vec<&str> = good.lines().collect();
    lines[4] = "{\"step\":5,\"loss\":0.5"; // cut off
    let metrics = write(dir.path(), "metrics.jsonl", &lines.join("\n"));
    let err = plot_metrics(&metrics, &dir.path().join("m.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains(&metrics.display().to_string()), "{err}");
    assert!(err.contains("line 5"), "{err}");

    // a value of the wrong type and a line without a step name their line too
    lines[4] = "{\"step\":5,\"loss\":\"low\"}";
    let metrics = write(dir.path(), "metrics.jsonl", &lines.join("\n"));
    let err = plot_metrics(&metrics, &dir.path().join("m.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 5") && err.contains("`loss`"), "{err}");
    lines[4] = "{\"loss\":0.5}";
    let metrics = write(dir.path(), "metrics.jsonl", &lines.join("\n"));
    let err = plot_metrics(&metrics, &dir.path().join("m.png"), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 5") && err.contains("`step`"), "{err}");
}
