//! `miadpo demo`: the whole MIA-DPO recipe in miniature, in process, on the synthetic world. Build the
//! world → a random LLaVA → SFT on single-image data only → evaluate (the "before") → augment the
//! training data into multi-image prompts → attention-aware selection of rejected answers (MIA-DPO's
//! thresholds and post-selection) → DPO with LoRA on the selected pairs → evaluate again (the
//! "after"). Every stage is the library function its command runs; the model stays in memory from
//! the SFT on (the SFT model is also written to `OUT/sft/model`, the adapter to `OUT/dpo/adapter`).
//!
//! Output: `OUT/summary.json` (accuracies before and after, pairs, timings, settings) and
//! `OUT/report.png` (training curves and before/after bars), with every intermediate file beside
//! them.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::world::{build, World, WorldOptions};
use crate::augment::llava_json::Mia;
use crate::augment::{AugmentOptions, Companions, Kind};
use crate::backend::Backend;
use crate::eval::{evaluate, EvalOptions, EvalSummary, Score};
use crate::model::llava::{GenerateOptions, Llava};
use crate::model::lora::Proj;
use crate::model::random::{write_random_checkpoint, RandomSpec};
use crate::select::ratio::default_threshold;
use crate::select::{PostSelect, SelectOptions, Shard};
use crate::text::Template;
use crate::train::adapter::LoraWeights;
use crate::train::backward::PassOptions;
use crate::train::dpo::{DpoConfig, LossType};
use crate::train::optim::{OptimConfig, OptimizerKind, Schedule};
use crate::train::sft::{prepare_samples, SftStage};
use crate::train::trainer::{run_steps, LoopConfig, TrainConfig, TrainState};
use crate::vision::preprocess::AspectMode;
use crate::{Error, Result};

/// How the rejected answers are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Selection {
    /// MIA-DPO: wrong answers given with little attention on the referred image (the paper's
    /// per-kind ratio thresholds), then post-selection
    #[default]
    Attention,
    /// the ablation: as many pairs as attention-aware selection keeps, drawn at random among all the
    /// wrong, not fully confident answers (ratio ignored; post-selection as set)
    Random,
}

impl Selection {
    pub fn name(self) -> &'static str {
        match self {
            Selection::Attention => "attention",
            Selection::Random => "random",
        }
    }
}

impl FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "attention" => Ok(Selection::Attention),
            "random" => Ok(Selection::Random),
            _ => Err(format!("unknown selection `{s}` (expected attention or random)")),
        }
    }
}

/// The demo's sizes and training settings (README "miadpo demo" says why each default).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSettings {
    /// training scenes of the world (five single-image questions each)
    pub train_scenes: usize,
    /// held-out scenes: one single-image question each, and one question of each multi-image kind
    pub eval_scenes: usize,
    /// side of the world's pictures (the demo model sees 112 px)
    pub image_size: u32,
    /// `init` preset of the random model
    pub preset: String,
    /// the prompt template of every stage
    pub template: String,
    /// SFT: optimizer steps, conversations per step, peak learning rate (cosine, 3% warmup)
    pub sft_steps: usize,
    pub sft_batch: usize,
    pub sft_lr: f64,
    /// augment: training questions turned into each multi-image kind
    pub augment_per_kind: usize,
    /// select, eval: new tokens per answer, prompts decoded together
    pub max_new_tokens: usize,
    pub generate_batch: usize,
    /// DPO: epochs over the pairs, pairs per step, peak learning rate (linear, 10% warmup), LoRA
    /// rank and alpha on the seven decoder linears, β, and MIA-DPO's γ (NLL of the chosen answer)
    pub dpo_epochs: usize,
    pub dpo_batch: usize,
    pub dpo_lr: f64,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub beta: f64,
    pub sft_weight: f64,
}

impl DemoSettings {
    /// The full run (under 20 minutes on two CPU cores).
    pub fn full() -> Self {
        DemoSettings {
            train_scenes: 1200,
            eval_scenes: 300,
            image_size: 112,
            preset: "demo".into(),
            template: Template::LlavaHf.name().into(),
            sft_steps: 1400,
            sft_batch: 8,
            sft_lr: 1e-3,
            augment_per_kind: 500,
            max_new_tokens: 24,
            generate_batch: 16,
            dpo_epochs: 2,
            dpo_batch: 4,
            dpo_lr: 3e-5,
            lora_r: 16,
            lora_alpha: 32.0,
            beta: 0.1,
            sft_weight: 0.0,
        }
    }

