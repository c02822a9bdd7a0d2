// Rotary position embedding of x[n_tokens, n_heads, head_dim] at positions
// pos0 + t. Pair i (0 <= i < head_dim/2) rotates by theta = pos * base^(-2i/head_dim):
//   pairing 0 (NEOX, Qwen2's):       elements (i, i + head_dim/2)
//   pairing 1 (adjacent, GPT-J-like): elements (2i, 2i + 1)
// Angles, cos and sin in f64; one thread per pair. `step_pos`, when not
// null, is added to pos0: a recorded decode step (a CUDA graph) takes each
// replay's position from device memory (see cuda/mod.rs, `position`).

extern "C" __global__ void rope_f32(const float* __restrict__ x, float* __restrict__ out, int n_tokens,
                                    int n_heads, int head_dim, int pos0, float freq_base, int pairing,
                                    const int* __restrict__ step_pos) {
    if (step_pos) pos0 += *step_pos;
    const int half = head_dim / 2;
    const unsigned long long total = (unsigned long long)n_tokens * n_heads * half;
    for (unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (unsigned long long)gridDim.x * blockDim.x) {
        const int i = (int)(k % half);
        const unsigned long long th = k / half;  // t * n_heads + h
        const int t = (int)(th / n_heads);
        const unsigned long long base = th * head_dim;
        int i0, i1;
        if (pairing == 0) { i0 = i; i1 = i + half; } else { i0 = 2 * i; i1 = 2 * i + 1; }
        const double theta = (double)(pos0 + t) * pow((double)freq_base, -2.0 * (double)i / (double)head_dim);
        double s, c;
        sincos(theta, &s, &c);
        const double x0 = (double)x[base + i0];
        const double x1 = (double)x[base + i1];
        out[base + i0] = (float)(x0 * c - x1 * s);
        out[base + i1] = (float)(x0 * s + x1 * c);
    }
}
