// RMSNorm forward/backward and LayerNorm forward: one block per row, f32 statistics.
// CPU twins: rms_norm, rms_norm_backward, layer_norm (add_rms_norm: add then rms_norm) in src/backend/cpu.rs.

// y = w * x / sqrt(mean(x^2) + eps)
extern "C" __global__ void rms_norm_fwd(const act* x, const float* w, act* y, int d, float eps) {
    __shared__ float scratch[32];
    const act* xr = x + (long)blockIdx.x * d;
    act* yr = y + (long)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) { float v = ld(xr[i]); ss += v * v; }
    float r = rsqrtf(block_sum(ss, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = st(w[i] * (ld(xr[i]) * r));
}

// The residual add and the next norm in one pass: x += y, then out = w * x / sqrt(mean(x^2) + eps)
// (the CPU's add then rms_norm; the same f32 roundings)
extern "C" __global__ void add_rms_norm_fwd(act* x, const act* y, const float* w, act* out, int d, float eps) {
    __shared__ float scratch[32];
    act* xr = x + (long)blockIdx.x * d;
    const act* yr = y + (long)blockIdx.x * d;
    act* orow = out + (long)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        act s = st(ld(xr[i]) + ld(yr[i]));
        xr[i] = s;
        float v = ld(s);
        ss += v * v;
    }
    float r = rsqrtf(block_sum(ss, scratch) / d + eps);
    // each thread reads back only the elements it wrote
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = st(w[i] * (ld(xr[i]) * r));
}

// dx = r * w * dy - x * r^3 * sum(w * dy * x) / d
extern "C" __global__ void rms_norm_bwd(const act* x, const float* w, const act* dy, act* dx, int d, float eps) {
    __shared__ float scratch[32];
    long off = (long)blockIdx.x * d;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = ld(x[off + i]);
        ss += v * v;
        dot += w[i] * ld(dy[off + i]) * v;
    }
    float r = rsqrtf(block_sum(ss, scratch) / d + eps);
    float c = r * r * r * block_sum(dot, scratch) / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dx[off + i] = st(r * w[i] * ld(dy[off + i]) - ld(x[off + i]) * c);
}

// y = (x - mean) / sqrt(var + eps) * w + b (two passes: mean, then centred variance)
extern "C" __global__ void layer_norm_fwd(const act* x, const float* w, const float* b, act* y, int d, float eps) {
    __shared__ float scratch[32];
    long off = (long)blockIdx.x * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += ld(x[off + i]);
    float mean = block_sum(s, scratch) / d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) { float c = ld(x[off + i]) - mean; v += c * c; }
    float inv = rsqrtf(block_sum(v, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) y[off + i] = st((ld(x[off + i]) - mean) * inv * w[i] + b[i]);
}

// inv[r] = 1 / sqrt(mean(x_r^2) + eps), one block per row (for the weight gradient below)
extern "C" __global__ void rms_inv(const act* x, float* inv, int d, float eps) {
    __shared__ float scratch[32];
    const act* xr = x + (long)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) { float v = ld(xr[i]); ss += v * v; }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) inv[blockIdx.x] = rsqrtf(ss / d + eps);
}

// dw[i] = sum over rows of dy * x * inv (one thread per column, rows in order: deterministic)
extern "C" __global__ void rms_norm_wgrad(const act* x, const act* dy, const float* inv, float* dw, int rows, int d) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= d) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) s += ld(dy[(long)r * d + i]) * ld(x[(long)r * d + i]) * inv[r];
    dw[i] = s;
}
