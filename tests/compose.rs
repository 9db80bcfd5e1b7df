//! Grid collage and pic-in-pic composition through the public API, on the fixture images, plus two
//! `#[ignore]`d helpers:
//!
//! - `matches_pillow` checks miadpo against Pillow's own output (the original MIA-DPO code composes
//!   with Pillow): `scripts/compare_pil.py --dump DIR` writes the inputs and Pillow's collages,
//!   pic-in-pic and plain resizes, then `MIADPO_PIL_DIR=DIR cargo test --release --test compose --
//!   --ignored matches_pillow` compares them. Resizes, cells and pic-in-pic must be identical; labels
//!   are rasterised by FreeType in Pillow and by ab_glyph here, so they are only compared for placement.
//! - `write_docs_examples` writes the README pictures `docs/grid_example.png` and
//!   `docs/pip_example.png` (`cargo test --release --test compose -- --ignored write_docs_examples`).
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use miadpo::augment::compose::{
    cell_origin, compose_grid, compose_pip, fit_in, grid_canvas_size, grid_shape, pip_box, CELL, LABEL_BAND,
};
use miadpo::vision::resample::{resize_rgb, Filter};

fn fixture(name: &str) -> RgbImage {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-llava/images")
        .join(name);
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn is_white(p: &Rgb<u8>) -> bool {
    p.0 == [255, 255, 255]
}

#[test]
fn grid_of_fixture_images() {
    // Square, wide and tall images smaller than a cell: each is enlarged to fit 448×448.
    let imgs = [
        fixture("sq0.png"),
        fixture("wide.png"),
        fixture("tall.png"),
        fixture("sq1.png"),
    ];
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let grid = compose_grid(&refs).expect("4 images make a 2×2 grid");
    assert_eq!(grid.dimensions(), (936, 976));
    let (rows, cols) = grid_shape(4).unwrap();
    for (k, img) in imgs.iter().enumerate() {
        let (x, y) = cell_origin(k, rows, cols);
        let (w, h) = fit_in(img.width(), img.height(), CELL);
        assert_eq!(w.max(h), CELL);
        let cell = resize_rgb(img, w, h, Filter::Lanczos);
        assert!(
            cell.enumerate_pixels()
                .all(|(cx, cy, p)| grid.get_pixel(x + cx, y + cy) == p),
            "cell {k}"
        );
        // The label band holds ink, and the part of the cell the image does not cover is white.
        assert!((y - LABEL_BAND..y).any(|py| (x + 20..x + 170).any(|px| !is_white(grid.get_pixel(px, py)))));
        assert!(is_white(grid.get_pixel(x + CELL - 1, y + CELL - 1)) || (w, h) == (CELL, CELL));
    }
}

#[test]
fn pip_of_fixture_images() {
    let bg = fixture("wide.png");
    let fg = fixture("tall.png");
    let out = compose_pip(&bg, &fg);
    assert_eq!(out.dimensions(), bg.dimensions());
    let (x, y, w, h) = pip_box(119, 59, 51, 84);
    // 0.7 of the background's height (59 -> 41.3), aspect kept, centred.
    assert_eq!((x, y, w, h), (47, 9, 25, 41));
    let small = resize_rgb(&fg, w, h, Filter::Lanczos);
    for (px, py, p) in out.enumerate_pixels() {
        let inside = (x..x + w).contains(&px) && (y..y + h).contains(&py);
        assert_eq!(
            p,
            if inside {
                small.get_pixel(px - x, py - y)
            } else {
                bg.get_pixel(px, py)
            }
        );
    }
}

#[test]
fn unsupported_grid_size_is_an_error() {
    let img = fixture("sq0.png");
    let err = compose_grid(&[&img; 5]).expect_err("5 images make no grid");
    assert!(err.to_string().contains('5'), "{err}");
}

/// The Rust bench's synthetic image (benches/augment.rs), to check that the Pillow script builds the
/// same inputs.
fn synthetic(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let mut s = x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ seed.wrapping_mul(83_492_791);
        s ^= s >> 13;
        s = s.wrapping_mul(0x5bd1_e995);
        s ^= s >> 15;
        let n = s & 31;
        let r = (x * 255 / w.max(1) + n + seed * 40) % 256;
        let g = (y * 255 / h.max(1) + n) % 256;
        let b = ((x + y) * 128 / (w + h).max(1) + seed * 17 + n) % 256;
        Rgb([r as u8, g as u8, b as u8])
    })
}

