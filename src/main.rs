//! The `miadpo` command line: a thin layer over the library (see README.md for every subcommand).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use miadpo::augment::{AugmentOptions, Companions, Kind};
use miadpo::backend::cpu::CpuBackend;
use miadpo::backend::{Backend, Device};
use miadpo::bench::{self, BenchOptions};
use miadpo::data::{load_pairs, pair_inputs, PairInputs};
use miadpo::model::llava::{GenerateOptions, Llava};
use miadpo::model::random::{write_random_checkpoint, RandomSpec};
use miadpo::select::{PostSelect, SelectOptions, Shard};
use miadpo::text::Template;
use miadpo::train::backward::PassOptions;
use miadpo::train::dpo::{DpoConfig, LossType};
use miadpo::train::optim::{OptimConfig, OptimizerKind, Schedule};
use miadpo::vision::preprocess::AspectMode;

#[derive(Parser)]
#[command(
    name = "miadpo",
    version,
    about = "MIA-DPO for LLaVA models on a handwritten transformer runtime"
)]
struct Cli {
    /// Worker threads (default: every core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Turn single-image LLaVA data into sequence, grid-collage and pic-in-pic multi-image prompts.
    Augment(AugmentArgs),
    /// Answer augmented prompts greedily and keep low-attention wrong answers as DPO rejected answers.
    Select(SelectArgs),
    /// DPO with LoRA on preference pairs (the output of `select`), writing a PEFT adapter; or, with
    /// `--stage sft`, full-parameter fine-tuning on LLaVA conversations, writing a llava-hf model.
    Train(TrainArgs),
    /// Greedy answer to a question about one or more images, with MIA-DPO's attention statistics.
    Generate(GenerateArgs),
    /// Sequence log-probs of the chosen and rejected answers of DPO preference pairs.
    Score(ScoreArgs),
    /// Prefill and decode throughput on a checkpoint (by default a random "small" LLaVA).
    Bench(BenchArgs),
    /// List the CUDA kernels, or compile them all through NVRTC and report their resources
    #[command(subcommand)]
    Kernels(KernelsCmd),
    /// Write a randomly initialised llava-hf checkpoint (for the demo and the benchmarks)
    Init(InitArgs),
    /// Build the demo's synthetic world: shape pictures, single-image instruction data, held-out
    /// single- and multi-image questions
    World(WorldArgs),
    /// Draw the curves of a training run (OUT/metrics.jsonl, DPO or SFT) to a PNG.
    Plot(PlotArgs),
    /// Exact-match accuracy of greedy answers on LLaVA-format question files, per file and task
    Eval(EvalArgs),
    /// The whole MIA-DPO recipe in miniature on a built-in synthetic world: world, random LLaVA, SFT,
    /// evaluation, augment, select, DPO, evaluation; writes OUT/summary.json and OUT/report.png
    Demo(DemoArgs),
}

#[derive(Args)]
struct AugmentArgs {
    /// LLaVA-665k-style JSON list of {"id", "image", "conversations"}
    #[arg(long)]
    data: PathBuf,
    /// Folder that image paths are resolved against; repeat to try several in order
    #[arg(long = "image-root")]
    image_roots: Vec<PathBuf>,
    /// Output folder: sequence.json, grid.json, pip.json, images/
    #[arg(long)]
    out: PathBuf,
    /// Kinds to make, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "sequence,grid,pip")]
    kinds: Vec<Kind>,
    /// At most N records per kind (the first N usable samples)
    #[arg(long)]
    per_kind: Option<usize>,
    /// Random seed: the same seed gives byte-identical output
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Companion and background images: `same` source dataset (coco, gqa, ...) or `any`
    #[arg(long, default_value = "same")]
    companions: Companions,
    /// JPEG quality of composed images
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    jpeg_quality: u8,
    /// Skip samples with a missing or undecodable image (listed in OUT/skipped.jsonl) instead of failing
    #[arg(long)]
    skip_bad: bool,
    /// Replace the results of an earlier run in --out
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct SelectArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Records written by `miadpo augment` (sequence.json, grid.json, pip.json); repeat for several
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Folder that image paths are resolved against; repeat (e.g. the original images and the augment folder)
    #[arg(long = "image-root")]
    image_roots: Vec<PathBuf>,
    /// Output JSONL of kept pairs; dropped ids go to FILE.dropped.jsonl; an existing file is resumed
    #[arg(long)]
    out: PathBuf,
    /// Decoder layer (0-based) whose attention gives the ratio [default: num_layers / 2]
    #[arg(long)]
    attn_layer: Option<usize>,
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// One ratio threshold for every kind [default: MIA-DPO's per kind and image count]
    #[arg(long)]
    ratio_threshold: Option<f64>,
    /// Keep only answers whose max-softmax perplexity is above this
    #[arg(long, default_value_t = 1.1)]
    ppl_threshold: f64,
    /// Skip the post-selection filters
    #[arg(long)]
    no_post_select: bool,
    /// Post-selection: drop pairs whose rejected answer's perplexity is above this
    #[arg(long, default_value_t = 10.0)]
    post_max_ppl: f64,
    /// Post-selection: drop pairs whose answers' word counts differ by more than this factor
    #[arg(long, default_value_t = 3.0)]
    post_max_length_ratio: f64,
    /// Post-selection: drop pairs whose normalised edit distance is below this (near-duplicates)
    #[arg(long, default_value_t = 0.2)]
    post_min_edit_distance: f64,
    /// Skip records whose ground truth is longer than this many characters
    #[arg(long, default_value_t = 512)]
    max_gt_chars: usize,
    /// Prompts decoded together
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Process every N-th record starting at I (I/N), for N processes side by side
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Skip (and count) malformed records and records whose images are missing instead of failing
    #[arg(long)]
    skip_bad: bool,
}

/// `--stage`: what `train` trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TrainStage {
    /// DPO with LoRA on preference pairs; writes OUT/adapter (PEFT)
    Dpo,
    /// Full-parameter supervised fine-tuning of the projector and decoder on LLaVA conversations;
    /// writes OUT/model (llava-hf)
    Sft,
}

