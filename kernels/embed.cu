// Embedding gather and row scatter (image features into the prompt's rows).
// CPU twins: embed, scatter_rows in src/backend/cpu.rs.

// out (n, d) = table[ids[r]]; ids checked on the host
extern "C" __global__ void embed_gather(const bf16* table, const int* ids, act* out, int n, int d) {
    long total = (long)n * d;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < total; t += (long)gridDim.x * blockDim.x) {
        long r = t / d;
        out[t] = st(bf2f(table[(long)ids[r] * d + t % d]));
    }
}

// x[rows[r]] = src[r] for r < n
extern "C" __global__ void scatter_rows(act* x, const int* rows, const act* src, int n, int d) {
    long total = (long)n * d;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < total; t += (long)gridDim.x * blockDim.x) {
        long r = t / d;
        x[(long)rows[r] * d + t % d] = src[t];
    }
}

// g[rows[r]] += src[r] for r < n (repeated rows add up: atomics)
extern "C" __global__ void scatter_add_rows(float* g, const int* rows, const act* src, int n, int d) {
    long total = (long)n * d;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < total; t += (long)gridDim.x * blockDim.x) {
        long r = t / d;
        atomicAdd(&g[(long)rows[r] * d + t % d], ld(src[t]));
    }
}
