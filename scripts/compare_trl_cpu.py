#!/usr/bin/env python3
"""Times `miadpo train` against TRL's DPOTrainer + PEFT LoRA (CPU PyTorch) on one llava-hf checkpoint.

Both train on the same checkpoint and the same preference pairs, alternating whole processes round after
round on one machine; the script prints pairs/s, step time, setup time, peak RSS and the miadpo/TRL ratios,
with the CPU model and thread count.

Usage (the TRL side needs scripts/requirements-hf.txt + scripts/requirements-trl.txt, e.g. in /work/hfvenv):
  target/release/miadpo bench --save-model /tmp/small-llava --repeats 1     # writes the random "small" LLaVA
  /work/hfvenv/bin/python scripts/make_train_bench_data.py --out /tmp/train-bench --count 8
  /work/hfvenv/bin/python scripts/compare_trl_cpu.py --model /tmp/small-llava \
      --data /tmp/train-bench/train_bench.json --image-root /tmp/train-bench \
      --miadpo target/release/miadpo [--steps 6 --warmup 2 --rounds 1 --threads N] [--json]
      [--gradient-checkpointing] [--miadpo-arg=--gradient-checkpointing=false] [--wait-idle 600 --retries 3]
Without --data, --pairs N pairs (default 8) are written by make_train_bench_data.py into a temporary folder.
--json prints one JSON line with everything instead of the table (progress always goes to stderr).

Protocol (both sides; change both or neither):
  - one process per run: round r runs TRL then miadpo (odd rounds) or miadpo then TRL (even rounds), each
    as a fresh child with OMP_NUM_THREADS/MKL_NUM_THREADS = T; a run trains S optimizer steps of batch B
    (default 1 pair), gradient accumulation 1, from step 1 of a fresh adapter.
  - same hyper-parameters: LoRA r=128 alpha=256 dropout 0 on q,k,v,o,gate,up,down of the LLaMA decoder only
    (vision tower and projector frozen, no LoRA there), sigmoid DPO loss, beta 0.1, AdamW lr 5e-5,
    linear schedule with 10 % warm-up, max grad norm 1, weight decay 0, seed 0.
  - same text: `[BOS] + vicuna_v1(prompt)` with the `<image>` placeholder expanded to image_seq_length image
    tokens, then `tokens(answer) + [EOS]` tokenized on its own (src/text/tokenizer.rs). On the TRL side the
    prompt string is "<s>" + "A chat between a curious user ... USER: <image>\\n... ASSISTANT:" and the
    answers carry a literal "</s>", because TRL's vision collator tokenizes with add_special_tokens=False and
    adds no EOS for vision data; the worker checks that the ids equal miadpo's layout.
  - step time: miadpo's `step_time_s` from OUT/metrics.jsonl (policy forward, loss, backward, clip, AdamW);
    TRL's from a TrainerCallback, time.perf_counter() between on_step_begin and on_step_end (forward,
    reference forward, backward, clip, optimizer step; the batch is collated before on_step_begin and the
    logging happens after on_step_end, so neither is timed). The first --warmup steps of every run are
    dropped; pairs/s = B / median(remaining step times); the headline is the median over rounds.
  - setup: time from process start to the training loop (miadpo: its `train:` line, after model load, image
    features and the reference log-probs of every pair; TRL: on_train_begin, after imports, model load, PEFT
    wrapping and trainer init). Total wall: the whole process, exit included (miadpo writes the final
    checkpoint and adapter; TRL saves nothing).
  - peak RSS: ru_maxrss of each child from os.wait4 (one process, nothing else); max over rounds.
  - contention: at the child's start-of-training line and at every step line the driver samples the machine's
    busy CPU (/proc/stat) and the child's CPU time (/proc/PID/stat); per step it reports the child's cores
    and the other processes' cores (busy minus child). A run whose timed steps saw more than 0.1 other cores
    is contended and the table says so. On a shared machine, --wait-idle S waits (up to S s) for 5 idle
    seconds before every run and --retries N reruns a contended run up to N times, keeping the least
    contended one (the selection looks at contention only, never at speed, and is the same for both sides).
  - tokens per pair: the header gives the dataset mean of prompt, chosen and rejected tokens (identical ids
    on both sides) and the DPO work 2 x prompt + chosen + rejected; the table's "decoder rows/pair" is what
    one policy forward runs per pair in the timed steps: TRL 2 x (prompt + longer answer) (the shorter answer
    is right-padded), miadpo its own count (tokens_per_s x step_time_s: prompt + chosen + rejected with
    prefix sharing, 2 x prompt + chosen + rejected without).

What differs by design (say so when quoting the numbers):
  - reference log-probs: miadpo computes them once per pair before training (inside setup). TRL 1.16 refuses
    precompute_ref_log_probs for vision datasets, so with a PEFT adapter it runs a no-grad reference forward
    with the adapter disabled in every step (its documented behaviour; counted in TRL's step time).
  - vision tower: miadpo computes each image's features once (setup); TRL's collator repeats the image for
    the chosen and rejected rows and runs CLIP in the policy and the reference forward (4 image passes a pair
    a step; frozen, no backward through it).
  - layout: miadpo (with --prefix-sharing, its default where the build has it) runs each pair as one packed
    sequence [prompt | chosen | rejected], the image-heavy prompt once; TRL runs [chosen; rejected] as a
    padded batch of 2 full sequences (prompt twice). See "decoder rows/pair" in the table.
  - compute: TRL loads the model with dtype=float32 (bf16/fp16 off, use_cpu=True, SDPA attention, TRL's
    chunked log-prob LM head); miadpo reads the f16 weights in place and computes in f32.
  - gradient checkpointing: off on the TRL side by default (--gradient-checkpointing turns it on; TRL's
    DPOConfig default is on); miadpo's default is on (recompute in the backward: less memory, more compute).
    The header says what each side ran (miadpo's from `train --help` defaults and --miadpo-arg); to match,
    pass --gradient-checkpointing, or --miadpo-arg=--gradient-checkpointing=false.
  - data order: each side shuffles with its own seed-0 sampler, so the pairs of the timed steps can differ
    (same pairs, other order); the token counts above say how much work a pair is on each side.
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TRAIN_MARKER = "[trl-worker] train begin"
CONTENDED = 0.1  # other processes' CPU use (cores) in a timed step above which a run counts as contended


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_pairs(path):
    """A JSON list or JSONL of {"id", "image", "prompt", "chosen", "rejected"} (as src/data.rs load_pairs)."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def resolve(path, roots):
    if os.path.isabs(path):
        return path
    for r in roots:
        p = os.path.join(r, path)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"image {path!r} not found under {roots}")


