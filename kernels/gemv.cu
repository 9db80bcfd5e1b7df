// Products of a few rows (a decode step: 1 to 8 rows) with bf16 weight matrices, several matrices of
// one input in one launch (q, k and v; gate and up): y_i (m, n_i) = x (m, k) · W_iᵀ + bias_i.
// CPU twin: linear / linears in src/backend/cpu.rs (f32 products of the converted weights).
//
// At these shapes a product is a read of W, memory-bound; cuBLAS's bf16 GEMM also wants x rounded
// to bf16 first (a cast launch), and each cuBLAS call costs the host several microseconds, which a
// decode step of ~100 products could not hide. Here x stays f32 (read through L1, every warp of a
// block reads the same rows), one warp computes F output features for all m rows: each lane reads
// 16 bytes (8 weights) of each feature's row per step, so a warp reads 512 contiguous bytes a
// feature, and the m·F dot products are reduced across the warp at the end. A lane reads 32·m bytes
// of x a step against 16·F of W, so F grows with m (1, 1, 2, 4 for m = 1, 2, 4, 8): x's L1 traffic
// stays within 4x W's (one feature a warp at m = 8 would ask L1 for 16x HBM's rate, past its
// ~128 B/clock per SM), and each W byte is still read once.

#define GEMV_MAX_MATS 4

struct GemvMats {
    const bf16* w[GEMV_MAX_MATS];    // matrix i: (n_i, k) row-major
    const float* bias[GEMV_MAX_MATS]; // its bias (n_i), or null
    float* y[GEMV_MAX_MATS];          // its output (m, n_i)
    int n0[GEMV_MAX_MATS + 1];        // its features are n0[i] .. n0[i + 1] of the launch's (n0[count..]
                                      // all the total)
    int count;                        // matrices
};

// Grid: ceil(W / 8) blocks of 256 threads, W = Σ ceil(n_i / F) warps, a warp per F consecutive
// features of one matrix (matrix i's warps after those of the matrices before it). k a multiple of
// 8, W's rows and x's 16-byte aligned; M >= m.
template <int M, int F>
__device__ __forceinline__ void gemv_rows(const float* x, const GemvMats& mats, int m, int k) {
    int gw = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    // this warp's matrix, by constant indices only (an index into the parameters held in a register
    // made the compiler copy them to a stack frame)
    const bf16* W = mats.w[0];
    const float* bias = mats.bias[0];
    float* y = mats.y[0];
    int width = mats.n0[1], first = 0, end = (width + F - 1) / F; // matrix 0's warps: first .. end
    int start = end;                                                // the next matrix's first warp
#pragma unroll
    for (int j = 1; j < GEMV_MAX_MATS; j++) {
        if (j < mats.count) {
            int nj = mats.n0[j + 1] - mats.n0[j], wj = (nj + F - 1) / F;
            if (gw >= start) {
                W = mats.w[j];
                bias = mats.bias[j];
                y = mats.y[j];
                width = nj;
                first = start;
                end = start + wj;
            }
            start += wj;
        }
    }
    if (gw >= end) return; // past the last matrix (whole warps: the reductions below stay uniform)
    int n = (gw - first) * F; // this warp's first feature in its matrix
    const uint4* wr = (const uint4*)(W + (long)n * k);
    float acc[M][F];
#pragma unroll
    for (int r = 0; r < M; r++)
#pragma unroll
        for (int t = 0; t < F; t++) acc[r][t] = 0.0f;
    for (int c = lane; c < k / 8; c += 32) {
        float w[F][8];
#pragma unroll
        for (int t = 0; t < F; t++) {
            uint4 u = n + t < width ? wr[(long)t * (k / 8) + c] : make_uint4(0u, 0u, 0u, 0u);
            w[t][0] = __uint_as_float(u.x << 16);
            w[t][1] = __uint_as_float(u.x & 0xffff0000u);
            w[t][2] = __uint_as_float(u.y << 16);
            w[t][3] = __uint_as_float(u.y & 0xffff0000u);
            w[t][4] = __uint_as_float(u.z << 16);
            w[t][5] = __uint_as_float(u.z & 0xffff0000u);
            w[t][6] = __uint_as_float(u.w << 16);
            w[t][7] = __uint_as_float(u.w & 0xffff0000u);
        }
#pragma unroll
        for (int r = 0; r < M; r++) {
            if (r < m) {
                const float4* xr = (const float4*)(x + (long)r * k) + 2 * c;
                float4 a = __ldg(xr), b = __ldg(xr + 1);
#pragma unroll
                for (int t = 0; t < F; t++)
                    acc[r][t] += w[t][0] * a.x + w[t][1] * a.y + w[t][2] * a.z + w[t][3] * a.w + w[t][4] * b.x +
                                 w[t][5] * b.y + w[t][6] * b.z + w[t][7] * b.w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < M; r++) {
#pragma unroll
        for (int t = 0; t < F; t++) {
            float s = warp_sum(acc[r][t]);
            if (r < m && n + t < width && lane == 0)
                y[(long)r * width + n + t] = s + (bias != 0 ? bias[n + t] : 0.0f);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m1(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<1, 1>(x, mats, m, k);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m2(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<2, 1>(x, mats, m, k);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m4(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<4, 2>(x, mats, m, k);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m8(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<8, 4>(x, mats, m, k);
}
