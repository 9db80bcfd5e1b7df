// Elementwise ops on act activations (f32 math), casts, bias add, dropout. Grid-stride loops over n.
// CPU twins: add, axpy, mul, activation, swiglu (activation then mul), swiglu_backward, dropout in
// src/backend/cpu.rs.

extern "C" __global__ void add(act* x, const act* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = st(ld(x[i]) + ld(y[i]));
}

extern "C" __global__ void axpy(act* x, float alpha, const act* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = st(fmaf(alpha, ld(y[i]), ld(x[i])));
}

extern "C" __global__ void mul(act* x, const act* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = st(ld(x[i]) * ld(y[i]));
}

// kind: 0 silu, 1 gelu (erf), 2 gelu (tanh), 3 quick_gelu
extern "C" __global__ void activation(act* x, long n, int kind) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = ld(x[i]), y;
        if (kind == 0) y = v / (1.0f + expf(-v));
        else if (kind == 1) y = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        else if (kind == 2) y = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        else y = v / (1.0f + expf(-1.702f * v));
        x[i] = st(y);
    }
}

// gate = silu(gate) * up, in place (activation then mul in one pass, the same f32 roundings)
extern "C" __global__ void swiglu_fwd(act* gate, const act* up, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = ld(gate[i]);
        gate[i] = st(g / (1.0f + expf(-g)) * ld(up[i]));
    }
}

// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
extern "C" __global__ void swiglu_bwd(const act* gate, const act* up, const act* dmid, act* dgate, act* dup, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = ld(gate[i]), u = ld(up[i]), dm = ld(dmid[i]);
        float s = 1.0f / (1.0f + expf(-g));
        dup[i] = st(dm * g * s);
        dgate[i] = st(dm * u * s * (1.0f + g * (1.0f - s)));
    }
}

extern "C" __global__ void cast_f32_bf16(const float* x, bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f2bf(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* x, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = bf2f(x[i]);
}

// x (a, b, d) -> y (b, a, d): row j·a + i of y is row i·b + j of x (the vision tower's images
// interleaved per position, so that one attention call takes every image's heads). Grid-stride over
// y, d contiguous on both sides.
extern "C" __global__ void transpose_rows(const act* x, act* y, int a, int b, int d) {
    long n = (long)a * b * d;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < n; e += (long)gridDim.x * blockDim.x) {
        long r = e / d, i = r % a, j = r / a;
        y[e] = x[(i * b + j) * d + e % d];
    }
}

// x (rows, cols) += b (cols)
extern "C" __global__ void bias_add(act* x, const act* b, long rows, int cols) {
    long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = st(ld(x[i]) + ld(b[i % cols]));
}

// y = x / (1 - p) where kept, else 0 (the same mask for the forward and the gradient)
extern "C" __global__ void dropout(const act* x, act* y, long n, float p, u64 key) {
    float keep_scale = 1.0f / (1.0f - p);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = dropout_keep(key, (u64)i, p) ? st(ld(x[i]) * keep_scale) : (act)0;
}

// x[i] = v (outputs are poisoned with NaN before the kernels that must write every element run)
extern "C" __global__ void fill_f32(float* x, long n, float v) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] = v;
}

// dx = dy * act'(x), x the activation's input; kind as in `activation`
extern "C" __global__ void activation_bwd(const act* x, const act* dy, act* dx, long n, int kind) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = ld(x[i]), g;
        if (kind == 0) { float s = 1.0f / (1.0f + expf(-v)); g = s * (1.0f + v * (1.0f - s)); }
        else if (kind == 1) g = 0.5f * (1.0f + erff(v * 0.70710678118654752f)) + v * expf(-0.5f * v * v) * 0.3989422804014327f;
        else if (kind == 2) {
            float c = 0.7978845608028654f, t = tanhf(c * (v + 0.044715f * v * v * v));
            g = 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * v * v);
        } else { float s = 1.0f / (1.0f + expf(-1.702f * v)); g = s + 1.702f * v * s * (1.0f - s); }
        dx[i] = st(ld(dy[i]) * g);
    }
}

// out[c] = sum over rows of x[r][c] (one thread per column, rows in order: deterministic)
extern "C" __global__ void col_sum(const act* x, act* out, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) s += ld(x[(long)r * cols + c]);
    out[c] = st(s);
}
