// Attention, in numbered variants (llm.c dev/cuda style; `miadpo bench --task ops --filter attention`
// times them, MIADPO_ATTENTION=plain|fused|pipelined|wgmma|wgmma128 picks one; variants 3 and 4 are
// described where they start, below):
//   1. attention_plain / attention_plain_bwd: one block per (query row, head), the row's scores in
//      shared memory. Unfused and slow; kept as the first, obviously-correct version, for decode steps
//      (one query row) and for head dims that are not a multiple of 16.
//   2. attention_fwd_d{16,32,64,128}: flash attention (FlashAttention-2's loop order) on the tensor
//      cores through mma.sync (sm_80+): 64 query rows per block, 16 per warp, key tiles of 64 in
//      shared memory, online softmax in registers, the log-sum-exp per row saved for the backward, and
//      the per-group attention mass accumulated per tile with the same running-max rescaling as the
//      row sum (so it equals the sums of the materialised softmax over each group's keys).
// Every variant: causal with q_pos0, GQA, the prefix-shared DPO hole (queries at positions >=
// hole_first skip keys [hole_a, hole_b)), optional per-group mass per (row, head) (the host averages
// heads). CPU twins: attention, attention_backward in src/backend/cpu.rs.
//
// Key groups (src/backend/cuda.rs group_layout): groups[0..=n_groups] are the offsets of each group's
// ranges, then (start, end) per range, sorted by group and, within a group, by start; ranges of a
// group do not overlap. So a grid cell or the pic-in-pic centre (one range per patch row) is one
// group and one accumulator. The fused kernels keep the masses of at most FA_MAX_GROUPS groups in
// registers, indexed only by unrolled loops (a run-time index would put them in local memory), and
// walk each group's ranges in shared memory (at most FA_MAX_RANGES; the host splits bigger sets).

__device__ __forceinline__ bool visible(int qpos, int j, int causal, int hole_first, int hole_a, int hole_b) {
    if (causal && j > qpos) return false;
    if (hole_first >= 0 && qpos >= hole_first && j >= hole_a && j < hole_b) return false;
    return true;
}

// q (tq, H*D), k v (tk, KV*D), out (tq, H*D); groups (any number, layout above); mass (tq, H, n_groups)
// or null
extern "C" __global__ void attention_plain(const act* q, const act* k, const act* v, act* out, int tq, int tk,
                                           int heads, int kv_heads, int d, int causal, int q_pos0, int hole_first,
                                           int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    extern __shared__ float p[]; // tk
    __shared__ float scratch[32];
    int i = blockIdx.x, h = blockIdx.y, kvh = h / (heads / kv_heads), qpos = q_pos0 + i;
    const act* qr = q + ((long)i * heads + h) * d;
    float scale = rsqrtf((float)d), mx = -INFINITY;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float s = -INFINITY;
        if (visible(qpos, j, causal, hole_first, hole_a, hole_b)) {
            const act* kr = k + ((long)j * kv_heads + kvh) * d;
            s = 0.0f;
            for (int e = 0; e < d; e++) s += ld(qr[e]) * ld(kr[e]);
            s *= scale;
        }
        p[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, scratch);
    float z = 0.0f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) { float e = p[j] == -INFINITY ? 0.0f : expf(p[j] - mx); p[j] = e; z += e; }
    z = block_sum(z, scratch);
    float inv = 1.0f / z;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) p[j] *= inv;
    __syncthreads();
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < tk; j++) acc += p[j] * ld(v[((long)j * kv_heads + kvh) * d + e]);
        out[((long)i * heads + h) * d + e] = st(acc);
    }
    if (mass != 0) {
        const int* rng = groups + n_groups + 1;
        for (int g = 0; g < n_groups; g++) {
            float s = 0.0f;
            for (int r = groups[g]; r < groups[g + 1]; r++) {
                int a = rng[2 * r], b = min(rng[2 * r + 1], tk);
                for (int j = a + threadIdx.x; j < b; j += blockDim.x) s += p[j];
            }
            s = block_sum(s, scratch);
            if (threadIdx.x == 0) mass[((long)i * heads + h) * n_groups + g] = s;
        }
    }
}

// Backward, one block per (query row, head): recompute P, dP = dO V^T, dS = P (dP - dO.O) / sqrt(D);
// dq row written; dk, dv accumulated in f32 with atomics (dk, dv zeroed by the host).
extern "C" __global__ void attention_plain_bwd(const act* q, const act* k, const act* v, const act* o, const act* dout,
                                               float* dq, float* dk, float* dv, int tq, int tk, int heads, int kv_heads,
                                               int d, int causal, int q_pos0, int hole_first, int hole_a, int hole_b) {
    extern __shared__ float p[]; // 2 * tk: probabilities, then dS
    __shared__ float scratch[32];
    float* ds = p + tk;
    int i = blockIdx.x, h = blockIdx.y, kvh = h / (heads / kv_heads), qpos = q_pos0 + i;
    long qo = ((long)i * heads + h) * d;
    float scale = rsqrtf((float)d), mx = -INFINITY;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float s = -INFINITY;
        if (visible(qpos, j, causal, hole_first, hole_a, hole_b)) {
            long ko = ((long)j * kv_heads + kvh) * d;
            s = 0.0f;
            for (int e = 0; e < d; e++) s += ld(q[qo + e]) * ld(k[ko + e]);
            s *= scale;
        }
        p[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, scratch);
    float z = 0.0f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) { float e = p[j] == -INFINITY ? 0.0f : expf(p[j] - mx); p[j] = e; z += e; }
    z = block_sum(z, scratch);
    float di = 0.0f;
    for (int e = threadIdx.x; e < d; e += blockDim.x) di += ld(dout[qo + e]) * ld(o[qo + e]);
    di = block_sum(di, scratch);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float pj = p[j] / z;
        p[j] = pj;
        float dpj = 0.0f;
        if (pj != 0.0f) {
            long vo = ((long)j * kv_heads + kvh) * d;
            for (int e = 0; e < d; e++) dpj += ld(dout[qo + e]) * ld(v[vo + e]);
        }
        ds[j] = pj * (dpj - di) * scale;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < tk; j++) acc += ds[j] * ld(k[((long)j * kv_heads + kvh) * d + e]);
        dq[qo + e] = acc;
    }
    for (int j = 0; j < tk; j++) {
        if (p[j] == 0.0f) continue;
        long ko = ((long)j * kv_heads + kvh) * d;
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            atomicAdd(&dk[ko + e], ds[j] * ld(q[qo + e]));
            atomicAdd(&dv[ko + e], p[j] * ld(dout[qo + e]));
        }
    }
}

// ---- variant 2: flash attention forward on the tensor cores (mma.sync m16n8k16, bf16 in, f32 acc) ----

#define FA_BM 64        // query rows per block: 4 warps of 16
#define FA_BN 64        // keys per tile
#define FA_MAX_GROUPS 16 // key groups whose mass a block accumulates (registers)
#define FA_MAX_RANGES 64 // their ranges, in shared memory

// The first ng <= FA_MAX_GROUPS groups of the layout (n_groups groups; the host launches at most
// FA_MAX_GROUPS groups and FA_MAX_RANGES ranges) into shared memory sg (FA_MAX_GROUPS + 1 +
// 2 * FA_MAX_RANGES ints): offsets, then ranges at sg + ng + 1. The caller syncs before reading.
__device__ __forceinline__ void load_groups(int* sg, const int* groups, int n_groups, int ng) {
    int nr = min(groups[ng], FA_MAX_RANGES);
    for (int x = threadIdx.x; x <= ng; x += blockDim.x) sg[x] = min(groups[x], nr);
    for (int x = threadIdx.x; x < 2 * nr; x += blockDim.x) sg[ng + 1 + x] = groups[n_groups + 1 + x];
}

// two floats -> one register of bf16x2 (the lower index in the low half, as mma.sync reads it)
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)f2bf(lo) | ((unsigned)f2bf(hi) << 16);
}

// c (16x8, f32) += a (16x16, bf16, row-major fragment) * b (16x8, bf16, column-major fragment).
// Fragments (PTX ISA, mma.m16n8k16): lane = 4*g + t; a: {row g, k 2t..2t+1}, {row g+8, k 2t..},
// {row g, k 2t+8..}, {row g+8, k 2t+8..}; b: {k 2t..2t+1, col g}, {k 2t+8.., col g};
// c: {row g, cols 2t, 2t+1}, {row g+8, cols 2t, 2t+1}.
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// rows (r0 .. r0+rows) x D of a (rows_total, stride_rows*D) f32 tensor -> bf16 shared memory with
// row stride S; rows past `limit` are zero. 16-byte loads (D is a multiple of 16).
template <int D, int S>
__device__ __forceinline__ void fa_load_rows(bf16* dst, const act* src, int r0, int rows, int limit, int stride) {
    for (int idx = threadIdx.x; idx < rows * (D / 4); idx += blockDim.x) {
        int r = idx / (D / 4), c = (idx % (D / 4)) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + r < limit) x = *(const float4*)(src + (long)(r0 + r) * stride + c);
        *(uint2*)(dst + r * S + c) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
    }
}

// The a fragments of this warp's 16 query rows (row-major bf16 in shared memory, stride D + 8), for
// all D / 16 k-steps of S = Q Kᵀ; kept in registers for the whole key loop.
template <int D>
__device__ __forceinline__ void fa_q_fragments(const bf16* qw, unsigned (&qf)[D / 16][4]) {
    constexpr int S = D + 8;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        qf[kk][0] = *(const unsigned*)(qw + g * S + kk * 16 + 2 * t);
        qf[kk][1] = *(const unsigned*)(qw + (g + 8) * S + kk * 16 + 2 * t);
        qf[kk][2] = *(const unsigned*)(qw + g * S + kk * 16 + 2 * t + 8);
        qf[kk][3] = *(const unsigned*)(qw + (g + 8) * S + kk * 16 + 2 * t + 8);
    }
}

// This thread's probabilities of the tile (sc, keys n0 .. n0 + BN) that group gi's ranges hold, per
// row (add0, add1); rs: its row sums of the tile. Returns whether a range of the group meets the
// tile (uniform over the block: the ranges and n0 are the block's).
template <int BN>
__device__ __forceinline__ bool fa_group_tile_sums(const float (&sc)[BN / 8][4], int n0, const float (&rs)[2],
                                                   const int* sg, int ng, int gi, float& add0, float& add1) {
    const int t = threadIdx.x & 3;
    const int* rng = sg + ng + 1;
    bool touched = false;
    add0 = add1 = 0.0f;
    for (int r = sg[gi]; r < sg[gi + 1]; r++) {
        int a = rng[2 * r], b = rng[2 * r + 1];
        if (a >= n0 + BN) break; // sorted by start: the rest lie past this tile
        if (a <= n0 && n0 + BN <= b) {
            // the tile lies inside the range (most tiles of an image): the row sums; no other range
            // of the group meets it
            add0 = rs[0];
            add1 = rs[1];
            return true;
        }
        if (b > n0) {
            touched = true;
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int j = n0 + nt * 8 + 2 * t + (e & 1);
                    float x = (j >= a && j < b) ? sc[nt][e] : 0.0f;
                    if (e < 2) add0 += x; else add1 += x;
                }
            }
        }
    }
    return touched;
}

// The per-group mass of this tile, rescaled like the row sum: acc(r, gi) (this thread's part of row r's
// mass on group gi; registers in variants 2 to 4, shared memory in variant 6; variant 5 sums over
// the quad instead, fa_mass_update_quad) becomes
// acc * alpha[r] + this thread's probabilities sc on the group's keys (rs[r]: their sum over the
// tile). Only the group's ranges that meet the tile add. The group index is unrolled (registers),
// its ranges a run-time loop over shared memory.
template <int BN, typename Acc>
__device__ __forceinline__ void fa_mass_update(const float (&sc)[BN / 8][4], int n0, const float (&rs)[2],
                                               const float (&alpha)[2], const int* sg, int ng, Acc acc) {
#pragma unroll
    for (int gi = 0; gi < FA_MAX_GROUPS; gi++) {
        if (gi < ng) {
            float add0, add1;
            fa_group_tile_sums<BN>(sc, n0, rs, sg, ng, gi, add0, add1);
            float& m0 = acc(0, gi);
            m0 = m0 * alpha[0] + add0;
            float& m1 = acc(1, gi);
            m1 = m1 * alpha[1] + add1;
        }
    }
}

