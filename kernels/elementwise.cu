// Elementwise ops on bf16 activations (f32 math), casts, bias add, dropout. Grid-stride loops over n.
// CPU twins: add, axpy, mul, activation, swiglu_backward, dropout in src/backend/cpu.rs.

extern "C" __global__ void add_bf16(bf16* x, const bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) + bf2f(y[i]));
}

extern "C" __global__ void axpy_bf16(bf16* x, float alpha, const bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = f2bf(fmaf(alpha, bf2f(y[i]), bf2f(x[i])));
}

extern "C" __global__ void mul_bf16(bf16* x, const bf16* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) * bf2f(y[i]));
}

// act: 0 silu, 1 gelu (erf), 2 gelu (tanh), 3 quick_gelu
extern "C" __global__ void activation_bf16(bf16* x, long n, int act) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = bf2f(x[i]), y;
        if (act == 0) y = v / (1.0f + expf(-v));
        else if (act == 1) y = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        else if (act == 2) y = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        else y = v / (1.0f + expf(-1.702f * v));
        x[i] = f2bf(y);
    }
}

// mid = silu(gate) * up
extern "C" __global__ void swiglu_fwd(const bf16* gate, const bf16* up, bf16* mid, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = bf2f(gate[i]);
        mid[i] = f2bf(g / (1.0f + expf(-g)) * bf2f(up[i]));
    }
}

// silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
extern "C" __global__ void swiglu_bwd(const bf16* gate, const bf16* up, const bf16* dmid, bf16* dgate, bf16* dup, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = bf2f(gate[i]), u = bf2f(up[i]), dm = bf2f(dmid[i]);
        float s = 1.0f / (1.0f + expf(-g));
        dup[i] = f2bf(dm * g * s);
        dgate[i] = f2bf(dm * u * s * (1.0f + g * (1.0f - s)));
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

// x (rows, cols) += b (cols)
extern "C" __global__ void bias_add_bf16(bf16* x, const bf16* b, long rows, int cols) {
    long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) + bf2f(b[i % cols]));
}

// y = x / (1 - p) where kept, else 0 (the same mask for the forward and the gradient)
extern "C" __global__ void dropout_bf16(const bf16* x, bf16* y, long n, float p, u64 key) {
    float keep_scale = 1.0f / (1.0f - p);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = dropout_keep(key, (u64)i, p) ? f2bf(bf2f(x[i]) * keep_scale) : (bf16)0;
}
