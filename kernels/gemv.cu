// Products of a few rows (a decode step: 1 to 8 rows) with bf16 weight matrices, several matrices of
// one input in one launch (q, k and v; gate and up): y_i (m, n_i) = x (m, k) · W_iᵀ + bias_i.
// CPU twin: linear / linears in src/backend/cpu.rs (f32 products of the converted weights).
//
// At these shapes a product is a read of W, memory-bound; cuBLAS's bf16 GEMM also wants x rounded
// to bf16 first (a cast launch), and each cuBLAS call costs the host several microseconds, which a
// decode step of ~100 products could not hide. Here x stays f32 (read through L1, every warp of a
// block reads the same rows), one warp computes one output feature for all m rows: each lane reads
// 16 bytes (8 weights) of W's row per step, so a warp reads 512 contiguous bytes, and the m dot
// products are reduced across the warp at the end.

#define GEMV_MAX_MATS 4

struct GemvMats {
    const bf16* w[GEMV_MAX_MATS];    // matrix i: (n_i, k) row-major
    const float* bias[GEMV_MAX_MATS]; // its bias (n_i), or null
    float* y[GEMV_MAX_MATS];          // its output (m, n_i)
    int n0[GEMV_MAX_MATS + 1];        // its features are n0[i] .. n0[i + 1] of the launch's (n0[count..]
                                      // all the total)
    int count;                        // matrices
};

// Grid: ceil(n0[count] / 8) blocks of 256 threads, a warp per output feature. k a multiple of 8,
// W's rows and x's 16-byte aligned; M >= m.
template <int M>
__device__ __forceinline__ void gemv_rows(const float* x, const GemvMats& mats, int m, int k) {
    int f = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    // feature f's matrix, by constant indices only (an index into the parameters held in a register
    // made the compiler copy them to a stack frame)
    const bf16* W = mats.w[0];
    const float* bias = mats.bias[0];
    float* y = mats.y[0];
    int lo = 0, hi = mats.n0[1];
#pragma unroll
    for (int j = 1; j < GEMV_MAX_MATS; j++) {
        if (j < mats.count && mats.n0[j] <= f) {
            W = mats.w[j];
            bias = mats.bias[j];
            y = mats.y[j];
            lo = mats.n0[j];
            hi = mats.n0[j + 1];
        }
    }
    if (f >= hi) return; // past the last matrix (whole warps: the reduction below stays uniform)
    int n = f - lo, width = hi - lo;
    const uint4* wr = (const uint4*)(W + (long)n * k);
    float acc[M];
#pragma unroll
    for (int r = 0; r < M; r++) acc[r] = 0.0f;
    for (int c = lane; c < k / 8; c += 32) {
        uint4 u = wr[c];
        float w[8] = {__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                      __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u),
                      __uint_as_float(u.z << 16), __uint_as_float(u.z & 0xffff0000u),
                      __uint_as_float(u.w << 16), __uint_as_float(u.w & 0xffff0000u)};
#pragma unroll
        for (int r = 0; r < M; r++) {
            if (r < m) {
                const float4* xr = (const float4*)(x + (long)r * k) + 2 * c;
                float4 a = __ldg(xr), b = __ldg(xr + 1);
                acc[r] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y +
                          w[6] * b.z + w[7] * b.w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < M; r++) {
        float s = warp_sum(acc[r]);
        if (r < m && lane == 0) y[(long)r * width + n] = s + (bias != 0 ? bias[n] : 0.0f);
    }
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m1(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<1>(x, mats, m, k);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m2(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<2>(x, mats, m, k);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m4(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<4>(x, mats, m, k);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16_m8(const float* x, GemvMats mats, int m, int k) {
    gemv_rows<8>(x, mats, m, k);
}
