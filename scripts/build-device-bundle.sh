#!/usr/bin/env bash
# Builds, on this (Rust) machine, what scripts/device-check.sh runs on a GPU machine without a Rust
# toolchain: the CLI and the GPU test binary, stripped, into target/device/ (carry that folder).
#   scripts/build-device-bundle.sh && du -sh target/device    # must stay well under 64 MiB
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
mkdir -p target/device
cp target/release/miadpo target/device/miadpo
# the test binary's path comes from cargo's JSON messages (a compile error must stop the script: a
# stale binary would otherwise travel and test old code)
cargo test --release --test gpu --no-run
bin=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[ -n "$bin" ] || { echo "no gpu test binary in cargo's messages" >&2; exit 1; }
cp "$bin" target/device/gpu-tests
strip target/device/miadpo target/device/gpu-tests
du -sh target/device/*
