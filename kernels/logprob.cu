// Per-token log-probs through the LM head without the (T, V) logits: the host runs cuBLAS over one
// vocabulary chunk of logits at a time (rows, chunk) and these kernels fold each chunk into a running
// max / sum / target logit per row (online log-sum-exp), then finish log p, max softmax probability and
// NLL. The backward recomputes each chunk's logits and turns them into d logits for the next GEMM.
// One block per row. CPU twins: fused_logprobs / fused_logprobs_backward in src/backend/cpu.rs.

// state per row: run_max, run_sum (of exp(logit - run_max)), target logit
extern "C" __global__ void lse_chunk(const float* logits, int chunk, int chunk_start, const int* targets,
                                     float* run_max, float* run_sum, float* target_logit) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    const float* l = logits + (long)row * chunk;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < chunk; j += blockDim.x) mx = fmaxf(mx, l[j]);
    mx = block_max(mx, scratch);
    float s = 0.0f;
    for (int j = threadIdx.x; j < chunk; j += blockDim.x) s += expf(l[j] - mx);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        float m0 = run_max[row], m1 = fmaxf(m0, mx);
        run_sum[row] = run_sum[row] * expf(m0 - m1) + s * expf(mx - m1);
        run_max[row] = m1;
        int t = targets[row] - chunk_start;
        if (t >= 0 && t < chunk) target_logit[row] = l[t];
    }
}

// logp = target - lse; lse kept for the backward; max softmax prob = exp(max - lse)
extern "C" __global__ void lse_finish(const float* run_max, const float* run_sum, const float* target_logit,
                                      int rows, float* logp, float* lse, float* max_prob) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float z = run_max[r] + logf(run_sum[r]);
    lse[r] = z;
    logp[r] = target_logit[r] - z;
    max_prob[r] = expf(run_max[r] - z);
}

// d logits (rows, chunk) = g_r * (onehot(target) - exp(logit - lse)), written as bf16 for cuBLAS
extern "C" __global__ void lse_chunk_bwd(const float* logits, int chunk, int chunk_start, const int* targets,
                                         const float* lse, const float* dlogp, bf16* dlogits) {
    int row = blockIdx.x;
    float z = lse[row], g = dlogp[row];
    int t = targets[row] - chunk_start;
    for (int j = threadIdx.x; j < chunk; j += blockDim.x) {
        float v = -g * expf(logits[(long)row * chunk + j] - z) + (j == t ? g : 0.0f);
        dlogits[(long)row * chunk + j] = f2bf(v);
    }
}

// Greedy decoding: per row of logits (rows, vocab), the first index of the maximum and its softmax
// probability (for max_softmax_ppl). One block per row. CPU twin: greedy in src/backend/mod.rs
// (NaNs skipped on both).
extern "C" __global__ void argmax_maxprob(const float* logits, int vocab, int* out_id, float* out_prob) {
    __shared__ float scratch[32];
    __shared__ int best_idx[32];
    const float* l = logits + (long)blockIdx.x * vocab;
    float mx = -INFINITY;
    int idx = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x)
        if (l[j] > mx) { mx = l[j]; idx = j; }
    // the block's maximum, then the smallest index holding it (ties go to the first, like argmax)
    float m = block_max(mx, scratch);
    int cand = mx == m ? idx : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) cand = min(cand, __shfl_xor_sync(0xffffffffu, cand, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) best_idx[warp] = cand;
    __syncthreads();
    cand = lane < warps ? best_idx[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) cand = min(cand, __shfl_xor_sync(0xffffffffu, cand, o));
    // a row with no maximum (all -inf or NaN) picks token 0, as the CPU's `greedy` does, not an id
    // past the vocabulary
    if (cand == 0x7fffffff) cand = 0;
    float s = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(l[j] - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) { out_id[blockIdx.x] = cand; out_prob[blockIdx.x] = 1.0f / s; }
}
