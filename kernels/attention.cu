// RoPE, the KV store and attention of the CUDA backend (one file: a decode
// step's RoPE and KV store are one kernel, rope_qk_kv_store), over a per-layer KV cache laid out
// [max_ctx, n_head_kv, head_dim], element type f32 or f16 (stored as raw
// 16-bit words; conversions by PTX cvt, round-to-nearest-even on store like
// ggml's f32->f16). GQA is an index map (no repeated K/V):
//   head_map 0 (grouped): kv head = h / (n_head / n_head_kv)
//   head_map 1 (modulo):  kv head = h % n_head_kv   (the classic wrong map)
//   head_map 2 (ratio):   kv head = h * n_head_kv / n_head (the grouped map, spelled differently)
// Layouts: q [n_tokens, n_head, head_dim]; scores/probs [n_head, n_tokens, n_kv];
// ctx [n_tokens, n_head, head_dim]. Query t sits at position pos0 + t and may
// attend keys 0..=pos0+t. `step_pos` (kv_store, attention), when not null,
// is added to pos0 and n_kv: a recorded decode step (a CUDA graph) takes each
// replay's position from device memory.

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

// Rotary position embedding of x[n_tokens, n_heads, head_dim] at positions
// pos0 + t. Pair i (0 <= i < head_dim/2) rotates by theta = pos * base^(-2i/head_dim):
//   pairing 0 (NEOX, Qwen2's):       elements (i, i + head_dim/2)
//   pairing 1 (adjacent, GPT-J-like): elements (2i, 2i + 1)
// Angles, cos and sin in f64. Pair k of the flat [n_tokens * n_heads * half]
// pairs, into out (rounded to T on store: f32, or f16 for the cache).
template <typename T>
__device__ __forceinline__ void rope_pair(const float* __restrict__ x, T* __restrict__ out, unsigned long long k,
                                          int n_heads, int head_dim, int pos0, float freq_base, int pairing) {
    const int half = head_dim / 2;
    const int i = (int)(k % half);
    const unsigned long long th = k / half;  // t * n_heads + h
    const int t = (int)(th / n_heads);
    const unsigned long long base = th * head_dim;
    int i0, i1;
    if (pairing == 0) {
        i0 = i;
        i1 = i + half;
    } else {
        i0 = 2 * i;
        i1 = 2 * i + 1;
    }
    const double theta = (double)(pos0 + t) * pow((double)freq_base, -2.0 * (double)i / (double)head_dim);
    double s, c;
    sincos(theta, &s, &c);
    const double x0 = (double)x[base + i0];
    const double x1 = (double)x[base + i1];
    st(out, base + i0, (float)(x0 * c - x1 * s));
    st(out, base + i1, (float)(x0 * s + x1 * c));
}

// One thread per pair. `step_pos`, when not null, is added to pos0: a
// recorded decode step (a CUDA graph) takes each replay's position from
// device memory (see cuda/mod.rs, `position`).
extern "C" __global__ void rope_f32(const float* __restrict__ x, float* __restrict__ out, int n_tokens,
                                    int n_heads, int head_dim, int pos0, float freq_base, int pairing,
                                    const int* __restrict__ step_pos) {
    if (step_pos) pos0 += *step_pos;
    const u64 total = (u64)n_tokens * n_heads * (head_dim / 2);
    for (u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (u64)gridDim.x * blockDim.x) {
        rope_pair(x, out, k, n_heads, head_dim, pos0, freq_base, pairing);
    }
}

// K and V rows [n_tokens, kv_row] into the cache rows pos0.. (kv_row = n_head_kv * head_dim).
template <typename T>
__device__ void kv_store(const float* __restrict__ k, const float* __restrict__ v, T* __restrict__ kc,
                         T* __restrict__ vc, int n_tokens, int kv_row, int pos0, const int* __restrict__ step_pos) {
    if (step_pos) pos0 += *step_pos;
    const u64 total = (u64)n_tokens * kv_row;
    const u64 off = (u64)pos0 * kv_row;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        st(kc, off + i, k[i]);
        st(vc, off + i, v[i]);
    }
}