    /// `--quick`: every stage on a tiny world and a few steps (under 3 minutes; the numbers say
    /// nothing about the method).
    pub fn quick() -> Self {
        DemoSettings {
            train_scenes: 40,
            eval_scenes: 20,
            sft_steps: 30,
            augment_per_kind: 24,
            dpo_epochs: 1,
            ..Self::full()
        }
    }
}

impl DemoSettings {
    /// Applies `KEY=VALUE` overrides (`--set`): VALUE is read as JSON, else taken as a string.
    pub fn with_overrides(&self, sets: &[String]) -> Result<Self> {
        let mut v = serde_json::to_value(self).expect("settings serialize");
        for kv in sets {
            let (k, val) = kv
                .split_once('=')
                .ok_or_else(|| Error::Invalid(format!("--set `{kv}`: expected KEY=VALUE")))?;
            let obj = v.as_object_mut().expect("settings are an object");
            if !obj.contains_key(k) {
                let keys: Vec<&String> = obj.keys().collect();
                return Err(Error::Invalid(format!(
                    "--set `{kv}`: unknown setting `{k}` (one of {keys:?})"
                )));
            }
            let parsed = serde_json::from_str(val).unwrap_or_else(|_| Value::String(val.to_string()));
            obj.insert(k.to_string(), parsed);
        }
        serde_json::from_value(v).map_err(|e| Error::Invalid(format!("--set: {e}")))
    }
}

/// What one demo run does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub seed: u64,
    pub settings: DemoSettings,
    pub selection: Selection,
    /// MIA-DPO's post-selection filters (off: `--no-post-select`)
    pub post_select: bool,
    /// tokenizer.json of the random model (the LLaMA one)
    pub tokenizer: PathBuf,
    /// how the device is named in the summary
    pub device: String,
    /// reuse the SFT model (and curves) of this earlier run instead of training one: it must have
    /// the same seed and the same world, model and SFT settings (for ablations of the later stages)
    pub sft_from: Option<PathBuf>,
}

/// What the demo reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    /// stage `index` of `of` begins
    Start {
        stage: &'static str,
        index: usize,
        of: usize,
        what: String,
    },
    /// units done of the stage's total, and a short status
    Progress { done: usize, total: usize, msg: String },
    /// the stage ended after `seconds`; `line` says what it made
    Done {
        stage: &'static str,
        seconds: f64,
        line: String,
    },
}

/// The stages, in order (the keys of `summary.json`'s `stages`).
pub const STAGES: [&str; 9] = [
    "world",
    "init",
    "sft",
    "eval_before",
    "augment",
    "select",
    "dpo",
    "eval_after",
    "report",
];

/// The files and folders a run writes into `out` (what `--overwrite` removes, nothing else).
pub const OUTPUTS: [&str; 12] = [
    "world",
    "init",
    "sft",
    "eval_before.jsonl",
    "augment",
    "select",
    "dpo",
    "eval_after.jsonl",
    "summary.json",
    "report.png",
    ".summary.json.partial",
    ".report.png.partial",
];

/// Accuracies of one evaluation, as `summary.json` holds them.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Accuracies {
    /// held-out single-image questions
    pub single_image_accuracy: f64,
    /// the multi-image questions of all three kinds
    pub multi_image_accuracy: f64,
    /// per multi-image kind
    pub sequence: f64,
    pub grid: f64,
    pub pip: f64,
    /// per question kind (colour, shape, count, presence, caption), single-image
    pub single_by_question: BTreeMap<String, f64>,
    /// per question kind, the three multi-image kinds together
    pub multi_by_question: BTreeMap<String, f64>,
    /// questions asked: single, multi
    pub single_questions: usize,
    pub multi_questions: usize,
}

