"""`miadpo select` against HF transformers' generate(output_attentions=True) (how MIA-DPO selects) on
the same checkpoint and data, whole processes alternating on one machine: answers/s, tokens/s, peak
memory, and how often the two runtimes gave the same greedy answer.

Usage (HF side needs scripts/requirements-hf.txt, e.g. in /work/hfvenv):
  target/release/miadpo bench --save-model /tmp/small-llava --repeats 1 --new-tokens 2
  /work/hfvenv/bin/python scripts/side_by_side_select.py --model /tmp/small-llava --images 2 5 --batch 1 8

Data: scripts/make_select_bench_data.py (8 sequence records per image count, 640x480 images).
miadpo's peak memory is the process's max RSS (/usr/bin/time -v); HF's is ru_maxrss of its process.
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_ours(binary, model, data, root, new_tokens, batch, threads):
    out = tempfile.mktemp(suffix=".jsonl")
    cmd = ["/usr/bin/time", "-v", binary, "--threads", str(threads), "select", "--model", model, "--data", data,
           "--image-root", root, "--out", out, "--max-new-tokens", str(new_tokens), "--batch-size", str(batch),
           "--ratio-threshold", "1", "--ppl-threshold", "0", "--no-post-select"]
    err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    m = re.search(r"(\d+) answers, (\d+) tokens in ([\d.]+) s", err)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024
    answers = {}
    with open(out) as f:
        for line in f:
            r = json.loads(line)
            answers[r["id"]] = r["rejected"]
    for p in (out, out.replace(".jsonl", ".dropped.jsonl")):
        if os.path.exists(p):
            os.remove(p)
    n, tok, secs = int(m.group(1)), int(m.group(2)), float(m.group(3))
    return {"answers_per_s": n / secs, "tokens_per_s": tok / secs, "peak_rss_mb": rss, "answers": answers}


def run_hf(model, data, root, new_tokens, batch, threads):
    cmd = [sys.executable, os.path.join(HERE, "compare_hf_select.py"), "--model", model, "--data", data,
           "--image-root", root, "--max-new-tokens", str(new_tokens), "--batch-size", str(batch),
           "--threads", str(threads), "--json-only"]
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
    a = ap.parse_args()
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
                hf.append(run_hf(a.model, data, d, a.new_tokens, b, a.threads))
                ours.append(run_ours(a.miadpo, a.model, data, d, a.new_tokens, b, a.threads))
                print(f"{n} images, batch {b}, round {r + 1}: HF {hf[-1]['answers_per_s']:.3f} answers/s, "
                      f"miadpo {ours[-1]['answers_per_s']:.3f}", file=sys.stderr, flush=True)
            med = lambda xs, k: statistics.median(x[k] for x in xs)
            same = sum(ours[-1]["answers"].get(i) == t for i, t in hf[-1]["answers"].items())
            rows.append((n, b, med(hf, "answers_per_s"), med(ours, "answers_per_s"), med(hf, "tokens_per_s"),
                         med(ours, "tokens_per_s"), max(x["peak_rss_mb"] for x in hf),
                         max(x["peak_rss_mb"] for x in ours), same, len(hf[-1]["answers"]), hf[-1]))
    meta = rows[0][-1]
    print(f"CPU: {meta.get('cpu_model', '?')}, {a.threads} threads; torch {meta.get('torch')}, transformers "
          f"{meta.get('transformers')} (eager attention, output_attentions=True, f32); {a.count} sequence records "
          f"of 640x480 images, {a.new_tokens} new tokens each; medians of {a.rounds} round(s)")
    print("| images | batch | HF answers/s | miadpo answers/s | × | HF tokens/s | miadpo tokens/s | HF peak RSS MiB | miadpo peak RSS MiB | same answers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, b, ha, oa, ht, ot, hm, om, same, tot, _ in rows:
        print(f"| {n} | {b} | {ha:.3f} | {oa:.3f} | {oa / ha:.2f} | {ht:.1f} | {ot:.1f} | {hm:.0f} | {om:.0f} | {same}/{tot} |")


if __name__ == "__main__":
    main()