// Variant 5's group masses: one accumulator per (query row, group) in shared memory, summed over
// the row's quad (its 4 lanes hold different keys of the tile), instead of 2 x 16 per thread in
// registers, which cost the mass kernels of variant 4 their second block per SM (192 registers at
// d128). Per tile only the groups whose ranges meet it are reduced over the quad (2 shuffles per
// row; which groups is uniform over the block); the quad's first lane rescales its rows' groups when
// the running max moved (alpha != 1) and adds. acc0 and acc1: this thread's two rows' accumulators
// (written by lane t == 0 of the quad only). fa_store's quad sum then reads them from that lane.
template <int BN>
__device__ __forceinline__ void fa_mass_update_quad(const float (&sc)[BN / 8][4], int n0, const float (&rs)[2],
                                                    const float (&alpha)[2], const int* sg, int ng, float* acc0,
                                                    float* acc1) {
    const int t = threadIdx.x & 3;
    const bool moved0 = alpha[0] != 1.0f, moved1 = alpha[1] != 1.0f;
    for (int gi = 0; gi < ng; gi++) {
        float add0, add1;
        bool touched = fa_group_tile_sums<BN>(sc, n0, rs, sg, ng, gi, add0, add1);
        if (touched) { // uniform: the ranges and n0 are the block's
            add0 += __shfl_xor_sync(0xffffffffu, add0, 1);
            add0 += __shfl_xor_sync(0xffffffffu, add0, 2);
            add1 += __shfl_xor_sync(0xffffffffu, add1, 1);
            add1 += __shfl_xor_sync(0xffffffffu, add1, 2);
        }
        if (t == 0) {
            if (touched || moved0) acc0[gi] = acc0[gi] * alpha[0] + add0;
            if (touched || moved1) acc1[gi] = acc1[gi] * alpha[1] + add1;
        }
    }
}

// The online-softmax step of one tile of BN keys for this thread's two query rows (variants 2, 3 and
// 4). sc holds the tile's raw scores in the c-fragment layout that mma.m16n8 (per warp) and wgmma's
// m64nN accumulator (per warp of the warpgroup) share: lane = 4g + t, sc[j][e] is row g + 8 * (e >> 1)
// of the warp's 16, key n0 + 8j + 2t + (e & 1). They are scaled (`scale`: 1/sqrt(D) in log2 units),
// masked (unless `full`: the caller knows that every key of the tile is visible to every row of its
// warp), and replaced by the probabilities exp2(s - running max); the running max mrow, this thread's
// part of the row sum lrow and the group masses macc are updated, and alpha gets the factors by which
// the caller rescales its output rows before adding P V.
template <int BN, bool MASS>
__device__ __forceinline__ void fa_softmax(float (&sc)[BN / 8][4], float scale, int n0, const int (&qpos)[2], int tk,
                                           int causal, int hole_first, int hole_a, int hole_b, bool full,
                                           const int* sg, int ng, float (&mrow)[2], float (&lrow)[2],
                                           float (&macc)[2][MASS ? FA_MAX_GROUPS : 1], float (&alpha)[2]) {
    const int t = threadIdx.x & 3;
    // scale, mask, new running max (over the 4 threads that share a row)
    float mnew[2] = {mrow[0], mrow[1]};
#pragma unroll
    for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = e >> 1, j = n0 + nt * 8 + 2 * t + (e & 1);
            bool ok = full || (j < tk && (!causal || j <= qpos[r]) &&
                               !(hole_first >= 0 && qpos[r] >= hole_first && j >= hole_a && j < hole_b));
            sc[nt][e] = ok ? sc[nt][e] * scale : -INFINITY;
            mnew[r] = fmaxf(mnew[r], sc[nt][e]);
        }
    }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(0xffffffffu, mnew[r], 1));
        mnew[r] = fmaxf(mnew[r], __shfl_xor_sync(0xffffffffu, mnew[r], 2));
        base[r] = mnew[r] == -INFINITY ? 0.0f : mnew[r]; // a row with nothing visible yet
        alpha[r] = exp2f(mrow[r] - base[r]);
        mrow[r] = mnew[r];
    }
    float rs[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < BN / 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = exp2f(sc[nt][e] - base[e >> 1]);
            sc[nt][e] = p;
            rs[e >> 1] += p;
        }
    }
    lrow[0] = lrow[0] * alpha[0] + rs[0];
    lrow[1] = lrow[1] * alpha[1] + rs[1];
    if constexpr (MASS)
        fa_mass_update<BN>(sc, n0, rs, alpha, sg, ng, [&](int r, int gi) -> float& { return macc[r][gi]; });
}

// One key tile of the forward for this warp's 16 query rows (variants 2 and 3 alike): S = Q Kᵀ from
// the Q fragments and the K tile (row stride D + 8), scale and mask, the online-softmax update of
// (mrow, lrow, o), the per-group masses, then O += P V from the Vᵀ tile (row stride 64 + 8).
template <int D, bool MASS>
__device__ __forceinline__ void fa_tile(const unsigned (&qf)[D / 16][4], const bf16* sk, const bf16* svt, int n0,
                                        const int (&qpos)[2], int tk, int causal, int hole_first, int hole_a,
                                        int hole_b, const int* sg, int ng, float (&o)[D / 8][4], float (&mrow)[2],
                                        float (&lrow)[2], float (&macc)[2][MASS ? FA_MAX_GROUPS : 1]) {
    constexpr int S = D + 8, SV = FA_BN + 8;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float scale = rsqrtf((float)D) * 1.4426950408889634f; // scores in log2 units, for exp2f
    // S = Q Kᵀ for this warp's 16 rows and the tile's 64 keys
    float sc[FA_BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < FA_BN / 8; nt++) {
        sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
        const bf16* kr = sk + (nt * 8 + g) * S + 2 * t;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
            mma_bf16_16816(sc[nt], qf[kk], *(const unsigned*)(kr + kk * 16), *(const unsigned*)(kr + kk * 16 + 8));
    }
    float alpha[2];
    fa_softmax<FA_BN, MASS>(sc, scale, n0, qpos, tk, causal, hole_first, hole_a, hole_b, false, sg, ng, mrow, lrow,
                            macc, alpha);
    // O = O·alpha + P V, P from the score registers (the c fragment of S is the a fragment of P)
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < FA_BN / 16; kk++) {
        unsigned pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                          pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                          pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            const bf16* vr = svt + (dt * 8 + g) * SV + kk * 16 + 2 * t;
            mma_bf16_16816(o[dt], pa, *(const unsigned*)vr, *(const unsigned*)(vr + 8));
        }
    }
}

// The end of the forward for this warp's 16 rows (variants 2 and 3): row sums over the quad,
// normalise and store the output, the log-sum-exp when asked, the group masses.
template <int D, bool MASS>
__device__ __forceinline__ void fa_store(const float (&o)[D / 8][4], const float (&mrow)[2], float (&lrow)[2],
                                         const float (&macc)[2][MASS ? FA_MAX_GROUPS : 1], int row0, act* out,
                                         float* lse, float* mass, int tq, int heads, int h, int ng) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = row0 + g + 8 * r;
        float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
        if (row < tq) {
            act* orow = out + ((long)row * heads + h) * D + 2 * t;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *(float2*)(orow + dt * 8) = make_float2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
            if (t == 0 && lse != 0) lse[(long)row * heads + h] = (mrow[r] + log2f(lrow[r])) * 0.6931471805599453f;
        }
#pragma unroll
        for (int gi = 0; gi < (MASS ? FA_MAX_GROUPS : 0); gi++) {
            if (gi < ng) {
                float m = macc[r][gi];
                m += __shfl_xor_sync(0xffffffffu, m, 1);
                m += __shfl_xor_sync(0xffffffffu, m, 2);
                if (t == 0 && row < tq) mass[((long)row * heads + h) * ng + gi] = m * inv;
            }
        }
    }
}

template <int D, bool MASS>
__device__ __forceinline__ void flash_fwd(const act* q, const act* k, const act* v, act* out, float* lse, int tq,
                                          int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
                                          int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    static_assert(sizeof(act) == 4, "the tile loads read f32 activations");
    constexpr int S = D + 8;      // row stride (bf16) of Q and K tiles: the 16-byte pad spreads rows over banks
    constexpr int SV = FA_BN + 8; // row stride of the transposed V tile
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16* sq = (bf16*)fa_smem;    // (BM, S)
    bf16* sk = sq + FA_BM * S;    // (BN, S)
    bf16* svt = sk + FA_BN * S;   // (D, SV): V transposed, so P·V's b fragments are 32-bit loads
    __shared__ int sg[MASS ? FA_MAX_GROUPS + 1 + 2 * FA_MAX_RANGES : 1];
    // heaviest (latest, under the causal mask) query blocks first
    int m0 = (gridDim.x - 1 - blockIdx.x) * FA_BM, h = blockIdx.y, kvh = h / (heads / kv_heads);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int ng = MASS ? min(n_groups, FA_MAX_GROUPS) : 0;
    if (MASS) load_groups(sg, groups, n_groups, ng);
    fa_load_rows<D, S>(sq, q + h * D, m0, FA_BM, tq, heads * D);
    __syncthreads();
    unsigned qf[D / 16][4];
    fa_q_fragments<D>(sq + warp * 16 * S, qf);
    // this thread's two rows: g and g + 8 of its warp's 16
    int qpos[2] = {q_pos0 + m0 + warp * 16 + g, q_pos0 + m0 + warp * 16 + g + 8};
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f}; // lrow: this thread's columns only
    float macc[2][MASS ? FA_MAX_GROUPS : 1];
#pragma unroll
    for (int gi = 0; gi < (MASS ? FA_MAX_GROUPS : 1); gi++) macc[0][gi] = macc[1][gi] = 0.0f;
    int last = min(tq, m0 + FA_BM) - 1 + q_pos0; // the block's last query position
    int kend = causal ? min(tk, last + 1) : tk;
    int first = m0 + q_pos0;
    for (int n0 = 0; n0 < kend; n0 += FA_BN) {
        // a tile inside the hole for every row of the block
        if (hole_first >= 0 && first >= hole_first && n0 >= hole_a && n0 + FA_BN <= hole_b) continue;
        __syncthreads(); // the previous tile's readers are done
        fa_load_rows<D, S>(sk, k + kvh * D, n0, FA_BN, tk, kv_heads * D);
        // V transposed: consecutive threads take consecutive keys, so the 2-byte smem stores of a warp
        // fall in distinct banks
        for (int idx = threadIdx.x; idx < FA_BN * (D / 4); idx += blockDim.x) {
            int r = idx % FA_BN, c = (idx / FA_BN) * 4;
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (n0 + r < tk) x = *(const float4*)(v + ((long)(n0 + r) * kv_heads + kvh) * D + c);
            svt[(c + 0) * SV + r] = f2bf(x.x);
            svt[(c + 1) * SV + r] = f2bf(x.y);
            svt[(c + 2) * SV + r] = f2bf(x.z);
            svt[(c + 3) * SV + r] = f2bf(x.w);
        }
        __syncthreads();
        fa_tile<D, MASS>(qf, sk, svt, n0, qpos, tk, causal, hole_first, hole_a, hole_b, sg, ng, o, mrow, lrow, macc);
    }
    fa_store<D, MASS>(o, mrow, lrow, macc, m0 + warp * 16, out, lse, mass, tq, heads, h, ng);
}

// q (tq, H*D), k v (tk, KV*D), out (tq, H*D); lse (tq, H) or null; groups (layout above: at most
// FA_MAX_GROUPS groups and FA_MAX_RANGES ranges) and mass (tq, H, n_groups): read and written by the
// _mass kernels only (the others keep fewer registers). Grid (ceil(tq / 64), H), 128 threads,
// dynamic shared memory (64 + 64) * (D + 8) * 2 + D * 72 * 2 bytes.