#[derive(Args)]
struct TrainArgs {
    /// What to train
    #[arg(long, value_enum, default_value = "dpo")]
    stage: TrainStage,
    #[command(flatten)]
    m: ModelArgs,
    /// dpo: preference pairs, a JSON list or JSONL of {"id", "image", "prompt", "chosen", "rejected"};
    /// sft: LLaVA conversations, a JSON list (or JSONL) of {"id", "image", "conversations"}
    #[arg(long)]
    data: PathBuf,
    /// Folder that relative image paths are resolved against; repeat to try several in order
    #[arg(long = "image-root")]
    image_roots: Vec<PathBuf>,
    /// Output folder: metrics.jsonl, checkpoints, and adapter/ (dpo: a PEFT adapter) or model/ (sft: a
    /// llava-hf checkpoint)
    #[arg(long)]
    out: PathBuf,
    /// dpo: start from this PEFT adapter instead of a fresh LoRA
    #[arg(long)]
    adapter_init: Option<PathBuf>,
    /// dpo: LoRA rank
    #[arg(long, default_value_t = 128)]
    lora_r: usize,
    /// dpo: LoRA alpha
    #[arg(long, default_value_t = 256.0)]
    lora_alpha: f64,
    /// dpo: decoder linears that get LoRA, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    lora_targets: Vec<String>,
    /// dpo: sigmoid, hinge, ipo, robust, bco_pair, sppo_hard or nca_pair
    #[arg(long, default_value = "sigmoid")]
    loss: LossType,
    /// dpo: the DPO temperature
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// dpo: label smoothing of the sigmoid/robust losses
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// dpo: weight of the NLL of the chosen answers (MIA-DPO's gamma)
    #[arg(long, default_value_t = 0.0)]
    sft_weight: f64,
    #[arg(long, default_value = "adamw")]
    optimizer: OptimizerKind,
    /// Peak learning rate [default: 5e-5 for dpo, 2e-5 for sft (LLaVA-1.5's recipes)]
    #[arg(long)]
    lr: Option<f64>,
    /// Optimizer steps [default: --epochs over the data]
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Examples (pairs, conversations) per micro-batch
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// linear, cosine or constant after the warmup [default: linear for dpo, cosine for sft]
    #[arg(long)]
    schedule: Option<Schedule>,
    /// Share of the steps spent warming up [default: 0.1 for dpo, 0.03 for sft]
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// Clip the global gradient norm (0 = off)
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// AdamW's first-moment decay
    #[arg(long, default_value_t = 0.9)]
    adam_beta1: f32,
    /// AdamW's second-moment decay
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f32,
    /// AdamW's epsilon
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f32,
    /// Prompt + answer tokens; longer examples are skipped
    #[arg(long, default_value_t = 4096)]
    max_length: usize,
    /// Data order (and the LoRA init for dpo)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write OUT/checkpoint-STEP every N steps (0 = only at the end)
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Keep only the newest N checkpoints (0 = keep all); an SFT checkpoint holds the whole model and
    /// twice its size of optimizer state
    #[arg(long, default_value_t = 0)]
    save_total_limit: usize,
    /// Continue from the newest complete checkpoint in --out
    #[arg(long)]
    resume: bool,
    /// dpo: dropout on the input of every LoRA A while training (PEFT's lora_dropout)
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Keep only each layer's input in the forward and recompute the layer in the backward (less
    /// memory, about a third more compute)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    gradient_checkpointing: bool,
    /// dpo: encode each pair's prompt once for both answers ([prompt | chosen | rejected], rejected
    /// not seeing chosen) instead of as two sequences
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    prefix_sharing: bool,
}

/// The `train` flags that only the DPO stage reads (clap ids, i.e. field names).
const DPO_ONLY: [&str; 11] = [
    "adapter",
    "adapter_init",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "loss",
    "beta",
    "label_smoothing",
    "sft_weight",
    "lora_dropout",
    "prefix_sharing",
];

#[derive(Args)]
struct ModelArgs {
    /// llava-hf checkpoint folder (config.json, tokenizer.json, preprocessor_config.json, *.safetensors)
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter folder, applied unmerged
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Conversation template: vicuna_v1, llava_v0, llava_hf or plain
    #[arg(long, default_value = "vicuna_v1")]
    template: Template,
    /// Non-square images: `pad` to a square of the mean colour (LLaVA-1.5) or centre `crop` (HF default)
    #[arg(long, default_value = "pad")]
    aspect: AspectMode,
    /// auto, cpu or cuda (default from MIADPO_DEVICE, else auto)
    #[arg(long, default_value = "auto", env = "MIADPO_DEVICE")]
    device: Device,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// An image; repeat for several, one per `<image>` in the prompt, in order
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// The question, with one `<image>` per --image (e.g. $'<image>\nWhat is shown?')
    #[arg(long)]
    prompt: String,
    /// Stop after this many new tokens (or at EOS)
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Decoder layer (0-based) whose attention gives image_attention [default: num_layers / 2]
    #[arg(long)]
    attn_layer: Option<usize>,
    /// Print one JSON line instead of text
    #[arg(long)]
    json: bool,
}

