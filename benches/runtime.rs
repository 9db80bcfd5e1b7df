//! Prefill and decode throughput of the CPU backend on a random "small" LLaVA (CLIP-B/14 at 224 px,
//! 12-layer decoder of width 1024, vocab 32064) written to a temporary folder at bench time.
//! `cargo bench --bench runtime`; the HF side-by-side is scripts/compare_hf_cpu.py (see README).
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use miadpo::backend::cpu::CpuBackend;
use miadpo::backend::Backend;
use miadpo::bench::{bench_prompt, greedy_steps};
use miadpo::model::llava::Llava;
use miadpo::model::random::{write_random_checkpoint, RandomSpec};

const PROMPT_TOKENS: usize = 320;
const DECODE_STEPS: usize = 16;

fn runtime(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llava/model/tokenizer.json");
    write_random_checkpoint(dir.path(), &RandomSpec::small(), 0, &tok).expect("write random model");
    let m = Llava::load(dir.path(), CpuBackend::new()).expect("load random model");
    let prompt = bench_prompt(&m, PROMPT_TOKENS).unwrap();
    let s = m.cfg.vision.image_size;
    let pixels: Vec<f32> = (0..3 * s * s)
        .map(|i| ((i * 7919) % 255) as f32 / 127.0 - 1.0)
        .collect();
    let t = prompt.ids.len();
    // prefill: vision tower + projector + decoder over the prompt + last-row logits
    let prefill = || {
        let feats = m.image_features(std::slice::from_ref(&pixels));
        let (cache, logits) = m.prefill(&prompt.ids, &feats, false).unwrap();
        (cache, m.be.greedy_rows(&logits, 1, m.cfg.text.vocab_size)[0].0)
    };

    let mut g = c.benchmark_group("small-llava");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(t as u64));
    g.bench_function("prefill_320_tokens", |b| b.iter(&prefill));
    g.throughput(Throughput::Elements(DECODE_STEPS as u64));
    g.bench_function("decode_16_tokens_after_320", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut cache, first) = prefill(); // untimed
                let t0 = Instant::now();
                greedy_steps(&m, &mut cache, first, DECODE_STEPS);
                total += t0.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, runtime);
criterion_main!(benches);