// The three steps of attention as device functions, each with one fixed
// order of f32 operations: the separate kernels (which materialise scores
// and probabilities for checkpoints) and the fused one (which keeps them in
// shared memory) call the same functions with the same block size, so both
// paths give the same bits.

// q.k of query row `qr` and cache row `kr`: FMA in order of d. Unrolled so
// that the loads of several d are in flight at once (the FMAs still chain
// in order): one key's dot product is otherwise a chain of head_dim
// memory latencies.
template <typename T>
__device__ __forceinline__ float dot_qk(const float* __restrict__ qr, const T* __restrict__ kc, u64 kr, int head_dim) {
    float acc = 0.0f;
#pragma unroll 16
    for (int d = 0; d < head_dim; ++d) acc = __fmaf_rn(qr[d], ld(kc, kr + d), acc);
    return acc;
}

#define ATTN_THREADS 256

// softmax(scale * s) of one row over keys 0..limit, 0 for limit..n_kv: max
// subtracted, exponentials summed in f64. Block-wide (blockDim.x ==
// ATTN_THREADS); `pr` may be `sr` (each j is read and then written by the
// same thread, after the reductions). Each reduction goes through each
// warp by shuffles, then the warps' results in order (every thread reads
// them): one barrier each instead of one per halving. `smax` and `ssum`
// hold a value per warp.
__device__ void softmax_row(const float* sr, float* pr, int limit, int n_kv, float scale, float* smax, double* ssum) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float m = __int_as_float(0xff800000);  // -inf
    for (int j = threadIdx.x; j < limit; j += blockDim.x) m = fmaxf(m, __fmul_rn(scale, sr[j]));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) smax[warp] = m;
    __syncthreads();
    m = smax[0];
    for (int k = 1; k < warps; k++) m = fmaxf(m, smax[k]);
    double acc = 0.0;
    for (int j = threadIdx.x; j < limit; j += blockDim.x) acc += (double)expf(__fsub_rn(__fmul_rn(scale, sr[j]), m));
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if (lane == 0) ssum[warp] = acc;
    __syncthreads();
    double total = ssum[0];
    for (int k = 1; k < warps; k++) total += ssum[k];
    const double inv = 1.0 / total;
    for (int j = threadIdx.x; j < n_kv; j += blockDim.x) {
        pr[j] = j < limit ? (float)((double)expf(__fsub_rn(__fmul_rn(scale, sr[j]), m)) * inv) : 0.0f;
    }
}

// Four consecutive cache values from element i (i a multiple of 4: one
// 16-byte load for f32, one 8-byte load for f16).
__device__ __forceinline__ void ld4(const float* p, u64 i, float* v) {
    const float4 x = *(const float4*)(p + i);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
}
__device__ __forceinline__ void ld4(const half_bits* p, u64 i, float* v) {
    const uint2 x = *(const uint2*)(p + i);
    const half_bits h[4] = {(half_bits)(x.x & 0xffff), (half_bits)(x.x >> 16), (half_bits)(x.y & 0xffff),
                            (half_bits)(x.y >> 16)};
#pragma unroll
    for (int e = 0; e < 4; e++) v[e] = ld(h, e);
}

// Shared floats ctx_row needs for its partial sums.
#define CTX_PARTIAL (ATTN_THREADS * 4)

