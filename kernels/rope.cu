// Rotary embedding (HF rotate_half layout) and its backward (sign = -1 rotates back).
// Angles in double, rounded once, as the CPU twin (`rotate` in src/backend/cpu.rs) does.
// One thread per (row, head, i < head_dim / 2).
extern "C" __global__ void rope(act* x, const int* positions, int rows, int heads, int head_dim, double theta, float sign) {
    int half = head_dim / 2;
    long n = (long)rows * heads * half;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        int i = (int)(t % half);
        long rh = t / half; // row * heads + head
        int row = (int)(rh / heads);
        double inv = pow(theta, -(2.0 * i) / head_dim);
        double a = positions[row] * inv;
        float c = (float)cos(a), s = sign * (float)sin(a);
        act* h = x + rh * head_dim;
        float x1 = ld(h[i]), x2 = ld(h[i + half]);
        h[i] = st(x1 * c - x2 * s);
        h[i + half] = st(x2 * c + x1 * s);
    }
}

// q's and k's rotation in one launch (a decode step's): threads past q's pairs rotate k's.
extern "C" __global__ void rope_qk(act* q, act* k, const int* positions, int rows, int heads, int kv_heads,
                                   int head_dim, double theta) {
    int half = head_dim / 2;
    long nq = (long)rows * heads * half, n = nq + (long)rows * kv_heads * half;
    for (long t = blockIdx.x * (long)blockDim.x + threadIdx.x; t < n; t += (long)gridDim.x * blockDim.x) {
        bool is_q = t < nq;
        long u = is_q ? t : t - nq;
        int hh = is_q ? heads : kv_heads;
        int i = (int)(u % half);
        long rh = u / half; // row * heads + head
        int row = (int)(rh / hh);
        double inv = pow(theta, -(2.0 * i) / head_dim);
        double a = positions[row] * inv;
        float c = (float)cos(a), s = (float)sin(a);
        act* h = (is_q ? q : k) + rh * head_dim;
        float x1 = ld(h[i]), x2 = ld(h[i + half]);
        h[i] = st(x1 * c - x2 * s);
        h[i + half] = st(x2 * c + x1 * s);
    }
}