/// Where preference pairs come from (score, train).
#[derive(Args)]
struct PairData {
    /// Preference pairs: a JSON list or JSONL of {"id", "image", "prompt", "chosen", "rejected"}
    #[arg(long)]
    data: PathBuf,
    /// Folder that relative image paths are resolved against; repeat to try several in order
    #[arg(long = "image-root")]
    image_roots: Vec<PathBuf>,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    pairs: PairData,
    /// Print one JSON line per pair instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Checkpoint to time [default: a random LLaVA of --preset, written to a temporary folder]
    #[arg(long)]
    model: Option<PathBuf>,
    /// Random model size when no --model is given: small (CLIP-B/14 224 px + 12x1024 decoder) or tiny
    #[arg(long, default_value = "small")]
    preset: String,
    /// Keep the random checkpoint in this folder (e.g. to time HF transformers on it)
    #[arg(long)]
    save_model: Option<PathBuf>,
    /// tokenizer.json for the random checkpoint [default: tests/fixtures/tiny-llava/model/tokenizer.json]
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Prompt length in tokens, image included
    #[arg(long, default_value_t = 320)]
    prompt_tokens: usize,
    /// Greedy decode steps timed after the prefill
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// generate: sequences decoded together after the prefill (copies of the prompt's cache, one
    /// packed step each; what `select --batch-size` runs); decode tok/s counts every sequence's
    /// tokens
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed repeats (medians are reported)
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Untimed warm-up runs
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// auto, cpu or cuda (default from MIADPO_DEVICE, else auto)
    #[arg(long, env = "MIADPO_DEVICE")]
    device: Option<Device>,
    /// Print one JSON line
    #[arg(long)]
    json: bool,
    /// What to time: `generate` (prefill + greedy decode) or `train` (DPO steps: forward of both
    /// answers, loss, backward into the LoRA, AdamW)
    #[arg(long, default_value = "generate", value_parser = ["generate", "train", "ops"])]
    task: String,
    /// ops: print the op names and exit
    #[arg(long)]
    list: bool,
    /// ops: only the ops whose name contains this (the two ceilings are always measured)
    #[arg(long, default_value = "")]
    filter: String,
    /// ops: sequence length of the attention ops
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// ops: rows of the other ops
    #[arg(long, default_value_t = 512)]
    rows: usize,
    /// train: tokens of each answer
    #[arg(long, default_value_t = 24)]
    answer_tokens: usize,
    /// train: LoRA rank (alpha = 2 r) on every decoder linear
    #[arg(long, default_value_t = 128)]
    lora_r: usize,
    /// train: recompute each layer in the backward
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    gradient_checkpointing: bool,
    /// train: one packed [prompt | chosen | rejected] sequence per pair
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    prefix_sharing: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// LLaVA-format questions (`[{"id", "image", "conversations", "task"?}]`: the first human turn is
    /// asked, the first gpt turn is the right answer); repeat for several files (one row each)
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Folder that image paths are resolved against; repeat to try several in order
    #[arg(long = "image-root")]
    image_roots: Vec<PathBuf>,
    /// Stop each answer after this many new tokens (or at EOS)
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Questions decoded together
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Write every answer to this JSONL file ({"id", "set", "task", "answer", "gold", "correct"})
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Print the accuracies as one JSON object instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Output folder (refused when it holds anything, unless --overwrite)
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// auto, cpu or cuda (default from MIADPO_DEVICE, else auto)
    #[arg(long, default_value = "auto", env = "MIADPO_DEVICE")]
    device: Device,
    /// Seed of the world, the random model, the data order and the LoRA init
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Every stage on a tiny world with a few steps (a smoke test of under a minute on two cores, not a result)
    #[arg(long)]
    quick: bool,
    /// How rejected answers are chosen: `attention` (MIA-DPO) or `random` (the ablation: as many
    /// pairs, drawn at random from the wrong answers)
    #[arg(long, default_value = "attention")]
    selection: miadpo::demo::run::Selection,
    /// Skip MIA-DPO's post-selection filters (the ablation)
    #[arg(long)]
    no_post_select: bool,
    /// Reuse the SFT model of an earlier demo run (same seed, world, model and SFT settings) instead
    /// of training one: for ablations of the selection and DPO stages
    #[arg(long, value_name = "RUN")]
    sft_from: Option<PathBuf>,
    /// Replace an earlier demo run in --out (only the demo's own files are removed)
    #[arg(long)]
    overwrite: bool,
    /// tokenizer.json of the random model [default: tests/fixtures/tiny-llava/model/tokenizer.json]
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Override one of the demo's settings (KEY=VALUE, repeatable; the keys are those of
    /// summary.json's `settings`, e.g. --set sft_steps=500)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Args)]
struct InitArgs {
    /// Output folder (config.json, model.safetensors in f16, tokenizer and preprocessor configs)
    #[arg(long)]
    out: PathBuf,
    /// small (CLIP-B/14 224 px + 12x1024 decoder), demo (3x128 CLIP at 112 px + 4x256 decoder) or tiny
    #[arg(long, default_value = "demo")]
    preset: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// tokenizer.json to ship [default: tests/fixtures/tiny-llava/model/tokenizer.json, the LLaMA one]
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct WorldArgs {
    /// Output folder: images/, train.json, eval_single.json, eval_multi/ (augment's three kinds)
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training scenes (five questions each)
    #[arg(long, default_value_t = 400)]
    train_scenes: usize,
    /// Held-out scenes (one question each)
    #[arg(long, default_value_t = 120)]
    eval_scenes: usize,
    /// Side of the square pictures in pixels
    #[arg(long, default_value_t = 224)]
    image_size: u32,
}

#[derive(Subcommand)]
enum KernelsCmd {
    /// Print every kernel as family/name
    List,
    /// Compile every kernel family for an architecture (needs libnvrtc, no GPU) and print
    /// `family/name  regs=N  smem=N  spill=N  ok`; fails on a compile error, any spill or stack frame,
    /// and on ptxas serializing `wgmma` (sm_90a)
    Check {
        /// sm_80 or sm_90a
        #[arg(long, default_value = "sm_90a")]
        arch: String,
    },
}

#[derive(Args)]
struct PlotArgs {
    /// Run folder of `miadpo train` (holds metrics.jsonl), or of `miadpo demo` (its report is redrawn)
    out: PathBuf,
    /// Output PNG [default: OUT/metrics.png, for a demo run OUT/report.png]
    #[arg(long)]
    png: Option<PathBuf>,
}

/// Runs `$call` with `$be` bound to the backend `--device` picks: `cuda` the CUDA backend (an error
/// without a usable GPU), `cpu` the CPU; `auto` the GPU when the CUDA backend starts, else the CPU.
macro_rules! on_device {
    ($dev:expr, |$be:ident| $call:expr) => {
        match $dev {
            Device::Cuda => {
                let $be = miadpo::backend::cuda::CudaBackend::new(0)?;
                eprintln!("device: {}", $be.device());
                $call
            }
            Device::Auto if miadpo::backend::cuda::driver_present() => {
                match miadpo::backend::cuda::CudaBackend::new(0) {
                    Ok($be) => {
                        eprintln!("device: {}", $be.device());
                        $call
                    }
                    Err(e) => {
                        eprintln!("--device auto: using the CPU ({e})");
                        let $be = CpuBackend::new();
                        $call
                    }
                }
            }
            Device::Auto | Device::Cpu => {
                let $be = CpuBackend::new();
                $call
            }
        }
    };
}

fn main() {
    use clap::{CommandFactory, FromArgMatches};
    // `MIADPO_DEVICE=` (set but empty) means unset, as for most tools' variables, not "device ``"
    if std::env::var_os("MIADPO_DEVICE").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("MIADPO_DEVICE");
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // the train flags given on the command line (not defaults): the SFT stage refuses DPO-only ones
    let given: Vec<String> = matches
        .subcommand_matches("train")
        .map(|t| {
            t.ids()
                .filter(|id| t.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
                .map(|id| id.to_string())
                .collect()
        })
        .unwrap_or_default();
    if let Err(e) = run(cli, &given) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli, given: &[String]) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads")?;
    }
    match cli.cmd {
        Cmd::Augment(a) => augment(a),
        Cmd::Select(a) => on_device!(a.m.device, |be| select(a, be)),
        Cmd::Train(a) => on_device!(a.m.device, |be| train_cmd(a, given, be)),
        Cmd::Generate(a) => on_device!(a.m.device, |be| generate(a, be)),
        Cmd::Score(a) => on_device!(a.m.device, |be| score(a, be)),
        Cmd::Bench(a) => on_device!(a.device.unwrap_or_default(), |be| bench_cmd(a, be)),
        Cmd::Plot(a) => plot_cmd(a),
        Cmd::Eval(a) => on_device!(a.m.device, |be| eval_cmd(a, be)),
        Cmd::Demo(a) => {
            miadpo::demo::run::prepare_out(&a.out, a.overwrite)?;
            on_device!(a.device, |be| demo_cmd(a, be))
        }
        Cmd::World(a) => world_cmd(a),
        Cmd::Init(a) => init_cmd(a),
        Cmd::Kernels(k) => kernels_cmd(k),
    }
}

fn load_model<B: Backend>(m: &ModelArgs, be: B) -> Result<Llava<B>> {
    let mut model = Llava::load(&m.model, be)?;
    if let Some(a) = &m.adapter {
        model.load_adapter(a)?;
    }
    Ok(model)
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{bar:40}} {{pos}}/{{len}} [{{elapsed}} < {{eta}}]"
        ))
        .expect("static template"),
    );
    pb
}