// probs V for one (query, head): out[d] = sum_j p[j] V[j, kvh, d]. Block-wide
// (blockDim.x == ATTN_THREADS, head_dim <= ATTN_THREADS). Each thread takes
// `per` consecutive dims (4 when head_dim is a multiple of 4: one vector
// load per key; else 1); the keys 0..n_kv are split into as many contiguous
// parts as the block has threads left over (16 for head_dim 64), thread
// (part, dims) sums its part in order of j, zero probabilities skipped, and
// the parts are added in order. Keys from `stop` on must have probability 0
// (the fused kernel passes its causal limit, the separate kernel n_kv):
// skipping them changes no bit. `partial` is CTX_PARTIAL floats of shared
// memory.
template <typename T>
__device__ void ctx_row(const float* pr, const T* __restrict__ vc, float* __restrict__ out, int n_kv, int stop,
                        int head_dim, int n_head_kv, int kvh, float* partial) {
    const int per = (head_dim & 3) == 0 ? 4 : 1;
    const int groups = head_dim / per;
    const int parts = blockDim.x / groups;
    const int g = threadIdx.x % groups, part = threadIdx.x / groups;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (part < parts) {
        const int chunk = (n_kv + parts - 1) / parts;
        const int j1 = min(stop, (part + 1) * chunk);
        // A select, not a branch, skips zero probabilities (a zero times an
        // infinite V would be NaN): the loop unrolls and its loads overlap.
        if (per == 4) {
#pragma unroll 4
            for (int j = part * chunk; j < j1; ++j) {
                const float p = pr[j];
                float v[4];
                ld4(vc, ((u64)j * n_head_kv + kvh) * head_dim + 4 * g, v);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float t = __fmaf_rn(p, v[e], acc[e]);
                    acc[e] = p != 0.0f ? t : acc[e];
                }
            }
        } else {
#pragma unroll 8
            for (int j = part * chunk; j < j1; ++j) {
                const float p = pr[j];
                const float t = __fmaf_rn(p, ld(vc, ((u64)j * n_head_kv + kvh) * head_dim + g), acc[0]);
                acc[0] = p != 0.0f ? t : acc[0];
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 4; e++) partial[e * ATTN_THREADS + threadIdx.x] = acc[e];
    __syncthreads();
    if (threadIdx.x < head_dim) {
        const int gd = threadIdx.x / per, e = threadIdx.x % per;
        float s = partial[e * ATTN_THREADS + gd];
        for (int k = 1; k < parts; ++k) s += partial[e * ATTN_THREADS + k * groups + gd];
        out[threadIdx.x] = s;
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
        out[i] = dot_qk(q + ((u64)t * n_head + h) * head_dim, kc, ((u64)j * n_head_kv + kvh) * head_dim, head_dim);
    }
}

// probs V, one block of ATTN_THREADS per (t, h); probs are 0 beyond the causal limit.
template <typename T>
__device__ void attn_ctx(const float* __restrict__ probs, const T* __restrict__ vc, float* __restrict__ out,
                         int n_head, int n_tokens, int n_kv, int head_dim, int n_head_kv, int head_map) {
    __shared__ float partial[CTX_PARTIAL];
    const int t = blockIdx.x / n_head, h = blockIdx.x % n_head;
    const int kvh = kv_head(h, n_head, n_head_kv, head_map);
    ctx_row(probs + ((u64)h * n_tokens + t) * n_kv, vc, out + ((u64)t * n_head + h) * head_dim, n_kv, n_kv, head_dim,
            n_head_kv, kvh, partial);
}

// A fused attention row's scores (in shared memory, 0 past `limit`) made
// its probabilities in place, as the separate kernels make them:
// softmax_row, then the f16 rounding when round_probs. `scores_out` and
// `probs_out`, when not null (checkpoints observe them), get the row's
// scores and its probabilities before any rounding at element `row_at`.
// Block-wide; the caller syncs before other threads read the row.
__device__ void softmax_kept(float* row, int limit, int n_kv, float scale, int round_probs,
                             float* __restrict__ scores_out, float* __restrict__ probs_out, u64 row_at, float* smax,
                             double* ssum) {
    // softmax_row overwrites the row only after its own barriers: these reads come first.
    if (scores_out) {
        for (int j = threadIdx.x; j < n_kv; j += blockDim.x) scores_out[row_at + j] = row[j];
    }
    softmax_row(row, row, limit, n_kv, scale, smax, ssum);
    // Each thread reads back the probabilities it wrote itself (softmax_row's stride).
    if (probs_out) {
        for (int j = threadIdx.x; j < n_kv; j += blockDim.x) probs_out[row_at + j] = row[j];
    }
    if (round_probs) {
        for (int j = threadIdx.x; j < n_kv; j += blockDim.x) {
            half_bits hb;
            st(&hb, 0, row[j]);
            row[j] = ld(&hb, 0);
        }
    }
}

// Keys j0 .. j0 + nk - 1 of kv head kvh into `tile` (rows of key_stride
// elements), by the whole block. When a key row is whole 16-byte pieces
// (head_dim 64 in f16 or f32) each thread loads KEY_TILE_LOADS pieces
// before storing any, so that many loads are in flight (one key row is
// contiguous in the cache; the rows of one kv head are n_head_kv rows apart),
// and stores them as 32-bit words (a padded row is word-aligned, not
// 16-byte aligned); else element by element.
#define KEY_TILE_LOADS 8
template <typename T>
__device__ __forceinline__ void load_key_tile(const T* __restrict__ kc, T* tile, int j0, int nk, int n_head_kv, int kvh,
                                              int head_dim, int key_stride) {
    if ((head_dim * (int)sizeof(T)) % 16 == 0) {
        const int pieces = head_dim * (int)sizeof(T) / 16;  // per key row
        const int per_piece = 16 / (int)sizeof(T);          // elements per piece
        const int total = nk * pieces;
        unsigned int* words = (unsigned int*)tile;
        const int stride_words = key_stride * (int)sizeof(T) / 4;
        for (int base = threadIdx.x; base < total; base += blockDim.x * KEY_TILE_LOADS) {
            uint4 v[KEY_TILE_LOADS];
#pragma unroll
            for (int k = 0; k < KEY_TILE_LOADS; k++) {
                const int i = base + k * blockDim.x;
                if (i < total) {
                    const int key = i / pieces, c = i - key * pieces;
                    v[k] = *(const uint4*)(kc + ((u64)(j0 + key) * n_head_kv + kvh) * head_dim + c * per_piece);
                }
            }
#pragma unroll
            for (int k = 0; k < KEY_TILE_LOADS; k++) {
                const int i = base + k * blockDim.x;
                if (i < total) {
                    const int key = i / pieces, c = i - key * pieces;
                    unsigned int* d = words + key * stride_words + c * 4;
                    d[0] = v[k].x, d[1] = v[k].y, d[2] = v[k].z, d[3] = v[k].w;
                }
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < nk * head_dim; i += blockDim.x) {
        const int key = i / head_dim, d = i - key * head_dim;
        tile[key * key_stride + d] = kc[((u64)(j0 + key) * n_head_kv + kvh) * head_dim + d];
    }
}

// Scores, softmax and context in one kernel, one block of ATTN_THREADS per
// (h, t): the row's scores and probabilities live in dynamic shared memory
// (n_kv floats) and never reach global memory. The keys are read
// `tile_keys` at a time into shared memory by the whole block (coalesced:
// consecutive threads, consecutive elements of a key), then each thread
// takes the dot product of one key as dot_qk takes it from the cache (a
// thread walking its own key row in global memory costs one L1 wavefront
// per lane and load: 30 times slower at 512 keys). The same functions, in
// the same order, as attn_scores + softmax_causal (+ the f16 rounding of
// the probabilities when round_probs, numerics ggml with an f16 cache) +
// attn_ctx: the same bits. Dynamic shared memory: n_kv floats of scores,
// then tile_keys key rows of key_stride elements of T (the host pads a row to
// an odd number of 32-bit words, so lanes reading rows side by side hit
// different banks). `scores_out`, `probs_out`, when not null (checkpoints
// observe them): the row's scores and probabilities (before any rounding)
// also go there, [n_head, n_tokens, n_kv] as attn_scores and
// softmax_causal lay them out.
template <typename T>
__device__ void attention(const float* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                          float* __restrict__ out, float* __restrict__ scores_out, float* __restrict__ probs_out,
                          int n_head, int n_tokens, int n_kv, int head_dim, int n_head_kv, int pos0, int head_map,
                          float scale, int round_probs, const int* __restrict__ step_pos, int max_kv, int tile_keys,
                          int key_stride) {
    if (step_pos) {
        pos0 += *step_pos;
        n_kv += *step_pos;
    }
    extern __shared__ float row[];
    // After the scores of the longest row this launch may see (max_kv, the
    // recorded step's cache length), 16-byte aligned.
    T* tile = (T*)(row + ((max_kv + 3) & ~3));
    __shared__ float smax[ATTN_THREADS / 32];
    __shared__ double ssum[ATTN_THREADS / 32];
    __shared__ float partial[CTX_PARTIAL];
    const int h = blockIdx.x / n_tokens, t = blockIdx.x % n_tokens;
    const int kvh = kv_head(h, n_head, n_head_kv, head_map);
    const float* qr = q + ((u64)t * n_head + h) * head_dim;
    const int limit = min(pos0 + t + 1, n_kv);
    for (int j = limit + threadIdx.x; j < n_kv; j += blockDim.x) row[j] = 0.0f;
    for (int j0 = 0; j0 < limit; j0 += tile_keys) {
        const int nk = min(tile_keys, limit - j0);
        load_key_tile(kc, tile, j0, nk, n_head_kv, kvh, head_dim, key_stride);
        __syncthreads();
        for (int jj = threadIdx.x; jj < nk; jj += blockDim.x) row[j0 + jj] = dot_qk(qr, tile, (u64)jj * key_stride, head_dim);
        __syncthreads();
    }
    // This block's row of [n_head, n_tokens, n_kv] (blockIdx.x = h * n_tokens + t).
    softmax_kept(row, limit, n_kv, scale, round_probs, scores_out, probs_out,
                 (u64)blockIdx.x * n_kv, smax, ssum);
    __syncthreads();
    ctx_row(row, vc, out + ((u64)t * n_head + h) * head_dim, n_kv, limit, head_dim, n_head_kv, kvh, partial);
}

// ctx_row for the R query rows of attention_rows at once: rows[r *
// row_stride ..] holds row r's probabilities (0 beyond its causal limit),
// r < nr; row r's context goes to out + r * out_stride. Each thread loads a
// value of V once for all R rows and sums it into row r exactly as
// ctx_row sums row r alone: the same parts and chunks (they follow from
// n_kv and the block size), keys in order, zero probabilities skipped by
// the same select (keys past a row's limit have probability 0, so walking
// to the last row's limit changes no earlier row's sum), the parts added in
// order: the same bits, with V read once instead of R times.
template <typename T, int R>
__device__ void ctx_rows(const float* rows, int row_stride, int nr, const T* __restrict__ vc, float* __restrict__ out,
                         u64 out_stride, int n_kv, int stop, int head_dim, int n_head_kv, int kvh, float* partial) {
    const int per = (head_dim & 3) == 0 ? 4 : 1;
    const int groups = head_dim / per;
    const int parts = blockDim.x / groups;
    const int g = threadIdx.x % groups, part = threadIdx.x / groups;
    float acc[R][4];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int e = 0; e < 4; e++) acc[r][e] = 0.0f;
    }
    if (part < parts) {
        const int chunk = (n_kv + parts - 1) / parts;
        const int j1 = min(stop, (part + 1) * chunk);
#pragma unroll 2
        for (int j = part * chunk; j < j1; ++j) {
            float v[4];
            if (per == 4) {
                ld4(vc, ((u64)j * n_head_kv + kvh) * head_dim + 4 * g, v);
            } else {
                v[0] = ld(vc, ((u64)j * n_head_kv + kvh) * head_dim + g);
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float p = r < nr ? rows[r * row_stride + j] : 0.0f;
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    if (e < per) {
                        const float t = __fmaf_rn(p, v[e], acc[r][e]);
                        acc[r][e] = p != 0.0f ? t : acc[r][e];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (r < nr) {
#pragma unroll
            for (int e = 0; e < 4; e++) partial[e * ATTN_THREADS + threadIdx.x] = acc[r][e];
            __syncthreads();
            if (threadIdx.x < head_dim) {
                const int gd = threadIdx.x / per, e = threadIdx.x % per;
                float s = partial[e * ATTN_THREADS + gd];
                for (int k = 1; k < parts; ++k) s += partial[e * ATTN_THREADS + k * groups + gd];
                out[r * out_stride + threadIdx.x] = s;
            }
            // `partial` is written again for the next row.
            __syncthreads();
        }
    }
}

// attention for R consecutive query rows of one head in one block (a
// prefill's rows of a head read the same keys and values): block b takes
// head b / ceil(n_tokens / R), rows t0 .. t0 + R - 1 (fewer at the end).
// Each key tile is loaded once for all of them; each row's scores are
// dot_qk as attention takes them, its softmax softmax_row (the whole block,
// row after row), its context ctx_rows (V read once for the R rows): each
// row has the bits of attention, so of the three ops. Dynamic shared
// memory: R rows of row_stride = max_kv rounded up to 4 floats, then the
// key tile as in attention. Not for recorded steps (one token).
template <typename T, int R>
__device__ void attention_rows(const float* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                               float* __restrict__ out, float* __restrict__ scores_out, float* __restrict__ probs_out,
                               int n_head, int n_tokens, int n_kv, int head_dim, int n_head_kv, int pos0,
                               int head_map, float scale, int round_probs, int max_kv, int tile_keys, int key_stride) {
    extern __shared__ float rows[];
    const int row_stride = (max_kv + 3) & ~3;
    T* tile = (T*)(rows + (u64)R * row_stride);
    __shared__ float smax[ATTN_THREADS / 32];
    __shared__ double ssum[ATTN_THREADS / 32];
    __shared__ float partial[CTX_PARTIAL];
    const int row_blocks = (n_tokens + R - 1) / R;
    const int h = blockIdx.x / row_blocks, t0 = (blockIdx.x % row_blocks) * R;
    const int nr = min(R, n_tokens - t0);
    const int kvh = kv_head(h, n_head, n_head_kv, head_map);
    // Row r's causal limit; the last row's is the largest.
    const int reach = min(pos0 + t0 + nr, n_kv);
    for (int r = 0; r < nr; r++) {
        const int limit = min(pos0 + t0 + r + 1, n_kv);
        for (int j = limit + threadIdx.x; j < n_kv; j += blockDim.x) rows[r * row_stride + j] = 0.0f;
    }
    for (int j0 = 0; j0 < reach; j0 += tile_keys) {
        const int nk = min(tile_keys, reach - j0);
        load_key_tile(kc, tile, j0, nk, n_head_kv, kvh, head_dim, key_stride);
        __syncthreads();
        for (int i = threadIdx.x; i < nr * nk; i += blockDim.x) {
            const int r = i / nk, jj = i - r * nk;
            if (j0 + jj < min(pos0 + t0 + r + 1, n_kv)) {
                const float* qr = q + ((u64)(t0 + r) * n_head + h) * head_dim;
                rows[r * row_stride + j0 + jj] = dot_qk(qr, tile, (u64)jj * key_stride, head_dim);
            }
        }
        __syncthreads();
    }
    for (int r = 0; r < nr; r++) {
        softmax_kept(rows + r * row_stride, min(pos0 + t0 + r + 1, n_kv), n_kv, scale, round_probs, scores_out,
                     probs_out, ((u64)h * n_tokens + t0 + r) * n_kv, smax, ssum);
    }
    __syncthreads();
    ctx_rows<T, R>(rows, row_stride, nr, vc, out + ((u64)t0 * n_head + h) * head_dim, (u64)n_head * head_dim, n_kv,
                   reach, head_dim, n_head_kv, kvh, partial);
}

#define ATTENTION_ROWS(R)                                                                                          \
    extern "C" __global__ void attention_rows##R##_f32(                                                           \
        const float* q, const float* kc, const float* vc, float* out, float* scores_out, float* probs_out,         \
        int n_head, int n_tokens, int n_kv, int head_dim, int n_head_kv, int pos0, int head_map, float scale,      \
        int round_probs, int max_kv, int tile_keys, int key_stride) {                                              \
        attention_rows<float, R>(q, kc, vc, out, scores_out, probs_out, n_head, n_tokens, n_kv, head_dim,        \
                                 n_head_kv, pos0, head_map, scale, round_probs, max_kv, tile_keys, key_stride);    \
    }                                                                                                              \
    extern "C" __global__ void attention_rows##R##_f16(                                                           \
        const float* q, const half_bits* kc, const half_bits* vc, float* out, float* scores_out,                   \
        float* probs_out, int n_head, int n_tokens, int n_kv, int head_dim, int n_head_kv, int pos0,               \
        int head_map, float scale, int round_probs, int max_kv, int tile_keys, int key_stride) {                  \
        attention_rows<half_bits, R>(q, kc, vc, out, scores_out, probs_out, n_head, n_tokens, n_kv, head_dim,    \
                                     n_head_kv, pos0, head_map, scale, round_probs, max_kv, tile_keys,            \
                                     key_stride);                                                                  \
    }

// 4 rows: on the H100, 8 rows measured slower than 4 at 128 and 512 tokens
// (fewer blocks in flight: more registers and shared memory each).
ATTENTION_ROWS(4)

// rope_f32 of q and of k at rope_pos0, and kv_store of the rotated k and of
// v at kv_pos0, in one launch (a decode step's three smallest kernels): the
// same per-element operations, so the same bits as the three launches. The
// flat index runs over q's pairs, then k's pairs, then v's elements; a k pair
// is written to k_out and to the cache (rotated in f64, rounded to f32, then
// to T as kv_store rounds it).
template <typename T>
__device__ void rope_qk_kv_store(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                 float* __restrict__ q_out, float* __restrict__ k_out, T* __restrict__ kc,
                                 T* __restrict__ vc, int n_tokens, int n_head, int n_head_kv, int head_dim,
                                 int rope_pos0, int kv_pos0, float freq_base, int pairing,
                                 const int* __restrict__ step_pos) {
    if (step_pos) {
        rope_pos0 += *step_pos;
        kv_pos0 += *step_pos;
    }
    const int half = head_dim / 2;
    const int kv_row = n_head_kv * head_dim;
    const u64 q_pairs = (u64)n_tokens * n_head * half, k_pairs = (u64)n_tokens * n_head_kv * half;
    const u64 v_elems = (u64)n_tokens * kv_row;
    const u64 off = (u64)kv_pos0 * kv_row;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < q_pairs + k_pairs + v_elems;
         i += (u64)gridDim.x * blockDim.x) {
        if (i < q_pairs) {
            rope_pair(q, q_out, i, n_head, head_dim, rope_pos0, freq_base, pairing);
        } else if (i < q_pairs + k_pairs) {
            const u64 kk = i - q_pairs;
            rope_pair(k, k_out, kk, n_head_kv, head_dim, rope_pos0, freq_base, pairing);
            // This thread's two rotated values, as kv_store reads them back.
            const u64 th = kk / half;
            const int p = (int)(kk % half);
            const u64 e0 = th * head_dim + (pairing == 0 ? p : 2 * p);
            const u64 e1 = th * head_dim + (pairing == 0 ? p + half : 2 * p + 1);
            st(kc, off + e0, k_out[e0]);
            st(kc, off + e1, k_out[e1]);
        } else {
            const u64 e = i - q_pairs - k_pairs;
            st(vc, off + e, v[e]);
        }
    }
}

extern "C" __global__ void rope_qk_kv_store_f32(const float* q, const float* k, const float* v, float* q_out,
                                                float* k_out, float* kc, float* vc, int n_tokens, int n_head,
                                                int n_head_kv, int head_dim, int rope_pos0, int kv_pos0,
                                                float freq_base, int pairing, const int* step_pos) {
    rope_qk_kv_store<float>(q, k, v, q_out, k_out, kc, vc, n_tokens, n_head, n_head_kv, head_dim, rope_pos0,
                            kv_pos0, freq_base, pairing, step_pos);
}
extern "C" __global__ void rope_qk_kv_store_f16(const float* q, const float* k, const float* v, float* q_out,
                                                float* k_out, half_bits* kc, half_bits* vc, int n_tokens,
                                                int n_head, int n_head_kv, int head_dim, int rope_pos0,
                                                int kv_pos0, float freq_base, int pairing, const int* step_pos) {
    rope_qk_kv_store<half_bits>(q, k, v, q_out, k_out, kc, vc, n_tokens, n_head, n_head_kv, head_dim, rope_pos0,
                                kv_pos0, freq_base, pairing, step_pos);
}

extern "C" __global__ void kv_store_f32(const float* k, const float* v, float* kc, float* vc, int n_tokens,
                                        int kv_row, int pos0, const int* step_pos) {
    kv_store<float>(k, v, kc, vc, n_tokens, kv_row, pos0, step_pos);
}
extern "C" __global__ void kv_store_f16(const float* k, const float* v, half_bits* kc, half_bits* vc,
                                        int n_tokens, int kv_row, int pos0, const int* step_pos) {
    kv_store<half_bits>(k, v, kc, vc, n_tokens, kv_row, pos0, step_pos);
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

// softmax(scale * s) over keys 0..=pos0+t of each row (row = h * n_tokens + t);
// entries beyond the causal limit are 0. One block of ATTN_THREADS per row.
extern "C" __global__ void softmax_causal_f32(const float* __restrict__ scores, float* __restrict__ out,
                                              int n_tokens, int n_kv, float scale, int pos0) {
    __shared__ float smax[ATTN_THREADS / 32];
    __shared__ double ssum[ATTN_THREADS / 32];
    const u64 row = blockIdx.x;
    const int t = (int)(row % n_tokens);
    softmax_row(scores + row * n_kv, out + row * n_kv, min(pos0 + t + 1, n_kv), n_kv, scale, smax, ssum);
}

extern "C" __global__ void attention_f32(const float* q, const float* kc, const float* vc, float* out,
                                         float* scores_out, float* probs_out, int n_head, int n_tokens, int n_kv,
                                         int head_dim, int n_head_kv, int pos0, int head_map, float scale,
                                         int round_probs, const int* step_pos, int max_kv, int tile_keys,
                                         int key_stride) {
    attention<float>(q, kc, vc, out, scores_out, probs_out, n_head, n_tokens, n_kv, head_dim, n_head_kv, pos0,
                     head_map, scale, round_probs, step_pos, max_kv, tile_keys, key_stride);
}
extern "C" __global__ void attention_f16(const float* q, const half_bits* kc, const half_bits* vc, float* out,
                                         float* scores_out, float* probs_out, int n_head, int n_tokens, int n_kv,
                                         int head_dim, int n_head_kv, int pos0, int head_map, float scale,
                                         int round_probs, const int* step_pos, int max_kv, int tile_keys,
                                         int key_stride) {
    attention<half_bits>(q, kc, vc, out, scores_out, probs_out, n_head, n_tokens, n_kv, head_dim, n_head_kv, pos0,
                         head_map, scale, round_probs, step_pos, max_kv, tile_keys, key_stride);
}
