"""`miadpo select` against HF transformers' generate(output_attentions=True) (how MIA-DPO selects) on
the same checkpoint and data, whole processes alternating on one machine: answers/s, tokens/s, peak
memory, and how often the two runtimes gave the same greedy answer.

On a GPU machine: `--device cuda` runs both on GPU 0 (HF in bf16) and reports peak GPU memory
(torch.cuda.max_memory_allocated; miadpo's memory pool high-water mark).

Usage (HF side needs scripts/requirements-hf.txt, e.g. in /work/hfvenv):
  target/release/miadpo bench --save-model /tmp/small-llava --repeats 1 --new-tokens 2
  /work/hfvenv/bin/python scripts/side_by_side_select.py --model /tmp/small-llava --images 2 5 --batch 1 8

Data: scripts/make_select_bench_data.py (8 sequence records per image count, 640x480 images).
miadpo's peak memory is the process's max RSS (/usr/bin/time -v); HF's is ru_maxrss of its process.
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_ours(binary, model, data, root, new_tokens, batch, threads, device):
    out = tempfile.mktemp(suffix=".jsonl")
    # GNU time for the peak RSS where it is installed (GPU machines may lack it: RSS then reads 0)
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
    cmd = timer + [binary, "--threads", str(threads), "select", "--model", model, "--data", data,
           "--image-root", root, "--out", out, "--max-new-tokens", str(new_tokens), "--batch-size", str(batch),
           "--ratio-threshold", "1", "--ppl-threshold", "0", "--no-post-select", "--device", device]
    err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    # the rates as select computes them (its seconds are printed to 0.1 s, too coarse for a short run)
    m = re.search(r"(\d+) answers, (\d+) tokens in [\d.]+ s: ([\d.]+) answers/s, ([\d.]+) tokens/s", err)
    rss_m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rss = int(rss_m.group(1)) / 1024 if rss_m else 0.0
    gpu = re.search(r"peak device memory (\d+) MiB", err)
    answers = {}
    with open(out) as f:
        for line in f:
            r = json.loads(line)
            answers[r["id"]] = r["rejected"]
    for p in (out, out.replace(".jsonl", ".dropped.jsonl")):
        if os.path.exists(p):
            os.remove(p)
    return {"answers_per_s": float(m.group(3)), "tokens_per_s": float(m.group(4)), "peak_rss_mb": rss,
            "peak_gpu_mb": float(gpu.group(1)) if gpu else None, "answers": answers}


def run_hf(model, data, root, new_tokens, batch, threads, device):
    cmd = [sys.executable, os.path.join(HERE, "compare_hf_select.py"), "--model", model, "--data", data,
           "--image-root", root, "--max-new-tokens", str(new_tokens), "--batch-size", str(batch),
           "--threads", str(threads), "--json-only", "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    j["answers"] = {r["id"]: r["answer"] for r in j["records"]}
    return j


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--miadpo", default=os.path.join(HERE, "..", "target", "release", "miadpo"))
    ap.add_argument("--images", type=int, nargs="+", default=[2, 5])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: both on GPU 0 (HF in bf16, eager attention), peak GPU memory in the table")
    a = ap.parse_args()
    mem = "peak_gpu_mb" if a.device == "cuda" else "peak_rss_mb"
    work = tempfile.mkdtemp(prefix="select-bench-")
    rows = []
    for n in a.images:
        d = os.path.join(work, f"seq{n}")
        subprocess.run([sys.executable, os.path.join(HERE, "make_select_bench_data.py"), "--out", d, "--kind",
                        "sequence", "--images", str(n), "--count", str(a.count)], check=True, capture_output=True)
        data = os.path.join(d, "select_bench.json")
        for b in a.batch:
            hf, ours = [], []
            for r in range(a.rounds):
                hf.append(run_hf(a.model, data, d, a.new_tokens, b, a.threads, a.device))
                ours.append(run_ours(a.miadpo, a.model, data, d, a.new_tokens, b, a.threads, a.device))
                # each result as it comes (to stderr), so that a run cut off by a time limit keeps them
                print(f"{n} images, batch {b}, round {r + 1}: HF {hf[-1]['answers_per_s']:.3f} answers/s "
                      f"({hf[-1][mem] or 0:.0f} MiB), miadpo {ours[-1]['answers_per_s']:.3f} "
                      f"({ours[-1][mem] or 0:.0f} MiB)", file=sys.stderr, flush=True)
            med = lambda xs, k: statistics.median(x[k] for x in xs)
            same = sum(ours[-1]["answers"].get(i) == t for i, t in hf[-1]["answers"].items())
            rows.append((n, b, med(hf, "answers_per_s"), med(ours, "answers_per_s"), med(hf, "tokens_per_s"),
                         med(ours, "tokens_per_s"), max(x[mem] or 0 for x in hf),
                         max(x[mem] or 0 for x in ours), same, len(hf[-1]["answers"]), hf[-1]))
    meta = rows[0][-1]
    where = (f"GPU: {meta.get('device')}" if a.device == "cuda"
             else f"CPU: {meta.get('cpu_model', '?')}, {a.threads} threads")
    prec = "bf16" if a.device == "cuda" else "f32"
    print(f"{where}; torch {meta.get('torch')}, transformers "
          f"{meta.get('transformers')} (eager attention, output_attentions=True, {prec}); {a.count} sequence records "
          f"of 640x480 images, {a.new_tokens} new tokens each; medians of {a.rounds} round(s)")
    unit = "peak GPU MiB" if a.device == "cuda" else "peak RSS MiB"
    print(f"| images | batch | HF answers/s | miadpo answers/s | × | HF tokens/s | miadpo tokens/s | HF {unit} | miadpo {unit} | same answers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, b, ha, oa, ht, ot, hm, om, same, tot, _ in rows:
        print(f"| {n} | {b} | {ha:.3f} | {oa:.3f} | {oa / ha:.2f} | {ht:.1f} | {ot:.1f} | {hm:.0f} | {om:.0f} | {same}/{tot} |")


if __name__ == "__main__":
    main()