extern "C" __global__ void __launch_bounds__(128) attention_fwd_d16(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<16, false>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_d32(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<32, false>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_d64(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<64, false>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_d128(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<128, false>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_mass_d16(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<16, true>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_mass_d32(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<32, true>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_mass_d64(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<64, true>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_mass_d128(const act* q, const act* k, const act* v, act* out,
        float* lse, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd<128, true>(q, k, v, out, lse, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                   hole_a, hole_b, groups, n_groups, mass);
}

// ---- variant 2 backward: FlashAttention-2's backward on the tensor cores ----
//
// One block per (64-key tile, kv head); 4 warps, each owning 16 keys. For every query head of the kv
// head's group and every 64-row query tile that can see the keys, with the forward's log-sum-exp:
//   Sᵀ = K Qᵀ, Pᵀ = exp(Sᵀ/√D − lse), dVᵀ-rows += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − Δ),
//   dK-rows += dSᵀ Q / √D   (registers, per warp: no atomics, GQA heads summed in place)
//   dQ += dS K / √D         (dS through shared memory, warps split over query rows, f32 atomics)
// with Δ = rowsum(dO ∘ O) from attention_bwd_delta. bf16 operands, f32 accumulation.

// delta (tq, H) = rowsum over D of dout ∘ out; one warp per (row, head)
extern "C" __global__ void attention_bwd_delta(const act* dout, const act* out, float* delta, int rows, int d) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= rows) return;
    float s = 0.0f;
    for (int e = lane; e < d; e += 32) s += ld(dout[(long)r * d + e]) * ld(out[(long)r * d + e]);
    s = warp_sum(s);
    if (lane == 0) delta[r] = s;
}

// rows (r0 .. r0+rows) of a strided f32 tensor -> bf16 shared memory twice: row-major (stride S) and
// transposed (stride ST, column r); rows past `limit` are zero
template <int D, int S, int ST>
__device__ __forceinline__ void fa_load_both(bf16* dst, bf16* dst_t, const act* src, int r0, int rows, int limit,
                                             int stride) {
    for (int idx = threadIdx.x; idx < rows * (D / 4); idx += blockDim.x) {
        int r = idx % rows, c = (idx / rows) * 4; // consecutive threads: consecutive rows (transposed stores)
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + r < limit) x = *(const float4*)(src + (long)(r0 + r) * stride + c);
        *(uint2*)(dst + r * S + c) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
        dst_t[(c + 0) * ST + r] = f2bf(x.x);
        dst_t[(c + 1) * ST + r] = f2bf(x.y);
        dst_t[(c + 2) * ST + r] = f2bf(x.z);
        dst_t[(c + 3) * ST + r] = f2bf(x.w);
    }
}

// 16-byte copies global -> shared that complete asynchronously (sm_80+): cp.async.cg, then
// commit_group per batch and wait_group N (at most N batches still in flight)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// R rows of C bf16 (C a multiple of 8, both strides in elements, rows 16-byte aligned) by cp.async
template <int R, int C>
__device__ __forceinline__ void cp_rows(bf16* dst, int dst_stride, const bf16* src, long src_stride) {
    for (int x = threadIdx.x; x < R * C / 8; x += blockDim.x) {
        int r = x / (C / 8), c = (x % (C / 8)) * 8;
        cp_async16(dst + r * dst_stride + c, src + r * src_stride + c);
    }
}

// p[0] += a, p[1] += b in global memory (p 8-byte aligned), results unused: one vector reduction on
// sm_90 (red.global.add.v2.f32: half the dQ atomics of the backward), two scalar ones before
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// PACKED (variant 3's backward, `attention_bwd3_d*`): Q and dO come packed to bf16 once per call by
// attention_pack_kv, row-major qb, dob (H, tqpad, D) and transposed qbt, dobt (H, D, tqpad), and
// each query tile's four pieces are copied by cp.async into one of two buffers while the tile
// before is computed; otherwise (variant 2) they are read as f32, converted and transposed per tile.
template <int D, bool PACKED>
__device__ __forceinline__ void flash_bwd(const act* q, const act* k, const act* v, const act* dout,
                                          const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq,
                                          int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
                                          int hole_a, int hole_b, const bf16* qb, const bf16* qbt, const bf16* dob,
                                          const bf16* dobt, int tqpad) {
    static_assert(sizeof(act) == 4, "the tile loads read f32 activations");
    constexpr int S = D + 8, ST = FA_BN + 8, NB = PACKED ? 2 : 1;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16* sk = (bf16*)fa_smem;       // (BN keys, S)
    bf16* skt = sk + FA_BN * S;      // (D, ST): K transposed
    bf16* sv = skt + D * ST;         // (BN, S)
    bf16* sq0 = sv + FA_BN * S;      // NB x (BM queries, S)
    bf16* sqt0 = sq0 + NB * FA_BM * S; // NB x (D, ST)
    bf16* sdo0 = sqt0 + NB * D * ST; // NB x (BM, S)
    bf16* sdot0 = sdo0 + NB * FA_BM * S; // NB x (D, ST)
    bf16* sds = sdot0 + NB * D * ST; // (BM, ST): dS, queries x keys
    float* slse = (float*)(sds + FA_BM * ST); // (BM) lse in log2 units
    float* sdel = slse + FA_BM;    // (BM)
    int n0 = blockIdx.x * FA_BN, kvh = blockIdx.y, group = heads / kv_heads;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float scale = rsqrtf((float)D), scale2 = scale * 1.4426950408889634f;
    fa_load_both<D, S, ST>(sk, skt, k + kvh * D, n0, FA_BN, tk, kv_heads * D);
    fa_load_rows<D, S>(sv, v + kvh * D, n0, FA_BN, tk, kv_heads * D);
    // this thread's keys: rows g and g + 8 of the warp's 16
    int key[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
    float dka[D / 8][4], dva[D / 8][4]; // (16 keys, D) per warp, c-fragment layout
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[dt][e] = dva[dt][e] = 0.0f;
    // query rows that can see this tile: causal from the tile's first key; past the hole's first
    // position, none when the whole tile lies in the hole
    int i_begin = causal ? max(0, n0 - q_pos0) / FA_BM * FA_BM : 0;
    int i_end = tq;
    if (hole_first >= 0 && n0 >= hole_a && n0 + FA_BN <= hole_b) i_end = min(tq, max(0, hole_first - q_pos0));
    // PACKED: the query tile i0 of head kvh * group + hh into buffer b (rows and their transposes)
    auto issue = [&](int hh, int i0, int b) {
        long h = kvh * group + hh;
        cp_rows<FA_BM, D>(sq0 + b * FA_BM * S, S, qb + (h * tqpad + i0) * D, D);
        cp_rows<D, FA_BM>(sqt0 + b * D * ST, ST, qbt + h * D * tqpad + i0, tqpad);
        cp_rows<FA_BM, D>(sdo0 + b * FA_BM * S, S, dob + (h * tqpad + i0) * D, D);
        cp_rows<D, FA_BM>(sdot0 + b * D * ST, ST, dobt + h * D * tqpad + i0, tqpad);
        cp_async_commit();
    };
    // the (head of the group, query tile) pairs in order, one tile ahead in flight when PACKED
    int hh = 0, i0 = i_begin, buf = 0;
    if (i_begin >= i_end) hh = group; // no query sees this key tile
    if (PACKED && hh < group) issue(hh, i0, 0);
    while (hh < group) {
        int h = kvh * group + hh;
        int next_hh = i0 + FA_BM < i_end ? hh : hh + 1, next_i0 = i0 + FA_BM < i_end ? i0 + FA_BM : i_begin;
        bf16 *sq = sq0 + buf * FA_BM * S, *sqt = sqt0 + buf * D * ST;
        bf16 *sdo = sdo0 + buf * FA_BM * S, *sdot = sdot0 + buf * D * ST;
        __syncthreads(); // the previous tile's readers are done (and, PACKED, the other buffer's)
        if constexpr (PACKED) {
            if (next_hh < group) issue(next_hh, next_i0, buf ^ 1);
        } else {
            fa_load_both<D, S, ST>(sq, sqt, q + h * D, i0, FA_BM, tq, heads * D);
            fa_load_both<D, S, ST>(sdo, sdot, dout + h * D, i0, FA_BM, tq, heads * D);
        }
        for (int r = threadIdx.x; r < FA_BM; r += blockDim.x) {
            bool in = i0 + r < tq;
            slse[r] = in ? lse[(long)(i0 + r) * heads + h] * 1.4426950408889634f : 0.0f;
            sdel[r] = in ? delta[(long)(i0 + r) * heads + h] : 0.0f;
        }
        if constexpr (PACKED) {
            if (next_hh < group) cp_async_wait<1>(); // this tile's copies (the next one's may fly)
            else cp_async_wait<0>();
        }
        __syncthreads();
        // Sᵀ (16 keys x 64 queries) and dPᵀ = V dOᵀ, both with this warp's keys as rows
        float pt[FA_BM / 8][4], dpt[FA_BM / 8][4];
        const bf16* kw = sk + (warp * 16) * S;
        const bf16* vw = sv + (warp * 16) * S;
#pragma unroll
        for (int nt = 0; nt < FA_BM / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) pt[nt][e] = dpt[nt][e] = 0.0f;
            const bf16* qr = sq + (nt * 8 + g) * S + 2 * t;
            const bf16* dor = sdo + (nt * 8 + g) * S + 2 * t;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                unsigned a[4], b[4];
                a[0] = *(const unsigned*)(kw + g * S + kk * 16 + 2 * t);
                a[1] = *(const unsigned*)(kw + (g + 8) * S + kk * 16 + 2 * t);
                a[2] = *(const unsigned*)(kw + g * S + kk * 16 + 2 * t + 8);
                a[3] = *(const unsigned*)(kw + (g + 8) * S + kk * 16 + 2 * t + 8);
                b[0] = *(const unsigned*)(vw + g * S + kk * 16 + 2 * t);
                b[1] = *(const unsigned*)(vw + (g + 8) * S + kk * 16 + 2 * t);
                b[2] = *(const unsigned*)(vw + g * S + kk * 16 + 2 * t + 8);
                b[3] = *(const unsigned*)(vw + (g + 8) * S + kk * 16 + 2 * t + 8);
                mma_bf16_16816(pt[nt], a, *(const unsigned*)(qr + kk * 16), *(const unsigned*)(qr + kk * 16 + 8));
                mma_bf16_16816(dpt[nt], b, *(const unsigned*)(dor + kk * 16), *(const unsigned*)(dor + kk * 16 + 8));
            }
        }
        // Pᵀ and dSᵀ in place (pt, dpt); masked entries are 0
#pragma unroll
        for (int nt = 0; nt < FA_BM / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int ql = nt * 8 + 2 * t + (e & 1), qi = i0 + ql, qpos = q_pos0 + qi, j = key[e >> 1];
                bool ok = qi < tq && j < tk && (!causal || j <= qpos) &&
                          !(hole_first >= 0 && qpos >= hole_first && j >= hole_a && j < hole_b);
                float p = ok ? exp2f(pt[nt][e] * scale2 - slse[ql]) : 0.0f;
                pt[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - sdel[ql]);
            }
        }
        // dV += Pᵀ dO, dK += dSᵀ Q (the c fragments of Pᵀ, dSᵀ are the a fragments, k = queries)
#pragma unroll
        for (int kk = 0; kk < FA_BM / 16; kk++) {
            unsigned pa[4] = {pack_bf16(pt[2 * kk][0], pt[2 * kk][1]), pack_bf16(pt[2 * kk][2], pt[2 * kk][3]),
                              pack_bf16(pt[2 * kk + 1][0], pt[2 * kk + 1][1]),
                              pack_bf16(pt[2 * kk + 1][2], pt[2 * kk + 1][3])};
            unsigned da[4] = {pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]), pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                const bf16* dr = sdot + (dt * 8 + g) * ST + kk * 16 + 2 * t;
                const bf16* qr = sqt + (dt * 8 + g) * ST + kk * 16 + 2 * t;
                mma_bf16_16816(dva[dt], pa, *(const unsigned*)dr, *(const unsigned*)(dr + 8));
                mma_bf16_16816(dka[dt], da, *(const unsigned*)qr, *(const unsigned*)(qr + 8));
            }
        }
        // dS to shared memory as (queries, keys), for dQ = dS K with the warps over query rows
#pragma unroll
        for (int nt = 0; nt < FA_BM / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int ql = nt * 8 + 2 * t + (e & 1), kl = warp * 16 + g + 8 * (e >> 1);
                sds[ql * ST + kl] = f2bf(dpt[nt][e]);
            }
        }
        __syncthreads();
        {
            const bf16* dsw = sds + (warp * 16) * ST; // this warp's 16 query rows
            unsigned af[FA_BN / 16][4];
#pragma unroll
            for (int kk = 0; kk < FA_BN / 16; kk++) {
                af[kk][0] = *(const unsigned*)(dsw + g * ST + kk * 16 + 2 * t);
                af[kk][1] = *(const unsigned*)(dsw + (g + 8) * ST + kk * 16 + 2 * t);
                af[kk][2] = *(const unsigned*)(dsw + g * ST + kk * 16 + 2 * t + 8);
                af[kk][3] = *(const unsigned*)(dsw + (g + 8) * ST + kk * 16 + 2 * t + 8);
            }
            int r0 = i0 + warp * 16 + g, r1 = r0 + 8;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int kk = 0; kk < FA_BN / 16; kk++) {
                    const bf16* kr = skt + (dt * 8 + g) * ST + kk * 16 + 2 * t;
                    mma_bf16_16816(c, af[kk], *(const unsigned*)kr, *(const unsigned*)(kr + 8));
                }
                int col = dt * 8 + 2 * t;
                if (r0 < tq) red_add2(dq + ((long)r0 * heads + h) * D + col, c[0] * scale, c[1] * scale);
                if (r1 < tq) red_add2(dq + ((long)r1 * heads + h) * D + col, c[2] * scale, c[3] * scale);
            }
        }
        hh = next_hh;
        i0 = next_i0;
        if constexpr (PACKED) buf ^= 1;
    }
    // this warp's 16 keys of dK (scaled) and dV, every head of the group summed
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (key[r] >= tk) continue;
        long base = ((long)key[r] * kv_heads + kvh) * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *(float2*)(dk + base + dt * 8) = make_float2(dka[dt][2 * r] * scale, dka[dt][2 * r + 1] * scale);
            *(float2*)(dv + base + dt * 8) = make_float2(dva[dt][2 * r], dva[dt][2 * r + 1]);
        }
    }
}