impl Accuracies {
    pub fn from_eval(s: &EvalSummary) -> Self {
        let get = |set: &str| s.sets.get(set).copied().unwrap_or_default();
        let single = get("eval_single");
        let mut multi = Score::default();
        let mut by_q_multi: BTreeMap<String, Score> = BTreeMap::new();
        for kind in ["sequence", "grid", "pip"] {
            let sc = get(kind);
            multi.correct += sc.correct;
            multi.total += sc.total;
            for (task, sc) in s.tasks.get(kind).into_iter().flatten() {
                let e = by_q_multi.entry(task.clone()).or_default();
                e.correct += sc.correct;
                e.total += sc.total;
            }
        }
        Accuracies {
            single_image_accuracy: single.accuracy(),
            multi_image_accuracy: multi.accuracy(),
            sequence: get("sequence").accuracy(),
            grid: get("grid").accuracy(),
            pip: get("pip").accuracy(),
            single_by_question: s
                .tasks
                .get("eval_single")
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.accuracy()))
                .collect(),
            multi_by_question: by_q_multi.into_iter().map(|(k, v)| (k, v.accuracy())).collect(),
            single_questions: single.total,
            multi_questions: multi.total,
        }
    }
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct DemoSummary {
    pub before: Accuracies,
    pub after: Accuracies,
    /// DPO pairs selected (`select/pairs.jsonl`)
    pub pairs: usize,
    pub pairs_by_kind: BTreeMap<String, usize>,
    /// total wall time in seconds
    pub seconds: f64,
    pub stages: BTreeMap<String, f64>,
    pub device: String,
    pub seed: u64,
    pub selection: String,
    pub post_select: bool,
    /// augmented training prompts answered by `select`, and of those the wrong, not fully confident
    /// answers that passed post-selection whatever their attention (the random ablation's pool)
    pub select_answered: usize,
    /// selected pairs DPO could not use (an empty answer, ...; listed by `train`'s rules)
    pub pairs_skipped: usize,
    pub select_candidates: Option<usize>,
    /// the run whose SFT model was reused (`--sft-from`)
    pub sft_from: Option<PathBuf>,
    pub settings: DemoSettings,
}