# --------------------------------------------------------------------------------------------------------
# TRL worker (this script run as a child with --worker trl)
# --------------------------------------------------------------------------------------------------------

def trl_worker(a):
    t_start = time.perf_counter()
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.x renames (e.g. activation_checkpointing)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    torch.set_num_threads(a.threads)
    import datasets
    import peft
    import transformers
    import trl
    from PIL import Image
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ClipProc
    except ImportError:  # older transformers: the slow processor is the Pillow one
        from transformers import CLIPImageProcessor as ClipProc
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()

    # model: float32 compute, SDPA; `torch_dtype` is the pre-5.x name of `dtype`
    load_kw = {"attn_implementation": "sdpa"}
    load_kw["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(a.model, **load_kw)
    cfg = model.config
    n_img = int(getattr(cfg, "image_seq_length", 0) or 0) or (cfg.vision_config.image_size
                                                              // cfg.vision_config.patch_size) ** 2
    img_tok = int(getattr(cfg, "image_token_index", None) or cfg.image_token_id)

    tok = AutoTokenizer.from_pretrained(a.model)
    if os.path.exists(os.path.join(a.model, "processor_config.json")):
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(a.model)
    else:  # llava-hf folders written by `miadpo bench --save-model` have no processor_config.json
        proc = LlavaProcessor(image_processor=ClipProc.from_pretrained(a.model), tokenizer=tok,
                              patch_size=cfg.vision_config.patch_size,
                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                              num_additional_image_tokens=1, image_token="<image>")
    tok = proc.tokenizer
    bos, eos = tok.bos_token, tok.eos_token

    raw = load_pairs(a.data)
    roots = a.image_root or ["."]
    rows = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for p in raw:
        ims = p["image"] if isinstance(p["image"], list) else [p["image"]]
        rows["images"].append([Image.open(resolve(im, roots)).convert("RGB") for im in ims])
        q = f"{SYSTEM_VICUNA_V1} USER: {p['prompt']} ASSISTANT:"  # src/text/template.rs VicunaV1
        rows["prompt"].append(bos + q)
        rows["chosen"].append(p["chosen"] + eos)
        rows["rejected"].append(p["rejected"] + eos)
    dataset = datasets.Dataset.from_dict(rows)

    # token layout check: [BOS] + tokens(expanded template) / tokens(answer) + [EOS], as miadpo
    tk = tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else None
    layout_ok, lens = True, {"prompt": [], "chosen": [], "rejected": []}
    for i, p in enumerate(raw):
        n_images = len(rows["images"][i])
        o = proc(images=[rows["images"][i]], text=[rows["prompt"][i]], add_special_tokens=False)
        ids = list(o["input_ids"][0])
        c = list(proc(text=[rows["chosen"][i]], add_special_tokens=False)["input_ids"][0])
        r = list(proc(text=[rows["rejected"][i]], add_special_tokens=False)["input_ids"][0])
        if tk is not None:
            q = f"{SYSTEM_VICUNA_V1} USER: {p['prompt']} ASSISTANT:".replace("<image>", "<image>" * n_img)
            want = [tok.bos_token_id] + tk.encode(q, add_special_tokens=False).ids
            want_c = tk.encode(p["chosen"], add_special_tokens=False).ids + [tok.eos_token_id]
            want_r = tk.encode(p["rejected"], add_special_tokens=False).ids + [tok.eos_token_id]
            layout_ok &= ids == want and c == want_c and r == want_r
        layout_ok &= ids.count(img_tok) == n_img * n_images
        lens["prompt"].append(len(ids))
        lens["chosen"].append(len(c))
        lens["rejected"].append(len(r))

    base_collator = DataCollatorForVisionPreference(processor=proc, max_length=None)
    batches = []  # token counts of each collated batch, in order (the trainer collates just before each step)

    def collate(examples):
        out = base_collator(examples)
        am, cm = out["attention_mask"], out["completion_mask"]
        batches.append({"pairs": am.shape[0] // 2, "padded": int(am.numel()), "real": int(am.sum()),
                        "completion": int(cm.sum()), "pixel_rows": int(out["pixel_values"].shape[0])})
        return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_begin, self.step_s, self.logs, self.t_train_begin = None, [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.t_train_begin = time.perf_counter()
            print(TRAIN_MARKER, file=sys.stderr, flush=True)

        def on_step_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t_begin)
            print(f"[trl-worker] step {state.global_step}/{args.max_steps} {self.step_s[-1]:.3f} s",
                  file=sys.stderr, flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs, step=state.global_step))

    out_dir = tempfile.mkdtemp(prefix="trl-worker-")
    conf_kw = dict(output_dir=out_dir, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
                   max_steps=a.steps, learning_rate=a.lr, beta=a.beta, loss_type=["sigmoid"],
                   lr_scheduler_type="linear", warmup_steps=0.1, max_grad_norm=1.0, weight_decay=0.0,
                   eval_strategy="no", save_strategy="no", logging_steps=1, report_to="none", use_cpu=True,
                   bf16=False, fp16=False, gradient_checkpointing=a.gradient_checkpointing, max_length=None,
                   precompute_ref_log_probs=False, seed=0, data_seed=0, disable_tqdm=True,
                   dataloader_num_workers=0)
    args = DPOConfig(**conf_kw)
    lora = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=LORA_REGEX, task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=proc,
                         data_collator=collate, peft_config=lora, callbacks=[timer])
    pm = trainer.model
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    lora_names = [n for n, p in pm.named_parameters() if p.requires_grad]
    bad = [n for n in lora_names if "language_model" not in n or "lora_" not in n]
    if bad:
        raise SystemExit(f"unexpected trainable parameters outside the decoder's LoRA: {bad[:5]}")
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    base_model = pm.get_base_model() if hasattr(pm, "get_base_model") else pm
    gc_flags = [getattr(base_model, n) for n in ("is_activation_checkpointing", "is_gradient_checkpointing")
                if hasattr(type(base_model), n)]
    gc_effective = bool(gc_flags[0]) if gc_flags else None
    setup_s = timer.t_train_begin - t_start
    result = {
        "tool": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "torch": torch.__version__, "datasets": datasets.__version__,
                     "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "compute_dtype": str(next(pm.parameters()).dtype).replace("torch.", ""),
        "optim": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "gradient_checkpointing_effective": gc_effective,
        "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "trainable_params": trainable,
        "lora_modules": len(lora_names) // 2,
        "token_layout_matches_miadpo": bool(layout_ok),
        "dataset_tokens": {k: statistics.mean(v) for k, v in lens.items()},
        "step_s": timer.step_s,
        "batches": batches[:len(timer.step_s)],
        "setup_s_self": setup_s,
        "losses": [l.get("loss") for l in timer.logs if "loss" in l],
        "max_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(a.result, "w") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------------

def cpu_busy_s():
    """System-wide busy CPU seconds (all cores, all processes) from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    steal = v[7] if len(v) > 7 else 0
    return (sum(v[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_s, say, threshold=0.25, quiet_s=5):
    """Waits (at most max_s seconds) until the machine has been nearly idle (< threshold busy cores) for
    quiet_s seconds in a row. Returns the seconds waited."""
    t0 = time.perf_counter()
    quiet, told = 0, False
    while time.perf_counter() - t0 < max_s:
        b0 = cpu_busy_s()
        time.sleep(1)
        b1 = cpu_busy_s()
        if b0 is None or b1 is None:
            return 0.0
        if b1 - b0 < threshold:
            quiet += 1
            if quiet >= quiet_s:
                break
        else:
            quiet = 0
            if not told:
                say(f"  waiting for the machine to go idle ({b1 - b0:.2f} cores busy; --wait-idle {max_s:g} s at most)")
                told = True
    return time.perf_counter() - t0


def run_child(cmd, log_path, marker, env):
    """Runs cmd, tee-ing nothing: stdout+stderr go to log_path with arrival times. Returns wall seconds, the
    seconds until a stderr line starting with `marker` (None if never), exit code and the child's peak RSS
    (MiB, ru_maxrss from wait4: this process alone)."""
    b0 = cpu_busy_s()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1)
    marks = {}
    samples = []  # (seconds since start, machine busy CPU s, child CPU s) at the marker and at every step line
    lock = threading.Lock()
    log = open(log_path, "w")
    tick = os.sysconf("SC_CLK_TCK")

    def child_cpu_s():
        try:
            with open(f"/proc/{p.pid}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()
            return (int(v[11]) + int(v[12])) / tick  # utime + stime, all threads
        except (OSError, ValueError, IndexError):
            return None

    def sample(t):
        samples.append((t, cpu_busy_s(), child_cpu_s()))

    def pump(stream, name):
        for line in stream:
            t = time.perf_counter() - t0
            with lock:
                log.write(f"{t:9.3f} {name} {line}")
                log.flush()
                if name == "err" and marker and line.startswith(marker) and "marker" not in marks:
                    marks["marker"] = t
                    sample(t)
                if name == "err" and line.startswith("[trl-worker] step"):
                    sample(t)
                    print(f"    {line.rstrip()}", file=sys.stderr, flush=True)
                if name == "out" and line.startswith("step "):
                    sample(t)
                    print(f"    [miadpo] {line.rstrip()}", file=sys.stderr, flush=True)

    th = [threading.Thread(target=pump, args=(p.stdout, "out")), threading.Thread(target=pump, args=(p.stderr, "err"))]
    for t in th:
        t.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    b1 = cpu_busy_s()
    own = ru.ru_utime + ru.ru_stime
    # CPU that other processes used during the run, in cores (0 = the machine was the child's alone)
    other = max(0.0, ((b1 - b0) - own) / wall) if b0 is not None and b1 is not None else None
    for t in th:
        t.join()
    log.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    # per step (between consecutive step lines, the first from the marker): the child's CPU use and other
    # processes' CPU use, in cores
    step_own, step_other = [], []
    for (t0_, b0_, c0_), (t1_, b1_, c1_) in zip(samples, samples[1:]):
        dt = t1_ - t0_
        if None in (b0_, b1_, c0_, c1_) or dt <= 0:
            step_own.append(None)
            step_other.append(None)
            continue
        step_own.append((c1_ - c0_) / dt)
        step_other.append(max(0.0, ((b1_ - b0_) - (c1_ - c0_)) / dt))
    return {"wall_s": wall, "marker_s": marks.get("marker"), "rc": p.returncode, "max_rss_mib": ru.ru_maxrss / 1024,
            "cpu_s": own, "other_cpu_cores": other, "step_own_cores": step_own, "step_other_cores": step_other}


def tail(path, n=30):
    with open(path) as f:
        return "".join(f.readlines()[-n:])


def miadpo_train_settings(exe, extra):
    """The effective value of `miadpo train`'s boolean switches that change the work per step
    (--gradient-checkpointing, --prefix-sharing): "absent" when `train --help` has no such flag, else the
    help's [default: ...] unless `extra` (the --miadpo-arg list) sets it."""
    try:
        h = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        h = ""
    out = {}
    for flag in ("--gradient-checkpointing", "--prefix-sharing"):
        m = re.search(re.escape(flag) + r"\b[^\n]*\n(?:(?!\n\s*--).)*?\[default: ([^\]]+)\]", h, re.S)
        val = (m.group(1) if m else "absent") if flag in h else "absent"
        for i, x in enumerate(extra):
            if x == flag:
                nxt = extra[i + 1] if i + 1 < len(extra) else None
                val = nxt if nxt in ("true", "false") else "true"
            elif x.startswith(flag + "="):
                val = x.split("=", 1)[1]
        out[flag.lstrip("-").replace("-", "_")] = val
    return out


def file_id(path):
    """sha256 prefix and mtime of a file (the binary under test may be rebuilt between sessions)."""
    import hashlib
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
        return {"sha256_16": digest, "mtime": mtime}
    except OSError:
        return None


def miadpo_version(exe):
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="llava-hf checkpoint folder")
    ap.add_argument("--data", help="preference pairs (JSON list / JSONL); default: --pairs synthetic pairs")
    ap.add_argument("--image-root", action="append", help="where image paths are resolved (repeatable)")
    ap.add_argument("--pairs", type=int, default=8, help="synthetic pairs to write when --data is not given (8)")
    ap.add_argument("--miadpo", default=os.environ.get("MIADPO", os.path.join(HERE, "..", "target", "release", "miadpo")),
                    help="miadpo binary (default $MIADPO or target/release/miadpo)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the timing (2)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of (TRL, miadpo) processes (default 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads on both sides (default: all cores)")
    ap.add_argument("--batch-size", type=int, default=1, help="pairs per optimizer step (default 1)")
    ap.add_argument("--lora-r", type=int, default=128, help="LoRA rank (default 128)")
    ap.add_argument("--lora-alpha", type=int, default=256, help="LoRA alpha (default 256)")
    ap.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TRL side: turn gradient checkpointing on")
    ap.add_argument("--miadpo-arg", action="append", default=[],
                    help="extra argument for `miadpo train` (repeat; e.g. --miadpo-arg=--some-flag)")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="S",
                    help="before each run wait up to S s for the machine to go idle (shared machines; default 0)")
    ap.add_argument("--retries", type=int, default=0, metavar="N",
                    help="rerun a run whose timed steps were contended up to N times, keeping the least contended "
                         "(default 0)")
    ap.add_argument("--only", choices=["trl", "miadpo"], help="run one side only (debugging)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, metrics) and print its path")
    ap.add_argument("--json", action="store_true", help="print one JSON line with everything instead of the table")
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps <= a.warmup or a.warmup < 0:
        ap.error("--steps must exceed --warmup (>= 0)")
    if a.rounds < 1 or a.threads < 1 or a.batch_size < 1:
        ap.error("--rounds, --threads and --batch-size must be >= 1")
    if a.worker == "trl":
        return trl_worker(a)

    say = lambda *x: print(*x, file=sys.stderr, flush=True)
    work = tempfile.mkdtemp(prefix="compare-trl-")
    if a.data is None:
        ddir = os.path.join(work, "data")
        subprocess.run([sys.executable, os.path.join(HERE, "make_train_bench_data.py"), "--out", ddir,
                        "--count", str(a.pairs)], check=True, stdout=sys.stderr)
        a.data, a.image_root = os.path.join(ddir, "train_bench.json"), [ddir]
        generated = True
    else:
        generated = False
    a.image_root = a.image_root or [os.path.dirname(os.path.abspath(a.data))]
    n_pairs = len(load_pairs(a.data))
    exe = os.path.abspath(a.miadpo)
    if a.only != "trl" and not os.access(exe, os.X_OK):
        ap.error(f"--miadpo {exe} is not an executable")

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(work, "hf-datasets-cache"))
    roots = sum((["--image-root", r] for r in a.image_root), [])
    trl_base = [sys.executable, os.path.abspath(__file__), "--worker", "trl", "--model", a.model, "--data", a.data,
                "--threads", str(a.threads), "--steps", str(a.steps), "--warmup", str(a.warmup),
                "--batch-size", str(a.batch_size), "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha),
                "--lr", repr(a.lr), "--beta", repr(a.beta)] + roots + \
               (["--gradient-checkpointing"] if a.gradient_checkpointing else [])
    mia_base = [exe, "--threads", str(a.threads), "train", "--model", a.model, "--data", a.data] + roots + \
               ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--grad-accum", "1",
                "--lora-r", str(a.lora_r), "--lora-alpha", str(a.lora_alpha), "--lr", repr(a.lr),
                "--beta", repr(a.beta), "--loss", "sigmoid", "--schedule", "linear", "--warmup-ratio", "0.1",
                "--max-grad-norm", "1", "--seed", "0"] + a.miadpo_arg

    def one_run(side, tag):
        log = os.path.join(work, f"{side}-{tag}.log")
        waited = wait_idle(a.wait_idle, say) if a.wait_idle > 0 else 0.0
        say(f"{tag}: {side} ({a.steps} steps) ...")
        if side == "trl":
            res = os.path.join(work, f"trl-{tag}.json")
            c = run_child(trl_base + ["--result", res], log, TRAIN_MARKER, env)
            if c["rc"] != 0 or not os.path.exists(res):
                say(tail(log))
                raise SystemExit(f"TRL worker failed (exit {c['rc']}); log: {log}")
            with open(res) as f:
                j = json.load(f)
            steps = j["step_s"]
            tokens = [b["real"] / b["pairs"] for b in j["batches"]]  # 2 x prompt + chosen + rejected
            rows = [b["padded"] / b["pairs"] for b in j["batches"]]  # 2 x (prompt + longer answer)
        else:
            out = os.path.join(work, f"miadpo-{tag}")
            c = run_child(mia_base + ["--out", out], log, "train:", env)
            if c["rc"] != 0:
                say(tail(log))
                raise SystemExit(f"miadpo train failed (exit {c['rc']}); log: {log}")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                ms = [json.loads(l) for l in f if l.strip()]
            steps = [m["step_time_s"] for m in ms]
            tokens = None  # which pairs a step used is not in the metrics
            rows = [m["tokens_per_s"] * m["step_time_s"] / a.batch_size for m in ms]  # miadpo's own row count
            j = {"losses": [m["loss"] for m in ms]}
            shutil.rmtree(out, ignore_errors=True)  # adapter + optimizer state: ~0.4 GB at r=128
        if len(steps) != a.steps:
            raise SystemExit(f"{side}: {len(steps)} step times for {a.steps} steps; log: {log}")
        timed = steps[a.warmup:]
        med = statistics.median(timed)
        own_t = [x for x in c["step_own_cores"][a.warmup:] if x is not None]
        oth_t = [x for x in c["step_other_cores"][a.warmup:] if x is not None]
        run = {"step_s": steps, "timed_median_s": med, "pairs_per_s": a.batch_size / med,
               "dpo_tokens_per_pair_timed": statistics.mean(tokens[a.warmup:]) if tokens else None,
               "rows_per_pair_timed": statistics.mean(rows[a.warmup:]),
               "setup_s": c["marker_s"], "wall_s": c["wall_s"], "max_rss_mib": c["max_rss_mib"],
               "cpu_s": c["cpu_s"], "other_cpu_cores": c["other_cpu_cores"], "waited_idle_s": waited,
               "step_own_cores": c["step_own_cores"], "step_other_cores": c["step_other_cores"],
               "timed_own_cores": statistics.median(own_t) if own_t else None,
               "timed_other_cores_max": max(oth_t) if oth_t else None,
               "losses": j.get("losses"), "detail": j if side == "trl" else None}
        say(f"{tag} {side:>6}: {a.batch_size / med:.4f} pairs/s (median step {med:.2f} s over "
            f"{len(timed)}), setup {c['marker_s'] or float('nan'):.1f} s, wall {c['wall_s']:.1f} s, "
            f"peak RSS {c['max_rss_mib']:.0f} MiB, other processes {c['other_cpu_cores'] or 0:.2f} cores "
            f"(timed steps: max {run['timed_other_cores_max'] if oth_t else float('nan'):.2f})")
        return run

    def contended(run):
        return run["timed_other_cores_max"] is None or run["timed_other_cores_max"] > CONTENDED

    runs = {"trl": [], "miadpo": []}
    discarded = 0  # contended runs replaced by a rerun
    sides = [s for s in ("trl", "miadpo") if a.only in (None, s)]
    for r in range(a.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            best = None
            for attempt in range(a.retries + 1):
                tag = f"round{r + 1}" + (f"-retry{attempt}" if attempt else "")
                run = one_run(side, tag)
                if best is not None:
                    discarded += 1
                if best is None or (run["timed_other_cores_max"] or 9) < (best["timed_other_cores_max"] or 9):
                    best = run
                if not contended(best):
                    break
                if attempt < a.retries:
                    say(f"  {tag} {side}: contended ({run['timed_other_cores_max'] or float('nan'):.2f} other cores "
                        f"in a timed step); running it again ({attempt + 1}/{a.retries})")
            best["attempts"] = attempt + 1
            runs[side].append(best)

    def agg(side):
        rs = runs[side]
        if not rs:
            return None
        return {"pairs_per_s": statistics.median(x["pairs_per_s"] for x in rs),
                "step_s": statistics.median(x["timed_median_s"] for x in rs),
                "dpo_tokens_per_pair": statistics.mean(x["dpo_tokens_per_pair_timed"] for x in rs)
                if rs[0]["dpo_tokens_per_pair_timed"] is not None else None,
                "rows_per_pair": statistics.mean(x["rows_per_pair_timed"] for x in rs),
                "setup_s": statistics.median(x["setup_s"] for x in rs if x["setup_s"] is not None),
                "wall_s": statistics.median(x["wall_s"] for x in rs),
                "max_rss_mib": max(x["max_rss_mib"] for x in rs),
                "cores_used": statistics.median(x["timed_own_cores"] for x in rs if x["timed_own_cores"] is not None)
                if any(x["timed_own_cores"] is not None for x in rs) else None}

    med = {s: agg(s) for s in ("trl", "miadpo")}
    trl_detail = runs["trl"][0]["detail"] if runs["trl"] else {}
    ratio = None
    if med["trl"] and med["miadpo"]:
        t, m = med["trl"], med["miadpo"]
        ratio = {"pairs_per_s": m["pairs_per_s"] / t["pairs_per_s"], "step_s": m["step_s"] / t["step_s"],
                 "setup_s": m["setup_s"] / t["setup_s"], "wall_s": m["wall_s"] / t["wall_s"],
                 "max_rss_mib": m["max_rss_mib"] / t["max_rss_mib"]}
    mset = miadpo_train_settings(exe, a.miadpo_arg) if a.only != "trl" else {}
    result = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": a.threads,
        "model": os.path.abspath(a.model), "data": os.path.abspath(a.data), "pairs": n_pairs,
        "protocol": {"steps": a.steps, "warmup": a.warmup, "rounds": a.rounds, "batch_size": a.batch_size,
                     "grad_accum": 1, "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "lora_dropout": 0.0,
                     "lora_targets": LORA_TARGETS, "lr": a.lr, "beta": a.beta, "loss": "sigmoid",
                     "schedule": "linear, 10% warm-up", "max_grad_norm": 1.0,
                     "trl_gradient_checkpointing": a.gradient_checkpointing,
                     "miadpo_settings": mset, "miadpo_extra_args": a.miadpo_arg,
                     "wait_idle_s": a.wait_idle, "retries": a.retries, "discarded_contended_runs": discarded},
        "miadpo": {"binary": exe, "version": miadpo_version(exe) if a.only != "trl" else None,
                   "file": file_id(exe) if a.only != "trl" else None},
        "trl": {k: trl_detail.get(k) for k in ("versions", "compute_dtype", "optim", "gradient_checkpointing",
                                               "gradient_checkpointing_effective",
                                               "precompute_ref_log_probs", "attn_implementation",
                                               "trainable_params", "lora_modules", "token_layout_matches_miadpo",
                                               "dataset_tokens")} if trl_detail else None,
        "medians": med, "miadpo_over_trl": ratio,
        "runs": {s: [{k: v for k, v in x.items() if k != "detail"} for x in rs] for s, rs in runs.items()},
    }
    if a.keep:
        result["work_dir"] = work
    else:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(result))
        return

    tv = (result["trl"] or {}).get("versions") or {}
    print(f"CPU: {result['cpu']} ({result['cpu_count']} logical CPUs), {a.threads} threads; model {a.model}")
    src = "synthetic, make_train_bench_data.py --seed 0" if generated else a.data
    print(f"data: {n_pairs} pairs ({src}); {a.steps} steps of {a.batch_size} pair(s) per run, first {a.warmup} "
          f"dropped, {a.rounds} round(s), processes alternated; LoRA r={a.lora_r} alpha={a.lora_alpha} on "
          f"{len(LORA_TARGETS)} decoder linears, sigmoid beta {a.beta}, lr {a.lr:g}")
    if tv:
        d = result["trl"]
        ds = d["dataset_tokens"]
        print(f"TRL {tv.get('trl')} / transformers {tv.get('transformers')} / peft {tv.get('peft')} / torch "
              f"{tv.get('torch')}: {d['compute_dtype']} compute, {d['attn_implementation']} attention, optim "
              f"{d['optim']}, gradient checkpointing {'on' if d['gradient_checkpointing'] else 'off'}"
              + ("" if d.get("gradient_checkpointing_effective") in (None, d["gradient_checkpointing"])
                 else f" (model reports {'on' if d['gradient_checkpointing_effective'] else 'off'})")
              + f", reference "
              f"forward every step (adapter disabled; precompute refused for vision data), "
              f"{d['trainable_params'] / 1e6:.2f}M LoRA params in {d['lora_modules']} modules")
        print(f"tokens per pair (dataset mean, both sides): prompt {ds['prompt']:.1f} (image tokens incl.), chosen "
              f"{ds['chosen']:.1f}, rejected {ds['rejected']:.1f} (EOS incl.); DPO work 2 x prompt + chosen + rejected "
              f"= {2 * ds['prompt'] + ds['chosen'] + ds['rejected']:.1f}; TRL token ids == miadpo's layout: "
              f"{'yes' if d['token_layout_matches_miadpo'] else 'NO'}")
    if a.only != "trl":
        fid = result["miadpo"]["file"] or {}
        sw = lambda v: {"true": "on", "false": "off", "absent": "not in this build"}.get(v, v)
        print(f"{result['miadpo']['version']} ({exe}, sha256 {fid.get('sha256_16', '?')}, built {fid.get('mtime', '?')}): "
              f"f16 weights read in place, f32 compute, reference log-probs once before training; gradient "
              f"checkpointing {sw(mset.get('gradient_checkpointing'))}, prefix sharing "
              f"{sw(mset.get('prefix_sharing'))}" + (f"; extra args {' '.join(a.miadpo_arg)}" if a.miadpo_arg else ""))
    print()
    print("| | pairs/s | step s (median) | decoder rows/pair | CPU cores used | setup s | total wall s "
          "| peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    fc = lambda x: f"{x:.2f}" if x is not None else "?"
    names = {"trl": "TRL DPOTrainer + PEFT (CPU PyTorch, f32)", "miadpo": "miadpo train (CPU backend)"}
    for s in ("trl", "miadpo"):
        m = med[s]
        if m:
            print(f"| {names[s]} | {m['pairs_per_s']:.4f} | {m['step_s']:.2f} | {m['rows_per_pair']:.0f} "
                  f"| {fc(m['cores_used'])} | {m['setup_s']:.1f} | {m['wall_s']:.1f} | "
                  f"{m['max_rss_mib']:.0f} |")
    if ratio:
        print(f"| miadpo / TRL | {ratio['pairs_per_s']:.2f}x | {ratio['step_s']:.2f}x | | | {ratio['setup_s']:.2f}x | "
              f"{ratio['wall_s']:.2f}x | {ratio['max_rss_mib']:.2f}x |")
    print()
    print("setup = process start to the training loop (miadpo: load + image features + reference log-probs of "
          "every pair; TRL: imports + load + PEFT + trainer init). decoder rows/pair = sequence rows one policy "
          "forward runs per pair in the timed steps, as each side counts them (TRL: the padded [chosen; rejected] "
          "batch, 2 x (prompt + longer answer); miadpo: its tokens_per_s x step_time_s, [prompt | chosen | "
          "rejected] with prefix sharing). CPU cores used = the child's CPU time / wall time "
          "over the timed steps (median).")
    print("per step: seconds [child cores / other processes' cores]; the first "
          f"{a.warmup} step(s) of each run are not timed")
    for s in ("trl", "miadpo"):
        for i, x in enumerate(runs[s]):
            cells = []
            for k, t in enumerate(x["step_s"]):
                o = x["step_own_cores"][k] if k < len(x["step_own_cores"]) else None
                q = x["step_other_cores"][k] if k < len(x["step_other_cores"]) else None
                cells.append(f"{t:.2f} [{fc(o)}/{fc(q)}]")
            print(f"  {s} round {i + 1}: " + "  ".join(cells)
                  + "\n    losses: " + " ".join(f"{l:.4f}" for l in (x["losses"] or []) if l is not None))
    other = [x["timed_other_cores_max"] for rs in runs.values() for x in rs if x["timed_other_cores_max"] is not None]
    if other:
        print("other processes' CPU use, max over each run's timed steps (cores, 0 = clean): "
              + " ".join(f"{x:.2f}" for x in other)
              + ("   <- contended: numbers are not clean" if max(other) > CONTENDED else "   (clean)"))
    if a.keep:
        print(f"work folder: {work}")


if __name__ == "__main__":
    main()