// q, dout (tq, H*D), k v (tk, KV*D), lse delta (tq, H); dq (tq, H*D) zeroed by the host (atomics);
// dk dv (tk, KV*D) written in full. Grid (ceil(tk / 64), KV), 128 threads, dynamic shared memory
// (4 * 64 * (D + 8) + 3 * D * 72 + 64 * 72) * 2 + 2 * 64 * 4 bytes.

extern "C" __global__ void __launch_bounds__(128) attention_bwd_d16(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b) {
    flash_bwd<16, false>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                          hole_a, hole_b, 0, 0, 0, 0, 0);
}

extern "C" __global__ void __launch_bounds__(128) attention_bwd_d32(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b) {
    flash_bwd<32, false>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                          hole_a, hole_b, 0, 0, 0, 0, 0);
}

extern "C" __global__ void __launch_bounds__(128) attention_bwd_d64(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b) {
    flash_bwd<64, false>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                          hole_a, hole_b, 0, 0, 0, 0, 0);
}

extern "C" __global__ void __launch_bounds__(128) attention_bwd_d128(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b) {
    flash_bwd<128, false>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                          hole_a, hole_b, 0, 0, 0, 0, 0);
}

// Variant 3's backward: variant 2's with Q and dO packed to bf16 once (attention_pack_kv on Q and
// on dO: row-major and transposed, tqpad rows) and their tiles double-buffered by cp.async. Dynamic
// shared memory (6 * 64 * (D + 8) + 5 * D * 72 + 64 * 72) * 2 + 2 * 64 * 4 bytes: 201.5 KiB at D = 128,
// more than an A100 block may have (the host takes variant 2's there).

extern "C" __global__ void __launch_bounds__(128) attention_bwd3_d16(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b, const bf16* qb, const bf16* qbt,
        const bf16* dob, const bf16* dobt, int tqpad) {
    flash_bwd<16, true>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                         hole_a, hole_b, qb, qbt, dob, dobt, tqpad);
}

extern "C" __global__ void __launch_bounds__(128) attention_bwd3_d32(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b, const bf16* qb, const bf16* qbt,
        const bf16* dob, const bf16* dobt, int tqpad) {
    flash_bwd<32, true>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                         hole_a, hole_b, qb, qbt, dob, dobt, tqpad);
}

extern "C" __global__ void __launch_bounds__(128) attention_bwd3_d64(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b, const bf16* qb, const bf16* qbt,
        const bf16* dob, const bf16* dobt, int tqpad) {
    flash_bwd<64, true>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                         hole_a, hole_b, qb, qbt, dob, dobt, tqpad);
}

extern "C" __global__ void __launch_bounds__(128) attention_bwd3_d128(const act* q, const act* k, const act* v,
        const act* dout, const float* lse, const float* delta, float* dq, act* dk, act* dv, int tq, int tk, int heads,
        int kv_heads, int causal, int q_pos0, int hole_first, int hole_a, int hole_b, const bf16* qb, const bf16* qbt,
        const bf16* dob, const bf16* dobt, int tqpad) {
    flash_bwd<128, true>(q, k, v, dout, lse, delta, dq, dk, dv, tq, tk, heads, kv_heads, causal, q_pos0, hole_first,
                         hole_a, hole_b, qb, qbt, dob, dobt, tqpad);
}

// ---- variant 2 decode: flash-decoding (a few query rows against a long cache, keys split over blocks) ----
//
// Decode steps have 1..15 query rows, too few for a 64-row tensor-core tile. Grid (splits, heads,
// tq): each block takes a contiguous chunk of keys, each of its 4 warps every 4th key of the chunk,
// one key per step with the head dim across the lanes (coalesced 4..16-byte loads), an online softmax
// per warp (and the per-group mass, rescaled alike); the warps merge in shared memory and the block
// writes its partial (max, sum, D accumulators, group masses) for attention_decode_combine.

#define DEC_WARPS 4
#define DEC_KEYS 4 // keys per warp and step

// A lane's E consecutive elements of a K or V row as floats: f32 rows element by element; bf16 rows
// (the KV cache of a decode step) in one 2-, 4- or 8-byte load (the row offsets are multiples of E).
template <int E>
__device__ __forceinline__ void load_row(const float* p, float* x) {
#pragma unroll
    for (int e = 0; e < E; e++) x[e] = p[e];
}

template <int E>
__device__ __forceinline__ void load_row(const bf16* p, float* x) {
    if constexpr (E == 4) {
        uint2 u = *reinterpret_cast<const uint2*>(p);
        x[0] = __uint_as_float(u.x << 16);
        x[1] = __uint_as_float(u.x & 0xffff0000u);
        x[2] = __uint_as_float(u.y << 16);
        x[3] = __uint_as_float(u.y & 0xffff0000u);
    } else if constexpr (E == 2) {
        unsigned int u = *reinterpret_cast<const unsigned int*>(p);
        x[0] = __uint_as_float(u << 16);
        x[1] = __uint_as_float(u & 0xffff0000u);
    } else {
#pragma unroll
        for (int e = 0; e < E; e++) x[e] = bf2f(p[e]);
    }
}

// One block's share: query row i (of q and of the partials) at position qpos, head blockIdx.y, the
// keys of split blockIdx.x. K and V are f32 rows (`attention`) or the bf16 cache (KV = bf16).
template <int D, typename KV>
__device__ __forceinline__ void flash_decode(const act* q, const KV* k, const KV* v, float* part, int i, int qpos,
                                             int tk, int heads, int kv_heads, int causal, int hole_first,
                                             int hole_a, int hole_b, const int* groups, int n_groups, int chunk) {
    constexpr int E = D >= 32 ? D / 32 : 1;   // dims per lane
    constexpr int LANES = D / E;              // lanes that hold dims
    constexpr int P = 2 + D + FA_MAX_GROUPS;  // one partial: max, sum, acc[D], mass[16]
    __shared__ float sp_part[DEC_WARPS][P];
    __shared__ int sg[FA_MAX_GROUPS + 1 + 2 * FA_MAX_RANGES];
    int split = blockIdx.x, h = blockIdx.y, kvh = h / (heads / kv_heads);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int ng = min(n_groups, FA_MAX_GROUPS);
    load_groups(sg, groups, n_groups, ng);
    __syncthreads();
    const int* rng = sg + ng + 1;
    int j0 = split * chunk, j1 = min(tk, j0 + chunk);
    if (causal) j1 = min(j1, qpos + 1);
    const float scale = rsqrtf((float)D) * 1.4426950408889634f;
    float qv[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        qv[e] = lane < LANES ? ld(q[((long)i * heads + h) * D + lane * E + e]) * scale : 0.0f;
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f, mass[FA_MAX_GROUPS];
#pragma unroll
    for (int gi = 0; gi < FA_MAX_GROUPS; gi++) mass[gi] = 0.0f;
    // DEC_KEYS keys per warp and step: their K and V rows are all loaded before the first score
    // is reduced, so a warp has that many rows in flight instead of one (the loop is latency-bound)
    for (int j = j0 + warp * DEC_KEYS; j < j1; j += DEC_WARPS * DEC_KEYS) {
        float s[DEC_KEYS], vv[DEC_KEYS][E];
#pragma unroll
        for (int u = 0; u < DEC_KEYS; u++) {
            int jj = j + u;
            bool ok = jj < j1 && !(hole_first >= 0 && qpos >= hole_first && jj >= hole_a && jj < hole_b);
            s[u] = 0.0f;
            if (ok && lane < LANES) {
                long at = ((long)jj * kv_heads + kvh) * D + lane * E;
                float kx[E];
                load_row<E>(k + at, kx);
                load_row<E>(v + at, vv[u]);
#pragma unroll
                for (int e = 0; e < E; e++) s[u] += qv[e] * kx[e];
            } else {
#pragma unroll
                for (int e = 0; e < E; e++) vv[u][e] = 0.0f;
            }
            s[u] = ok ? s[u] : -INFINITY; // uniform over the warp
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < DEC_KEYS; u++) {
            if (s[u] != -INFINITY) s[u] = warp_sum(s[u]); // every lane holds the score (log2 units)
            mn = fmaxf(mn, s[u]);
        }
        float base = mn == -INFINITY ? 0.0f : mn; // no key seen yet
        float alpha = exp2f(m - base), p[DEC_KEYS], psum = 0.0f;
#pragma unroll
        for (int u = 0; u < DEC_KEYS; u++) {
            p[u] = exp2f(s[u] - base);
            psum += p[u];
        }
        m = mn;
        l = l * alpha + psum;
        if (lane < LANES) {
#pragma unroll
            for (int e = 0; e < E; e++) {
                float a = acc[e] * alpha;
#pragma unroll
                for (int u = 0; u < DEC_KEYS; u++) a += p[u] * vv[u][e];
                acc[e] = a;
            }
        }
#pragma unroll
        for (int gi = 0; gi < FA_MAX_GROUPS; gi++) {
            if (gi < ng) {
                float in = 0.0f; // p of the keys a range of the group holds
#pragma unroll
                for (int u = 0; u < DEC_KEYS; u++) {
                    for (int r = sg[gi]; r < sg[gi + 1]; r++) {
                        if (rng[2 * r] > j + u) break; // sorted by start
                        if (j + u < rng[2 * r + 1]) {
                            in += p[u];
                            break;
                        }
                    }
                }
                mass[gi] = mass[gi] * alpha + in;
            }
        }
    }
    // the warps' partials through shared memory; warp 0 merges them into the block's
    if (lane == 0) {
        sp_part[warp][0] = m;
        sp_part[warp][1] = l;
#pragma unroll
        for (int gi = 0; gi < FA_MAX_GROUPS; gi++) sp_part[warp][2 + D + gi] = mass[gi];
    }
    if (lane < LANES) {
#pragma unroll
        for (int e = 0; e < E; e++) sp_part[warp][2 + lane * E + e] = acc[e];
    }
    __syncthreads();
    float* out = part + (((long)i * heads + h) * gridDim.x + split) * P;
    if (warp == 0) {
        float mm = -INFINITY;
        for (int w = 0; w < DEC_WARPS; w++) mm = fmaxf(mm, sp_part[w][0]);
        float base = mm == -INFINITY ? 0.0f : mm;
        for (int x = lane; x < P; x += 32) {
            float sum = 0.0f;
            if (x == 0) {
                sum = mm;
            } else {
                for (int w = 0; w < DEC_WARPS; w++) sum += sp_part[w][x] * exp2f(sp_part[w][0] - base);
            }
            out[x] = sum;
        }
    }
}

// Merges the splits: part (tq, H, splits, 2 + D + 16) -> out (tq, H*D) and mass (tq, H, n_groups) or
// null; one warp per (row, head), the lanes over the head dim.
extern "C" __global__ void attention_decode_combine(const float* part, act* out, float* mass, int rows, int d,
                                                    int splits, int n_groups) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= rows) return;
    int P = 2 + d + FA_MAX_GROUPS;
    const float* pr = part + (long)r * splits * P;
    float mm = -INFINITY;
    for (int s = 0; s < splits; s++) mm = fmaxf(mm, pr[s * P]);
    float base = mm == -INFINITY ? 0.0f : mm, l = 0.0f;
    for (int s = 0; s < splits; s++) l += pr[s * P + 1] * exp2f(pr[s * P] - base);
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int e = lane; e < d; e += 32) {
        float a = 0.0f;
        for (int s = 0; s < splits; s++) a += pr[s * P + 2 + e] * exp2f(pr[s * P] - base);
        out[(long)r * d + e] = st(a * inv);
    }
    if (mass != 0) {
        for (int g = lane; g < n_groups && g < FA_MAX_GROUPS; g += 32) {
            float a = 0.0f;
            for (int s = 0; s < splits; s++) a += pr[s * P + 2 + d + g] * exp2f(pr[s * P] - base);
            mass[(long)r * n_groups + g] = a * inv;
        }
    }
}