fn augment(a: AugmentArgs) -> Result<()> {
    let mut kinds = a.kinds.clone();
    kinds.sort();
    kinds.dedup();
    let o = AugmentOptions {
        data: a.data,
        image_roots: a.image_roots,
        out: a.out,
        kinds,
        per_kind: a.per_kind,
        seed: a.seed,
        companions: a.companions,
        jpeg_quality: a.jpeg_quality,
        skip_bad: a.skip_bad,
        overwrite: a.overwrite,
    };
    let pb = bar(0, "composing");
    let summary = miadpo::augment::run(&o, &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    eprintln!(
        "augment: {} samples read, {} used, {} skipped",
        summary.samples_read,
        summary.samples_used,
        summary.samples_read - summary.samples_used
    );
    for (reason, n) in summary.skip_reasons() {
        eprintln!("  skipped {n:>7}  {reason}");
    }
    for (kind, n) in &summary.records {
        eprintln!(
            "  {:<9} {n:>7} records -> {}",
            kind.name(),
            o.out.join(format!("{kind}.json")).display()
        );
    }
    if summary.companion_fallbacks > 0 {
        eprintln!(
            "  {} record(s) drew companions from other datasets: their own dataset holds too few images",
            summary.companion_fallbacks
        );
    }
    if !summary.skipped.is_empty() {
        eprintln!(
            "  skipped samples are listed in {}",
            o.out.join("skipped.jsonl").display()
        );
    }
    Ok(())
}

fn select<B: Backend>(a: SelectArgs, be: B) -> Result<()> {
    let model = load_model(&a.m, be)?;
    let o = SelectOptions {
        data: a.data,
        image_roots: a.image_roots,
        out: a.out,
        template: a.m.template,
        aspect: a.m.aspect,
        generate: GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            attn_layer: a.attn_layer,
            use_adapter: true,
        },
        ratio_threshold: a.ratio_threshold,
        ppl_threshold: a.ppl_threshold,
        post: (!a.no_post_select).then_some(PostSelect {
            max_ppl: a.post_max_ppl,
            max_length_ratio: a.post_max_length_ratio,
            min_edit_distance: a.post_min_edit_distance,
        }),
        max_gt_chars: a.max_gt_chars,
        batch_size: a.batch_size,
        shard: a.shard,
        skip_bad: a.skip_bad,
    };
    let pb = bar(0, "selecting");
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} selecting {bar:30} {pos}/{len} records [{elapsed} < {eta}] {msg}",
        )
        .expect("static template"),
    );
    let t0 = std::time::Instant::now();
    let s = miadpo::select::run(&model, &o, &mut |p| {
        pb.set_length(p.total as u64);
        pb.set_position(p.done as u64);
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!(
            "{} kept, {:.2} answers/s, {:.1} tokens/s",
            p.kept,
            p.done as f64 / secs,
            p.tokens as f64 / secs
        ));
    })?;
    pb.finish_and_clear();
    let kept: usize = s.kept.values().sum();
    let dropped: usize = s.dropped.values().sum();
    let skipped: usize = s.skipped.values().sum();
    eprintln!(
        "select: {} records (shard {}/{}), {} decided by an earlier run, {} skipped, {} answered",
        s.seen, o.shard.index, o.shard.count, s.resumed, skipped, s.answers
    );
    for (reason, n) in &s.skipped {
        eprintln!("  skipped {n:>7}  {reason}");
    }
    eprintln!("  kept    {kept:>7}  -> {}", o.out.display());
    for ((kind, n_img), n) in &s.kept {
        eprintln!("          {n:>7}  {kind}, {n_img} images");
    }
    eprintln!(
        "  dropped {dropped:>7}  -> {}",
        miadpo::select::run::dropped_path(&o.out).display()
    );
    for (reason, n) in &s.dropped {
        eprintln!("          {n:>7}  {reason}");
    }
    if s.answers > 0 {
        eprintln!(
            "  {} answers, {} tokens in {:.1} s: {:.2} answers/s, {:.1} tokens/s",
            s.answers,
            s.tokens,
            s.seconds,
            s.answers as f64 / s.seconds,
            s.tokens as f64 / s.seconds
        );
    }
    if let Some(mib) = model.be.peak_memory_mib() {
        eprintln!("  peak device memory {mib:.0} MiB");
    }
    Ok(())
}

/// What both training stages resolve from the flags before they differ.
struct TrainCommon {
    lr: f64,
    schedule: Schedule,
    warmup_ratio: f64,
    /// the settings a resume must keep that every stage has (--steps/--epochs may grow, the data file
    /// may move)
    run: miadpo::train::checkpoint::RunSettings,
}

fn train_cmd<B: Backend>(a: TrainArgs, given: &[String], be: B) -> Result<()> {
    let sft = a.stage == TrainStage::Sft;
    if sft {
        let dpo_only: Vec<String> = DPO_ONLY
            .iter()
            .filter(|id| given.iter().any(|g| g == *id))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if !dpo_only.is_empty() {
            bail!(
                "{} only appl{} to --stage dpo: --stage sft trains every weight of the projector and decoder (no LoRA, reference or DPO loss){}",
                dpo_only.join(", "),
                if dpo_only.len() == 1 { "ies" } else { "y" },
                if given.iter().any(|g| g == "adapter") {
                    "; to fine-tune an adapted model, merge the adapter into it first"
                } else {
                    ""
                }
            );
        }
    }
    let (lr, schedule, warmup_ratio) = if sft {
        (
            a.lr.unwrap_or(2e-5),
            a.schedule.unwrap_or(Schedule::Cosine),
            a.warmup_ratio.unwrap_or(0.03),
        )
    } else {
        (
            a.lr.unwrap_or(5e-5),
            a.schedule.unwrap_or(Schedule::Linear),
            a.warmup_ratio.unwrap_or(0.1),
        )
    };
    for (ok, what) in [
        (
            (0.0..1.0).contains(&a.lora_dropout),
            "--lora-dropout must be in [0, 1)",
        ),
        (
            (0.0..1.0).contains(&a.adam_beta1),
            "--adam-beta1 must be in [0, 1)",
        ),
        (
            (0.0..1.0).contains(&a.adam_beta2),
            "--adam-beta2 must be in [0, 1)",
        ),
        (a.adam_eps > 0.0, "--adam-eps must be positive"),
        (lr >= 0.0 && lr.is_finite(), "--lr must be a finite number >= 0"),
        (
            (0.0..=1.0).contains(&warmup_ratio),
            "--warmup-ratio must be in [0, 1]",
        ),
        (a.lora_r > 0, "--lora-r must be at least 1"),
        (
            a.batch_size > 0 && a.grad_accum > 0,
            "--batch-size and --grad-accum must be at least 1",
        ),
    ] {
        if !ok {
            bail!("{what}");
        }
    }
    if a.out.join("metrics.jsonl").exists() && !a.resume {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            a.out.display()
        );
    }
    let mut run: miadpo::train::checkpoint::RunSettings = [
        ("--stage", format!("{:?}", a.stage).to_lowercase()),
        ("--template", format!("{:?}", a.m.template)),
        ("--aspect", format!("{:?}", a.m.aspect)),
        ("--max-length", a.max_length.to_string()),
        ("--optimizer", format!("{:?}", a.optimizer)),
        ("--lr", lr.to_string()),
        ("--adam-beta1", a.adam_beta1.to_string()),
        ("--adam-beta2", a.adam_beta2.to_string()),
        ("--adam-eps", a.adam_eps.to_string()),
        ("--weight-decay", a.weight_decay.to_string()),
        ("--schedule", format!("{schedule:?}")),
        ("--warmup-ratio", warmup_ratio.to_string()),
        ("--max-grad-norm", a.max_grad_norm.to_string()),
        ("--batch-size", a.batch_size.to_string()),
        ("--grad-accum", a.grad_accum.to_string()),
        ("--seed", a.seed.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if !sft {
        run.extend(
            [
                ("--adapter-init", format!("{:?}", a.adapter_init)),
                ("--lora-r", a.lora_r.to_string()),
                ("--lora-alpha", a.lora_alpha.to_string()),
                ("--lora-targets", a.lora_targets.join(",")),
                ("--lora-dropout", a.lora_dropout.to_string()),
                ("--loss", a.loss.to_string()),
                ("--beta", a.beta.to_string()),
                ("--label-smoothing", a.label_smoothing.to_string()),
                ("--sft-weight", a.sft_weight.to_string()),
                ("--prefix-sharing", a.prefix_sharing.to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
    }
    let common = TrainCommon {
        lr,
        schedule,
        warmup_ratio,
        run,
    };
    if sft {
        train_sft(a, common, be)
    } else {
        train_dpo(a, common, be)
    }
}

impl TrainArgs {
    /// The loop settings of `--steps` steps (or `--epochs` over `n` examples).
    fn loop_config(&self, c: &TrainCommon, n: usize) -> miadpo::train::trainer::LoopConfig {
        let per_step = self.batch_size * self.grad_accum;
        miadpo::train::trainer::LoopConfig {
            optim: OptimConfig {
                kind: self.optimizer,
                weight_decay: self.weight_decay,
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                eps: self.adam_eps,
            },
            lr: c.lr,
            schedule: c.schedule,
            warmup_ratio: c.warmup_ratio,
            max_grad_norm: self.max_grad_norm,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            steps: self.steps.unwrap_or(self.epochs * n.div_ceil(per_step.max(1))),
            seed: self.seed,
            // the host copies as often as a checkpoint reads them (and when the run returns)
            sync_every: self.save_every,
        }
    }
}

/// OUT/metrics.jsonl opened for appending, with only the lines of the steps up to `step` (those the
/// checkpoint being resumed holds) kept.
fn open_metrics(out: &Path, step: usize) -> Result<std::fs::File> {
    let path = out.join("metrics.jsonl");
    let kept: String = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, kept).with_context(|| path.display().to_string())?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| path.display().to_string())
}

/// SIGINT/SIGTERM: the first asks the loop to stop at the next sequence boundary (the step in
/// progress is abandoned, then a checkpoint is written); a second one exits at once.
fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("interrupt: stopping after the current sequence and writing a checkpoint (interrupt again to exit now)");
    })
    .context("installing the SIGINT/SIGTERM handler")?;
    Ok(stop)
}

