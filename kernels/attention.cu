// Attention kernels of the CUDA backend over a per-layer KV cache laid out
// [max_ctx, n_head_kv, head_dim], element type f32 or f16 (stored as raw
// 16-bit words; conversions by PTX cvt, round-to-nearest-even on store like
// ggml's f32->f16). GQA is an index map (no repeated K/V):
//   head_map 0 (grouped): kv head = h / (n_head / n_head_kv)
//   head_map 1 (modulo):  kv head = h % n_head_kv   (the classic wrong map)
//   head_map 2 (ratio):   kv head = h * n_head_kv / n_head (the grouped map, spelled differently)
// Layouts: q [n_tokens, n_head, head_dim]; scores/probs [n_head, n_tokens, n_kv];
// ctx [n_tokens, n_head, head_dim]. Query t sits at position pos0 + t and may
// attend keys 0..=pos0+t.

typedef unsigned long long u64;
typedef unsigned short half_bits;

__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const half_bits* p, u64 i) {
    float f;
    half_bits h = p[i];
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(half_bits* p, u64 i, float v) {
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i] = h;
}

__device__ __forceinline__ int kv_head(int h, int n_head, int n_head_kv, int head_map) {
    return head_map == 0 ? h / (n_head / n_head_kv) : head_map == 1 ? h % n_head_kv : h * n_head_kv / n_head;
}

// K and V rows [n_tokens, kv_row] into the cache rows pos0.. (kv_row = n_head_kv * head_dim).
template <typename T>
__device__ void kv_store(const float* __restrict__ k, const float* __restrict__ v, T* __restrict__ kc,
                         T* __restrict__ vc, int n_tokens, int kv_row, int pos0) {
    const u64 total = (u64)n_tokens * kv_row;
    const u64 off = (u64)pos0 * kv_row;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        st(kc, off + i, k[i]);
        st(vc, off + i, v[i]);
    }
}

// Raw scores q.k, one thread per (h, t, j); 0 beyond the causal limit.
template <typename T>
__device__ void attn_scores(const float* __restrict__ q, const T* __restrict__ kc, float* __restrict__ out,
                            int n_head, int n_tokens, int n_kv, int head_dim, int n_head_kv, int pos0,
                            int head_map) {
    const u64 total = (u64)n_head * n_tokens * n_kv;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const int j = (int)(i % n_kv);
        const u64 ht = i / n_kv;
        const int t = (int)(ht % n_tokens);
        const int h = (int)(ht / n_tokens);
        if (j > pos0 + t) {
            out[i] = 0.0f;
            continue;
        }
        const int kvh = kv_head(h, n_head, n_head_kv, head_map);
        const float* qr = q + ((u64)t * n_head + h) * head_dim;
        const u64 kr = ((u64)j * n_head_kv + kvh) * head_dim;
        float acc = 0.0f;
        for (int d = 0; d < head_dim; ++d) acc += qr[d] * ld(kc, kr + d);
        out[i] = acc;
    }
}

// probs V, one thread per (t, h, d); probs are 0 beyond the causal limit.
template <typename T>
__device__ void attn_ctx(const float* __restrict__ probs, const T* __restrict__ vc, float* __restrict__ out,
                         int n_head, int n_tokens, int n_kv, int head_dim, int n_head_kv, int head_map) {
    const u64 total = (u64)n_tokens * n_head * head_dim;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const int d = (int)(i % head_dim);
        const u64 th = i / head_dim;
        const int h = (int)(th % n_head);
        const int t = (int)(th / n_head);
        const int kvh = kv_head(h, n_head, n_head_kv, head_map);
        const float* pr = probs + ((u64)h * n_tokens + t) * n_kv;
        float acc = 0.0f;
        for (int j = 0; j < n_kv; ++j) {
            const float p = pr[j];
            if (p != 0.0f) acc += p * ld(vc, ((u64)j * n_head_kv + kvh) * head_dim + d);
        }
        out[i] = acc;
    }
}

extern "C" __global__ void kv_store_f32(const float* k, const float* v, float* kc, float* vc, int n_tokens,
                                        int kv_row, int pos0) {
    kv_store<float>(k, v, kc, vc, n_tokens, kv_row, pos0);
}
extern "C" __global__ void kv_store_f16(const float* k, const float* v, half_bits* kc, half_bits* vc,
                                        int n_tokens, int kv_row, int pos0) {
    kv_store<half_bits>(k, v, kc, vc, n_tokens, kv_row, pos0);
}
extern "C" __global__ void attn_scores_f32(const float* q, const float* kc, float* out, int n_head, int n_tokens,
                                           int n_kv, int head_dim, int n_head_kv, int pos0, int head_map) {
    attn_scores<float>(q, kc, out, n_head, n_tokens, n_kv, head_dim, n_head_kv, pos0, head_map);
}
extern "C" __global__ void attn_scores_f16(const float* q, const half_bits* kc, float* out, int n_head,
                                           int n_tokens, int n_kv, int head_dim, int n_head_kv, int pos0,
                                           int head_map) {
    attn_scores<half_bits>(q, kc, out, n_head, n_tokens, n_kv, head_dim, n_head_kv, pos0, head_map);
}
extern "C" __global__ void attn_ctx_f32(const float* probs, const float* vc, float* out, int n_head, int n_tokens,
                                        int n_kv, int head_dim, int n_head_kv, int head_map) {
    attn_ctx<float>(probs, vc, out, n_head, n_tokens, n_kv, head_dim, n_head_kv, head_map);
}
extern "C" __global__ void attn_ctx_f16(const float* probs, const half_bits* vc, float* out, int n_head,
                                        int n_tokens, int n_kv, int head_dim, int n_head_kv, int head_map) {
    attn_ctx<half_bits>(probs, vc, out, n_head, n_tokens, n_kv, head_dim, n_head_kv, head_map);
}

#define SOFTMAX_THREADS 256

// softmax(scale * s) over keys 0..=pos0+t of each row (row = h * n_tokens + t),
// max subtracted, f64 sum; entries beyond the causal limit are 0. One block per row.
extern "C" __global__ void softmax_causal_f32(const float* __restrict__ scores, float* __restrict__ out,
                                              int n_tokens, int n_kv, float scale, int pos0) {
    __shared__ float smax[SOFTMAX_THREADS];
    __shared__ double ssum[SOFTMAX_THREADS];
    const u64 row = blockIdx.x;
    const int t = (int)(row % n_tokens);
    int limit = pos0 + t + 1;
    if (limit > n_kv) limit = n_kv;
    const float* sr = scores + row * n_kv;
    float* pr = out + row * n_kv;
    float m = __int_as_float(0xff800000);  // -inf
    for (int j = threadIdx.x; j < limit; j += blockDim.x) m = fmaxf(m, scale * sr[j]);
    smax[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
        __syncthreads();
    }
    m = smax[0];
    double acc = 0.0;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) acc += (double)expf(scale * sr[j] - m);
    ssum[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) ssum[threadIdx.x] += ssum[threadIdx.x + s];
        __syncthreads();
    }
    const double inv = 1.0 / ssum[0];
    for (int j = threadIdx.x; j < n_kv; j += blockDim.x) {
        pr[j] = j < limit ? (float)((double)expf(scale * sr[j] - m) * inv) : 0.0f;
    }
}