// The per-head group mass (tq, H, n_groups) averaged over the heads -> (tq, n_groups), so that only
// the average leaves the device; one thread per (row, group), heads summed in order (deterministic).
extern "C" __global__ void attention_mass_heads(const float* per_head, float* mass, int tq, int heads,
                                                int n_groups) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= tq * n_groups) return;
    int i = x / n_groups, g = x % n_groups;
    const float* p = per_head + (long)i * heads * n_groups + g;
    float a = 0.0f;
    for (int h = 0; h < heads; h++) a += p[(long)h * n_groups];
    mass[x] = a / (float)heads;
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_d16(const act* q, const act* k, const act* v,
        float* part, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, int chunk) {
    flash_decode<16, act>(q, k, v, part, blockIdx.z, q_pos0 + blockIdx.z, tk, heads, kv_heads, causal, hole_first, hole_a,
                     hole_b, groups, n_groups, chunk);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_d32(const act* q, const act* k, const act* v,
        float* part, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, int chunk) {
    flash_decode<32, act>(q, k, v, part, blockIdx.z, q_pos0 + blockIdx.z, tk, heads, kv_heads, causal, hole_first, hole_a,
                     hole_b, groups, n_groups, chunk);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_d64(const act* q, const act* k, const act* v,
        float* part, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, int chunk) {
    flash_decode<64, act>(q, k, v, part, blockIdx.z, q_pos0 + blockIdx.z, tk, heads, kv_heads, causal, hole_first, hole_a,
                     hole_b, groups, n_groups, chunk);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_d128(const act* q, const act* k, const act* v,
        float* part, int tq, int tk, int heads, int kv_heads, int causal, int q_pos0, int hole_first, int hole_a,
        int hole_b, const int* groups, int n_groups, int chunk) {
    flash_decode<128, act>(q, k, v, part, blockIdx.z, q_pos0 + blockIdx.z, tk, heads, kv_heads, causal, hole_first, hole_a,
                     hole_b, groups, n_groups, chunk);
}

// ---- decode over a packed batch: every sequence against its own cache in one launch ----
//
// A batched decode step (select answers several records at once) has a few new rows per sequence and
// one KV cache per sequence, of its own length. The caches' addresses, lengths and group layouts
// travel by value in the launch's parameters (up to DEC_MAX_SEQS sequences; the backend splits bigger
// batches), so a step costs one append launch and one decode launch per layer however many sequences
// it holds, where it took a copy per cache and a launch per sequence.

#define DEC_MAX_SEQS 32

// (also kv_append_seqs' parameters: sequence s's new rows go to cache rows tk[s] - rows .. tk[s])
struct DecodeSeqs {
    bf16* k[DEC_MAX_SEQS];      // sequence s's cache (tk[s], kv_heads * D) in bf16, its new rows included
    bf16* v[DEC_MAX_SEQS];
    int row0[DEC_MAX_SEQS + 1]; // its new rows: row0[s] .. row0[s + 1] of q, k, v (and of the partials)
    int tk[DEC_MAX_SEQS];       // its keys; its rows are the last, causal
    int goff[DEC_MAX_SEQS];     // its group layout (as load_groups reads it) at groups + goff[s]
    int ng[DEC_MAX_SEQS];       // its groups, 0 for none
    int n;                      // sequences
};

// the sequence that holds row i (row0 ascending; at most DEC_MAX_SEQS steps through the parameters)
__device__ __forceinline__ int seq_of_row(const int* row0, int n, int i) {
    int s = 0;
    while (s + 1 < n && row0[s + 1] <= i) s++;
    return s;
}

// Grid (splits, heads, rows of every sequence): as attention_decode_d*, the keys of split blockIdx.x
// of the row's own sequence (splits past its keys write an empty partial, which the merge weighs 0).
template <int D>
__device__ __forceinline__ void flash_decode_seqs(const act* q, float* part, const DecodeSeqs& b, int heads,
                                                  int kv_heads, const int* groups, int chunk) {
    int i = blockIdx.z, s = seq_of_row(b.row0, b.n, i);
    int qpos = b.tk[s] - (b.row0[s + 1] - b.row0[s]) + (i - b.row0[s]);
    flash_decode<D, bf16>(q, b.k[s], b.v[s], part, i, qpos, b.tk[s], heads, kv_heads, 1, -1, 0, 0, groups + b.goff[s],
                    b.ng[s], chunk);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_seqs_d16(const act* q, float* part,
        DecodeSeqs seqs, int heads, int kv_heads, const int* groups, int chunk) {
    flash_decode_seqs<16>(q, part, seqs, heads, kv_heads, groups, chunk);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_seqs_d32(const act* q, float* part,
        DecodeSeqs seqs, int heads, int kv_heads, const int* groups, int chunk) {
    flash_decode_seqs<32>(q, part, seqs, heads, kv_heads, groups, chunk);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_seqs_d64(const act* q, float* part,
        DecodeSeqs seqs, int heads, int kv_heads, const int* groups, int chunk) {
    flash_decode_seqs<64>(q, part, seqs, heads, kv_heads, groups, chunk);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_seqs_d128(const act* q, float* part,
        DecodeSeqs seqs, int heads, int kv_heads, const int* groups, int chunk) {
    flash_decode_seqs<128>(q, part, seqs, heads, kv_heads, groups, chunk);
}

// Appends each sequence's new rows of K and V to its caches, whose last rows they become (the
// decode launch's parameters: cache row tk[s] - (row0[s + 1] - r) for new row r), rounded to bf16
// as `cast_f32_bf16` does. Grid (ceil(kvd / 256), new rows), a thread per element of a row.
extern "C" __global__ void kv_append_seqs(const act* k_new, const act* v_new, DecodeSeqs b, int kvd) {
    int r = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= kvd) return;
    int s = seq_of_row(b.row0, b.n, r);
    long dst = (long)(b.tk[s] - b.row0[s + 1] + r) * kvd + c, src = (long)r * kvd + c;
    b.k[s][dst] = f2bf(ld(k_new[src]));
    b.v[s][dst] = f2bf(ld(v_new[src]));
}

// ---- variant 3: variant 2's forward with bf16 K/V packed once and the tiles pipelined ----
//
// Variant 2 re-reads each K/V tile as f32 from L2 for every 64-row query block, converts and
// transposes it in registers, and computes only after a barrier: load latency is not hidden.
// Variant 3: attention_pack_kv writes K as bf16 (KV, Tpad, D) and V transposed as bf16 (KV, D, Tpad)
// once per call; the forward takes 128 query rows per block (8 warps of 16: half the tile re-reads)
// and double-buffers the K and Vᵀ tiles with cp.async (16-byte copies, sm_80+), so the next tile
// streams in while the tensor cores work on this one.

// K (tk, KV*D) f32 -> kb (KV, tpad, D) bf16; V -> vt (KV, D, tpad) bf16; rows past tk are zero.
// Grid (tpad / 64, KV), 256 threads; V goes through shared memory to be transposed.
template <int D>
__device__ __forceinline__ void pack_kv(const act* k, const act* v, bf16* kb, bf16* vt, int tk, int tpad,
                                        int kv_heads) {
    __shared__ bf16 tile[64][D + 2];
    int n0 = blockIdx.x * 64, kvh = blockIdx.y;
    for (int idx = threadIdx.x; idx < 64 * (D / 4); idx += blockDim.x) {
        int r = idx / (D / 4), c = (idx % (D / 4)) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f), y = x;
        if (n0 + r < tk) {
            x = *(const float4*)(k + ((long)(n0 + r) * kv_heads + kvh) * D + c);
            y = *(const float4*)(v + ((long)(n0 + r) * kv_heads + kvh) * D + c);
        }
        *(uint2*)(kb + ((long)kvh * tpad + n0 + r) * D + c) = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
        tile[r][c] = f2bf(y.x);
        tile[r][c + 1] = f2bf(y.y);
        tile[r][c + 2] = f2bf(y.z);
        tile[r][c + 3] = f2bf(y.w);
    }
    __syncthreads();
    // vt rows: 64 consecutive keys of one dim, two per thread
    for (int idx = threadIdx.x; idx < D * 32; idx += blockDim.x) {
        int dd = idx / 32, r = (idx % 32) * 2;
        unsigned pair = (unsigned)tile[r][dd] | ((unsigned)tile[r + 1][dd] << 16);
        *(unsigned*)(vt + ((long)kvh * D + dd) * tpad + n0 + r) = pair;
    }
}

#define FA3_BM 128

template <int D, bool MASS>
__device__ __forceinline__ void flash_fwd_pipelined(const act* q, const bf16* kb, const bf16* vt, act* out, float* lse,
                                                    int tq, int tk, int tpad, int heads, int kv_heads, int causal,
                                                    int q_pos0, int hole_first, int hole_a, int hole_b,
                                                    const int* groups, int n_groups, float* mass) {
    static_assert(sizeof(act) == 4, "the query tile load reads f32 activations");
    constexpr int S = D + 8, SV = FA_BN + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16* sq = (bf16*)fa_smem;             // (BM, S)
    bf16* sk0 = sq + FA3_BM * S;           // 2 x (BN, S)
    bf16* sv0 = sk0 + 2 * FA_BN * S;       // 2 x (D, SV)
    __shared__ int sg[MASS ? FA_MAX_GROUPS + 1 + 2 * FA_MAX_RANGES : 1];
    int m0 = (gridDim.x - 1 - blockIdx.x) * FA3_BM, h = blockIdx.y, kvh = h / (heads / kv_heads);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int ng = MASS ? min(n_groups, FA_MAX_GROUPS) : 0;
    if (MASS) load_groups(sg, groups, n_groups, ng);
    const bf16* kh = kb + (long)kvh * tpad * D;
    const bf16* vh = vt + (long)kvh * D * tpad;
    auto load_tile = [&](int n0, int buf) {
        bf16* sk = sk0 + buf * FA_BN * S;
        bf16* sv = sv0 + buf * D * SV;
        for (int c = threadIdx.x; c < FA_BN * (D / 8); c += blockDim.x) {
            int r = c / (D / 8), col = (c % (D / 8)) * 8;
            cp_async16(sk + r * S + col, kh + (long)(n0 + r) * D + col);
        }
        for (int c = threadIdx.x; c < D * (FA_BN / 8); c += blockDim.x) {
            int r = c / (FA_BN / 8), col = (c % (FA_BN / 8)) * 8;
            cp_async16(sv + r * SV + col, vh + (long)r * tpad + n0 + col);
        }
        cp_async_commit();
    };
    int last = min(tq, m0 + FA3_BM) - 1 + q_pos0;
    int kend = causal ? min(tk, last + 1) : tk;
    int first = m0 + q_pos0;
    auto skipped = [&](int n0) {
        return hole_first >= 0 && first >= hole_first && n0 >= hole_a && n0 + FA_BN <= hole_b;
    };
    // the first tile's copies start before the query tile is converted
    int n_first = 0;
    while (n_first < kend && skipped(n_first)) n_first += FA_BN;
    if (n_first < kend) load_tile(n_first, 0);
    fa_load_rows<D, S>(sq, q + h * D, m0, FA3_BM, tq, heads * D);
    __syncthreads();
    unsigned qf[D / 16][4];
    fa_q_fragments<D>(sq + warp * 16 * S, qf);
    int qpos[2] = {q_pos0 + m0 + warp * 16 + g, q_pos0 + m0 + warp * 16 + g + 8};
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
    float macc[2][MASS ? FA_MAX_GROUPS : 1];
#pragma unroll
    for (int gi = 0; gi < (MASS ? FA_MAX_GROUPS : 1); gi++) macc[0][gi] = macc[1][gi] = 0.0f;
    int buf = 0;
    for (int n0 = n_first; n0 < kend;) {
        int next = n0 + FA_BN;
        while (next < kend && skipped(next)) next += FA_BN;
        if (next < kend) {
            load_tile(next, buf ^ 1); // the other buffer: its readers finished at the last barrier
            cp_async_wait<1>();       // this tile's copies are done (the next one's may be in flight)
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* sk = sk0 + buf * FA_BN * S;
        const bf16* svt = sv0 + buf * D * SV;
        fa_tile<D, MASS>(qf, sk, svt, n0, qpos, tk, causal, hole_first, hole_a, hole_b, sg, ng, o, mrow, lrow, macc);
        __syncthreads(); // this buffer's readers are done before the next iteration refills it
        buf ^= 1;
        n0 = next;
    }
    fa_store<D, MASS>(o, mrow, lrow, macc, m0 + warp * 16, out, lse, mass, tq, heads, h, ng);
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_d16(const act* k, const act* v, bf16* kb, bf16* vt,
        int tk, int tpad, int kv_heads) {
    pack_kv<16>(k, v, kb, vt, tk, tpad, kv_heads);
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_d32(const act* k, const act* v, bf16* kb, bf16* vt,
        int tk, int tpad, int kv_heads) {
    pack_kv<32>(k, v, kb, vt, tk, tpad, kv_heads);
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_d64(const act* k, const act* v, bf16* kb, bf16* vt,
        int tk, int tpad, int kv_heads) {
    pack_kv<64>(k, v, kb, vt, tk, tpad, kv_heads);
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_d128(const act* k, const act* v, bf16* kb, bf16* vt,
        int tk, int tpad, int kv_heads) {
    pack_kv<128>(k, v, kb, vt, tk, tpad, kv_heads);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_d16(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<16, false>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_d32(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<32, false>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<64, false>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<128, false>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_mass_d16(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<16, true>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_mass_d32(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<32, true>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_mass_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<64, true>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd3_mass_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_pipelined<128, true>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

// ---- variant 4: wgmma (sm_90a), FlashAttention-3's forward without warp specialisation ----
//
// A block of 256 threads (two warpgroups) takes 128 query rows of one head, each warpgroup 64 of
// them; the K and Vᵀ tiles of BN keys (packed to bf16 by attention_pack_kv, as for variant 3) are
// shared by both warpgroups and double-buffered with cp.async (the next tile's copies are in flight
// while this one is computed). Per tile and warpgroup:
//   S (64 x BN)  = Q Kᵀ   wgmma m64nBNk16, both operands from shared memory, D/16 k-steps
//   online softmax on S in registers (fa_softmax, the code variants 2 and 3 use: same fragment layout)
//   O (64 x D)  += P V    wgmma m64nDk16, P from registers (the a fragment), Vᵀ from shared memory
// then fa_store as in variants 2 and 3. No producer warp, no ping-pong between the warpgroups and no
// overlap of one tile's softmax with the next tile's Q Kᵀ (FlashAttention-3 has all three): the
// simplest wgmma design, first to be made correct on a device.
//
// Register fragments (PTX ISA 9.7.15.5.1.1.1, "Matrix Fragments for wgmma.mma_async.m64nNk16",
// figures "WGMMA .m64nNk16 register fragment layout for accumulator matrix D" and "... for matrix A").
// Thread i of the warpgroup: warp w = i / 32 (0..3), lane = i % 32 = 4g + t.
//   Accumulator D (64 x N, f32), N/2 registers d[0..N/2): d[4j + e] is row 16w + g + 8 * (e >> 1),
//   column 8j + 2t + (e & 1), j < N/8. Here d[4j + e] is held as d[j][e]: per warp exactly the c
//   fragment of mma.m16n8 that variants 2 and 3 keep in sc[nt][e], o[dt][e], so fa_softmax and
//   fa_store serve all three; the two rows of a thread are shared by the 4 lanes of its quad (t).
//   A (64 x 16, bf16) in registers, 4 registers of bf16x2 (lower column in the low half): a0 = row
//   16w + g, columns 2t, 2t+1; a1 = row 16w + g + 8, the same columns; a2, a3 = the same rows,
//   columns 2t + 8, 2t + 9: the a fragment of mma.m16n8k16, so P's keys 16kk..16kk+16 are
//   {pack(sc[2kk][0..1]), pack(sc[2kk][2..3]), pack(sc[2kk+1][0..1]), pack(sc[2kk+1][2..3])}.
//
// Shared memory (PTX ISA 9.7.15.5.1.2, K-major, no swizzle: the "interleave" canonical layout
// ((8,m),(T,2k)):((1T,SBO),(1,LBO)) with T = 8 bf16). Every operand is K-major: Q (rows x D), K
// (keys x D) and Vᵀ (D x keys; attention_pack_kv already writes V transposed, so no transpose bit is
// needed and both products use the same layout). A tile of R rows x C columns (C along the product's
// K dimension) is (R/8) x (C/8) core matrices of 8 rows x 16 bytes; core matrix (r/8, c/8) is the
// 128 contiguous bytes at 128 * ((r/8) * (C/8) + c/8), its row r % 8 at 16 * (r % 8). So the
// descriptor's leading-dimension byte offset (next core matrix along K) is 128 and its
// stride-dimension byte offset (next 8 rows) is 16 * C; one k16 step is two core matrices further,
// +256 bytes (+16 in the descriptor's address field). No swizzle: a core matrix covers the 32
// banks once, so reading one should be free of conflicts (to be confirmed by ncu); the 16-byte
// chunk x of a tile (x = 8 * core matrix + r % 8) lies at byte 16x, so the cp.async and Q stores of
// consecutive threads fill consecutive 16 bytes.
//
// Ordering (PTX ISA 9.7.15, async proxy): K/V arrive by cp.async and Q by ordinary stores (generic
// proxy); wgmma reads shared memory through the async proxy, so each writing thread runs
// fence.proxy.async.shared::cta after its writes (after cp.async.wait_group) and before the block
// barrier. Registers: wgmma.fence before each batch of wgmma (the accumulators and P were written by
// ordinary instructions), commit_group after it and wait_group 0 before the results are read; the
// accumulators and P are tied to those asm statements (fa4_pin), so the compiler moves no read of
// them above the wait and no write below the fence. A buffer is refilled only after the barrier
// that follows both warpgroups' wait_group on it.
//
// sm_90a only: elsewhere (sm_80 builds of the same source) the kernels trap; the host picks them on
// sm_90a alone.

#define FA4_BM 128 // query rows per block: two warpgroups of 64
#define FA4_QM_STRIDE 17 // variant 5's mass accumulators: floats per query row (16 groups + 1 pad)
// keys per tile: 64 (attention_fwd4[_mass]_d*; at d128 the plain kernel keeps to 128 registers, so
// two blocks share an SM) or 128 (attention_fwd4w_d*: wider Q Kᵀ products, half the barriers, one
// block per SM at d128); the mass kernels take 64 (at 128 they would hold 253 registers at d128)

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int N>
struct Wgmma; // ss: d (64 x N) = A·B (+ d if accumulate), A and B from shared memory (descriptors);
              // rs: d += A·B, A from registers (the a fragment above), B from shared memory

template <>
struct Wgmma<64> {
    static __device__ __forceinline__ void ss(float (&d)[8][4], u64 a, u64 b, int accumulate) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                     "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
                       "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
                       "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
                       "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
                       "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                     : "l"(a), "l"(b), "r"(accumulate)
                     : "memory");
    }
    static __device__ __forceinline__ void rs(float (&d)[8][4], const unsigned (&a)[4], u64 b) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                     "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
                       "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
                       "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
                       "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
                       "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1)
                     : "memory");
    }
};

template <>
struct Wgmma<128> {
    static __device__ __forceinline__ void ss(float (&d)[16][4], u64 a, u64 b, int accumulate) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                     "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                     "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                     "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
                       "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
                       "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
                       "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
                       "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
                       "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
                       "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
                       "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
                       "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
                       "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
                       "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
                       "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
                       "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                     : "l"(a), "l"(b), "r"(accumulate)
                     : "memory");
    }
    static __device__ __forceinline__ void rs(float (&d)[16][4], const unsigned (&a)[4], u64 b) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                     "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                     "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                     "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                     "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                     "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                     : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),
                       "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
                       "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),
                       "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
                       "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
                       "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
                       "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),
                       "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
                       "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),
                       "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
                       "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),
                       "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
                       "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),
                       "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
                       "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
                       "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1)
                     : "memory");
    }
};

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// this thread's shared-memory writes (ordinary stores, completed cp.async) visible to the async proxy
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Variant 5's copies and barriers (PTX ISA 9.7.9.25 cp.async.bulk, 9.7.13.15 mbarrier). An mbarrier
// of count 1 per stage: the copying thread's arrive.expect_tx is the one arrival, and the phase
// completes when the bulk copies' bytes have landed (complete_tx); waiters test the phase's parity.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(u64* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
// nanoseconds of the GPU's global timer (the same on every SM, unlike clock64, which a block
// preempted and resumed on another SM would see jump)
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// A wait that has not ended after two seconds is a deadlock of the kernel's barrier logic: trap,
// so that the launch fails with an error instead of hanging the process.
__device__ __forceinline__ void mbar_wait(u64* bar, unsigned parity) {
    unsigned done = 0;
    unsigned long long t0 = global_ns();
    while (!done) {
        if (global_ns() - t0 > 2000000000ull) __trap();
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(smem_addr(bar)), "r"(parity)
                     : "memory");
    }
}
// bytes (a multiple of 16, both addresses 16-byte aligned) from global to this block's shared memory
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}
// the 128 threads of one warpgroup (named barrier id 1 or 2; 0 is __syncthreads')
__device__ __forceinline__ void wg_bar_sync(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }

// Ties registers to this point of the program (an empty asm that reads and writes them): an
// accumulator read after wg_wait, or written before wg_fence, stays on its side.
template <int N>
__device__ __forceinline__ void fa4_pin(float (&r)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++)
        asm volatile("" : "+f"(r[j][0]), "+f"(r[j][1]), "+f"(r[j][2]), "+f"(r[j][3])::"memory");
}
template <int N>
__device__ __forceinline__ void fa4_pin(unsigned (&r)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++)
        asm volatile("" : "+r"(r[j][0]), "+r"(r[j][1]), "+r"(r[j][2]), "+r"(r[j][3])::"memory");
}

// wgmma descriptor of a K-major, unswizzled tile (layout above) whose 8-row groups are sbo bytes
// apart: start address, leading-dimension byte offset 128, stride-dimension byte offset, each >> 4;
// base offset 0, swizzle mode 0 (bits 62-63).
__device__ __forceinline__ u64 fa4_desc(const bf16* tile, int sbo) {
    unsigned a = (unsigned)__cvta_generic_to_shared(tile);
    return (u64)((a & 0x3FFFFu) >> 4) | ((u64)(128 >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}

// An R x C bf16 tile (row stride `stride` elements in global memory) into the core-matrix layout by
// 16-byte cp.async; chunk x (8 bf16) goes to dst + 8x.
template <int R, int C>
__device__ __forceinline__ void fa4_load_tile(bf16* dst, const bf16* src, long stride) {
    for (int x = threadIdx.x; x < R * C / 8; x += blockDim.x) {
        int rest = x >> 3, r = (rest / (C / 8)) * 8 + (x & 7), c = (rest % (C / 8)) * 8;
        cp_async16(dst + x * 8, src + r * stride + c);
    }
}

// Query rows m0 .. m0 + 128 (f32, row stride `stride`) -> bf16 in the core-matrix layout (128 x D);
// rows past tq are zero.
template <int D>
__device__ __forceinline__ void fa4_load_q(bf16* sq, const act* q, int m0, int tq, int stride) {
    for (int x = threadIdx.x; x < FA4_BM * D / 8; x += blockDim.x) {
        int rest = x >> 3, r = m0 + (rest / (D / 8)) * 8 + (x & 7), c = (rest % (D / 8)) * 8;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (r < tq) {
            const float4* src = (const float4*)(q + (long)r * stride + c);
            float4 a = src[0], b = src[1];
            w = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
        }
        *(uint4*)(sq + x * 8) = w;
    }
}

// The pieces of a tile step (fa4_step; variant 6 interleaves them across tiles). Issue only: the
// caller fences, commits and waits.
// S (64 x BN) = Q Kᵀ over D / 16 k-steps, both operands in shared memory
template <int D, int BN>
__device__ __forceinline__ void fa4_qk(float (&sc)[BN / 8][4], u64 dq, u64 dk) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) Wgmma<BN>::ss(sc, dq + 16 * kk, dk + 16 * kk, kk > 0);
}
// O (64 x D) += P Vᵀᵀ over BN / 16 k-steps, P from registers
template <int D, int BN>
__device__ __forceinline__ void fa4_pv(float (&o)[D / 8][4], const unsigned (&pa)[BN / 16][4], u64 dv) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) Wgmma<D>::rs(o, pa[kk], dv + 16 * kk);
}
// O's two rows of this thread times the softmax's rescaling factors
template <int D>
__device__ __forceinline__ void fa4_rescale(float (&o)[D / 8][4], const float (&alpha)[2]) {
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        o[j][2] *= alpha[1];
        o[j][3] *= alpha[1];
    }
}
// P (the probabilities in S's accumulator) as the a fragments of the k16 steps over the tile's keys
template <int BN>
__device__ __forceinline__ void fa4_pack_p(const float (&sc)[BN / 8][4], unsigned (&pa)[BN / 16][4]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        pa[kk][0] = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
        pa[kk][1] = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
        pa[kk][2] = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
        pa[kk][3] = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
}