/// What every stage does after a step: the metrics line (OUT/metrics.jsonl), the step line (stdout),
/// and a checkpoint every `--save-every` steps (`save` writes it; older ones beyond
/// `--save-total-limit` are removed).
fn after_step<X: Serialize>(
    metrics: &mut std::fs::File,
    a: &TrainArgs,
    steps: usize,
    s: &miadpo::train::trainer::StepMetrics<X>,
    line: String,
    st: &miadpo::train::trainer::TrainState,
    save: &mut dyn FnMut() -> miadpo::Result<PathBuf>,
) -> miadpo::Result<()> {
    let path = a.out.join("metrics.jsonl");
    if s.skipped {
        eprintln!("step {}: loss or gradient not finite, update skipped", s.step);
    }
    let json = serde_json::to_string(s).expect("metrics serialize");
    writeln!(metrics, "{json}").map_err(|e| miadpo::Error::io(&path, e))?;
    println!("step {:>5}/{steps}  {line}", s.step);
    if a.save_every > 0 && st.step.is_multiple_of(a.save_every) && st.step < steps {
        let dir = save()?;
        eprintln!("checkpoint {}", dir.display());
        miadpo::train::checkpoint::prune(&a.out, a.save_total_limit)?;
    }
    Ok(())
}

fn train_dpo<B: Backend>(a: TrainArgs, c: TrainCommon, be: B) -> Result<()> {
    use miadpo::model::lora::Proj;
    use miadpo::train::adapter::LoraWeights;
    use miadpo::train::checkpoint;
    let targets = a
        .lora_targets
        .iter()
        .map(|t| {
            Proj::ALL
                .into_iter()
                .find(|p| p.path().ends_with(&format!(".{t}")))
                .with_context(|| format!("--lora-targets: unknown module `{t}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut model = Llava::load(&a.m.model, be)?;
    let base = checkpoint::base_fingerprint(&a.m.model)?;
    let pass = PassOptions {
        checkpointing: a.gradient_checkpointing,
        lora_dropout: a.lora_dropout,
        prefix_sharing: a.prefix_sharing,
    };
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let pb = bar(0, "reference log-probs");
    let prepared = miadpo::train::data::prepare_pairs(
        &model,
        &a.data,
        &a.image_roots,
        a.m.template,
        a.m.aspect,
        a.max_length,
        &base,
        pass,
        Some(&miadpo::train::data::cache_path(&a.out)),
        &mut |i, n| {
            pb.set_length(n as u64);
            pb.set_position(i as u64);
        },
    )?;
    pb.finish_and_clear();
    for (id, why) in &prepared.skipped {
        eprintln!("skipped `{id}`: {why}");
    }
    if prepared.pairs.is_empty() {
        bail!("{}: no usable pair", a.data.display());
    }
    if prepared.cached > 0 {
        eprintln!(
            "reference log-probs of {} pairs read from {}",
            prepared.cached,
            miadpo::train::data::cache_path(&a.out).display()
        );
    }
    let run = &c.run;
    let resumed = if a.resume {
        checkpoint::latest(&a.out)
    } else {
        None
    };
    let mut state = miadpo::train::trainer::TrainState::default();
    let mut w = match (&resumed, &a.adapter_init) {
        (Some(dir), _) => {
            let (w, st) = checkpoint::load(dir, model.cfg.text.num_layers, &base, run)?;
            eprintln!("resuming from {} (step {})", dir.display(), st.step);
            state = st;
            w
        }
        (None, Some(dir)) => {
            model.load_adapter(dir)?;
            LoraWeights::from_adapter(model.adapter.as_ref().expect("just loaded"))?
        }
        (None, None) => {
            let t = model.cfg.text.clone();
            LoraWeights::init(t.num_layers, &targets, a.lora_r, a.lora_alpha, a.seed, |_, p| {
                p.shape(&t)
            })
        }
    };
    let cfg = miadpo::train::trainer::TrainConfig {
        dpo: DpoConfig {
            loss: a.loss,
            beta: a.beta,
            label_smoothing: a.label_smoothing,
            sft_weight: a.sft_weight,
        },
        pass,
        run: a.loop_config(&c, prepared.pairs.len()),
    };
    let steps = cfg.run.steps;
    let mut metrics = open_metrics(&a.out, state.step)?;
    eprintln!(
        "train: {} pairs ({} skipped), {steps} steps of {} pairs, {} loss, beta {}, LoRA r={} alpha={}",
        prepared.pairs.len(),
        prepared.skipped.len(),
        a.batch_size * a.grad_accum,
        a.loss,
        a.beta,
        w.r,
        w.alpha
    );
    let stop = stop_flag()?;
    let outcome = miadpo::train::trainer::train(
        &mut model,
        &mut w,
        &mut state,
        &prepared.pairs,
        &cfg,
        &stop,
        &mut |s, st, w| {
            let g = &s.stage;
            let line = format!(
                "loss {:.4}  acc {:.2}  margin {:+.4}  chosen {:+.4}  rejected {:+.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
                s.loss, g.accuracies, g.margins, g.rewards_chosen, g.rewards_rejected, s.lr, s.grad_norm, s.tokens_per_s
            );
            after_step(&mut metrics, &a, steps, s, line, st, &mut || {
                checkpoint::save(&a.out, w, st, &base, run)
            })
        },
    )?;
    let dir = checkpoint::save(&a.out, &w, &state, &base, run)?;
    checkpoint::prune(&a.out, a.save_total_limit)?;
    if outcome.interrupted {
        eprintln!(
            "interrupted after step {}/{steps}: checkpoint {}; continue with the same command plus --resume",
            state.step,
            dir.display()
        );
        return Ok(());
    }
    let adapter_dir = a.out.join("adapter");
    w.save_peft(&adapter_dir, &a.m.model.display().to_string())?;
    eprintln!(
        "adapter written to {} (load it with --adapter)",
        adapter_dir.display()
    );
    Ok(())
}

fn train_sft<B: Backend>(a: TrainArgs, c: TrainCommon, be: B) -> Result<()> {
    use miadpo::train::checkpoint::{self, Slots};
    use miadpo::train::sft::{prepare_samples, SftStage};
    let mut model = Llava::load(&a.m.model, be)?;
    let base = checkpoint::base_fingerprint(&a.m.model)?;
    let pass = PassOptions {
        checkpointing: a.gradient_checkpointing,
        ..Default::default()
    };
    std::fs::create_dir_all(&a.out).with_context(|| a.out.display().to_string())?;
    let pb = bar(0, "image features");
    let data = prepare_samples(
        &model,
        &a.data,
        &a.image_roots,
        a.m.template,
        a.m.aspect,
        a.max_length,
        &mut |i, n| {
            pb.set_length(n as u64);
            pb.set_position(i as u64);
        },
    )?;
    pb.finish_and_clear();
    for (id, why) in &data.skipped {
        eprintln!("skipped `{id}`: {why}");
    }
    if data.samples.is_empty() {
        bail!("{}: no usable conversation", a.data.display());
    }
    if data.later_turns > 0 {
        eprintln!(
            "note: {} conversations have more turns after the first answer; only the first question and answer of each are trained",
            data.later_turns
        );
    }
    let run = &c.run;
    let resumed = if a.resume {
        checkpoint::latest(&a.out)
    } else {
        None
    };
    let (mut stage, mut state) = match &resumed {
        Some(dir) => {
            checkpoint::verify(dir, &base, run)?;
            let stage = SftStage::new(&model, &dir.join("model"), pass)?;
            let st = checkpoint::load_named(dir, &stage.names(), &base, run)?;
            eprintln!("resuming from {} (step {})", dir.display(), st.step);
            (stage, st)
        }
        None => (
            SftStage::new(&model, &a.m.model, pass)?,
            miadpo::train::trainer::TrainState::default(),
        ),
    };
    let cfg = a.loop_config(&c, data.samples.len());
    let steps = cfg.steps;
    let mut metrics = open_metrics(&a.out, state.step)?;
    let tokens: usize = data.samples.iter().map(|s| s.answer.len()).sum();
    eprintln!(
        "train --stage sft: {} conversations ({} skipped, {tokens} answer tokens), {steps} steps of {} conversations, {:.1}M parameters (projector + decoder), lr {:e} {} after {:.0}% warmup",
        data.samples.len(),
        data.skipped.len(),
        a.batch_size * a.grad_accum,
        stage.num_params() as f64 / 1e6,
        c.lr,
        c.schedule,
        c.warmup_ratio * 100.0,
    );
    let names = stage.names();
    let write = |stage: &SftStage<B>, st: &miadpo::train::trainer::TrainState| {
        checkpoint::save_with(&a.out, st, Slots::Named(&names), &base, run, &mut |tmp| {
            stage.write_model(&a.m.model, &tmp.join("model"))
        })
    };
    let stop = stop_flag()?;
    let outcome = miadpo::train::trainer::run_steps(
        &mut model,
        &mut stage,
        &mut state,
        &data.samples,
        &cfg,
        &stop,
        &mut |s, st, stage| {
            let line = format!(
                "loss {:.4}  acc {:.3}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
                s.loss, s.stage.mean_token_accuracy, s.lr, s.grad_norm, s.tokens_per_s
            );
            after_step(&mut metrics, &a, steps, s, line, st, &mut || write(stage, st))
        },
    )?;
    let dir = write(&stage, &state)?;
    checkpoint::prune(&a.out, a.save_total_limit)?;
    if outcome.interrupted {
        eprintln!(
            "interrupted after step {}/{steps}: checkpoint {}; continue with the same command plus --resume",
            state.step,
            dir.display()
        );
        return Ok(());
    }
    let model_dir = a.out.join("model");
    stage.save_model(&a.m.model, &model_dir)?;
    eprintln!(
        "model written to {} (a llava-hf checkpoint: --model {} loads it)",
        model_dir.display(),
        model_dir.display()
    );
    Ok(())
}

#[derive(Serialize)]
struct GenerateJson<'a> {
    prompt_tokens: usize,
    token_ids: &'a [u32],
    text: &'a str,
    image_attention: &'a [f64],
    attn_layer: usize,
    max_softmax_ppl: f64,
}

fn generate<B: Backend>(a: GenerateArgs, be: B) -> Result<()> {
    let placeholders = a
        .prompt
        .matches(miadpo::text::tokenizer::IMAGE_PLACEHOLDER)
        .count();
    if placeholders != a.images.len() {
        bail!(
            "--prompt has {placeholders} `<image>` placeholder(s) but {} --image was given (one `<image>` per image, in order)",
            a.images.len()
        );
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let model = load_model(&a.m, be)?;
    let prompt = model.prompt(a.m.template, &a.prompt, a.images.len(), "--prompt")?;
    let pixels = a
        .images
        .iter()
        .map(|p| model.pixels(p, a.m.aspect))
        .collect::<miadpo::Result<Vec<_>>>()?;
    let features = model.image_features(&pixels);
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        attn_layer: a.attn_layer,
        use_adapter: true,
    };
    let pb = bar(a.max_new_tokens as u64, "generating");
    let g = model.generate_ids_with(&prompt, &features, &prompt.image_spans, &opts, &mut |n| {
        pb.set_position(n as u64)
    })?;
    pb.finish_and_clear();
    let mut out = std::io::stdout().lock();
    if a.json {
        let j = GenerateJson {
            prompt_tokens: g.prompt_tokens,
            token_ids: &g.token_ids,
            text: &g.text,
            image_attention: &g.image_attention,
            attn_layer: g.attn_layer,
            max_softmax_ppl: g.max_softmax_ppl,
        };
        writeln!(out, "{}", serde_json::to_string(&j)?)?;
    } else {
        writeln!(out, "{}", g.text)?;
        let att: Vec<String> = g
            .image_attention
            .iter()
            .enumerate()
            .map(|(i, r)| format!("Image{} {r:.4}", i + 1))
            .collect();
        writeln!(
            out,
            "[{} new tokens after a {}-token prompt; image attention at layer {}: {}; max-softmax ppl {:.4}]",
            g.token_ids.len(),
            g.prompt_tokens,
            g.attn_layer,
            if att.is_empty() {
                "n/a (fewer than 2 tokens)".to_string()
            } else {
                att.join(", ")
            },
            g.max_softmax_ppl
        )?;
    }
    Ok(())
}

#[derive(Serialize)]
struct ScoreJson<'a> {
    id: &'a str,
    chosen_logp: f64,
    rejected_logp: f64,
    chosen_tokens: usize,
    rejected_tokens: usize,
}

fn score<B: Backend>(a: ScoreArgs, be: B) -> Result<()> {
    let model = load_model(&a.m, be)?;
    let pairs = load_pairs(&a.pairs.data)?;
    let pb = bar(pairs.len() as u64, "scoring");
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "{:<24} {:>14} {:>14} {:>7} {:>7}",
            "id", "chosen_logp", "rejected_logp", "c_tok", "r_tok"
        )?;
    }
    for p in &pairs {
        let PairInputs {
            prompt,
            chosen,
            rejected,
            features,
        } = pair_inputs(&model, p, &a.pairs.image_roots, a.m.template, a.m.aspect)
            .with_context(|| format!("{}", a.pairs.data.display()))?;
        let lps = model.sequence_logps(&prompt, &features, &[chosen.clone(), rejected.clone()], true)?;
        pb.suspend(|| -> Result<()> {
            if a.json {
                let j = ScoreJson {
                    id: &p.id,
                    chosen_logp: lps[0],
                    rejected_logp: lps[1],
                    chosen_tokens: chosen.len(),
                    rejected_tokens: rejected.len(),
                };
                writeln!(out, "{}", serde_json::to_string(&j)?)?;
            } else {
                writeln!(
                    out,
                    "{:<24} {:>14.4} {:>14.4} {:>7} {:>7}",
                    p.id,
                    lps[0],
                    lps[1],
                    chosen.len(),
                    rejected.len()
                )?;
            }
            Ok(())
        })?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(())
}

fn default_tokenizer() -> Result<PathBuf> {
    let rel = Path::new("tests/fixtures/tiny-llava/model/tokenizer.json");
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    [rel.to_path_buf(), built_in]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no tokenizer for the random model: pass --tokenizer (looked for {})",
                rel.display()
            )
        })
}

