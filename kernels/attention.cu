// Plain (unfused, correct) attention until the fused kernels of issue 7: one block per (query row,
// head), the row's scores in shared memory (tk floats: dynamic shared memory), causal with q_pos0,
// GQA, the prefix-shared DPO hole (queries at positions >= hole_first skip keys [hole_a, hole_b)),
// and optional per-span attention mass (per row and head; the host averages heads).
// CPU twins: attention, attention_backward in src/backend/cpu.rs.

__device__ __forceinline__ bool visible(int qpos, int j, int causal, int hole_first, int hole_a, int hole_b) {
    if (causal && j > qpos) return false;
    if (hole_first >= 0 && qpos >= hole_first && j >= hole_a && j < hole_b) return false;
    return true;
}

// q (tq, H*D), k v (tk, KV*D), out (tq, H*D); spans (n_spans, 2) ints; mass (tq, H, n_spans) or null
extern "C" __global__ void attention_plain(const act* q, const act* k, const act* v, act* out, int tq, int tk,
                                           int heads, int kv_heads, int d, int causal, int q_pos0, int hole_first,
                                           int hole_a, int hole_b, const int* spans, int n_spans, float* mass) {
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
        for (int g = 0; g < n_spans; g++) {
            int a = spans[2 * g], b = min(spans[2 * g + 1], tk);
            float s = 0.0f;
            for (int j = a + threadIdx.x; j < b; j += blockDim.x) s += p[j];
            s = block_sum(s, scratch);
            if (threadIdx.x == 0) mass[((long)i * heads + h) * n_spans + g] = s;
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
