#!/usr/bin/env python3
"""Replays the tile pipeline of attention variants 5 and 6 (kernels/attention.cu, `flash_fwd_wgmma`
with MODE 1 and 2) as a state machine over random interleavings of the two warpgroups and of the
bulk copies' arrival, and checks what the kernels rely on:

- no deadlock: some warpgroup can always move, or a copy is still in flight;
- every tile a warpgroup reads is the one it expects, landed, and not overwritten until the
  warpgroup has released it (variant 6 reads a tile's Vᵀ one step later than its K);
- the mbarrier parity each wait uses matches the phase of the copy it waits for.

A stage's mbarrier is modelled as its count of completed phases; `try_wait.parity P` succeeds when
the current phase's parity differs from P (the phase of parity P has completed). No GPU: this checks
the protocol, not the PTX (the GPU tests do that).

    python3 scripts/check_pipeline_protocol.py     # prints one "ok" line per variant
"""
import random


def run(overlap, n_tiles, rng):
    phases = [0, 0]            # completed phases per stage (mbarrier)
    content = [None, None]     # the tile a stage holds once its copy has landed
    in_flight = []             # (stage, tile) copies issued, not landed
    done_with = [0, 0]         # warpgroups done with the stage's current tile
    readers = [set(), set()]   # warpgroups still reading each stage

    def load(tile, stage):
        assert not readers[stage], f"tile {tile} copied into stage {stage} while {readers[stage]} read it"
        assert all(s != stage for s, _ in in_flight), "two copies in flight into one stage"
        in_flight.append((stage, tile))

    def release(wg, stage, tile):
        readers[stage].discard(wg)
        done_with[stage] += 1
        if done_with[stage] == 2:   # the second warpgroup refills it with the tile two ahead
            done_with[stage] = 0
            if tile + 2 < n_tiles:
                load(tile + 2, stage)

    for t in range(min(2, n_tiles)):
        load(t, t)
    # each warpgroup: the next tile i, and (variant 6) the computed tile whose P V is still to come
    wgs = [{"i": 0, "prev": None} for _ in range(2)]
    while True:
        moves = [("land", k) for k in range(len(in_flight))]
        for w, st in enumerate(wgs):
            i = st["i"]
            if i < n_tiles and phases[i % 2] % 2 != (i // 2) % 2:   # try_wait.parity succeeds
                moves.append(("step", w))
            elif i == n_tiles and st["prev"] is not None:          # variant 6: the last P V
                moves.append(("finish", w))
        if not moves:
            assert all(st["i"] == n_tiles and st["prev"] is None for st in wgs), f"deadlock: {wgs}"
            return
        kind, x = rng.choice(moves)
        if kind == "land":
            stage, tile = in_flight.pop(x)
            content[stage] = tile
            phases[stage] += 1
            assert phases[stage] == tile // 2 + 1, "a stage's phases count its tiles"
            continue
        st = wgs[x]
        if kind == "finish":
            stage, tile = st["prev"]
            assert content[stage] == tile, "variant 6: the last tile's Vᵀ was overwritten"
            st["prev"] = None
            continue
        i, stage = st["i"], st["i"] % 2
        assert content[stage] == i and all(s != stage for s, _ in in_flight), f"tile {i} not landed"
        readers[stage].add(x)
        if overlap:
            # Q K_i^T together with P_{i-1} V_{i-1}: the previous tile's stage must still hold it,
            # and is released once that product has landed
            if st["prev"] is not None:
                ps, pt = st["prev"]
                assert content[ps] == pt, f"variant 6: tile {pt}'s Vᵀ overwritten before its P V"
                release(x, ps, pt)
            st["prev"] = (stage, i)
        else:
            release(x, stage, i)
        st["i"] += 1

rng = random.Random(0)
for overlap, name in ((False, "variant 5"), (True, "variant 6")):
    for trial in range(4000):
        run(overlap, rng.randrange(0, 12), rng)
    print(f"ok: {name}, 4000 random interleavings of 0 to 11 tiles")