fn bench_cmd<B: Backend>(a: BenchArgs, be: B) -> Result<()> {
    if a.task == "ops" || a.list {
        return ops_bench(a, be);
    }
    let tmp;
    let dir = match (&a.model, &a.save_model) {
        (Some(m), None) => m.clone(),
        (Some(_), Some(_)) => bail!("--model and --save-model exclude each other"),
        (None, save) => {
            let spec = RandomSpec::preset(&a.preset)?;
            let tok = match &a.tokenizer {
                Some(t) => t.clone(),
                None => default_tokenizer()?,
            };
            let dir = match save {
                Some(d) => d.clone(),
                None => {
                    tmp = std::env::temp_dir().join(format!("miadpo-bench-{}", std::process::id()));
                    tmp.clone()
                }
            };
            eprintln!("writing a random `{}` LLaVA to {}", a.preset, dir.display());
            write_random_checkpoint(&dir, &spec, 0, &tok)?;
            dir
        }
    };
    let mut model = Llava::load(&dir, be)?;
    if a.task == "train" {
        let opts = bench::TrainBenchOptions {
            prompt_tokens: a.prompt_tokens,
            answer_tokens: a.answer_tokens,
            lora_r: a.lora_r,
            pass: PassOptions {
                checkpointing: a.gradient_checkpointing,
                prefix_sharing: a.prefix_sharing,
                lora_dropout: 0.0,
            },
            repeats: a.repeats,
            warmup: a.warmup,
        };
        let pb = bar((a.warmup + a.repeats) as u64, "DPO steps");
        let r = bench::run_train(&mut model, &opts, |i, _| pb.set_position(i as u64))?;
        pb.finish_and_clear();
        if a.model.is_none() && a.save_model.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let cpu = model.be.hardware();
        if a.json {
            let mut v = serde_json::to_value(&r)?;
            v["runtime"] = "miadpo".into();
            v["device"] = cpu.into();
            v["model"] = dir.display().to_string().into();
            println!("{}", serde_json::to_string(&v)?);
        } else {
            println!(
                "miadpo {} on {cpu} ({} threads), DPO step, batch 1: prompt {} tokens, answers {} tokens, LoRA r={}, checkpointing {}, prefix sharing {}, {} repeats:",
                model.be_name(),
                r.threads,
                r.prompt_tokens,
                r.answer_tokens,
                r.lora_r,
                r.gradient_checkpointing,
                r.prefix_sharing,
                r.repeats
            );
            println!(
                "  step {:.3} s (min {:.3}, max {:.3})  {:.3} pairs/s  {:.1} tok/s  peak RSS {:.0} MiB  (reference pass {:.3} s, once per pair)",
                r.step_s.median, r.step_s.min, r.step_s.max, r.pairs_per_s, r.tokens_per_s, r.peak_rss_mib, r.reference_s
            );
            println!(
                "  of which update {:.3} s (gradient norm, clipping, optimizer, weights into the model), forward + backward {:.3} s",
                r.update_s.median,
                r.step_s.median - r.update_s.median
            );
        }
        return Ok(());
    }
    let opts = BenchOptions {
        prompt_tokens: a.prompt_tokens,
        new_tokens: a.new_tokens,
        repeats: a.repeats,
        warmup: a.warmup,
        batch: a.batch,
    };
    let pb = bar((a.warmup + a.repeats) as u64, "timing");
    let r = bench::run(&model, &opts, |i, _| pb.set_position(i as u64))?;
    pb.finish_and_clear();
    if a.model.is_none() && a.save_model.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let cpu = model.be.hardware();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["runtime"] = "miadpo".into();
        v["device"] = cpu.clone().into();
        v["model"] = dir.display().to_string().into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "miadpo {} on {cpu} ({} threads), prompt {} tokens, {} new tokens{}, {} repeats:",
            model.be_name(),
            r.threads,
            r.prompt_tokens,
            r.new_tokens,
            if r.batch > 1 {
                format!(" for each of {} sequences decoded together", r.batch)
            } else {
                String::new()
            },
            r.repeats
        );
        println!(
            "  prefill {:>9.1} tok/s (min {:.1}, max {:.1})",
            r.prefill_tok_s.median, r.prefill_tok_s.min, r.prefill_tok_s.max
        );
        println!(
            "  decode  {:>9.2} tok/s (min {:.2}, max {:.2})",
            r.decode_tok_s.median, r.decode_tok_s.min, r.decode_tok_s.max
        );
    }
    Ok(())
}

