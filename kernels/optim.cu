// Optimizer updates on f32 master weights (PyTorch's AdamW and SGD order of operations), and the
// global gradient norm (two passes: per-block partial sums, then one block; deterministic).
// CPU twins: update, clip_grad_norm in src/train/optim.rs.

// g scaled by gs (the clipping factor, 1 for none); p <- p (1 - lr wd); m, v moments;
// p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, long n, float lr,
                                      float beta1, float beta2, float eps, float wd, float bc1, float bc2,
                                      float gs) {
    float step = lr / bc1, sqrt_bc2 = sqrtf(bc2);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float pi = p[i] * (1.0f - lr * wd), gi = g[i] * gs;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step * mi / (sqrtf(vi) / sqrt_bc2 + eps);
    }
}

// g scaled by gs; g <- g + wd p; p <- p - lr g
extern "C" __global__ void sgd_step(float* p, const float* g, long n, float lr, float wd, float gs) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        p[i] -= lr * (g[i] * gs + wd * p[i]);
}

// Sums of squares in f64, as the host's: an f32 sum overflows to inf past 3.4e38 (a gradient element
// above ~1.8e19), where the host clips and steps, and is ~1e-6 of the host's norm apart.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// partial[blockIdx.x] = sum of g[i]^2 over this block's grid-stride share
extern "C" __global__ void sumsq_partial(const float* g, long n, double* partial) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        s += (double)g[i] * (double)g[i];
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] = sum of partial[0..n) (one block)
extern "C" __global__ void sum_final(const double* partial, int n, double* out) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}
