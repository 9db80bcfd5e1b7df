//! Collage composition throughput (MIA-DPO's grid and pic-in-pic augmentations).
//!
//! Inputs are deterministic synthetic images at the sizes COCO images commonly have (640×480,
//! 500×375, 427×640), built in memory so that the numbers measure composition only, not decoding.
//! `scripts/compare_pil.py` times the same compositing with Pillow on the same sizes; run it with
//! `--miadpo-json` on the output of this bench to print both side by side.
//!
//! The cells of a grid are resized in parallel (rayon), so by default a collage uses every core;
//! run with `RAYON_NUM_THREADS=1` for the single-thread figure to set against Pillow, whose resize
//! runs on one thread.
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use image::{Rgb, RgbImage};
use miadpo::augment::compose::{compose_grid, compose_pip};
use miadpo::augment::run::encode_jpeg;

/// Smooth gradients plus a little hash noise: compresses like a photo rather than like pure noise,
/// which matters for the JPEG case, and exercises every resampling tap.
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

/// Nine images, mostly 640×480 (COCO's most common size) with some 500×375 and 427×640.
fn inputs() -> Vec<RgbImage> {
    let sizes = [
        (640, 480),
        (500, 375),
        (427, 640),
        (640, 480),
        (640, 480),
        (500, 375),
        (640, 480),
        (427, 640),
        (640, 480),
    ];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &(w, h))| synthetic(w, h, i as u32))
        .collect()
}

fn bench_compose(c: &mut Criterion) {
    let images = inputs();
    let mut group = c.benchmark_group("augment");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1)); // one collage per iteration

    for n in [2usize, 4, 9] {
        let refs: Vec<&RgbImage> = images.iter().take(n).collect();
        group.bench_function(format!("grid_n{n}"), |b| {
            b.iter(|| compose_grid(black_box(&refs)).expect("supported count"))
        });
    }

    let background = synthetic(640, 480, 11);
    let foreground = synthetic(500, 375, 12);
    group.bench_function("pip_640x480_500x375", |b| {
        b.iter(|| compose_pip(black_box(&background), black_box(&foreground)))
    });

    // What the augment stage does with a collage next: encode it (quality 95, its default).
    let refs: Vec<&RgbImage> = images.iter().take(4).collect();
    group.bench_function("grid_n4_jpeg_q95", |b| {
        b.iter(|| {
            let grid = compose_grid(black_box(&refs)).expect("supported count");
            encode_jpeg(&grid, 95).expect("in-memory encode")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_compose);
criterion_main!(benches);
