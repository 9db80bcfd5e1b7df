//! Prefill and decode throughput of a checkpoint, with the protocol of scripts/compare_hf_cpu.py so
//! the two runtimes are timed on the same work: one image + filler text of `prompt_tokens` tokens, a
//! full forward (vision tower, projector, decoder, last-row logits), then `new_tokens` greedy steps
//! with the KV cache.
use std::time::Instant;

use crate::backend::Backend;
use crate::model::llama::KvCache;
use crate::model::llava::Llava;
use crate::model::random::Rng;
use crate::text::tokenizer::image_spans;
use crate::text::tokenizer::PromptIds;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub repeats: usize,
    pub warmup: usize,
    /// sequences decoded together after the prefill (copies of its cache, packed steps)
    pub batch: usize,
}

/// min / median / max of one figure over the repeats.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Stats {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub prefill_tok_s: Stats,
    /// every sequence's tokens per second
    pub decode_tok_s: Stats,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub batch: usize,
    pub repeats: usize,
    pub threads: usize,
}

/// The benchmark prompt: `[1] + [image]·image_seq_length + [100 + (i·7919) mod 31000 ...]`.
pub fn bench_prompt<B: Backend>(m: &Llava<B>, prompt_tokens: usize) -> Result<PromptIds> {
    let n_img = m.cfg.image_seq_length;
    if prompt_tokens < n_img + 2 {
        return Err(Error::Invalid(format!(
            "--prompt-tokens {prompt_tokens} is too small: the image alone takes {n_img} tokens plus BOS"
        )));
    }
    let mut ids = vec![m.cfg.text.bos_token_id];
    ids.extend(std::iter::repeat_n(m.cfg.image_token_id, n_img));
    ids.extend((0..prompt_tokens - 1 - n_img).map(|i| 100 + ((i * 7919) % 31000) as u32));
    let image_spans = image_spans(&ids, m.cfg.image_token_id, n_img);
    Ok(PromptIds { ids, image_spans })
}