/// Refuses an `out` that holds anything unless `overwrite`; with it, removes the demo's own outputs
/// (only those: [`OUTPUTS`]).
pub fn prepare_out(out: &Path, overwrite: bool) -> Result<()> {
    if out.is_dir() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            if !overwrite {
                return Err(Error::file(
                    out,
                    "is not empty: pass --overwrite to replace an earlier demo run there, or choose another --out",
                ));
            }
            for name in OUTPUTS {
                let p = out.join(name);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
                } else if p.exists() {
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
    } else if out.exists() {
        return Err(Error::file(out, "exists and is not a folder"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
}

/// Builds the world and its multi-image questions: `world::build`, then `augment`'s three kinds on
/// the held-out questions (companions from held-out scenes only), each record given the `task` of
/// its source question.
pub fn build_world(
    o: &WorldOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(World, BTreeMap<Kind, usize>)> {
    let w = build(o, progress)?;
    let multi = o.out.join("eval_multi");
    let summary = crate::augment::run(
        &AugmentOptions {
            data: w.eval_single.clone(),
            image_roots: vec![w.root.clone()],
            out: multi.clone(),
            kinds: Kind::ALL.to_vec(),
            per_kind: None,
            seed: o.seed,
            companions: Companions::Same,
            jpeg_quality: 95,
            skip_bad: false,
            overwrite: false,
        },
        &|_, _| {},
    )?;
    let tasks = task_map(&w.eval_single)?;
    for kind in Kind::ALL {
        add_tasks(&multi.join(format!("{kind}.json")), &tasks)?;
    }
    Ok((w, summary.records))
}

/// id → `task` of a world question file.
fn task_map(path: &Path) -> Result<BTreeMap<String, String>> {
    Ok(crate::data::read_json_list(path, "world questions")?
        .iter()
        .filter_map(|r| {
            Some((
                r.get("id")?.as_str()?.to_string(),
                r.get("task")?.as_str()?.to_string(),
            ))
        })
        .collect())
}

/// Gives every augmented record of `path` the `task` of its source question (`mia.source_id`).
fn add_tasks(path: &Path, tasks: &BTreeMap<String, String>) -> Result<()> {
    let mut list = crate::data::read_json_list(path, "augmented records")?;
    for r in &mut list {
        let task = r
            .pointer("/mia/source_id")
            .and_then(Value::as_str)
            .and_then(|id| tasks.get(id));
        if let (Some(t), Some(obj)) = (task.cloned(), r.as_object_mut()) {
            obj.insert("task".into(), Value::String(t));
        }
    }
    crate::augment::run::write_atomic(
        path,
        serde_json::to_string_pretty(&list).expect("json").as_bytes(),
    )
}

/// The settings that make the world, the random model and the SFT model.
const SFT_KEYS: [&str; 8] = [
    "train_scenes",
    "eval_scenes",
    "image_size",
    "preset",
    "template",
    "sft_steps",
    "sft_batch",
    "sft_lr",
];

/// Checks that `prev` (an earlier demo run) has the SFT model this run would train.
fn check_reusable(prev: &Path, o: &DemoOptions) -> Result<()> {
    let path = prev.join("summary.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&path).map_err(|e| Error::io(&path, e))?)
        .map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
    let ours = serde_json::to_value(&o.settings).expect("settings serialize");
    let mut diff: Vec<String> = SFT_KEYS
        .iter()
        .filter(|k| v["settings"][**k] != ours[**k])
        .map(|k| format!("{k} {} (here {})", v["settings"][*k], ours[*k]))
        .collect();
    if v["seed"] != o.seed {
        diff.push(format!("seed {} (here {})", v["seed"], o.seed));
    }
    if v.get("sft_from").is_some_and(|x| !x.is_null()) {
        diff.push("it reused another run's SFT model itself (point to that run)".into());
    }
    if !diff.is_empty() {
        return Err(Error::file(
            &path,
            format!("--sft-from: that run's SFT model differs: {}", diff.join(", ")),
        ));
    }
    Ok(())
}

/// Appends one JSON line (a metrics record) to `f`.
fn write_line<T: Serialize>(f: &mut std::fs::File, path: &Path, v: &T) -> Result<()> {
    let line = serde_json::to_string(v).expect("metrics serialize");
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

fn write_predictions(path: &Path, s: &EvalSummary) -> Result<()> {
    let mut text = String::new();
    for p in &s.predictions {
        text += &serde_json::to_string(p).expect("prediction serializes");
        text.push('\n');
    }
    crate::augment::run::write_atomic(path, text.as_bytes())
}

/// Stage bookkeeping: events and timings.
struct Stages<'a> {
    events: &'a mut dyn FnMut(Event),
    seconds: BTreeMap<String, f64>,
    index: usize,
    t0: Instant,
    name: &'static str,
}

impl Stages<'_> {
    fn start(&mut self, stage: &'static str, what: String) {
        self.index += 1;
        self.name = stage;
        self.t0 = Instant::now();
        (self.events)(Event::Start {
            stage,
            index: self.index,
            of: STAGES.len(),
            what,
        });
    }
    fn progress(&mut self, done: usize, total: usize, msg: String) {
        (self.events)(Event::Progress { done, total, msg });
    }
    fn done(&mut self, line: String) {
        let seconds = self.t0.elapsed().as_secs_f64();
        self.seconds.insert(self.name.to_string(), seconds);
        (self.events)(Event::Done {
            stage: self.name,
            seconds,
            line,
        });
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Runs the demo on backend `be` (call [`prepare_out`] first). `events` sees each stage start,
/// progress and end.
pub fn run<B: Backend>(be: B, o: &DemoOptions, events: &mut dyn FnMut(Event)) -> Result<DemoSummary> {
    let t_all = Instant::now();
    let s = &o.settings;
    let template: Template = s.template.parse().map_err(Error::Invalid)?;
    let aspect = AspectMode::Pad;
    let mut st = Stages {
        events,
        seconds: BTreeMap::new(),
        index: 0,
        t0: Instant::now(),
        name: "",
    };
    let out = &o.out;
    let stop = AtomicBool::new(false);

    // 1. the world
    st.start(
        "world",
        format!(
            "{} training scenes (5 questions each), {} held-out scenes, {} px",
            s.train_scenes, s.eval_scenes, s.image_size
        ),
    );
    let world_dir = out.join("world");
    let (world, multi) = build_world(
        &WorldOptions {
            out: world_dir.clone(),
            seed: o.seed,
            train_scenes: s.train_scenes,
            eval_scenes: s.eval_scenes,
            image_size: s.image_size,
        },
        &mut |i, n| st.progress(i, n, String::new()),
    )?;
    let multi_n: usize = multi.values().sum();
    st.done(format!(
        "{} training questions, {} held-out single-image and {multi_n} multi-image questions",
        world.train_records, world.eval_records
    ));

    let roots = vec![world.root.clone()];
    let sft_dir = out.join("sft");
    std::fs::create_dir_all(&sft_dir).map_err(|e| Error::io(&sft_dir, e))?;
    let sft_metrics = sft_dir.join("metrics.jsonl");
    let adamw = OptimConfig {
        kind: OptimizerKind::AdamW,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let (mut m, sft_model) = match &o.sft_from {
        // 2-3. the SFT model of an earlier run with the same world, model and SFT settings
        Some(prev) => {
            st.start("init", format!("reusing the SFT model of {}", prev.display()));
            check_reusable(prev, o)?;
            st.done("skipped".into());
            st.start("sft", format!("reusing the SFT model of {}", prev.display()));
            let model = prev.join("sft/model");
            let m = Llava::load(&model, be)?;
            let from = prev.join("sft/metrics.jsonl");
            std::fs::copy(&from, &sft_metrics).map_err(|e| Error::io(&from, e))?;
            st.done(format!("model {} (curves copied)", model.display()));
            (m, model)
        }
        None => {
            // 2. a random LLaVA
            let spec = RandomSpec::preset(&s.preset)?;
            st.start("init", format!("random `{}` LLaVA", s.preset));
            let init_dir = out.join("init");
            write_random_checkpoint(&init_dir, &spec, o.seed, &o.tokenizer)?;
            let mut m = Llava::load(&init_dir, be)?;
            let params: usize = spec
                .tensors()
                .iter()
                .map(|(_, sh)| sh.iter().product::<usize>())
                .sum();
            st.done(format!(
                "{:.1}M parameters, {} image tokens, {}x{} decoder",
                params as f64 / 1e6,
                spec.image_tokens(),
                spec.t_layers,
                spec.t_hidden
            ));

            // 3. SFT on the single-image training questions
            st.start(
                "sft",
                format!(
                    "{} steps of {} conversations, lr {:e}",
                    s.sft_steps, s.sft_batch, s.sft_lr
                ),
            );
            let data = prepare_samples(&m, &world.train, &roots, template, aspect, 4096, &mut |i, n| {
                st.progress(i, n, "image features".into())
            })?;
            if let Some((id, why)) = data.skipped.first() {
                return Err(Error::sample(
                    id,
                    format!("the world's record cannot be trained: {why}"),
                ));
            }
            let pass = PassOptions {
                checkpointing: false,
                ..Default::default()
            };
            let mut stage = SftStage::new(&m, &init_dir, pass)?;
            let mut mf = std::fs::File::create(&sft_metrics).map_err(|e| Error::io(&sft_metrics, e))?;
            let sft_cfg = LoopConfig {
                optim: adamw.clone(),
                lr: s.sft_lr,
                schedule: Schedule::Cosine,
                warmup_ratio: 0.03,
                max_grad_norm: 1.0,
                batch_size: s.sft_batch,
                grad_accum: 1,
                steps: s.sft_steps,
                seed: o.seed,
                sync_every: 0, // the weights are read when the run returns
            };
            let mut state = TrainState::default();
            let mut tail = Vec::new();
            run_steps(
                &mut m,
                &mut stage,
                &mut state,
                &data.samples,
                &sft_cfg,
                &stop,
                &mut |sm, _, _| {
                    write_line(&mut mf, &sft_metrics, sm)?;
                    tail.push((sm.loss, sm.stage.mean_token_accuracy));
                    st.progress(
                        sm.step,
                        s.sft_steps,
                        format!(
                            "loss {:.3}  token acc {:.3}",
                            sm.loss, sm.stage.mean_token_accuracy
                        ),
                    );
                    Ok(())
                },
            )?;
            let sft_model = sft_dir.join("model");
            stage.write_model(&init_dir, &sft_model)?;
            let k = tail.len().clamp(1, 20);
            let (ml, ma) = tail[tail.len().saturating_sub(k)..]
                .iter()
                .fold((0.0, 0.0), |(a, b), (l, t)| (a + l / k as f64, b + t / k as f64));
            st.done(format!(
                "{} conversations; last {k} steps: loss {ml:.3}, token accuracy {ma:.3}; model in {}",
                data.samples.len(),
                sft_model.display()
            ));
            (m, sft_model)
        }
    };

    // 4. evaluate the SFT model
    let eval_files = vec![
        world.eval_single.clone(),
        world_dir.join("eval_multi/sequence.json"),
        world_dir.join("eval_multi/grid.json"),
        world_dir.join("eval_multi/pip.json"),
    ];
    let eval_opts = EvalOptions {
        data: eval_files,
        image_roots: vec![world.root.clone(), world_dir.join("eval_multi")],
        template,
        aspect,
        max_new_tokens: s.max_new_tokens,
        batch_size: s.generate_batch,
        use_adapter: true,
    };
    st.start("eval_before", "held-out single- and multi-image questions".into());
    let ev = evaluate(&m, &eval_opts, &mut |d, n| st.progress(d, n, String::new()))?;
    write_predictions(&out.join("eval_before.jsonl"), &ev)?;
    let before = Accuracies::from_eval(&ev);
    st.done(format!(
        "single-image {}, multi-image {} (sequence {}, grid {}, pip {})",
        pct(before.single_image_accuracy),
        pct(before.multi_image_accuracy),
        pct(before.sequence),
        pct(before.grid),
        pct(before.pip)
    ));

    // 5. augment the single-image training questions
    st.start(
        "augment",
        format!("{} training questions per kind", s.augment_per_kind),
    );
    let aug_dir = out.join("augment");
    // a seeded draw of the training questions (the first N of train.json would be N/5 scenes)
    let mut train: Vec<Value> = crate::data::read_json_list(&world.train, "world training data")?;
    train.shuffle(&mut ChaCha8Rng::seed_from_u64(o.seed ^ 0x6175_676d)); // "augm"
    std::fs::create_dir_all(&aug_dir).map_err(|e| Error::io(&aug_dir, e))?;
    let source = aug_dir.join("source.json");
    crate::augment::run::write_atomic(&source, serde_json::to_string(&train).expect("json").as_bytes())?;
    let aug = crate::augment::run(
        &AugmentOptions {
            data: source,
            image_roots: roots.clone(),
            out: aug_dir.clone(),
            kinds: Kind::ALL.to_vec(),
            per_kind: Some(s.augment_per_kind),
            seed: o.seed,
            companions: Companions::Same,
            jpeg_quality: 95,
            skip_bad: false,
            overwrite: true,
        },
        &|_, _| {},
    )?;
    st.done(
        aug.records
            .iter()
            .map(|(k, n)| format!("{n} {}", k.name()))
            .collect::<Vec<_>>()
            .join(", "),
    );

    // 6. select rejected answers
    let sel_dir = out.join("select");
    std::fs::create_dir_all(&sel_dir).map_err(|e| Error::io(&sel_dir, e))?;
    let pairs_path = sel_dir.join("pairs.jsonl");
    st.start(
        "select",
        format!(
            "{} selection{}",
            o.selection.name(),
            if o.post_select {
                ", post-selection"
            } else {
                ", no post-selection"
            }
        ),
    );
    let sel = SelectOptions {
        data: Kind::ALL
            .iter()
            .map(|k| aug_dir.join(format!("{k}.json")))
            .collect(),
        image_roots: vec![world.root.clone(), aug_dir.clone()],
        out: match o.selection {
            Selection::Attention => pairs_path.clone(),
            Selection::Random => sel_dir.join("candidates.jsonl"),
        },
        template,
        aspect,
        generate: GenerateOptions {
            max_new_tokens: s.max_new_tokens,
            attn_layer: None,
            use_adapter: true,
        },
        ratio_threshold: match o.selection {
            Selection::Attention => None,
            Selection::Random => Some(f64::INFINITY),
        },
        ppl_threshold: 1.1,
        post: o.post_select.then(PostSelect::default),
        max_gt_chars: 512,
        batch_size: s.generate_batch,
        shard: Shard::default(),
        skip_bad: false,
    };
    let summ = crate::select::run(&m, &sel, &mut |p| {
        st.progress(p.done, p.total, format!("{} kept", p.kept))
    })?;
    let mut candidates = None;
    if o.selection == Selection::Random {
        let lines = read_lines(&sel.out)?;
        candidates = Some(lines.len());
        // as many as the paper's thresholds keep, drawn at random from the pool
        let n_att = lines
            .iter()
            .filter(|l| {
                let mia: Option<Mia> = l.get("mia").and_then(|m| serde_json::from_value(m.clone()).ok());
                let ratio = l.pointer("/mia/ratio").and_then(Value::as_f64);
                matches!((mia, ratio), (Some(m), Some(r)) if r <= default_threshold(&m))
            })
            .count();
        let mut idx: Vec<usize> = (0..lines.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(o.seed ^ 0x7261_6e64)); // "rand"
        let mut keep: Vec<usize> = idx.into_iter().take(n_att).collect();
        keep.sort_unstable();
        let text: String = keep
            .iter()
            .map(|&i| serde_json::to_string(&lines[i]).expect("json") + "\n")
            .collect();
        crate::augment::run::write_atomic(&pairs_path, text.as_bytes())?;
    }
    let pairs = read_lines(&pairs_path)?;
    let mut pairs_by_kind: BTreeMap<String, usize> =
        Kind::ALL.iter().map(|k| (k.name().to_string(), 0)).collect();
    for p in &pairs {
        if let Some(k) = p.pointer("/mia/kind").and_then(Value::as_str) {
            *pairs_by_kind.entry(k.to_string()).or_default() += 1;
        }
    }
    st.done(format!(
        "{} answers, {} pairs ({}){}",
        summ.answers,
        pairs.len(),
        pairs_by_kind
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        candidates
            .map(|c| format!(", drawn from {c} candidates"))
            .unwrap_or_default()
    ));

    // 7. DPO with LoRA on the pairs
    let dpo_dir = out.join("dpo");
    std::fs::create_dir_all(&dpo_dir).map_err(|e| Error::io(&dpo_dir, e))?;
    let dpo_metrics = dpo_dir.join("metrics.jsonl");
    st.start(
        "dpo",
        format!(
            "{} epochs, {} pairs per step, lr {:e}, LoRA r={} alpha={}, beta {}",
            s.dpo_epochs, s.dpo_batch, s.dpo_lr, s.lora_r, s.lora_alpha, s.beta
        ),
    );
    let dpo_pass = PassOptions {
        checkpointing: false,
        lora_dropout: 0.0,
        prefix_sharing: true,
    };
    let prepared = crate::train::data::prepare_pairs(
        &m,
        &pairs_path,
        &[world.root.clone(), aug_dir.clone()],
        template,
        aspect,
        4096,
        "demo",
        dpo_pass,
        None,
        &mut |i, n| st.progress(i, n, "reference log-probs".into()),
    )?;
    let dpo_line = if prepared.pairs.is_empty() {
        std::fs::File::create(&dpo_metrics).map_err(|e| Error::io(&dpo_metrics, e))?;
        "no pair to train on: the model is left as it is".to_string()
    } else {
        let t = m.cfg.text.clone();
        let mut w = LoraWeights::init(
            t.num_layers,
            &Proj::ALL,
            s.lora_r,
            s.lora_alpha,
            o.seed,
            |_, p| p.shape(&t),
        );
        let steps = s.dpo_epochs * prepared.pairs.len().div_ceil(s.dpo_batch);
        let cfg = TrainConfig {
            dpo: DpoConfig {
                loss: LossType::Sigmoid,
                beta: s.beta,
                label_smoothing: 0.0,
                sft_weight: s.sft_weight,
            },
            pass: dpo_pass,
            run: LoopConfig {
                optim: adamw,
                lr: s.dpo_lr,
                schedule: Schedule::Linear,
                warmup_ratio: 0.1,
                max_grad_norm: 1.0,
                batch_size: s.dpo_batch,
                grad_accum: 1,
                steps,
                seed: o.seed,
                sync_every: 0, // the adapter is read when the run returns
            },
        };
        let mut mf = std::fs::File::create(&dpo_metrics).map_err(|e| Error::io(&dpo_metrics, e))?;
        let mut state = TrainState::default();
        let mut tail = Vec::new();
        crate::train::trainer::train(
            &mut m,
            &mut w,
            &mut state,
            &prepared.pairs,
            &cfg,
            &stop,
            &mut |sm, _, _| {
                write_line(&mut mf, &dpo_metrics, sm)?;
                tail.push((sm.loss, sm.stage.accuracies, sm.stage.margins));
                st.progress(
                    sm.step,
                    steps,
                    format!(
                        "loss {:.3}  reward acc {:.2}  margin {:+.3}",
                        sm.loss, sm.stage.accuracies, sm.stage.margins
                    ),
                );
                Ok(())
            },
        )?;
        w.save_peft(&dpo_dir.join("adapter"), &sft_model.display().to_string())?;
        let k = tail.len().clamp(1, 20);
        let (ml, ma, mm) = tail[tail.len().saturating_sub(k)..]
            .iter()
            .fold((0.0, 0.0, 0.0), |(a, b, c), (l, r, g)| {
                (a + l / k as f64, b + r / k as f64, c + g / k as f64)
            });
        format!(
            "{} pairs ({} skipped), {steps} steps; last {k} steps: loss {ml:.3}, reward accuracy {ma:.2}, margin {mm:+.3}",
            prepared.pairs.len(),
            prepared.skipped.len()
        )
    };
    st.done(dpo_line);

    // 8. evaluate again, with the adapter
    st.start("eval_after", "the same questions, SFT model + DPO adapter".into());
    let ev = evaluate(&m, &eval_opts, &mut |d, n| st.progress(d, n, String::new()))?;
    write_predictions(&out.join("eval_after.jsonl"), &ev)?;
    let after = Accuracies::from_eval(&ev);
    st.done(format!(
        "single-image {} ({:+.1} points), multi-image {} ({:+.1} points)",
        pct(after.single_image_accuracy),
        100.0 * (after.single_image_accuracy - before.single_image_accuracy),
        pct(after.multi_image_accuracy),
        100.0 * (after.multi_image_accuracy - before.multi_image_accuracy),
    ));

    // 9. summary and report
    st.start("report", "summary.json, report.png".into());
    let mut summary = DemoSummary {
        before,
        after,
        pairs: pairs.len(),
        pairs_by_kind,
        pairs_skipped: prepared.skipped.len(),
        seconds: 0.0,
        stages: BTreeMap::new(),
        device: o.device.clone(),
        seed: o.seed,
        selection: o.selection.name().into(),
        post_select: o.post_select,
        select_answered: summ.answers,
        select_candidates: candidates,
        sft_from: o.sft_from.clone(),
        settings: s.clone(),
    };
    draw_report(
        out,
        &serde_json::to_value(&summary).expect("json"),
        &out.join("report.png"),
    )?;
    st.done(format!(
        "{}, {}",
        out.join("summary.json").display(),
        out.join("report.png").display()
    ));
    summary.stages = st.seconds.clone();
    summary.seconds = t_all.elapsed().as_secs_f64();
    crate::augment::run::write_atomic(
        &out.join("summary.json"),
        (serde_json::to_string_pretty(&summary).expect("json") + "\n").as_bytes(),
    )?;
    Ok(summary)
}

/// Draws `png` for the demo run in `out` from its `summary.json` (as a JSON value) and its SFT and
/// DPO metrics: the training curves and the before/after bars (`miadpo plot RUN` redraws it).
pub fn draw_report(out: &Path, summary: &Value, png: &Path) -> Result<()> {
    let summary_path = out.join("summary.json");
    let acc = |when: &str, key: &str| -> Result<f64> {
        summary[when][key].as_f64().ok_or_else(|| {
            Error::file(
                &summary_path,
                format!("no number at {when}.{key}: not a demo summary"),
            )
        })
    };
    let mut bars: Vec<crate::plot::BarGroup> = Vec::new();
    for (label, key) in [
        ("single image", "single_image_accuracy"),
        ("sequence", "sequence"),
        ("grid", "grid"),
        ("pic-in-pic", "pip"),
        ("multi-image", "multi_image_accuracy"),
    ] {
        bars.push((label.to_string(), acc("before", key)?, acc("after", key)?));
    }
    let pct_of = |when: &str, key: &str| acc(when, key).map(pct);
    let title = format!(
        "miadpo demo (seed {}, {} selection{}): multi-image {} -> {}, single-image {} -> {}",
        summary["seed"],
        summary["selection"].as_str().unwrap_or("attention"),
        if summary["post_select"] == Value::Bool(false) {
            ", no post-selection"
        } else {
            ""
        },
        pct_of("before", "multi_image_accuracy")?,
        pct_of("after", "multi_image_accuracy")?,
        pct_of("before", "single_image_accuracy")?,
        pct_of("after", "single_image_accuracy")?,
    );
    crate::plot::plot_demo_report(
        &out.join("sft/metrics.jsonl"),
        &out.join("dpo/metrics.jsonl"),
        &bars,
        png,
        &title,
    )
}

/// The JSON lines of a JSONL file (blank lines skipped).
fn read_lines(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::file(path, format!("line {}: {e}", i + 1))))
        .collect()
}