// One key tile for this thread's warpgroup (variants 4 and 5; variant 6 interleaves its pieces): S = Q Kᵀ on wgmma (both operands in
// shared memory), the online softmax and group masses (fa_softmax), O = O·alpha + P V on wgmma (P
// from registers, Vᵀ in shared memory); every wgmma is complete when it returns, so the tile's
// buffers may be refilled after it. sk (BN, D) and svt (D, BN): the key tile at n0 in the
// core-matrix layout above. The rest is fixed for the block (computed once, before the key loop):
// the warpgroup's first and last query positions (wg_live: it has rows; the last block may hold
// fewer than 128), its warp's first and last (w_first, w_last), its own two rows (qpos: g and g + 8
// of the warp's 16), and the descriptor of the warpgroup's (64, D) query tile (dq). Skipped
// (uniformly over the warpgroup) where none of the warpgroup's rows sees a key of the tile.
// QUAD (variant 5's mass kernels): the group masses in shared memory (fa_mass_update_quad: qm0, qm1
// this thread's rows' accumulators), macc untouched.
template <int D, int BN, bool MASS, bool QUAD>
__device__ __forceinline__ void fa4_step(bool wg_live, int wg_first, int wg_last, int w_first, int w_last,
                                         const int (&qpos)[2], u64 dq, const bf16* sk, const bf16* svt, int n0,
                                         int tk, int causal, int hole_first, int hole_a, int hole_b, const int* sg,
                                         int ng, float (&o)[D / 8][4], float (&sc)[BN / 8][4], float (&mrow)[2],
                                         float (&lrow)[2], float (&macc)[2][MASS ? FA_MAX_GROUPS : 1], float* qm0,
                                         float* qm1) {
    bool in_hole = hole_first >= 0 && wg_first >= hole_first && n0 >= hole_a && n0 + BN <= hole_b;
    // (an if around the body, not an early return: with a return ptxas kept 30 more registers in
    // the mass kernels and spilled in attention_fwd4w_d64)
    if (wg_live && (!causal || n0 <= wg_last) && !in_hole) { // uniform over the warpgroup
        const u64 dk = fa4_desc(sk, 16 * D);
        const u64 dv = fa4_desc(svt, 16 * BN);
        const float scale = rsqrtf((float)D) * 1.4426950408889634f; // scores in log2 units, for exp2f
        // S = Q Kᵀ (the first k-step overwrites the previous tile's probabilities)
        fa4_pin(sc);
        wg_fence();
        fa4_qk<D, BN>(sc, dq, dk);
        wg_commit();
        wg_wait<0>();
        fa4_pin(sc);
        // no key of the tile masked for any row of this warp: past the end, the diagonal, the hole
        bool full = n0 + BN <= tk && (!causal || n0 + BN - 1 <= w_first) &&
                    !(hole_first >= 0 && w_last >= hole_first && n0 < hole_b && n0 + BN > hole_a);
        float alpha[2];
        if constexpr (MASS && QUAD) {
            float no_mass[2][1];
            fa_softmax<BN, false>(sc, scale, n0, qpos, tk, causal, hole_first, hole_a, hole_b, full, sg, ng, mrow,
                                  lrow, no_mass, alpha);
            float rs[2] = {0.0f, 0.0f}; // this thread's probabilities of the tile, per row
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++) {
                rs[0] += sc[nt][0] + sc[nt][1];
                rs[1] += sc[nt][2] + sc[nt][3];
            }
            fa_mass_update_quad<BN>(sc, n0, rs, alpha, sg, ng, qm0, qm1);
        } else {
            fa_softmax<BN, MASS>(sc, scale, n0, qpos, tk, causal, hole_first, hole_a, hole_b, full, sg, ng, mrow,
                                 lrow, macc, alpha);
        }
        fa4_rescale<D>(o, alpha);
        unsigned pa[BN / 16][4];
        fa4_pack_p<BN>(sc, pa);
        // O += P V
        fa4_pin(o);
        fa4_pin(pa);
        wg_fence();
        fa4_pv<D, BN>(o, pa, dv);
        wg_commit();
        wg_wait<0>();
        fa4_pin(o);
    }
}
#endif