pub fn run<B: Backend>(
    m: &Llava<B>,
    o: &BenchOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<BenchResult> {
    if o.repeats == 0 || o.batch == 0 {
        return Err(Error::Invalid("--repeats and --batch must be at least 1".into()));
    }
    let prompt = bench_prompt(m, o.prompt_tokens)?;
    let s = m.cfg.vision.image_size;
    let mut rng = Rng::new(0);
    let pixels: Vec<f32> = (0..3 * s * s).map(|_| rng.normal() as f32).collect();
    let t = prompt.ids.len();
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    let total = o.warmup + o.repeats;
    for rep in 0..total {
        progress(rep, total);
        let t0 = Instant::now();
        let feats = m.image_features(std::slice::from_ref(&pixels));
        let (mut cache, logits) = m.prefill(&prompt.ids, &feats, false)?;
        // the first pick waits for the prefill (a download), so the prefill time is its own
        let first = m.be.greedy_rows(&logits, 1, m.cfg.text.vocab_size)[0].0;
        // the batch's copies of the cache, before the timed steps (select prefills each prompt)
        let mut caches = if o.batch > 1 {
            let copies = vec![cache.clone(); o.batch];
            m.be.synchronize();
            Some(copies)
        } else {
            None
        };
        let t1 = Instant::now();
        match caches.as_mut() {
            None => greedy_steps(m, &mut cache, first, o.new_tokens),
            Some(caches) => greedy_steps_packed(m, caches, first, o.new_tokens),
        }
        let t2 = Instant::now();
        if rep >= o.warmup {
            pre.push(t as f64 / (t1 - t0).as_secs_f64());
            dec.push((o.new_tokens * o.batch) as f64 / (t2 - t1).as_secs_f64());
        }
    }
    progress(total, total);
    Ok(BenchResult {
        prefill_tok_s: Stats::of(pre),
        decode_tok_s: Stats::of(dec),
        prompt_tokens: t,
        new_tokens: o.new_tokens,
        batch: o.batch,
        repeats: o.repeats,
        threads: rayon::current_num_threads(),
    })
}

/// `n` greedy decode steps from token `tok` with the KV cache, no statistics: the decode work that
/// the benchmarks time (each step's pick waits for its forward, as in `generate`).
pub fn greedy_steps<B: Backend>(m: &Llava<B>, cache: &mut KvCache<B>, tok: u32, n: usize) {
    greedy_steps_packed(m, std::slice::from_mut(cache), tok, n);
}

/// `n` packed greedy decode steps of every sequence of `caches` (one row each), all from token
/// `tok`: the batched decode that `select --batch-size` runs, without its statistics.
pub fn greedy_steps_packed<B: Backend>(m: &Llava<B>, caches: &mut [KvCache<B>], tok: u32, n: usize) {
    use crate::model::llama::Segment;
    let be = &m.be;
    let mut toks = vec![tok; caches.len()];
    let segs = vec![
        Segment {
            rows: 1,
            capture: None
        };
        caches.len()
    ];
    for _ in 0..n {
        let x = be.embed(&toks, &m.decoder.embed);
        let (hid, _) = m.decoder.forward_packed(be, x, &segs, caches, false);
        let picks = be.greedy_rows(
            &m.decoder.logits(be, &hid, toks.len()),
            toks.len(),
            m.cfg.text.vocab_size,
        );
        toks = picks.into_iter().map(|(t, _)| t).collect();
    }
}

/// The CPU model name from /proc/cpuinfo (for labelling numbers), or "unknown CPU".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// What `bench --task train` times: DPO steps (policy forward of both answers, loss, backward into
/// the LoRA, AdamW update) on one synthetic pair, batch 1.
#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    pub prompt_tokens: usize,
    pub answer_tokens: usize,
    pub lora_r: usize,
    pub pass: crate::train::backward::PassOptions,
    pub repeats: usize,
    pub warmup: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainBenchResult {
    pub step_s: Stats,
    /// the step's update part (gradient norm, clipping, optimizer, weights into the model), seconds:
    /// what the step costs that no layout of the pair changes
    pub update_s: Stats,
    pub pairs_per_s: f64,
    /// rows the forward ran over per second (the packed sequence counts its prompt once)
    pub tokens_per_s: f64,
    /// the one-off reference pass (adapter off) of the pair, seconds
    pub reference_s: f64,
    pub prompt_tokens: usize,
    pub answer_tokens: usize,
    pub lora_r: usize,
    pub gradient_checkpointing: bool,
    pub prefix_sharing: bool,
    /// the process's peak resident memory so far (VmHWM), MiB
    pub peak_rss_mib: f64,
    pub repeats: usize,
    pub threads: usize,
}

/// Times `warmup + repeats` DPO steps on one synthetic pair of `prompt_tokens` (image included) and
/// two different answers of `answer_tokens`, with a fresh LoRA of rank `lora_r` (alpha 2r) on every
/// decoder linear. Medians over the timed steps.
pub fn run_train<B: Backend>(
    m: &mut Llava<B>,
    o: &TrainBenchOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<TrainBenchResult> {
    use crate::model::lora::Proj;
    use crate::train::adapter::LoraWeights;
    use crate::train::trainer::{train, TrainConfig, TrainPair, TrainState};
    if o.repeats == 0 || o.answer_tokens == 0 {
        return Err(Error::Invalid(
            "--repeats and --answer-tokens must be at least 1".into(),
        ));
    }
    let prompt = bench_prompt(m, o.prompt_tokens)?;
    let s = m.cfg.vision.image_size;
    let mut rng = Rng::new(0);
    let pixels: Vec<f32> = (0..3 * s * s).map(|_| rng.normal() as f32).collect();
    let answer = |salt: usize| -> Vec<u32> {
        (0..o.answer_tokens)
            .map(|i| 200 + ((i * 104_729 + salt * 7_919) % 30_000) as u32)
            .collect()
    };
    let (chosen, rejected) = (answer(1), answer(2));
    let features = m.image_features(std::slice::from_ref(&pixels));
    let t0 = Instant::now();
    let refs =
        crate::train::backward::pair_forward(m, &prompt.ids, &chosen, &rejected, &features, o.pass, 0)?
            .logps();
    let reference_s = t0.elapsed().as_secs_f64();
    let pair = TrainPair {
        id: "bench".into(),
        prompt: prompt.ids.clone(),
        features: m.be.download(&features),
        chosen,
        rejected,
        ref_chosen: refs.0,
        ref_rejected: refs.1,
    };
    let t = m.cfg.text.clone();
    let mut w = LoraWeights::init(
        t.num_layers,
        &Proj::ALL,
        o.lora_r,
        2.0 * o.lora_r as f64,
        0,
        |_, p| p.shape(&t),
    );
    let total = o.warmup + o.repeats;
    let cfg = TrainConfig {
        dpo: Default::default(),
        pass: o.pass,
        run: crate::train::trainer::LoopConfig {
            optim: Default::default(),
            lr: 5e-5,
            schedule: crate::train::optim::Schedule::Constant,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            batch_size: 1,
            grad_accum: 1,
            steps: total,
            seed: 0,
            sync_every: 0, // the host copies are not read
        },
    };
    let (mut times, mut updates, mut tokens) = (Vec::new(), Vec::new(), Vec::new());
    let never = std::sync::atomic::AtomicBool::new(false);
    progress(0, total);
    train(
        m,
        &mut w,
        &mut TrainState::default(),
        &[pair],
        &cfg,
        &never,
        &mut |s, _, _| {
            progress(s.step, total);
            if s.step > o.warmup {
                times.push(s.step_time_s);
                updates.push(s.update_time_s);
                tokens.push(s.tokens_per_s);
            }
            Ok(())
        },
    )?;
    let step_s = Stats::of(times);
    Ok(TrainBenchResult {
        pairs_per_s: 1.0 / step_s.median,
        tokens_per_s: Stats::of(tokens).median,
        step_s,
        update_s: Stats::of(updates),
        reference_s,
        prompt_tokens: prompt.ids.len(),
        answer_tokens: o.answer_tokens,
        lora_r: o.lora_r,
        gradient_checkpointing: o.pass.checkpointing,
        prefix_sharing: o.pass.prefix_sharing,
        peak_rss_mib: peak_rss_mib(),
        repeats: o.repeats,
        threads: rayon::current_num_threads(),
    })
}

/// The process's peak resident set (VmHWM from /proc/self/status) in MiB, 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