fn load(dir: &Path, name: &str) -> RgbImage {
    let path = dir.join(name);
    image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

#[test]
#[ignore = "needs MIADPO_PIL_DIR from `scripts/compare_pil.py --dump DIR`"]
fn matches_pillow() {
    let dir = PathBuf::from(std::env::var("MIADPO_PIL_DIR").expect("set MIADPO_PIL_DIR"));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json"))
            .expect("manifest.json is JSON");
    let n_sources = manifest["n_sources"].as_u64().expect("n_sources") as usize;
    let sources: Vec<RgbImage> = (0..n_sources)
        .map(|i| load(&dir, &format!("src{i}.png")))
        .collect();
    for (i, s) in sources.iter().enumerate() {
        assert!(
            *s == synthetic(s.width(), s.height(), i as u32),
            "src{i}: script and bench inputs differ"
        );
    }

    for case in manifest["resizes"].as_array().expect("resizes") {
        let src = &sources[case["src"].as_u64().unwrap() as usize];
        let (w, h) = (
            case["width"].as_u64().unwrap() as u32,
            case["height"].as_u64().unwrap() as u32,
        );
        let filter = match case["filter"].as_str().unwrap() {
            "lanczos" => Filter::Lanczos,
            "bicubic" => Filter::Bicubic,
            "bilinear" => Filter::Bilinear,
            f => panic!("unknown filter {f}"),
        };
        let file = case["file"].as_str().unwrap();
        assert!(resize_rgb(src, w, h, filter) == load(&dir, file), "{file}");
        println!("{file}: identical");
    }

    let pip = compose_pip(&load(&dir, "bg.png"), &load(&dir, "fg.png"));
    assert!(pip == load(&dir, "pip.png"), "pip differs from Pillow");
    println!("pip.png: identical");

    for n in manifest["grids"]
        .as_array()
        .expect("grids")
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
    {
        let refs: Vec<&RgbImage> = sources.iter().take(n).collect();
        let ours = compose_grid(&refs).unwrap();
        let theirs = load(&dir, &format!("grid_n{n}.png"));
        // Kept beside Pillow's for a look at the labels.
        ours.save(dir.join(format!("miadpo_grid_n{n}.png"))).unwrap();
        let (rows, cols) = grid_shape(n).unwrap();
        assert_eq!(ours.dimensions(), grid_canvas_size(rows, cols));
        assert_eq!(ours.dimensions(), theirs.dimensions(), "grid n={n}: canvas size");
        // Everything outside the label bands must be identical: cells, gaps, white space.
        let band = |py: u32| {
            (0..rows).any(|r| (r * (CELL + LABEL_BAND)..r * (CELL + LABEL_BAND) + LABEL_BAND).contains(&py))
        };
        let (mut label_diff, mut max_diff, mut ink_ours, mut ink_theirs) = (0usize, 0u8, 0usize, 0usize);
        let (mut top_ours, mut top_theirs) = (u32::MAX, u32::MAX);
        for ((px, py, a), b) in ours.enumerate_pixels().zip(theirs.pixels()) {
            if !band(py) {
                assert_eq!(a, b, "grid n={n} at ({px},{py})");
                continue;
            }
            let dark = |p: &Rgb<u8>| p.0.iter().all(|&c| c < 128);
            ink_ours += usize::from(dark(a));
            ink_theirs += usize::from(dark(b));
            if dark(a) {
                top_ours = top_ours.min(py % (CELL + LABEL_BAND));
            }
            if dark(b) {
                top_theirs = top_theirs.min(py % (CELL + LABEL_BAND));
            }
            if a != b {
                label_diff += 1;
                max_diff = max_diff.max(a.0.iter().zip(b.0).map(|(x, y)| x.abs_diff(y)).max().unwrap_or(0));
            }
        }
        println!(
            "grid_n{n}.png: cells and gaps identical; label bands: {label_diff} pixels differ (max {max_diff}), \
             dark pixels {ink_ours} (miadpo) vs {ink_theirs} (Pillow), ink top row {top_ours} vs {top_theirs}"
        );
        // Same glyphs at the same place, rasterised by two libraries: similar ink, same rows.
        let ratio = ink_ours as f64 / ink_theirs.max(1) as f64;
        assert!(
            (0.85..1.15).contains(&ratio),
            "grid n={n}: label ink ratio {ratio}"
        );
        assert!(
            top_ours.abs_diff(top_theirs) <= 1,
            "grid n={n}: label rows {top_ours} vs {top_theirs}"
        );
    }
}

/// Writes the README pictures from the fixture images:
/// - `docs/grid_example.png`: `compose_grid` of sq3, wide, tall and sq1 (a 2×2 collage, 936×976),
///   shrunk to half size with Pillow-Lanczos so that the file stays small;
/// - `docs/pip_example.png`: `compose_pip` with wide.png (first enlarged to fit 448 px, since at
///   119×59 the picture would be too small to see) as background and sq2 as foreground.
#[test]
#[ignore = "writes docs/*.png; run by hand when the composition changes"]
fn write_docs_examples() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let imgs = [
        fixture("sq3.png"),
        fixture("wide.png"),
        fixture("tall.png"),
        fixture("sq1.png"),
    ];
    let refs: Vec<&RgbImage> = imgs.iter().collect();
    let grid = compose_grid(&refs).unwrap();
    let grid = resize_rgb(&grid, grid.width() / 2, grid.height() / 2, Filter::Lanczos);
    grid.save(docs.join("grid_example.png")).unwrap();

    let wide = fixture("wide.png");
    let (w, h) = fit_in(wide.width(), wide.height(), CELL);
    let bg = resize_rgb(&wide, w, h, Filter::Lanczos);
    compose_pip(&bg, &fixture("sq2.png"))
        .save(docs.join("pip_example.png"))
        .unwrap();
    for name in ["grid_example.png", "pip_example.png"] {
        let len = std::fs::metadata(docs.join(name)).unwrap().len();
        println!("docs/{name}: {len} bytes");
        assert!(len < 300_000, "{name} is {len} bytes");
    }
}
