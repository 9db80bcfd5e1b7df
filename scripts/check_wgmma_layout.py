#!/usr/bin/env python3
"""Replays variant 4's shared-memory layout, wgmma descriptors and register-fragment mapping
(kernels/attention.cu, `flash_fwd_wgmma`) and variant 5's tile images (`pack_kv_tiles`) in numpy, reading wgmma.mma_async as the PTX ISA describes it
(9.7.15.5.1: K-major no-swizzle canonical layout ((8,m),(T,2k)):((1T,SBO),(1,LBO)), the descriptor's bit
fields, the m64nNk16 accumulator and A-register fragments), and checks S = Q Kᵀ and O = P V for one tile
of each warpgroup at d 64/128 and 64/128-key tiles. No GPU: it checks that the kernel's index arithmetic
agrees with that reading of the PTX ISA, not the reading itself (the GPU tests do that).

    python3 scripts/check_wgmma_layout.py      # needs numpy; prints one "ok" line per shape
"""
import numpy as np

rng = np.random.default_rng(0)


def load_tile(smem, base, src, rows, cols):
    """fa4_load_tile / fa4_load_q: 16-byte chunk x -> (row, col), stored at base + 8x (bf16 elements)."""
    for x in range(rows * cols // 8):
        rest = x >> 3
        r = (rest // (cols // 8)) * 8 + (x & 7)
        c = (rest % (cols // 8)) * 8
        smem[base + 8 * x: base + 8 * x + 8] = src[r, c:c + 8]


def desc(base_elems, sbo_bytes):
    """fa4_desc: start address, LBO 128, SBO; base offset 0, swizzle 0."""
    a = base_elems * 2
    return ((a & 0x3FFFF) >> 4) | ((128 >> 4) << 16) | ((sbo_bytes >> 4) << 32)


def read_operand(smem, d, rows):
    """What wgmma reads for a K-major, unswizzled rows x 16 (k16) operand with descriptor d."""
    start, lbo, sbo = (d & 0x3FFF) << 4, ((d >> 16) & 0x3FFF) << 4, ((d >> 32) & 0x3FFF) << 4
    assert d >> 62 == 0 and (d >> 49) & 7 == 0
    out = np.zeros((rows, 16))
    for m in range(rows):
        for k in range(16):
            byte = start + (m // 8) * sbo + (m % 8) * 16 + (k // 8) * lbo + (k % 8) * 2
            out[m, k] = smem[byte // 2]
    return out


def acc_pos(i, reg):
    """Accumulator register reg of thread i of the warpgroup -> (row, col) of the 64 x N tile."""
    w, g, t = i // 32, (i % 32) // 4, i % 4
    j, e = reg // 4, reg % 4
    return 16 * w + g + 8 * (e >> 1), 8 * j + 2 * t + (e & 1)


def a_pos(i, reg, half):
    """A-register reg (bf16x2; half 0 = low) of thread i -> (row, k) of the 64 x 16 tile."""
    w, g, t = i // 32, (i % 32) // 4, i % 4
    return 16 * w + g + 8 * (reg & 1), 2 * t + half + 8 * (reg >> 1)


for D, BN in [(64, 64), (128, 64), (64, 128), (128, 128)]:
    tpad, n0, buf = 256, 128, 1
    Q, K, Vt = rng.standard_normal((128, D)), rng.standard_normal((tpad, D)), rng.standard_normal((D, tpad))
    smem = np.zeros(128 * D + 4 * BN * D)
    sq, sk, sv = 0, 128 * D, 128 * D + 2 * BN * D  # the kernel's sq, sk0, sv0
    load_tile(smem, sq, Q, 128, D)
    load_tile(smem, sk + buf * BN * D, K[n0:n0 + BN], BN, D)
    load_tile(smem, sv + buf * D * BN, Vt[:, n0:n0 + BN], D, BN)
    for wg in range(2):
        dq = desc(sq + wg * 64 * D, 16 * D)
        dk = desc(sk + buf * BN * D, 16 * D)
        dv = desc(sv + buf * D * BN, 16 * BN)
        S = sum(read_operand(smem, dq + 16 * kk, 64) @ read_operand(smem, dk + 16 * kk, BN).T
                for kk in range(D // 16))
        assert np.allclose(S, Q[64 * wg:64 * wg + 64] @ K[n0:n0 + BN].T), (D, BN, "S = Q K^T")
        # the threads' accumulator registers, any elementwise function of them (the softmax), packed
        # as the kernel packs pa[kk] from sc[2kk][0..3] and sc[2kk+1][0..3] (sc[j][e] = register 4j+e)
        P = np.exp(np.array([[S[acc_pos(i, r)] for r in range(BN // 2)] for i in range(128)]) - 3)
        O = np.zeros((64, D))
        for kk in range(BN // 16):
            A = np.zeros((64, 16))
            for i in range(128):
                sc = lambda j, e: P[i, 4 * j + e]
                pa = [(sc(2 * kk, 0), sc(2 * kk, 1)), (sc(2 * kk, 2), sc(2 * kk, 3)),
                      (sc(2 * kk + 1, 0), sc(2 * kk + 1, 1)), (sc(2 * kk + 1, 2), sc(2 * kk + 1, 3))]
                for reg in range(4):
                    for half in range(2):
                        A[a_pos(i, reg, half)] = pa[reg][half]
            O += A @ read_operand(smem, dv + 16 * kk, D).T
        assert np.allclose(O, np.exp(S - 3) @ Vt[:, n0:n0 + BN].T), (D, BN, "O = P V")
        # fa_store's reading of the O accumulator: o[dt][2r + c] is row g + 8r, column 8dt + 2t + c
        for i in range(128):
            w, g, t = i // 32, (i % 32) // 4, i % 4
            for dt in range(D // 8):
                for r in range(2):
                    for c in range(2):
                        assert acc_pos(i, 4 * dt + 2 * r + c) == (16 * w + g + 8 * r, 8 * dt + 2 * t + c)
    print(f"ok: d={D}, {BN}-key tiles")

# Variant 5: attention_pack_kv_tiles writes each 64-key tile of K and Vᵀ as the image that
# fa4_load_tile would build in shared memory from variant 4's packing; its bulk copy moves the image
# unchanged. Replays pack_kv_tiles' index arithmetic against load_tile, tk not a multiple of 64.
for D in (64, 128):
    tk, kv_heads = 150, 2
    tiles = (tk + 63) // 64
    k = rng.standard_normal((tk, kv_heads * D))
    v = rng.standard_normal((tk, kv_heads * D))
    kt = np.full(kv_heads * tiles * 64 * D, np.nan)
    vtt = np.full(kv_heads * tiles * D * 64, np.nan)
    for kvh in range(kv_heads):
        for bx in range(tiles):
            n0, tile = 64 * bx, kvh * tiles + bx
            for x in range(64 * D // 8):
                rest = x >> 3
                r, c = (rest // (D // 8)) * 8 + (x & 7), (rest % (D // 8)) * 8
                kt[tile * 64 * D + 8 * x: tile * 64 * D + 8 * x + 8] = (
                    k[n0 + r, kvh * D + c:kvh * D + c + 8] if n0 + r < tk else 0.0)
                rv, cv = (rest // 8) * 8 + (x & 7), (rest % 8) * 8
                vtt[tile * D * 64 + 8 * x: tile * D * 64 + 8 * x + 8] = [
                    v[n0 + cv + j, kvh * D + rv] if n0 + cv + j < tk else 0.0 for j in range(8)]
            # what variant 4 builds from kb (tpad, D) and vt (D, tpad) of this head
            kb, vt = np.zeros((tiles * 64, D)), np.zeros((D, tiles * 64))
            kb[:tk] = k[:, kvh * D:(kvh + 1) * D]
            vt[:, :tk] = v[:, kvh * D:(kvh + 1) * D].T
            want_k, want_v = np.zeros(64 * D), np.zeros(D * 64)
            load_tile(want_k, 0, kb[n0:n0 + 64], 64, D)
            load_tile(want_v, 0, vt[:, n0:n0 + 64], D, 64)
            assert np.array_equal(kt[tile * 64 * D:(tile + 1) * 64 * D], want_k), (D, kvh, bx, "K image")
            assert np.array_equal(vtt[tile * D * 64:(tile + 1) * D * 64], want_v), (D, kvh, bx, "V image")
    print(f"ok: d={D}, variant 5's tile images")
