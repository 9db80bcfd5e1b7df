"""Times miadpo and HF transformers (CPU PyTorch) on the same llava-hf checkpoint, alternating whole
processes round after round on one machine, and prints the medians and the miadpo/HF ratios.

Usage (the HF side needs scripts/requirements-hf.txt installed, e.g. in /work/hfvenv):
  target/release/miadpo bench --save-model /tmp/small-llava --repeats 1     # writes the random "small" LLaVA
  /work/hfvenv/bin/python scripts/side_by_side_cpu.py --model /tmp/small-llava \
      --miadpo target/release/miadpo --rounds 3

Each round runs `compare_hf_cpu.py --json-only` and `miadpo bench --json` with the same protocol
(P prompt tokens incl. one image, N greedy decode steps, R timed repeats after a warm-up, T threads).
"""
import argparse, json, os, statistics, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--miadpo", default=os.path.join(HERE, "..", "target", "release", "miadpo"))
    ap.add_argument("--prompt-tokens", type=int, default=320)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    common = ["--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
              "--repeats", str(a.repeats)]
    hf_cmd = [sys.executable, os.path.join(HERE, "compare_hf_cpu.py"), "--model", a.model, "--json-only",
              "--threads", str(a.threads)] + common
    rs_cmd = [a.miadpo, "--threads", str(a.threads), "bench", "--model", a.model, "--json"] + common
    rows = {"hf": {"prefill": [], "decode": []}, "miadpo": {"prefill": [], "decode": []}}
    meta = {}
    for r in range(a.rounds):
        for name, cmd in (("hf", hf_cmd), ("miadpo", rs_cmd)):
            j = run_json(cmd)
            meta[name] = j
            rows[name]["prefill"].append(j["prefill_tok_s"]["median"])
            rows[name]["decode"].append(j["decode_tok_s"]["median"])
            print(f"round {r + 1} {name:>6}: prefill {rows[name]['prefill'][-1]:8.1f} tok/s  "
                  f"decode {rows[name]['decode'][-1]:7.2f} tok/s", file=sys.stderr, flush=True)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in rows.items()}
    cpu = meta["hf"].get("cpu_model", "unknown CPU")
    hf_ver = f"transformers {meta['hf'].get('transformers', '?')} / torch {meta['hf'].get('torch', '?')}"
    print(f"CPU: {cpu}, {a.threads} threads; P={a.prompt_tokens}, N={a.new_tokens}, "
          f"{a.rounds} rounds x {a.repeats} repeats (medians of round medians); HF: {hf_ver}, f32, sdpa")
    print("| | prefill tok/s | decode tok/s |")
    print("|---|---:|---:|")
    print(f"| HF transformers (CPU PyTorch) | {med['hf']['prefill']:.1f} | {med['hf']['decode']:.2f} |")
    print(f"| miadpo (CPU backend) | {med['miadpo']['prefill']:.1f} | {med['miadpo']['decode']:.2f} |")
    print(f"| miadpo / HF | {med['miadpo']['prefill'] / med['hf']['prefill']:.2f}x | "
          f"{med['miadpo']['decode'] / med['hf']['decode']:.2f}x |")
    print(json.dumps({"cpu": cpu, "threads": a.threads, "rounds": rows, "medians": med}))


if __name__ == "__main__":
    main()