fn eval_cmd<B: Backend>(a: EvalArgs, be: B) -> Result<()> {
    use miadpo::eval::{evaluate, summary_json, table, EvalOptions};
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let model = load_model(&a.m, be)?;
    let o = EvalOptions {
        data: a.data,
        image_roots: a.image_roots,
        template: a.m.template,
        aspect: a.m.aspect,
        max_new_tokens: a.max_new_tokens,
        batch_size: a.batch_size,
        use_adapter: true,
    };
    let pb = bar(0, "answering");
    let t0 = std::time::Instant::now();
    let s = evaluate(&model, &o, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if let Some(p) = &a.predictions {
        let mut lines = String::new();
        for pred in &s.predictions {
            lines += &serde_json::to_string(pred)?;
            lines.push('\n');
        }
        miadpo::augment::run::write_atomic(p, lines.as_bytes())?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary_json(&s))?);
    } else {
        print!("{}", table(&s));
    }
    eprintln!(
        "{} questions in {:.1} s{}",
        s.overall.total,
        t0.elapsed().as_secs_f64(),
        a.predictions
            .as_ref()
            .map(|p| format!(", answers in {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

fn demo_cmd<B: Backend>(a: DemoArgs, be: B) -> Result<()> {
    use miadpo::demo::run::{run, DemoOptions, DemoSettings, Event};
    let device = if be.name() == "cpu" {
        format!(
            "cpu ({}, {} threads)",
            be.hardware(),
            rayon::current_num_threads()
        )
    } else {
        format!("{} ({})", be.name(), be.hardware())
    };
    let o = DemoOptions {
        out: a.out.clone(),
        seed: a.seed,
        settings: if a.quick {
            DemoSettings::quick()
        } else {
            DemoSettings::full()
        }
        .with_overrides(&a.sets)?,
        selection: a.selection,
        post_select: !a.no_post_select,
        tokenizer: match a.tokenizer {
            Some(t) => t,
            None => default_tokenizer()?,
        },
        device: device.clone(),
        sft_from: a.sft_from.clone(),
    };
    eprintln!(
        "demo{} in {} on {device}, seed {}",
        if a.quick { " --quick" } else { "" },
        a.out.display(),
        a.seed
    );
    let mut pb: Option<ProgressBar> = None;
    let summary = run(be, &o, &mut |e| match e {
        Event::Start {
            stage,
            index,
            of,
            what,
        } => {
            let p = ProgressBar::new(0);
            p.set_style(
                ProgressStyle::with_template(&format!(
                    "[{index}/{of}] {stage:<11} {{bar:30}} {{pos}}/{{len}} [{{elapsed}} < {{eta}}] {{msg}}"
                ))
                .expect("static template"),
            );
            p.set_message(what);
            pb = Some(p);
        }
        Event::Progress { done, total, msg } => {
            if let Some(p) = &pb {
                p.set_length(total as u64);
                p.set_position(done as u64);
                if !msg.is_empty() {
                    p.set_message(msg);
                }
            }
        }
        Event::Done { stage, seconds, line } => {
            if let Some(p) = pb.take() {
                p.finish_and_clear();
            }
            eprintln!("{stage:<11} {seconds:>6.1} s  {line}");
        }
    })?;
    let (b, f) = (&summary.before, &summary.after);
    println!(
        "{:<22} {:>8} {:>8} {:>8}",
        "accuracy", "before", "after", "change"
    );
    for (name, x, y) in [
        ("single-image", b.single_image_accuracy, f.single_image_accuracy),
        ("multi-image", b.multi_image_accuracy, f.multi_image_accuracy),
        ("  sequence", b.sequence, f.sequence),
        ("  grid", b.grid, f.grid),
        ("  pic-in-pic", b.pip, f.pip),
    ] {
        println!(
            "{name:<22} {:>7.1}% {:>7.1}% {:>+8.1}",
            100.0 * x,
            100.0 * y,
            100.0 * (y - x)
        );
    }
    println!(
        "{} DPO pairs ({}); {:.0} s in all; {}",
        summary.pairs,
        summary
            .pairs_by_kind
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        summary.seconds,
        a.out.join("summary.json").display()
    );
    Ok(())
}

fn plot_cmd(a: PlotArgs) -> Result<()> {
    let summary = a.out.join("summary.json");
    if summary.is_file() && a.out.join("sft/metrics.jsonl").is_file() {
        // a demo run: redraw its report
        let png = a.png.unwrap_or_else(|| a.out.join("report.png"));
        let text = std::fs::read(&summary).with_context(|| format!("reading {}", summary.display()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", summary.display()))?;
        miadpo::demo::run::draw_report(&a.out, &v, &png)?;
        println!("wrote {} (the demo report)", png.display());
        return Ok(());
    }
    let png = a.png.unwrap_or_else(|| a.out.join("metrics.png"));
    let title = a.out.display().to_string();
    let s = miadpo::plot::plot_metrics(&a.out.join("metrics.jsonl"), &png, &title)?;
    println!("wrote {} ({} steps)", png.display(), s.steps);
    Ok(())
}

fn kernels_cmd(k: KernelsCmd) -> Result<()> {
    use miadpo::cuda::{nvrtc, ARCHES, FAMILIES};
    match k {
        KernelsCmd::List => {
            for f in FAMILIES {
                for k in f.kernels {
                    println!("{}/{k}", f.name);
                }
            }
            Ok(())
        }
        KernelsCmd::Check { arch } => {
            if !ARCHES.contains(&arch.as_str()) {
                bail!("--arch {arch}: expected one of {}", ARCHES.join(", "));
            }
            let (major, minor) = nvrtc::version()?;
            eprintln!("NVRTC {major}.{minor}, {arch}");
            let mut bad = Vec::new();
            for f in FAMILIES {
                let c = nvrtc::compile(f, &arch)?;
                for note in nvrtc::wgmma_notes(&c.log) {
                    eprintln!("{}: {note}", f.name);
                    bad.push(format!("{}: ptxas serialized wgmma ({note})", f.name));
                }
                for name in f.kernels {
                    let Some(s) = c.stats.iter().find(|s| s.name == *name) else {
                        bad.push(format!("{}/{name}: no ptxas report", f.name));
                        continue;
                    };
                    let spill = s.spill_stores + s.spill_loads;
                    let verdict = match (spill, s.stack) {
                        (0, 0) => "ok",
                        (0, _) => "STACK",
                        _ => "SPILL",
                    };
                    println!(
                        "{:<34} regs={:<4} smem={:<6} spill={:<4} stack={:<4} {verdict}",
                        format!("{}/{name}", f.name),
                        s.regs,
                        s.smem,
                        spill,
                        s.stack
                    );
                    if spill > 0 {
                        bad.push(format!("{}/{name}: {spill} bytes of spills", f.name));
                    } else if s.stack > 0 {
                        // local memory: a register array indexed at run time (slow, like a spill)
                        bad.push(format!("{}/{name}: {} bytes of stack frame", f.name, s.stack));
                    }
                }
            }
            if !bad.is_empty() {
                bail!("{} kernel(s) failed the check: {}", bad.len(), bad.join("; "));
            }
            Ok(())
        }
    }
}

fn ops_bench<B: Backend>(a: BenchArgs, be: B) -> Result<()> {
    if a.list {
        for op in miadpo::opbench::OPS {
            println!("{op}");
        }
        return Ok(());
    }
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let hw = be.hardware();
    let pb = bar(0, "timing ops");
    let results = miadpo::opbench::run(&be, &a.filter, a.seq_len, a.rows, a.repeats, &mut |name| {
        pb.set_message(name.to_string());
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    if results.is_empty() {
        bail!("--filter `{}` matches no op (see --list)", a.filter);
    }
    if a.json {
        for r in &results {
            let mut v = serde_json::to_value(r)?;
            v["device"] = hw.clone().into();
            v["backend"] = be.name().into();
            println!("{}", serde_json::to_string(&v)?);
        }
        return Ok(());
    }
    println!(
        "miadpo {} ops on {hw}, {} repeats, medians (attention T={}, other ops {} rows):",
        be.name(),
        a.repeats,
        a.seq_len,
        a.rows
    );
    println!(
        "{:<30} {:<22} {:>10} {:>14} {:>9}",
        "op", "shape", "ms", "achieved", "of ceil"
    );
    for r in &results {
        let unit = match r.bound {
            miadpo::opbench::Bound::Memory => "GB/s",
            miadpo::opbench::Bound::Compute => "TFLOP/s",
        };
        // the device memory a call takes beyond its inputs, where the backend counts it (GPU)
        let extra = r.extra_mib.map_or(String::new(), |e| format!("  +{e:.0} MiB"));
        println!(
            "{:<30} {:<22} {:>10.3} {:>7.2} {unit:<7}{:>8.0}%{extra}",
            r.name,
            r.shape,
            r.ms.median,
            r.achieved,
            100.0 * r.of_ceiling
        );
    }
    Ok(())
}

fn world_cmd(a: WorldArgs) -> Result<()> {
    use miadpo::demo::world::WorldOptions;
    if a.out.join("train.json").exists() {
        bail!("{} already holds a world: choose another --out", a.out.display());
    }
    let o = WorldOptions {
        out: a.out.clone(),
        seed: a.seed,
        train_scenes: a.train_scenes,
        eval_scenes: a.eval_scenes,
        image_size: a.image_size,
    };
    let pb = bar(0, "drawing scenes");
    // the multi-image questions: augment's three kinds over the held-out questions, companions drawn
    // from held-out scenes only, each with its source question's `task`
    let (w, records) = miadpo::demo::run::build_world(&o, &mut |i, n| {
        pb.set_length(n as u64);
        pb.set_position(i as u64);
    })?;
    pb.finish_and_clear();
    println!(
        "world in {}: {} training records ({} scenes), {} held-out single-image questions, multi-image: {}",
        a.out.display(),
        w.train_records,
        a.train_scenes,
        w.eval_records,
        records
            .iter()
            .map(|(k, n)| format!("{n} {}", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn init_cmd(a: InitArgs) -> Result<()> {
    if a.out.join("config.json").exists() {
        bail!(
            "{} already holds a checkpoint: choose another --out",
            a.out.display()
        );
    }
    let spec = RandomSpec::preset(&a.preset)?;
    let tok = match a.tokenizer {
        Some(t) => t,
        None => default_tokenizer()?,
    };
    write_random_checkpoint(&a.out, &spec, a.seed, &tok)?;
    let params: usize = spec
        .tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    println!(
        "wrote a random `{}` LLaVA ({:.1}M parameters, {} image tokens, {}x{} decoder) to {}",
        a.preset,
        params as f64 / 1e6,
        spec.image_tokens(),
        spec.t_layers,
        spec.t_hidden,
        a.out.display()
    );
    Ok(())
}
