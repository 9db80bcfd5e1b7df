#!/usr/bin/env python3
"""Replays the tile pipeline of attention variants 5 and 6 (kernels/attention.cu, `flash_fwd_wgmma`
with MODE 1 and 2) as a state machine over random interleavings of the two warpgroups and of the
bulk copies' arrival, and checks what the kernels rely on:

- no deadlock: some warpgroup can always move, or a copy is still in flight;
- every tile a warpgroup reads is the one it expects, landed, and not overwritten until the
  warpgroup has released it;
- the mbarrier parity each wait uses matches the phase of the copy it waits for.

Variant 5: a stage holds a tile's K and Vᵀ behind one barrier, released after the tile's products.
Variant 6 reads a tile's Vᵀ one step later than its K (Q K_iᵀ goes with P_{i-1} V_{i-1}), so K and
Vᵀ have a barrier each per stage: K_i is released once Q K_iᵀ has landed (refilled with K_{i+2}),
Vᵀ_{i-1} once P_{i-1} V_{i-1} has (refilled with Vᵀ_{i+1}), and each copy has about a step to land.

A stage's mbarrier is modelled as its count of completed phases; `try_wait.parity P` succeeds when
the current phase's parity differs from P (the phase of parity P has completed). No GPU: this checks
the protocol, not the PTX (the GPU tests do that).

    python3 scripts/check_pipeline_protocol.py     # prints one "ok" line per variant
"""
import random


def choose(rng, moves, in_flight, content, phases, wgs):
    """a random move of `moves` (none left: a deadlock); a copy landing is played here (its slot then
    holds its tile, and the slot's barrier completes a phase) and gives None, a warpgroup's move is
    returned"""
    assert moves, f"deadlock: {wgs}, phases {phases}, in flight {in_flight}"
    kind, x = rng.choice(moves)
    if kind != "land":
        return kind, x
    slot, tile = in_flight.pop(x)
    content[slot] = tile
    phases[slot] += 1
    assert phases[slot] == tile // 2 + 1, "a slot's phases count its tiles"
    return None


def run(n_tiles, rng):
    """variant 5: stage b (K and Vᵀ) behind barrier full[b]."""
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
    # each warpgroup: the next tile i
    wgs = [{"i": 0} for _ in range(2)]
    while True:
        if all(st["i"] == n_tiles for st in wgs):
            assert not in_flight, f"copies left in flight at exit: {in_flight}"
            return
        moves = [("land", k) for k in range(len(in_flight))]
        for w, st in enumerate(wgs):
            i = st["i"]
            if i < n_tiles and phases[i % 2] % 2 != (i // 2) % 2:   # try_wait.parity succeeds
                moves.append(("step", w))
        move = choose(rng, moves, in_flight, content, phases, wgs)
        if move is None:
            continue
        kind, x = move
        st = wgs[x]
        i, stage = st["i"], st["i"] % 2
        assert content[stage] == i and all(s != stage for s, _ in in_flight), f"tile {i} not landed"
        readers[stage].add(x)
        release(x, stage, i)
        st["i"] += 1

def run_split(n_tiles, rng):
    """variant 6: slots 0, 1 are the stages' K (barrier full[b]), 2, 3 their Vᵀ (full[2 + b])."""
    phases = [0] * 4
    content = [None] * 4
    in_flight = []
    done_with = [0] * 4
    readers = [set() for _ in range(4)]

    def load(tile, slot):
        assert not readers[slot], f"tile {tile} copied into slot {slot} while {readers[slot]} read it"
        assert all(s != slot for s, _ in in_flight), "two copies in flight into one slot"
        in_flight.append((slot, tile))

    def landed(slot, tile):
        """mbarrier.try_wait.parity for `tile` succeeds, and the slot then holds it"""
        if phases[slot] % 2 == (tile // 2) % 2:
            return False
        assert content[slot] == tile, f"slot {slot}: waited for tile {tile}, holds {content[slot]}"
        return True

    def release(wg, slot, tile):
        readers[slot].discard(wg)
        done_with[slot] += 1
        if done_with[slot] == 2:
            done_with[slot] = 0
            if tile + 2 < n_tiles:
                load(tile + 2, slot)

    for t in range(min(2, n_tiles)):
        load(t, t)       # K
        load(t, 2 + t)   # Vᵀ
    # each warpgroup walks: wait K_i, wait Vᵀ_{i-1} (i > 0), [both products in flight], release K_i
    # (Q K_iᵀ landed), release Vᵀ_{i-1} (its P V landed), i + 1; after the last tile: wait Vᵀ_last,
    # release it
    wgs = [{"i": 0, "step": 0} for _ in range(2)]
    while True:
        if all(st["i"] == n_tiles and (n_tiles == 0 or st["step"] == 2) for st in wgs):
            assert not in_flight, f"copies left in flight at exit: {in_flight}"
            return
        moves = [("land", k) for k in range(len(in_flight))]
        for w, st in enumerate(wgs):
            i, step = st["i"], st["step"]
            if i < n_tiles:
                if step == 0 and landed(i % 2, i):
                    moves.append(("k", w))
                elif step == 1 and (i == 0 or landed(2 + (i - 1) % 2, i - 1)):
                    moves.append(("v", w))
                elif step in (2, 3):
                    moves.append(("rel", w))
            elif i == n_tiles and n_tiles > 0 and step < 2:
                if step == 0 and landed(2 + (i - 1) % 2, i - 1):
                    moves.append(("v_last", w))
                elif step == 1:
                    moves.append(("rel_last", w))
        move = choose(rng, moves, in_flight, content, phases, wgs)
        if move is None:
            continue
        kind, x = move
        st = wgs[x]
        i = st["i"]
        if kind == "k":
            readers[i % 2].add(x)
            st["step"] = 1
        elif kind == "v":
            if i > 0:
                readers[2 + (i - 1) % 2].add(x)
            st["step"] = 2
        elif kind == "rel" and st["step"] == 2:
            assert content[i % 2] == i, f"K of tile {i} overwritten before Q Kᵀ landed"
            release(x, i % 2, i)
            st["step"] = 3
        elif kind == "rel":
            if i > 0:
                assert content[2 + (i - 1) % 2] == i - 1, f"Vᵀ of tile {i - 1} overwritten before its P V"
                release(x, 2 + (i - 1) % 2, i - 1)
            st["i"], st["step"] = i + 1, 0
        elif kind == "v_last":
            readers[2 + (i - 1) % 2].add(x)
            st["step"] = 1
        else:  # rel_last
            assert content[2 + (i - 1) % 2] == i - 1, "the last tile's Vᵀ overwritten before its P V"
            readers[2 + (i - 1) % 2].discard(x)
            st["step"] = 2


rng = random.Random(0)
for trial in range(4000):
    run(rng.randrange(0, 12), rng)
print("ok: variant 5, 4000 random interleavings of 0 to 11 tiles")
for trial in range(4000):
    run_split(rng.randrange(0, 12), rng)
print("ok: variant 6, 4000 random interleavings of 0 to 11 tiles")
