#!/usr/bin/env bash
# One call on a GPU machine (no Rust there): the card, the NVRTC compile check, every GPU test
# (CUDA backend vs CPU twin, op by op and end to end on the fixture), and a markdown summary in $OUT.
#
# Here, before the call:   scripts/build-device-bundle.sh        (writes target/device/, ~18 MiB)
# Device tool call:        command "bash scripts/device-check.sh", carry ["target/device"],
#                          timeout_s 480; the script keeps to BUDGET seconds (default 450) on its own
# Output:                  $OUT/device-check.md (table), $OUT/logs.tgz (gpu-tests.log, kernels-check.log, jsonl),
#                          both rewritten after every section, so a cut-off run still brings back what it did
# SECTIONS (default "kernels tests attention select commands ops sweep profile cpu", in that order,
# most wanted first): a subset for a rerun with little device time left, e.g.
#   SECTIONS="tests select commands" BUDGET=200 bash scripts/device-check.sh
# ("plain" adds variant 1 to the sweep). The time each section took is at the end of the table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
# at most 8 files come back from a device call: everything is written to W, and $OUT gets the table
# and one archive of W
W=$(mktemp -d /tmp/device-check.XXXX)
md="$W/device-check.md"
SECTIONS=${SECTIONS:-kernels tests attention select commands ops sweep profile cpu}
BUDGET=${BUDGET:-450}
t0=$SECONDS
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
# a step's time limit: its own, cut to what is left of BUDGET (minus 10 s to pack); 0 means skip it
cap() { local left=$((BUDGET - (SECONDS - t0) - 10)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 0)) || echo "$1"; }
# tm N CMD...: runs CMD under timeout cap(N), or reports the skip (exit 124 like a timeout)
tm() { local n; n=$(cap "$1"); shift; if [ "$n" = 0 ]; then echo "skipped (out of time): $*" >> "$W/commands.log"; return 124; fi; timeout "$n" "$@"; }
pack() { cp "$md" "$OUT/device-check.md"; (cd "$W" && tar czf "$OUT/logs.tgz" --exclude device-check.md .); }
# lap NAME: notes the section's time and packs what is there so far
laps=""; tl=$SECONDS
lap() { laps="$laps $1=$((SECONDS - tl))s"; tl=$SECONDS; pack; }
# NVRTC 13.0 and cuBLAS 13: the CUDA toolkit's lib64 and/or the nvidia-* wheels that come with torch
nv=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null)
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 "$nv/cu13/lib" "$nv"/*/lib; do
    if [ -e "$d/libnvrtc.so.13" ] || [ -e "$d/libcublas.so.13" ]; then
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" > "$W/env.txt"
# the kernel cache outside $OUT: at most 8 files come back from a device call
export MIADPO_REPO="$PWD" MIADPO_KERNEL_CACHE=/tmp/miadpo-kernel-cache
card=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
{
    echo "# miadpo device check"
    echo
    echo "- date: $(date -u +%FT%TZ)"
    echo "- card: $card"
    echo "- bundle: $(sha256sum target/device/miadpo | cut -c1-16) (miadpo), $(sha256sum target/device/gpu-tests | cut -c1-16) (gpu tests)"
    echo
} > "$md"
nvidia-smi > "$W/nvidia-smi.txt" 2>&1
status=0
new_ok="" # the new attention variants (5, 6) whose tests passed
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
arch="sm_${arch}"; [ "$arch" = "sm_90" ] && arch="sm_90a"
if want kernels; then
echo "## NVRTC compile check ($arch)" >> "$md"
if tm 120 target/device/miadpo kernels check --arch "$arch" > "$W/kernels-check.log" 2>&1; then
    echo "all $(grep -c ' ok$' "$W/kernels-check.log") kernels compile, no spills" >> "$md"
else
    status=1; echo "FAILED (see kernels-check.log)" >> "$md"
fi
echo >> "$md"
lap kernels
fi
if want tests; then
echo "## GPU tests (CUDA backend vs CPU twin)" >> "$md"
echo >> "$md"
# Three processes: every test without attention variants 5 and 6 (never run on a GPU yet), then the
# attention tests with variant 5, then with variant 6, so that a fault of one (a sticky CUDA error
# poisons the process; a barrier deadlock traps after two seconds) cannot take the other tests, or the other
# variant, with it; each one's benchmarks below run only if its tests passed.
# MIADPO_TEST_NO_WGMMA=1 would leave variant 4 out too.
if MIADPO_TEST_NO_NEW=1 tm 240 target/device/gpu-tests --nocapture --test-threads 1 > "$W/gpu-tests.log" 2>&1; then
    if grep -q "skipped: no usable GPU" "$W/gpu-tests.log"; then
        # the tests pass by skipping when the backend cannot start: on this machine that is a failure
        status=1; echo "FAILED: the CUDA backend did not start, every test skipped ($(grep -m1 'skipped: no usable GPU' "$W/gpu-tests.log"))" >> "$md"
    else
        echo "all passed (attention variants 5 and 6 excluded)" >> "$md"
    fi
else
    status=1; echo "FAILED (see gpu-tests.log)" >> "$md"
    # the same tests on variant 2 (forward and backward as verified on an H100 in the first two
    # device sessions): whether the failure is in the newer attention defaults (variant 4's forward
    # with variant 3's backward on sm_90a) or elsewhere
    pack
    if MIADPO_ATTENTION=fused MIADPO_TEST_NO_NEW=1 tm 150 target/device/gpu-tests --nocapture --test-threads 1 \
        > "$W/gpu-tests-fused.log" 2>&1; then
        echo "the same tests with MIADPO_ATTENTION=fused (variant 2 as the default): all passed" >> "$md"
    else
        echo "the same tests with MIADPO_ATTENTION=fused: FAILED too (see gpu-tests-fused.log)" >> "$md"
    fi
    grep -E 'panicked|^test .*FAILED' "$W/gpu-tests.log" | head -20 | sed 's/^/    default: /' >> "$md"
fi
for n in 5 6; do
    : > "$W/gpu-tests-v$n.log"
    [ "$arch" = "sm_90a" ] || continue
    pack
    if MIADPO_TEST_NEW=$n tm 90 target/device/gpu-tests attention --nocapture --test-threads 1 \
        > "$W/gpu-tests-v$n.log" 2>&1; then
        if grep -q "skipped: no usable GPU" "$W/gpu-tests-v$n.log"; then
            status=1; echo "attention tests with variant $n: skipped (no usable GPU)" >> "$md"
        else
            new_ok="$new_ok $n"; echo "attention tests with variant $n: all passed" >> "$md"
        fi
    else
        status=1; echo "attention tests with variant $n: FAILED (see gpu-tests-v$n.log)" >> "$md"
    fi
done
echo >> "$md"
echo '| check | relative error | tolerance | cosine |' >> "$md"
echo '|---|---:|---:|---:|' >> "$md"
{ grep -E 'rel err' "$W/gpu-tests.log"; grep -hE 'rel err' "$W/gpu-tests-v5.log" "$W/gpu-tests-v6.log" | grep -E 'WgmmaBulk|WgmmaOverlap'; } \
    | sed -E 's/^(.*[^ ]) +rel err ([^ ]+) \(tol ([^)]+)\)(  cosine ([^ ]+))?$/| \1 | \2 | \3 | \5 |/' >> "$md"
grep -E '^test |panicked|skipped' "$W/gpu-tests.log" | sed 's/^/    /' >> "$md"
for n in 5 6; do grep -E '^test |panicked|skipped|error' "$W/gpu-tests-v$n.log" | sed "s/^/    variant $n: /" >> "$md"; done
echo >> "$md"
# blocks per SM of every attention kernel the tests launched (the driver's occupancy calculator)
echo '```' >> "$md"
cat "$W/gpu-tests.log" "$W/gpu-tests-v5.log" "$W/gpu-tests-v6.log" 2>/dev/null | grep -E '^occupancy ' | sort -u >> "$md"
echo '```' >> "$md"
echo >> "$md"
# variant 4's tensor-core instructions in the compiled attention family (HGMMA: wgmma; HMMA: mma.sync)
if [ "$arch" = "sm_90a" ] && command -v cuobjdump > /dev/null; then
    echo "## SASS of the attention kernels (per kernel: HGMMA, HMMA)" >> "$md"
    echo >> "$md"
    echo '```' >> "$md"
    for cubin in "$MIADPO_KERNEL_CACHE"/attention-sm_90a-*.cubin; do
        cuobjdump --dump-sass "$cubin" 2>> "$W/commands.log" | awk '
            /Function :/ { name = $3 }
            /HGMMA/ { hg[name]++ } /HMMA/ { hm[name]++ }
            END { for (n in hg) printf "%-36s HGMMA %d\n", n, hg[n]; for (n in hm) if (!(n in hg)) printf "%-36s HMMA %d\n", n, hm[n] }' \
            | sort >> "$md"
    done
    echo '```' >> "$md"
    echo >> "$md"
fi
lap tests
fi
B="target/device/miadpo bench --task ops --device cuda --json"
T="python3 benches/torch_compare.py --device cuda"
# attention at T = 4096, default variant, side by side with SDPA: the issue 7 targets (speed, mass cost)
if want attention; then
tm 60 $B --filter attention --seq-len 4096 --repeats 7 > "$W/attn-miadpo-4096.jsonl" 2>> "$W/commands.log" || status=1
tm 60 $T --filter attention --seq-len 4096 --repeats 7 > "$W/attn-torch-4096.jsonl" 2>> "$W/commands.log" || status=1
# variants 5 and 6 (bulk copies on mbarriers; 6 with Q Kᵀ over the previous P V), sm_90a: variant
# 5 is the default there since the H200 run of 2026-11-27, 6 the candidate to replace it
for n in $new_ok; do
    w=$([ "$n" = 5 ] && echo wgmma-bulk || echo wgmma-overlap)
    MIADPO_ATTENTION=$w tm 60 $B --filter attention --seq-len 4096 --repeats 7 \
        > "$W/attn-$w-4096.jsonl" 2>> "$W/commands.log" || status=1
done
lap attention-4096
fi
# the random "small" LLaVA every later benchmark reads, written once (each bench run would write its own)
S=/tmp/small-llava
small() {
    [ -e "$S/config.json" ] || tm 60 target/device/miadpo bench --save-model "$S" --repeats 1 --warmup 0 \
        --new-tokens 1 --device cpu > /dev/null 2>> "$W/commands.log" || { status=1; return 1; }
}
# bench_both DEV: the generate and train benchmarks on the small LLaVA (the CPU's in section "cpu",
# last: the same numbers as in earlier runs, for the ratio)
bench_both() {
    for task in generate train; do
        echo "bench --task $task --device $1:" >> "$md"
        tm 60 target/device/miadpo bench --model "$S" --task $task --device "$1" --repeats 3 --warmup 1 >> "$md" \
            2>> "$W/commands.log" || { status=1; echo "FAILED" >> "$md"; }
    done
}
# the selection path: miadpo select vs HF generate(output_attentions=True, eager, bf16), random small LLaVA
if want select; then
small
tm 150 python3 scripts/side_by_side_select.py --model "$S" --miadpo target/device/miadpo \
    ${SELECT_ARGS:---images 2 5 --batch 1 8 --new-tokens 16} --device cuda > "$W/select-vs-hf.md" 2>> "$W/commands.log" || status=1
lap select
fi
if want commands; then
echo "## Commands on the GPU (the fixture scored on both; then the random small LLaVA)" >> "$md"
echo >> "$md"
echo '```' >> "$md"
small
# prefix sharing first (issue 7's target: >= 1.3x the two-sequence step on two-image prompts: two
# images of the small LLaVA are 512 of the 600 tokens)
for ps in true false; do
    echo "bench --task train --device cuda --prompt-tokens 600 --prefix-sharing $ps:" >> "$md"
    tm 60 target/device/miadpo bench --model "$S" --task train --device cuda --prompt-tokens 600 --prefix-sharing $ps \
        --repeats 5 --warmup 1 >> "$md" 2>> "$W/commands.log" || { status=1; echo "FAILED" >> "$md"; }
done
python3 - > "$W/pairs.jsonl" <<'PY'
import json
for i, c in enumerate(json.load(open("tests/fixtures/tiny-llava/cases.json"))["score"]):
    im = c["images"]
    print(json.dumps({"id": f"pair{i}", "image": im[0] if len(im) == 1 else im, "prompt": c["prompt"],
                      "chosen": c["chosen"], "rejected": c["rejected"]}))
PY
F=tests/fixtures/tiny-llava
for dev in cpu cuda; do
    echo "score --device $dev:" >> "$md"
    tm 60 target/device/miadpo score --model $F/model --adapter $F/adapter --data "$W/pairs.jsonl" \
        --image-root $F/images --device $dev >> "$md" 2>> "$W/commands.log" || { status=1; echo "FAILED" >> "$md"; }
done
bench_both cuda
# select's batched decode (8 sequences a step, one append and one flash-decoding launch per layer)
echo "bench --task generate --device cuda --batch 8:" >> "$md"
tm 60 target/device/miadpo bench --model "$S" --device cuda --batch 8 --repeats 3 --warmup 1 >> "$md" \
    2>> "$W/commands.log" || { status=1; echo "FAILED" >> "$md"; }
echo '```' >> "$md"
echo >> "$md"
lap commands
fi
if want ops; then
tm 90 $B --seq-len 4096 --rows 4096 --repeats 7 > "$W/ops-miadpo.jsonl" 2>> "$W/commands.log" || status=1
tm 90 $T --seq-len 4096 --rows 4096 --repeats 7 > "$W/ops-torch.jsonl" 2>> "$W/commands.log" || status=1
lap ops
fi
# the sweep: T = 1024 and 16384 side by side with SDPA, the other variants at T = 4096 (variant 1,
# the plain kernel, only when SECTIONS names "plain": ~40 s for numbers that do not change)
if want sweep; then
for t in 1024 16384; do
    tm 60 $B --filter attention --seq-len $t --repeats 3 > "$W/attn-miadpo-$t.jsonl" 2>> "$W/commands.log" || status=1
    tm 60 $T --filter attention --seq-len $t --repeats 3 > "$W/attn-torch-$t.jsonl" 2>> "$W/commands.log" || status=1
done
variants="fused pipelined"
[ "$arch" = "sm_90a" ] && variants="$variants wgmma wgmma128" # variant 4, the default before variant 5
want plain && variants="plain $variants"
for w in $variants; do
    MIADPO_ATTENTION=$w tm 60 $B --filter attention --seq-len 4096 --repeats 5 > "$W/attn-$w-4096.jsonl" 2>> "$W/commands.log" || status=1
done
lap sweep
fi
# where a decode step's time goes (the selection path): every kernel of a few greedy tokens on the
# small LLaVA under Nsight Compute, summed per kernel, against the step's wall time
if want profile && command -v ncu > /dev/null; then
    small
    tm 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$W/ncu-generate.csv" \
        target/device/miadpo bench --model "$S" --task generate --device cuda --repeats 1 --warmup 0 --new-tokens 4 \
        >> "$W/commands.log" 2>&1 || status=1
    python3 - "$W/ncu-generate.csv" > "$W/ncu-summary.md" 2>> "$W/commands.log" <<'PY'
import collections, csv, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))
        if r.get("Metric Name") == "gpu__time_duration.sum"]
tot, cnt = collections.Counter(), collections.Counter()
for r in rows:
    unit = r["Metric Unit"]
    v = float(r["Metric Value"].replace(",", "")) * {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(unit, 1.0)
    name = r["Kernel Name"].split("(")[0]
    tot[name] += v
    cnt[name] += 1
print(f"{len(rows)} kernels, {sum(tot.values()) / 1e3:.2f} ms of GPU time in all (prefill + 4 decode steps)")
print("| kernel | launches | total µs | µs per launch |")
print("|---|---:|---:|---:|")
for name, v in tot.most_common(25):
    print(f"| {name} | {cnt[name]} | {v:.0f} | {v / cnt[name]:.1f} |")
PY
    lap profile
fi
if want cpu; then
    small
    echo "## The same benchmarks on this machine's CPU" >> "$md"
    echo >> "$md"
    echo '```' >> "$md"
    bench_both cpu
    echo '```' >> "$md"
    echo >> "$md"
    lap cpu
fi
echo "## Ops and attention: miadpo CUDA backend vs PyTorch (4096 rows of hidden 4096; attention 32 heads of 128, T = 4096 unless named)" >> "$md"
echo >> "$md"
python3 - "$W" >> "$md" <<'PY'
import json, os, sys
d = sys.argv[1]
def load(name):
    p = os.path.join(d, name)
    return {r["name"]: r for r in map(json.loads, open(p)) if r.get("name")} if os.path.exists(p) else {}
def table(m, t, label=""):
    mib = lambda r: "-" if r is None or r.get("extra_mib") is None else f"{r['extra_mib']:.0f}"
    for name, r in m.items():
        if name.startswith("ceiling/") and label:
            continue
        o, ms = t.get(name), r["ms"]["median"]
        unit = "GB/s" if r["bound"] == "memory" else "TFLOP/s"
        ours = f"{r['achieved']:.0f} {unit} ({100 * r['of_ceiling']:.0f}%)"
        if o:
            theirs = f"{o['achieved']:.0f} {unit} ({100 * o['of_ceiling']:.0f}%)"
            print(f"| {name}{label} | {ms:.3f} | {o['ms']:.3f} | {o['ms'] / ms:.2f}x | {ours} | {theirs} | {mib(r)} | {mib(o)} |")
        else:
            print(f"| {name}{label} | {ms:.3f} | - | - | {ours} | - | {mib(r)} | - |")
print("| op | miadpo ms | torch ms | miadpo speed / torch | miadpo (of ceiling) | torch (of ceiling) | miadpo extra MiB | torch extra MiB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
table(load("ops-miadpo.jsonl"), load("ops-torch.jsonl"), "")
table(load("attn-miadpo-4096.jsonl"), load("attn-torch-4096.jsonl"), " (default variant)")
for t in (1024, 16384):
    table(load(f"attn-miadpo-{t}.jsonl"), load(f"attn-torch-{t}.jsonl"), f" T={t}")
for w, label in (("plain", "1 (plain)"), ("fused", "2 (fused)"), ("pipelined", "3 (pipelined)"), ("wgmma", "4 (wgmma)"),
                 ("wgmma128", "4 (wgmma128)"),
                 ("wgmma-bulk", "5 (wgmma-bulk)"), ("wgmma-overlap", "6 (wgmma-overlap)")):
    table(load(f"attn-{w}-4096.jsonl"), load("attn-torch-4096.jsonl"), f" variant {label}")
PY
echo >> "$md"
echo "## Selection: miadpo select vs HF eager generate(output_attentions=True)" >> "$md"
echo >> "$md"
cat "$W/select-vs-hf.md" >> "$md" 2>/dev/null
if [ -s "$W/ncu-summary.md" ]; then
    echo >> "$md"
    echo "## GPU time per kernel of bench --task generate (Nsight Compute)" >> "$md"
    echo >> "$md"
    cat "$W/ncu-summary.md" >> "$md"
fi
echo >> "$md"
echo "## Predictions (docs/attention-notes.md, written before the run) against this run" >> "$md"
echo >> "$md"
python3 scripts/device_predictions.py "$W" --targets >> "$md" 2>> "$W/commands.log"
cat "$md"
echo "- script time: $((SECONDS - t0)) s of a $BUDGET s budget; sections:$laps" >> "$md"
pack
exit $status
