// Pair losses of TRL over per-sequence log-probs, with their gradients and reward metrics: one thread
// per pair. loss_type: 0 sigmoid, 1 hinge, 2 ipo, 3 robust, 4 bco_pair, 5 sppo_hard, 6 nca_pair
// (src/train/dpo.rs `LossType` order). `delta` is bco_pair's running reward mean (updated on the host).
// Outputs per pair: loss, d loss / d policy_chosen and _rejected (already divided by n), rewards.
// CPU twin: dpo_loss in src/train/dpo.rs (f64 there; f64 here too: n is small and the host compares).

__device__ double log_sigmoid(double x) { return x >= 0.0 ? -log1p(exp(-x)) : x - log1p(exp(x)); }
__device__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

extern "C" __global__ void dpo_pair_loss(const double* pc, const double* pr, const double* rc, const double* rr,
                                         const int* nc_tokens, const int* nr_tokens, int n, int loss_type,
                                         double beta, double ls, double delta, double* loss, double* grad_c,
                                         double* grad_r, double* reward_c, double* reward_r) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double b = beta, c = pc[i] - rc[i], r = pr[i] - rr[i], d = c - r, l = 0.0, dc = 0.0, dr = 0.0;
    if (loss_type == 0) {
        l = -log_sigmoid(b * d) * (1.0 - ls) - log_sigmoid(-b * d) * ls;
        dc = -b * (1.0 - ls) * sigmoid(-b * d) + b * ls * sigmoid(b * d);
        dr = -dc;
    } else if (loss_type == 1) {
        double m = 1.0 - b * d;
        if (m > 0.0) { l = m; dc = -b; dr = b; }
    } else if (loss_type == 2) {
        double nc = nc_tokens[i] > 0 ? nc_tokens[i] : 1, nr = nr_tokens[i] > 0 ? nr_tokens[i] : 1;
        double e = c / nc - r / nr - 1.0 / (2.0 * b);
        l = e * e; dc = 2.0 * e / nc; dr = -2.0 * e / nr;
    } else if (loss_type == 3) {
        l = (-log_sigmoid(b * d) * (1.0 - ls) + log_sigmoid(-b * d) * ls) / (1.0 - 2.0 * ls);
        dc = (-b * (1.0 - ls) * sigmoid(-b * d) - b * ls * sigmoid(b * d)) / (1.0 - 2.0 * ls);
        dr = -dc;
    } else if (loss_type == 4) {
        double x = b * c - delta, y = -(b * r - delta);
        l = -log_sigmoid(x) - log_sigmoid(y); dc = -b * sigmoid(-x); dr = b * sigmoid(-y);
    } else if (loss_type == 5) {
        double x = c - 0.5 / b, y = r + 0.5 / b;
        l = x * x + y * y; dc = 2.0 * x; dr = 2.0 * y;
    } else {
        double x = b * c, y = b * r;
        l = -log_sigmoid(x) - 0.5 * log_sigmoid(-x) - 0.5 * log_sigmoid(-y);
        dc = -b * sigmoid(-x) + 0.5 * b * sigmoid(x); dr = 0.5 * b * sigmoid(y);
    }
    loss[i] = l;
    grad_c[i] = dc / n;
    grad_r[i] = dr / n;
    reward_c[i] = b * c;
    reward_r[i] = b * r;
}