// q (tq, H*D) f32; out, lse, groups, mass as variant 2. Grid (ceil(tq / 128), H), 256 threads,
// dynamic shared memory (128 + 4 * BN) * D * 2 bytes (+ 32 for BULK's barriers).
// Variant 4 (BULK false): kb (KV, tpad, D) and vt (KV, D, tpad) bf16 from attention_pack_kv, tpad a
// multiple of BN; every thread copies 16-byte pieces of the next tile by cp.async, and two block
// barriers per tile keep the warpgroups in step.
// Variant 5 (BULK true): kb and vt hold each tile as its shared-memory image (attention_pack_kv_tiles:
// (KV, tpad / BN, BN * D) and (KV, tpad / BN, D * BN)), so one thread moves a tile with two bulk
// copies (cp.async.bulk, the async proxy, like TMA without a tensor map) that complete on the
// stage's mbarrier; the warpgroups wait on that barrier, not on each other, and the stage is
// refilled by whichever warpgroup finishes it last. The warpgroups drift apart, so one's softmax can
// run under the other's wgmma (FlashAttention-3's ping-pong, without its explicit ordering).
template <int D, int BN, bool MASS, int MODE>
__device__ __forceinline__ void flash_fwd_wgmma(const act* q, const bf16* kb, const bf16* vt, act* out, float* lse,
                                                int tq, int tk, int tpad, int heads, int kv_heads, int causal,
                                                int q_pos0, int hole_first, int hole_a, int hole_b,
                                                const int* groups, int n_groups, float* mass) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(sizeof(act) == 4, "the query tile load reads f32 activations");
    static_assert(D % 16 == 0 && BN % 16 == 0, "k16 steps");
    constexpr bool BULK = MODE >= 1, OVERLAP = MODE == 2;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16* sq = (bf16*)fa_smem;     // (128, D): the two warpgroups' (64, D) query tiles
    bf16* sk0 = sq + FA4_BM * D;   // 2 x (BN, D) key tiles
    bf16* sv0 = sk0 + 2 * BN * D;  // 2 x (D, BN) Vᵀ tiles
    // BULK: "landed" barriers, and how many warpgroups are done with what is behind each: variant 5
    // one per stage (its K and Vᵀ tiles), variant 6 one per stage's K (full[b]) and one per stage's
    // Vᵀ (full[2 + b]), as it reads a tile's Vᵀ a step after its K
    u64* full = (u64*)(sv0 + 2 * D * BN);
    // OVERLAP with MASS: each thread's group masses (2 rows x FA_MAX_GROUPS) in shared memory, not
    // registers (the kernel holds 224 of them without), at [group][row][thread]
    float* smass = (float*)(full + 4);
    // variant 5 with MASS: one accumulator per (row of the block, group), rows FA4_QM_STRIDE floats
    // apart (17: the 8 quads of a warp hit 8 banks), written by each quad's first lane
    constexpr bool QUAD = MASS && MODE == 1;
    auto mass_acc = [&](int r, int gi) -> float& { return smass[(gi * 2 + r) * 256 + threadIdx.x]; }; // 256 threads
    __shared__ int done_with[4];
    __shared__ int sg[MASS ? FA_MAX_GROUPS + 1 + 2 * FA_MAX_RANGES : 1];
    // heaviest (latest, under the causal mask) query blocks first
    int m0 = (gridDim.x - 1 - blockIdx.x) * FA4_BM, h = blockIdx.y, kvh = h / (heads / kv_heads);
    int warp = threadIdx.x >> 5;
    int ng = MASS ? min(n_groups, FA_MAX_GROUPS) : 0;
    if (MASS) load_groups(sg, groups, n_groups, ng);
    int last = min(tq, m0 + FA4_BM) - 1 + q_pos0; // the block's last query position
    int kend = causal ? min(tk, last + 1) : tk;
    int first = m0 + q_pos0;
    // the tile after n0 (or kend): tiles inside the hole for every row of the block are skipped
    auto next_tile = [&](int n0) {
        int n = n0 + BN;
        while (n < kend && hole_first >= 0 && first >= hole_first && n >= hole_a && n + BN <= hole_b) n += BN;
        return n;
    };
    int n_first = next_tile(-BN);
    const bf16* kh = kb + (long)kvh * tpad * D; // variant 4's tiles of this kv head
    const bf16* vh = vt + (long)kvh * D * tpad;
    // BULK, one thread: the K image (what & 1) and/or the Vᵀ image (what & 2) of the tile at n0 into
    // stage buf, completing on barrier bar
    auto load_bulk = [&](int n0, int buf, int what, u64* bar) {
        long tile = (long)kvh * (tpad / BN) + n0 / BN;
        mbar_expect_tx(bar, ((what & 1) + (what >> 1)) * BN * D * 2);
        if (what & 1) bulk_g2s(sk0 + buf * BN * D, kb + tile * BN * D, BN * D * 2, bar);
        if (what & 2) bulk_g2s(sv0 + buf * D * BN, vt + tile * D * BN, D * BN * 2, bar);
    };
    auto load_tile = [&](int n0, int buf) {
        if constexpr (OVERLAP) {
            load_bulk(n0, buf, 1, &full[buf]);
            load_bulk(n0, buf, 2, &full[2 + buf]);
        } else if constexpr (BULK) {
            load_bulk(n0, buf, 3, &full[buf]);
        } else {
            fa4_load_tile<BN, D>(sk0 + buf * BN * D, kh + (long)n0 * D, D);
            fa4_load_tile<D, BN>(sv0 + buf * D * BN, vh + n0, tpad);
            cp_async_commit();
        }
    };
    if constexpr (BULK) {
        if (threadIdx.x == 0) {
            for (int b = 0; b < (OVERLAP ? 4 : 2); b++) {
                mbar_init(&full[b], 1);
                done_with[b] = 0;
            }
            fence_mbar_init();
        }
        __syncthreads(); // the barriers exist before anyone copies to or waits on them
        if (threadIdx.x == 0) {
            // both stages' first tiles
            if (n_first < kend) load_tile(n_first, 0);
            int n_second = next_tile(n_first);
            if (n_second < kend) load_tile(n_second, 1);
        }
    } else {
        // the first tile's copies start before the query tile is converted
        if (n_first < kend) load_tile(n_first, 0);
    }
    fa4_load_q<D>(sq, q + h * D, m0, tq, heads * D);
    fence_proxy_async(); // the query stores, before the barrier below or the loop's first one
    if constexpr (BULK) __syncthreads();
    int wg = warp >> 2, g = (threadIdx.x & 31) >> 2;
    int wg_row0 = m0 + 64 * wg;
    int wg_first = q_pos0 + wg_row0, wg_last = q_pos0 + min(tq, wg_row0 + 64) - 1;
    bool wg_live = wg_row0 < tq;
    int w_first = q_pos0 + m0 + warp * 16, w_last = w_first + 15;
    int qpos[2] = {w_first + g, w_first + g + 8};
    const u64 dq = fa4_desc(sq + wg * 64 * D, 16 * D);
    float o[D / 8][4], sc[BN / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
#pragma unroll
    for (int j = 0; j < BN / 8; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f}; // lrow: this thread's columns only
    float macc[2][MASS ? FA_MAX_GROUPS : 1];
#pragma unroll
    for (int gi = 0; gi < (MASS ? FA_MAX_GROUPS : 1); gi++) macc[0][gi] = macc[1][gi] = 0.0f;
    if constexpr (OVERLAP && MASS)
        for (int gi = 0; gi < ng; gi++) mass_acc(0, gi) = mass_acc(1, gi) = 0.0f; // this thread's own
    // QUAD: this thread's two rows (g and g + 8 of its warp's 16) in the block's accumulators
    float* qm0 = smass + (warp * 16 + g) * FA4_QM_STRIDE;
    float* qm1 = qm0 + 8 * FA4_QM_STRIDE;
    if constexpr (QUAD)
        if ((threadIdx.x & 3) == 0)
            for (int gi = 0; gi < ng; gi++) qm0[gi] = qm1[gi] = 0.0f; // the quad's first lane's own
    int buf = 0;
    int it = 0; // BULK: tiles done; tile `it` is in stage it & 1, behind its barriers' phase it >> 1
    // BULK: this warpgroup is done with what stands behind barrier `slot` (`what`, as load_bulk) of
    // stage sb, which holds the tile at n_done (every wgmma reading it has completed); the second
    // warpgroup to say so refills it with the tile two ahead
    auto release = [&](int slot, int sb, int n_done, int what) {
        wg_bar_sync(1 + wg);
        // the fences order the warpgroups' finished reads before the count and the count before the
        // refill (release and acquire; a relaxed atomic alone does not promise it)
        if ((threadIdx.x & 127) == 0 && (__threadfence_block(), atomicAdd(&done_with[slot], 1)) == 1) {
            __threadfence_block();
            atomicExch(&done_with[slot], 0);
            int n1 = next_tile(n_done), n2 = n1 < kend ? next_tile(n1) : kend;
            if (n2 < kend) {
                fence_proxy_async(); // the generic side's reads of the stage before the async writes
                load_bulk(n2, sb, what, &full[slot]);
            }
        }
    };
    // OVERLAP: the previous tile's P (zero before the first tile) and the stage holding its Vᵀ
    unsigned pa[OVERLAP ? BN / 16 : 1][4];
#pragma unroll
    for (int j = 0; j < (OVERLAP ? BN / 16 : 1); j++) pa[j][0] = pa[j][1] = pa[j][2] = pa[j][3] = 0u;
    int prev_buf = -1, prev_n0 = 0;
    for (int n0 = n_first; n0 < kend;) {
        int next = next_tile(n0);
        if constexpr (BULK) {
            mbar_wait(&full[buf], (it >> 1) & 1); // this tile's bytes (variant 6: its K) have landed
        } else {
            if (next < kend) {
                load_tile(next, buf ^ 1); // the other buffer: its readers finished before the last barrier
                cp_async_wait<1>();       // this tile's copies are done (the next one's may be in flight)
            } else {
                cp_async_wait<0>();
            }
            fence_proxy_async(); // this thread's copies, visible to the tensor cores after the barrier
            __syncthreads();
        }
        if constexpr (OVERLAP) {
            // FlashAttention-3's intra-warpgroup pipelining: this tile's S = Q Kᵀ and the previous
            // tile's O += P V go to the tensor cores together; the softmax of S runs while P V is
            // still in flight, and O is rescaled once it has landed. Every tile is computed, also
            // those none of the warpgroup's rows sees (the causal tail, the DPO hole): their scores
            // are all masked, so P is zero and alpha one, and wgmma stays out of divergent branches
            // (ptxas serializes it there). Before the first tile the P V is of a zero P, against the
            // query tile (finite values, as many as a Vᵀ tile holds; a stage not landed may hold NaNs).
            static_assert(!OVERLAP || BN == FA4_BM, "the query tile stands in for a Vᵀ tile");
            const u64 dv_prev = fa4_desc(prev_buf < 0 ? sq : sv0 + prev_buf * D * BN, 16 * BN);
            fa4_pin(sc);
            fa4_pin(o);
            fa4_pin(pa);
            wg_fence();
            fa4_qk<D, BN>(sc, dq, fa4_desc(sk0 + buf * BN * D, 16 * D));
            wg_commit();
            // the previous tile's Vᵀ, waited for once Q Kᵀ is on its way (the wait's loop between the
            // two products needs a fence of its own before the second)
            if (prev_buf >= 0) mbar_wait(&full[2 + prev_buf], ((it - 1) >> 1) & 1);
            fa4_pin(o);
            fa4_pin(pa);
            wg_fence();
            fa4_pv<D, BN>(o, pa, dv_prev);
            wg_commit();
            wg_wait<1>(); // S landed; P V may still run
            fa4_pin(sc);
            release(buf, buf, n0, 1); // this tile's K: its stage may take the K two tiles ahead
            bool full_tile = n0 + BN <= tk && (!causal || n0 + BN - 1 <= w_first) &&
                             !(hole_first >= 0 && w_last >= hole_first && n0 < hole_b && n0 + BN > hole_a);
            float alpha[2], no_mass[2][1];
            fa_softmax<BN, false>(sc, rsqrtf((float)D) * 1.4426950408889634f, n0, qpos, tk, causal, hole_first,
                                  hole_a, hole_b, full_tile, sg, ng, mrow, lrow, no_mass, alpha);
            if constexpr (MASS) {
                float rs[2] = {0.0f, 0.0f}; // this thread's probabilities of the tile, per row
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++) {
                    rs[0] += sc[nt][0] + sc[nt][1];
                    rs[1] += sc[nt][2] + sc[nt][3];
                }
                fa_mass_update<BN>(sc, n0, rs, alpha, sg, ng, mass_acc);
            }
            wg_wait<0>(); // the previous P V landed: O may be rescaled, pa rewritten, its Vᵀ refilled
            fa4_pin(o);
            fa4_pin(pa);
            if (prev_buf >= 0) release(2 + prev_buf, prev_buf, prev_n0, 2);
            fa4_rescale<D>(o, alpha);
            fa4_pack_p<BN>(sc, pa);
            prev_buf = buf;
            prev_n0 = n0;
        } else {
            fa4_step<D, BN, MASS, QUAD>(wg_live, wg_first, wg_last, w_first, w_last, qpos, dq, sk0 + buf * BN * D,
                                        sv0 + buf * D * BN, n0, tk, causal, hole_first, hole_a, hole_b, sg, ng, o, sc,
                                        mrow, lrow, macc, qm0, qm1);
            if constexpr (BULK) {
                release(buf, buf, n0, 3);
            } else {
                __syncthreads(); // both warpgroups' products on this buffer are done before it is refilled
            }
        }
        buf ^= 1;
        it++;
        n0 = next;
    }
    if constexpr (OVERLAP) {
        // the last tile's P V, once its Vᵀ has landed (when the block had no tile, a zero P against
        // the query tile, as before the first)
        const bf16* v_last = sq;
        if (prev_buf >= 0) {
            mbar_wait(&full[2 + prev_buf], ((it - 1) >> 1) & 1);
            v_last = sv0 + prev_buf * D * BN;
        }
        fa4_pin(o);
        fa4_pin(pa);
        wg_fence();
        fa4_pv<D, BN>(o, pa, fa4_desc(v_last, 16 * BN));
        wg_commit();
        wg_wait<0>();
        fa4_pin(o);
    }
    if constexpr (OVERLAP && MASS) {
#pragma unroll
        for (int gi = 0; gi < FA_MAX_GROUPS; gi++) {
            macc[0][gi] = gi < ng ? mass_acc(0, gi) : 0.0f;
            macc[1][gi] = gi < ng ? mass_acc(1, gi) : 0.0f;
        }
    }
    if constexpr (QUAD) {
        // the quad's sums from its first lane, zeros from the others: fa_store's quad sum is theirs
        bool first = (threadIdx.x & 3) == 0;
#pragma unroll
        for (int gi = 0; gi < FA_MAX_GROUPS; gi++) {
            macc[0][gi] = first && gi < ng ? qm0[gi] : 0.0f;
            macc[1][gi] = first && gi < ng ? qm1[gi] : 0.0f;
        }
    }
    fa_store<D, MASS>(o, mrow, lrow, macc, m0 + warp * 16, out, lse, mass, tq, heads, h, ng);
#else
    __trap(); // wgmma is sm_90a only; the host never launches these elsewhere
#endif
}

// Same arguments as attention_fwd3_* (kb, vt with tpad a multiple of 128).

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd4_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<64, 64, false, 0>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd4_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<128, 64, false, 0>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd4_mass_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<64, 64, true, 0>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd4_mass_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<128, 64, true, 0>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd4w_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<64, 128, false, 0>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256) attention_fwd4w_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<128, 128, false, 0>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

// Variant 5: variant 4 with tile images moved by bulk copies on mbarriers (64-key tiles; same
// arguments, kb and vt from attention_pack_kv_tiles).

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd5_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<64, 64, false, 1>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd5_mass_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<64, 64, true, 1>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd5_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<128, 64, false, 1>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 2) attention_fwd5_mass_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<128, 64, true, 1>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

// Variant 6: variant 5 with 128-key tiles, one block per SM (up to 255 registers a thread), and
// FlashAttention-3's intra-warpgroup pipelining: a tile's Q Kᵀ and the previous tile's P V are in
// flight together, and the softmax runs under the P V (same arguments; kb and vt from
// attention_pack_kv_tiles128). As a tile's Vᵀ is read a step after its K, each stage's K and Vᵀ
// have a barrier of their own: K is refilled once Q Kᵀ has landed, Vᵀ once P V has, so each copy
// has about a step to land (one barrier for both made every step wait for a copy issued at the end
// of the step before). The mass kernels keep the group accumulators in shared memory (32 KB more;
// in registers they would spill at 255).

extern "C" __global__ void __launch_bounds__(256, 1) attention_fwd6_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<64, 128, false, 2>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 1) attention_fwd6_mass_d64(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<64, 128, true, 2>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 1) attention_fwd6_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<128, 128, false, 2>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

extern "C" __global__ void __launch_bounds__(256, 1) attention_fwd6_mass_d128(const act* q, const bf16* kb, const bf16* vt, act* out,
        float* lse, int tq, int tk, int tpad, int heads, int kv_heads, int causal, int q_pos0, int hole_first,
        int hole_a, int hole_b, const int* groups, int n_groups, float* mass) {
    flash_fwd_wgmma<128, 128, true, 2>(q, kb, vt, out, lse, tq, tk, tpad, heads, kv_heads, causal,
        q_pos0, hole_first, hole_a, hole_b, groups, n_groups, mass);
}

// K (tk, KV*D) f32 -> kt (KV, tpad / BN, BN * D) bf16 and V -> vtt (KV, tpad / BN, D * BN) bf16: each
// BN-key tile of K and of Vᵀ as the image variants 5 and 6 copy into shared memory in one piece (the
// core-matrix layout of fa4_load_tile: 16-byte chunk x of an R x C tile holds row 8 * (x / 8 / (C / 8))
// + x % 8, columns 8 * (x / 8 % (C / 8)) ..+ 8). Keys past tk are zero. Grid (tpad / BN, KV), 256 threads.
template <int D, int BN>
__device__ __forceinline__ void pack_kv_tiles(const act* k, const act* v, bf16* kt, bf16* vtt, int tk, int tpad,
                                              int kv_heads) {
    int n0 = blockIdx.x * BN, kvh = blockIdx.y;
    long tile = (long)kvh * (tpad / BN) + blockIdx.x;
    bf16* kd = kt + tile * BN * D;
    bf16* vd = vtt + tile * D * BN;
    for (int x = threadIdx.x; x < BN * D / 8; x += blockDim.x) {
        // K: row r (key), columns c..c+8 (dims)
        int rest = x >> 3, r = (rest / (D / 8)) * 8 + (x & 7), c = (rest % (D / 8)) * 8;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (n0 + r < tk) {
            const float4* src = (const float4*)(k + ((long)(n0 + r) * kv_heads + kvh) * D + c);
            float4 a = src[0], b = src[1];
            w = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
        }
        *(uint4*)(kd + x * 8) = w;
        // Vᵀ: row r (dim), columns c..c+8 (keys)
        int rv = (rest / (BN / 8)) * 8 + (x & 7), cv = (rest % (BN / 8)) * 8;
        float e[8];
#pragma unroll
        for (int j = 0; j < 8; j++)
            e[j] = n0 + cv + j < tk ? v[((long)(n0 + cv + j) * kv_heads + kvh) * D + rv] : 0.0f;
        *(uint4*)(vd + x * 8) = make_uint4(pack_bf16(e[0], e[1]), pack_bf16(e[2], e[3]), pack_bf16(e[4], e[5]),
                                           pack_bf16(e[6], e[7]));
    }
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_tiles_d64(const act* k, const act* v,
        bf16* kt, bf16* vtt, int tk, int tpad, int kv_heads) {
    pack_kv_tiles<64, 64>(k, v, kt, vtt, tk, tpad, kv_heads);
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_tiles_d128(const act* k, const act* v,
        bf16* kt, bf16* vtt, int tk, int tpad, int kv_heads) {
    pack_kv_tiles<128, 64>(k, v, kt, vtt, tk, tpad, kv_heads);
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_tiles128_d64(const act* k, const act* v,
        bf16* kt, bf16* vtt, int tk, int tpad, int kv_heads) {
    pack_kv_tiles<64, 128>(k, v, kt, vtt, tk, tpad, kv_heads);
}

extern "C" __global__ void __launch_bounds__(256) attention_pack_kv_tiles128_d128(const act* k, const act* v,
        bf16* kt, bf16* vtt, int tk, int tpad, int kv_heads) {
    pack_kv_tiles<128, 128>(k, v, kt, vtt, tk, tpad, kv_heads);
}
