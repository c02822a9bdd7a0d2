// Weights as GGUF stores them: rows of ggml blocks, read on the GPU without
// an f32 copy. One device function per type gives element i of a row,
// bit for bit the value of the host dequantizer (crates/gguf/src/dequant.rs,
// itself proved bit-exact against ggml's to_float): the same f32 operations
// in the same order, written with explicit round-to-nearest intrinsics
// (__fmul_rn, __fadd_rn, __fsub_rn) so that NVRTC can never contract a
// multiply and an add into an FMA, which would round once instead of twice.
//
// Kernels, one set per type (the type is a template parameter; the extern "C"
// names carry its ggml name):
//   dequant_<ty>  rows [0, n_rows) of a matrix into f32, row-major;
//   dequant_f16_<ty> the same values rounded to f16 (tensor-core prefill);
//   gemv_<ty>     y[t, r] = sum_i W[r, i] x[t, i] (+ bias[r] when bias is not
//                 null) (residual[t, r] + that, when residual is not null)
//                 for a few tokens (decode): 1 to 8 warps per output row,
//                 each lane 32 values (a block) at a time, the blocks read
//                 once for all tokens;
//   gemv3_<ty>    up to three gemv_<ty> of one x in one launch (Q, K and V);
//   gemv_glu_<ty> act(x Wa^T) * (x Wb^T), the FFN's gate, up and SwiGLU in one;
//   rms_norm_f32  RMSNorm of rows times the weight (not a weight type's
//                 kernel: here because gemv3 and gemv_glu can fuse the same
//                 norm into their input, and must compute it with the same
//                 device code to give the same bits);
//   get_rows_<ty> the embedding lookup: out[t, c] = W[tok[t], c], or with the
//                 embed-transposed fault the flat element c * n_rows + tok[t].
// `flags` bit 0: the q5-0-high-bit fault (Q5_0's second half takes bit
// j + 16 of qh without the shift: the fault zoo's dequantization bug).
// Compiled at run time by NVRTC; no headers needed.

typedef unsigned long long u64;
typedef unsigned char u8;

#define GEMV_MAX_TOKENS 8
#define GEMV_WARPS 8
// The GEMV kernels' register cap: three blocks of GEMV_WARPS warps per SM
// (80 registers a thread; without it ptxas took up to 107, two
// blocks per SM). Not measured apart from the rest of the 2026-12-07 change.
#define GEMV_BOUNDS __launch_bounds__(GEMV_WARPS * 32, 3)

__device__ __forceinline__ float f16_at(const u8* p) {
    unsigned short h = (unsigned short)p[0] | ((unsigned short)p[1] << 8);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Little-endian u32 at any byte offset (blocks of 22 bytes are not aligned).
__device__ __forceinline__ unsigned int u32_at(const u8* p) {
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16) | ((unsigned int)p[3] << 24);
}

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }

// ggml's get_scale_min_k4: 6-bit scale (sc) and min (m) j of the 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Element i (0 <= i < block size) of one block `b`.
struct F32 {
    static const int BS = 1, TS = 4;
    __device__ static float at(const u8* b, int, int) { return __int_as_float((int)u32_at(b)); }
};
struct F16 {
    static const int BS = 1, TS = 2;
    __device__ static float at(const u8* b, int, int) { return f16_at(b); }
};
struct BF16 {
    static const int BS = 1, TS = 2;
    __device__ static float at(const u8* b, int, int) {
        return __int_as_float((int)(((unsigned int)b[0] | ((unsigned int)b[1] << 8)) << 16));
    }
};
// block_q4_0 { half d; u8 qs[16]; }
struct Q4_0 {
    static const int BS = 32, TS = 18;
    __device__ static float at(const u8* b, int i, int) {
        const int j = i & 15;
        const int q = i < 16 ? (b[2 + j] & 0xF) : (b[2 + j] >> 4);
        return mul((float)(q - 8), f16_at(b));
    }
};
// block_q4_1 { half d; half m; u8 qs[16]; }
struct Q4_1 {
    static const int BS = 32, TS = 20;
    __device__ static float at(const u8* b, int i, int) {
        const int j = i & 15;
        const int q = i < 16 ? (b[4 + j] & 0xF) : (b[4 + j] >> 4);
        return __fadd_rn(mul((float)q, f16_at(b)), f16_at(b + 2));
    }
};
// block_q5_0 { half d; u8 qh[4]; u8 qs[16]; }
struct Q5_0 {
    static const int BS = 32, TS = 22;
    __device__ static float at(const u8* b, int i, int flags) {
        const unsigned int qh = u32_at(b + 2);
        const int j = i & 15;
        int q;
        if (i < 16) {
            q = (b[6 + j] & 0xF) | (((qh >> j) << 4) & 0x10);
        } else if (flags & 1) {
            // The fault: bit j + 16 unshifted (0 once the shift passes bit 31).
            const unsigned int hb = j + 16 < 32 ? (qh >> (j + 16)) & 0x10 : 0;
            q = (b[6 + j] >> 4) | hb;
        } else {
            q = (b[6 + j] >> 4) | ((qh >> (j + 12)) & 0x10);
        }
        return mul((float)(q - 16), f16_at(b));
    }
};
// block_q5_1 { half d; half m; u8 qh[4]; u8 qs[16]; }
struct Q5_1 {
    static const int BS = 32, TS = 24;
    __device__ static float at(const u8* b, int i, int) {
        const unsigned int qh = u32_at(b + 4);
        const int j = i & 15;
        const int q = i < 16 ? (b[8 + j] & 0xF) | (((qh >> j) << 4) & 0x10) : (b[8 + j] >> 4) | ((qh >> (j + 12)) & 0x10);
        return __fadd_rn(mul((float)q, f16_at(b)), f16_at(b + 2));
    }
};
// block_q8_0 { half d; i8 qs[32]; }
struct Q8_0 {
    static const int BS = 32, TS = 34;
    __device__ static float at(const u8* b, int i, int) { return mul((float)(signed char)b[2 + i], f16_at(b)); }
};
// block_q2_K { u8 scales[16]; u8 qs[64]; half d; half dmin; }
// Element i = 128 n + 32 k + 16 h + l: quant bits 2k.. of qs[32 n + 16 h + l],
// scale byte 8 n + 2 k + h.
struct Q2_K {
    static const int BS = 256, TS = 84;
    __device__ static float at(const u8* b, int i, int) {
        const int n = i >> 7, k = (i >> 5) & 3, h = (i >> 4) & 1, l = i & 15;
        const int sc = b[8 * n + 2 * k + h];
        const float dl = mul(f16_at(b + 80), (float)(sc & 0xF));
        const float ml = mul(f16_at(b + 82), (float)(sc >> 4));
        const int q = (b[16 + 32 * n + 16 * h + l] >> (2 * k)) & 3;
        return __fsub_rn(mul(dl, (float)q), ml);
    }
};
// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; half d; }
// Element i = 128 n + 32 k + 16 h + l, l' = 16 h + l: 2 bits at 2k of
// qs[32 n + l'], minus 4 unless bit 4n + k of hmask[l'] is set; its 6-bit
// scale is number 8 n + 2 k + h of the 16 packed in scales[12].
struct Q3_K {
    static const int BS = 256, TS = 110;
    __device__ static float at(const u8* b, int i, int) {
        const int n = i >> 7, k = (i >> 5) & 3, h = (i >> 4) & 1, l = i & 15;
        const int lp = 16 * h + l;
        const u8* s = b + 96;
        const int is = 8 * n + 2 * k + h;
        const int g = is >> 2, e = is & 3;
        const int lo = g == 0 ? (s[e] & 0xF) : g == 1 ? (s[4 + e] & 0xF) : g == 2 ? (s[e] >> 4) : (s[4 + e] >> 4);
        const int hi = ((s[8 + e] >> (2 * g)) & 3) << 4;
        const float dl = mul(f16_at(b + 108), (float)((lo | hi) - 32));
        const int hbit = b[lp] & (1 << (4 * n + k));
        const int v = ((b[32 + 32 * n + lp] >> (2 * k)) & 3) - (hbit ? 0 : 4);
        return mul(dl, (float)v);
    }
};
// block_q4_K { half d; half dmin; u8 scales[12]; u8 qs[128]; }
// Element i = 64 g + 32 h + l: nibble h of qs[32 g + l], scale/min 2 g + h.
struct Q4_K {
    static const int BS = 256, TS = 144;
    __device__ static float at(const u8* b, int i, int) {
        const int g = i >> 6, h = (i >> 5) & 1, l = i & 31;
        int sc, m;
        scale_min_k4(2 * g + h, b + 4, sc, m);
        const float d1 = mul(f16_at(b), (float)sc);
        const float m1 = mul(f16_at(b + 2), (float)m);
        const u8 q = b[16 + 32 * g + l];
        return __fsub_rn(mul(d1, (float)(h ? q >> 4 : q & 0xF)), m1);
    }
};
// block_q5_K { half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
// Element i = 64 g + 32 h + l: nibble h of qs[32 g + l] plus 16 when bit
// 2 g + h of qh[l] is set; scale/min 2 g + h.
struct Q5_K {
    static const int BS = 256, TS = 176;
    __device__ static float at(const u8* b, int i, int) {
        const int g = i >> 6, h = (i >> 5) & 1, l = i & 31;
        int sc, m;
        scale_min_k4(2 * g + h, b + 4, sc, m);
        const float d1 = mul(f16_at(b), (float)sc);
        const float m1 = mul(f16_at(b + 2), (float)m);
        const u8 q = b[48 + 32 * g + l];
        const int v = (h ? q >> 4 : q & 0xF) + ((b[16 + l] >> (2 * g + h)) & 1 ? 16 : 0);
        return __fsub_rn(mul(d1, (float)v), m1);
    }
};
// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; half d; }
// Element i = 128 n + 32 k + l: low nibble of ql[64 n + l (+32 for k odd)]
// (high nibble for k >= 2), 2 bits at 2k of qh[32 n + l]; scale 8 n + l/16 + 2k.
struct Q6_K {
    static const int BS = 256, TS = 210;
    __device__ static float at(const u8* b, int i, int) {
        const int n = i >> 7, k = (i >> 5) & 3, l = i & 31;
        const u8 lo = b[64 * n + l + ((k & 1) ? 32 : 0)];
        const int q = ((k >= 2 ? lo >> 4 : lo & 0xF) | (((b[128 + 32 * n + l] >> (2 * k)) & 3) << 4)) - 32;
        const float sc = (float)(signed char)b[192 + 8 * n + (l >> 4) + 2 * k];
        return mul(mul(f16_at(b + 208), sc), (float)q);
    }
};

// Element `col` of the row starting at `row`.
template <typename T>
__device__ __forceinline__ float elem(const u8* row, int col, int flags) {
    return T::at(row + (u64)(col / T::BS) * T::TS, col % T::BS, flags);
}


// Eight consecutive elements base..base+7 of a row (base a multiple of 8;
// every block size is 1 or a multiple of 8, so they share one block and
// the block's scales are read once).
template <typename T>
__device__ __forceinline__ void elems8(const u8* row, int base, int flags, float* v) {
    if (T::BS == 1) {
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = T::at(row + (u64)(base + e) * T::TS, 0, flags);
    } else {
        const u8* blk = row + (u64)(base / T::BS) * T::TS;
        const int j0 = base % T::BS;
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = T::at(blk, j0 + e, flags);
    }
}

// The types of the real model's matrices, eight elements at a time with
// the block's scales read once: the same f32 operations per element as
// T::at (so the same values, bit for bit), without recomputing a scale
// eight times. base % 8 == 0, so the eight share one scale.
template <>
__device__ __forceinline__ void elems8<Q8_0>(const u8* row, int base, int, float* v) {
    const u8* blk = row + (u64)(base >> 5) * Q8_0::TS;
    const float d = f16_at(blk);
    const u8* q = blk + 2 + (base & 31);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = mul((float)(signed char)q[e], d);
}
template <>
__device__ __forceinline__ void elems8<Q5_0>(const u8* row, int base, int flags, float* v) {
    const u8* blk = row + (u64)(base >> 5) * Q5_0::TS;
    const int j0 = base & 31;
    if (flags & 1) {
        // The fault's dequantization, element by element.
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = Q5_0::at(blk, j0 + e, flags);
        return;
    }
    const float d = f16_at(blk);
    const unsigned int qh = u32_at(blk + 2);
    const u8* qs = blk + 6 + (j0 & 15);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const int j = (j0 & 15) + e;
        const int q = j0 < 16 ? (qs[e] & 0xF) | (((qh >> j) << 4) & 0x10) : (qs[e] >> 4) | ((qh >> (j + 12)) & 0x10);
        v[e] = mul((float)(q - 16), d);
    }
}
template <>
__device__ __forceinline__ void elems8<Q4_K>(const u8* row, int base, int, float* v) {
    const u8* blk = row + (u64)(base >> 8) * Q4_K::TS;
    const int i = base & 255;
    const int g = i >> 6, h = (i >> 5) & 1, l0 = i & 31;
    int sc, m;
    scale_min_k4(2 * g + h, blk + 4, sc, m);
    const float d1 = mul(f16_at(blk), (float)sc);
    const float m1 = mul(f16_at(blk + 2), (float)m);
    const u8* q = blk + 16 + 32 * g + l0;
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = __fsub_rn(mul(d1, (float)(h ? q[e] >> 4 : q[e] & 0xF)), m1);
}
template <>
__device__ __forceinline__ void elems8<Q6_K>(const u8* row, int base, int, float* v) {
    const u8* blk = row + (u64)(base >> 8) * Q6_K::TS;
    const int i = base & 255;
    const int n = i >> 7, k = (i >> 5) & 3, l0 = i & 31;
    const u8* lo = blk + 64 * n + l0 + ((k & 1) ? 32 : 0);
    const u8* hi = blk + 128 + 32 * n + l0;
    const float dsc = mul(f16_at(blk + 208), (float)(signed char)blk[192 + 8 * n + (l0 >> 4) + 2 * k]);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const int q = ((k >= 2 ? lo[e] >> 4 : lo[e] & 0xF) | (((hi[e] >> (2 * k)) & 3) << 4)) - 32;
        v[e] = mul(dsc, (float)q);
    }
}

// An f32 value as f16 bits, rounded to nearest even (PTX cvt; no headers).
__device__ __forceinline__ unsigned short to_f16(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

// Stores of dequantized values: f32 as they are, or f16 (the tensor-core
// prefill's weights, rounded to nearest even).
__device__ __forceinline__ void store1(float* o, float v) { *o = v; }
__device__ __forceinline__ void store1(unsigned short* o, float v) { *o = to_f16(v); }
// Eight values at o, which is aligned to eight elements.
__device__ __forceinline__ void store8(float* o, const float* v) {
    float4* o4 = (float4*)o;
    o4[0] = make_float4(v[0], v[1], v[2], v[3]);
    o4[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(unsigned short* o, const float* v) {
    unsigned int p[4];
#pragma unroll
    for (int k = 0; k < 4; k++) p[k] = (unsigned int)to_f16(v[2 * k]) | ((unsigned int)to_f16(v[2 * k + 1]) << 16);
    *(uint4*)o = make_uint4(p[0], p[1], p[2], p[3]);
}

// Rows of eight-element groups when the row length allows (one index
// division per eight values, the scales read once), else element by element.
// O: float (dequant_<ty>) or f16 bits (dequant_f16_<ty>).
template <typename T, typename O>
__device__ void dequant(const u8* __restrict__ w, u64 row_bytes, O* __restrict__ out, int n_rows, int n_cols, int flags) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    if ((n_cols & 7) == 0) {
        const unsigned int groups = (unsigned int)n_cols >> 3;
        const u64 total = (u64)n_rows * groups;
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
            const u64 r = i / groups;
            const int c = (int)(i - r * groups) << 3;
            float v[8];
            elems8<T>(w + r * row_bytes, c, flags, v);
            // Aligned to eight elements: the buffer is, and n_cols is a multiple of 8.
            store8(out + r * n_cols + c, v);
        }
        return;
    }
    const u64 total = (u64)n_rows * n_cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const u64 r = i / n_cols;
        store1(out + i, elem<T>(w + r * row_bytes, (int)(i % n_cols), flags));
    }
}

// The 32 values of group g (elements 32 g .. 32 g + 31) of a row whose
// length is a multiple of 32: one whole block of a 32-value type, one of
// the eight 32-value groups of a K-quant block, or 32 values of a plain
// type. Generic: four elems8, so the values of T::at bit for bit.
template <typename T>
__device__ __forceinline__ void group32(const u8* row, int g, int flags, float* v) {
#pragma unroll
    for (int k = 0; k < 4; k++) elems8<T>(row, g * 32 + 8 * k, flags, v + 8 * k);
}

// Whether group32<T> is one of the wide loaders below, which hold a group
// in few registers: gemv_glu then reads its two rows in one loop, both
// loads in flight (the generic loader's four elems8 take too many
// registers for two: ptxas spills them).
template <typename T>
struct WideGroup {
    static const bool value = false;
};

// f16 bits to f32 (PTX cvt, as f16_at).
__device__ __forceinline__ float f16_bits(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// The real model's types with loads as wide as their blocks' alignment
// allows, every load of the block issued before any value is computed (a
// GEMV's speed is the bytes it keeps in flight). The same f32 operations
// per element as T::at, so the same values, bit for bit. Alignment: a
// matrix starts 16-byte aligned (checked at upload); Q5_0 and Q8_0 blocks
// (22 and 34 bytes) are then 2-byte aligned, Q4_K blocks (144 bytes) 16-byte
// aligned; staged rows keep their offset modulo 16 (stage_rows).
template <>
__device__ __forceinline__ void group32<Q5_0>(const u8* row, int g, int flags, float* v) {
    const u8* blk = row + (u64)g * Q5_0::TS;
    if (flags & 1) {
        // The fault's dequantization, element by element.
#pragma unroll
        for (int e = 0; e < 32; e++) v[e] = Q5_0::at(blk, e, flags);
        return;
    }
    // block_q5_0 { half d; u8 qh[4]; u8 qs[16]; } as 11 halfwords.
    const unsigned short* h = (const unsigned short*)blk;
    unsigned short w[11];
#pragma unroll
    for (int k = 0; k < 11; k++) w[k] = h[k];
    const float d = f16_bits(w[0]);
    const unsigned int qh = (unsigned int)w[1] | ((unsigned int)w[2] << 16);
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int q = (w[3 + (j >> 1)] >> (8 * (j & 1))) & 0xFF;
        // As ints before the 16 comes off (qh is unsigned).
        const int lo = (q & 0xF) | (int)(((qh >> j) << 4) & 0x10);
        const int hi = (q >> 4) | (int)((qh >> (j + 12)) & 0x10);
        v[j] = mul((float)(lo - 16), d);
        v[j + 16] = mul((float)(hi - 16), d);
    }
}
template <>
__device__ __forceinline__ void group32<Q8_0>(const u8* row, int g, int, float* v) {
    // block_q8_0 { half d; i8 qs[32]; } as 17 halfwords.
    const unsigned short* h = (const unsigned short*)(row + (u64)g * Q8_0::TS);
    unsigned short w[17];
#pragma unroll
    for (int k = 0; k < 17; k++) w[k] = h[k];
    const float d = f16_bits(w[0]);
#pragma unroll
    for (int j = 0; j < 32; j++) v[j] = mul((float)(signed char)(w[1 + (j >> 1)] >> (8 * (j & 1))), d);
}
template <>
__device__ __forceinline__ void group32<Q4_K>(const u8* row, int g, int, float* v) {
    // Group g is j = g % 8 of its block: scale/min j, nibble h = j % 2 of
    // qs[32 (j / 2) .. + 32]. The block's first 16 bytes (d, dmin, the
    // packed scales) and the group's 32 quant bytes: three 16-byte loads.
    const u8* blk = row + (u64)(g >> 3) * Q4_K::TS;
    const int j = g & 7, h = j & 1;
    const uint4 head = *(const uint4*)blk;
    const uint4 q0 = *(const uint4*)(blk + 16 + 32 * (j >> 1));
    const uint4 q1 = *(const uint4*)(blk + 32 + 32 * (j >> 1));
    // get_scale_min_k4 on the 12 packed bytes, which are head.y, head.z and
    // head.w (bytes picked by shifts: a byte array indexed by j would live
    // in local memory).
    const int jj = j & 3;
    const int by = (head.y >> (8 * jj)) & 0xFF, bz = (head.z >> (8 * jj)) & 0xFF, bw = (head.w >> (8 * jj)) & 0xFF;
    const int sc = j < 4 ? by & 63 : (bw & 0xF) | ((by >> 6) << 4);
    const int m = j < 4 ? bz & 63 : (bw >> 4) | ((bz >> 6) << 4);
    const float d1 = mul(f16_bits((unsigned short)(head.x & 0xFFFF)), (float)sc);
    const float m1 = mul(f16_bits((unsigned short)(head.x >> 16)), (float)m);
    const unsigned int qw[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
#pragma unroll
    for (int l = 0; l < 32; l++) {
        const unsigned int q = (qw[l >> 2] >> (8 * (l & 3))) & 0xFF;
        v[l] = __fsub_rn(mul(d1, (float)(h ? q >> 4 : q & 0xF)), m1);
    }
}

template <>
struct WideGroup<Q5_0> {
    static const bool value = true;
};
template <>
struct WideGroup<Q8_0> {
    static const bool value = true;
};
template <>
struct WideGroup<Q4_K> {
    static const bool value = true;
};

// `warps_per_row` warps per output row r (1, 2, 4 or 8; a block holds
// GEMV_WARPS / warps_per_row rows). Each lane takes a group of 32
// consecutive values at a time (for a block type, one block or one K-quant
// group: its bytes loaded at once), the row's warps interleaved 32 groups
// apart (a warp covers 1024 values per step); it dequantizes them once and
// multiplies them into every token's accumulator (f32, FMA allowed:
// accumulation order is not ggml's anyway). Each warp reduces its lanes,
// then the row's warps are added in order. The values of a row that is not
// whole groups of 32 (plain types only) end element by element. Several
// warps per row keep a matrix of few rows (128 in Qwen2-0.5B's K and V)
// from leaving most of the GPU idle while each warp walks a long row.
// Launch: blockDim GEMV_WARPS * 32.
//
// x is read where it is, or from the block's copy in shared memory
// (GemvX): with a group a lane, the 32 lanes of a warp read x 128 bytes
// apart, so each 16-byte load of x from global memory touches 32 cache
// lines (Nsight on the H100: the GEMVs at 7-17% of the memory bandwidth);
// in shared memory each group is padded to 36 floats, which puts the 8
// lanes of each quarter-warp's 16-byte loads on 8 different 4-bank groups
// (36 / 4 = 9 = 1 mod 8): no bank conflict.
#define X_GROUP_STRIDE 36

// Where row_dot reads x ([n_tokens, n_cols]): `staged` null, at `x`;
// else value 32 g + e of token t at staged[t * token_stride + 36 g + e]
// for the whole groups, and at `x` for the rest of a row.
struct GemvX {
    const float* x;
    const float* staged;
    int token_stride;
};

// This thread's share of rows `rows[0..R)` (R = 2 in gemv_glu: one row of
// each matrix, both loads in flight together) times token t of x, into
// acc[k] for rows[k]. Each acc[k] sees the same operations in the same
// order whatever R is and wherever x is read from: the bits of the row
// alone. One token at a time: a few-token GEMV reads each row again per
// token (from L1 or L2, right after the first), which keeps one
// accumulator a row in registers instead of GEMV_MAX_TOKENS.
template <typename T, int R>
__device__ __forceinline__ void row_dot(const u8* const* rows, GemvX xv, int t, int n_cols, int flags, int part,
                                        int lane, int warps_per_row, float* acc) {
    const int n_groups = n_cols >> 5;
    const float* __restrict__ x = xv.x + (u64)t * n_cols;
    // Group g of the token at xg + ..., 16-byte aligned when `vec` (x in
    // global memory: when every token's row starts 16-byte aligned, which
    // is uniform across the launch).
    const float* xs = xv.staged ? xv.staged + (u64)t * xv.token_stride : nullptr;
    const bool vec = xs || (((((u64)xv.x) & 15) == 0) && ((n_cols & 3) == 0));
#pragma unroll 1
    for (int g = part * 32 + lane; g < n_groups; g += 32 * warps_per_row) {
        const float* xg = xs ? xs + g * X_GROUP_STRIDE : x + (u64)g * 32;
#pragma unroll
        for (int k = 0; k < R; k++) {
            float v[32];
            group32<T>(rows[k], g, flags, v);
            if (vec) {
#pragma unroll
                for (int e = 0; e < 32; e += 4) {
                    const float4 a = *(const float4*)(xg + e);
                    acc[k] += v[e] * a.x;
                    acc[k] += v[e + 1] * a.y;
                    acc[k] += v[e + 2] * a.z;
                    acc[k] += v[e + 3] * a.w;
                }
            } else {
#pragma unroll
                for (int e = 0; e < 32; e++) acc[k] += v[e] * xg[e];
            }
        }
    }
    for (int c = (n_groups << 5) + part * 32 + lane; c < n_cols; c += 32 * warps_per_row) {
#pragma unroll
        for (int k = 0; k < R; k++) acc[k] += elem<T>(rows[k], c, flags) * x[c];
    }
}

// Reduce acc[k] (R rows, one token) over the warp's lanes, then over the
// row's warps in order: `sums[k]` on lane 0 of the row's first warp (true
// is returned there). `partial[k]` holds the warps' sums of row k; the
// caller syncs the block before the next call writes it again.
template <int R>
__device__ __forceinline__ bool row_sums(const float* acc, float (*partial)[GEMV_WARPS], int warp, int lane, int part,
                                         int warps_per_row, float* sums) {
#pragma unroll
    for (int k = 0; k < R; k++) {
        float s = acc[k];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) partial[k][warp] = s;
    }
    __syncthreads();
    if (lane != 0 || part != 0) return false;
#pragma unroll
    for (int k = 0; k < R; k++) {
        float s = partial[k][warp];
        for (int j = 1; j < warps_per_row; j++) s += partial[k][warp + j];
        sums[k] = s;
    }
    return true;
}

// RMSNorm over the last dim times the weight. The sum of squares is
// accumulated in f64 (like the CPU oracle), the scale 1/sqrt(mean + eps)
// computed in f64.
#define NORM_THREADS 256
// stage_x runs rms_scale in a GEMV block: the same number of threads, so
// the same summation order, as the rms_norm_f32 launch.
static_assert(GEMV_WARPS * 32 == NORM_THREADS, "a GEMV block must be NORM_THREADS threads for the fused RMSNorm");

// The scale 1/sqrt(mean(xr^2) + eps) of one row of n_cols values, by the
// whole block (NORM_THREADS threads: the summation order follows from
// that alone, so every caller gets the same bits), returned to every
// thread. Each thread sums its stride of the row, then each warp by
// shuffles, then the warps' sums in order by every thread: one barrier
// instead of one per halving of a shared array (a decode step's row of 896
// is under four values a thread, so the reduction is most of the work).
// A second barrier lets the block call it again for another row.
__device__ double rms_scale(const float* __restrict__ xr, int n_cols, float eps) {
    __shared__ double partial[NORM_THREADS / 32];
    double acc = 0.0;
    for (int c = threadIdx.x; c < n_cols; c += NORM_THREADS) {
        const double v = (double)xr[c];
        acc += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    double total = 0.0;
    for (int k = 0; k < NORM_THREADS / 32; k++) total += partial[k];
    __syncthreads();
    return 1.0 / sqrt(total / (double)n_cols + (double)eps);
}

// One normalized value: x times the scale times the weight, in f64, rounded once.
__device__ __forceinline__ float rms_normed(float x, double scale, float w) {
    return (float)((double)x * scale * (double)w);
}

// One block (NORM_THREADS threads) per row.
extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm_f32(const float* __restrict__ x,
                                                                         const float* __restrict__ w,
                                                                         float* __restrict__ out, int n_cols,
                                                                         float eps) {
    const u64 row = blockIdx.x;
    const float* xr = x + row * (u64)n_cols;
    float* yr = out + row * (u64)n_cols;
    const double scale = rms_scale(xr, n_cols, eps);
    for (int c = threadIdx.x; c < n_cols; c += NORM_THREADS) yr[c] = rms_normed(xr[c], scale, w[c]);
}

// The block's copy of x ([n_tokens, n_cols], n_cols a multiple of 32) in
// shared memory `xs`, laid out as GemvX reads it: x as it is, or, with
// `norm_w` (the RMSNorm before the GEMV, fused), as rms_norm_f32 would
// write it (rms_scale and rms_normed, this block being NORM_THREADS
// threads as that launch is: the same bits). `norm_out`, when not null
// (a checkpoint observes the norm): block 0 also writes the normalized x
// there, [n_tokens, n_cols] as rms_norm_f32 lays it out; every block
// computes the same values. Ends with a barrier.
__device__ void stage_x(const float* __restrict__ x, const float* __restrict__ norm_w, float eps, int n_tokens,
                        int n_cols, float* xs, float* __restrict__ norm_out) {
    const int token_stride = (n_cols >> 5) * X_GROUP_STRIDE;
    float* keep = blockIdx.x == 0 ? norm_out : nullptr;
    for (int t = 0; t < n_tokens; t++) {
        const float* xr = x + (u64)t * n_cols;
        float* out = xs + (u64)t * token_stride;
        if (norm_w) {
            const double scale = rms_scale(xr, n_cols, eps);
            for (int c = threadIdx.x; c < n_cols; c += NORM_THREADS) {
                const float v = rms_normed(xr[c], scale, norm_w[c]);
                out[(c >> 5) * X_GROUP_STRIDE + (c & 31)] = v;
                if (keep) keep[(u64)t * n_cols + c] = v;
            }
        } else {
            for (int c = threadIdx.x; c < n_cols; c += NORM_THREADS) out[(c >> 5) * X_GROUP_STRIDE + (c & 31)] = xr[c];
        }
    }
    __syncthreads();
}

// The bytes of the block's rows r0 .. r0 + n - 1 (contiguous in the
// matrix of total_bytes) into shared memory, with 16-byte loads that the
// whole block issues at once: the weights then cross from memory in one
// coalesced wave instead of the lanes' scattered byte loads, each waiting
// on the last (a GEMV reads every weight once; its speed is the number of
// bytes in flight). Returns where row r0 starts in `stage`. The matrix
// starts 256-byte aligned (cudaMalloc); the range is widened to 16 bytes,
// and a last 16 bytes that would pass the matrix's end are read byte by byte.
__device__ const u8* stage_rows(const u8* __restrict__ w, u64 row_bytes, int n_rows, int r0, int n, uint4* stage) {
    const u64 total = (u64)n_rows * row_bytes;
    const u64 start = (u64)r0 * row_bytes;
    const u64 end = min(start + (u64)n * row_bytes, total);
    const u64 a0 = start & ~(u64)15;
    const u64 n16 = (end - a0 + 15) >> 4;
    for (u64 i = threadIdx.x; i < n16; i += blockDim.x) {
        const u64 at = a0 + i * 16;
        if (at + 16 <= total) {
            stage[i] = *(const uint4*)(w + at);
        } else {
            u8* d = (u8*)(stage + i);
            for (int k = 0; k < 16; k++) d[k] = at + k < total ? w[at + k] : 0;
        }
    }
    __syncthreads();
    return (const u8*)stage + (start - a0);
}

// Row r's bytes toward L2 (prefetch: no register waits for them), a cache
// line a lane: a block taking several blocks of rows in turn asks for the
// next block's rows before summing this one's, so their memory latency
// overlaps this block's work.
__device__ __forceinline__ void prefetch_row(const u8* w, u64 row_bytes, int r, int lane) {
    const u8* row = w + (u64)r * row_bytes;
    for (u64 off = (u64)lane * 128; off < row_bytes; off += 32 * 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + off));
}

// The GEMVs' dynamic shared memory: [x staged (stage_x), when x_staged][the
// block's rows (stage_rows), when staged]. `x_staged`: the block copies x
// there first (required with `norm_w`, the fused RMSNorm); the launch
// gives n_tokens * (n_cols / 32) * X_GROUP_STRIDE floats for it. Returns
// how row_dot reads x and, in `after`, where the staged rows go. `norm_out`:
// see stage_x.
__device__ __forceinline__ GemvX gemv_input(const float* x, const float* norm_w, float* norm_out, float eps,
                                            int x_staged, int n_tokens, int n_cols, uint4* shared, uint4** after) {
    GemvX xv = {x, nullptr, 0};
    *after = shared;
    if (x_staged) {
        xv.token_stride = (n_cols >> 5) * X_GROUP_STRIDE;
        stage_x(x, norm_w, eps, n_tokens, n_cols, (float*)shared, norm_out);
        xv.staged = (const float*)shared;
        *after = shared + (u64)n_tokens * xv.token_stride / 4;
    }
    return xv;
}

// `staged`: the block's rows are first copied to shared memory (stage_rows;
// the launch gives GEMV_WARPS / warps_per_row rows of dynamic shared memory
// plus 16 bytes per matrix), else read where they are. The same bytes,
// the same operations: the same bits either way.
// Blocks `block`, `block + block_step`, ... of this matrix (rows_per_block
// rows each): a launch of fewer blocks than the matrix has (its LM head has
// 19 k) stages x once per block, not once per 8 rows. gemv3 passes a step
// past its segment's end (one block each). `proj`, when not null with a
// residual (a checkpoint observes the projection alone): the product (and
// bias) before the residual is added, as `linear` alone would write it.
template <typename T>
__device__ void gemv(const u8* __restrict__ w, u64 row_bytes, const float* __restrict__ x,
                     const float* __restrict__ bias, const float* __restrict__ residual, float* __restrict__ y,
                     float* __restrict__ proj, int n_tokens, int n_rows, int n_cols, int flags, int warps_per_row,
                     int staged, int block, int block_step, const float* __restrict__ norm_w,
                     float* __restrict__ norm_out, float eps, int x_staged) {
    __shared__ float partial[1][GEMV_WARPS];
    extern __shared__ uint4 shared[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rows_per_block = GEMV_WARPS / warps_per_row;
    const int part = warp % warps_per_row;
    uint4* stage;
    const GemvX xv = gemv_input(x, norm_w, norm_out, eps, x_staged, n_tokens, n_cols, shared, &stage);
    for (int b = block; b * rows_per_block < n_rows; b += block_step) {
        const int r0 = b * rows_per_block;
        const int r = r0 + warp / warps_per_row;
        const u8* rows = staged ? stage_rows(w, row_bytes, n_rows, r0, min(rows_per_block, n_rows - r0), stage) - (u64)r0 * row_bytes : w;
        const u8* row[1] = {rows + (u64)min(r, n_rows - 1) * row_bytes};
        const int r_next = r + block_step * rows_per_block;
        if (part == 0 && r_next < n_rows) prefetch_row(w, row_bytes, r_next, lane);
        for (int t = 0; t < n_tokens; t++) {
            float acc[1] = {0.0f};
            if (r < n_rows) row_dot<T, 1>(row, xv, t, n_cols, flags, part, lane, warps_per_row, acc);
            float sum[1];
            if (row_sums<1>(acc, partial, warp, lane, part, warps_per_row, sum) && r < n_rows) {
                // The bias as add_bias_f32 adds it: one f32 addition to the sum;
                // the residual as add_f32 adds it (residual + product).
                const u64 i = (u64)t * n_rows + r;
                const float v = bias ? sum[0] + bias[r] : sum[0];
                y[i] = residual ? residual[i] + v : v;
                if (proj) proj[i] = v;
            }
            // `partial` (and, after the last token, the staged rows) are
            // written again by the next token or block of rows.
            __syncthreads();
        }
    }
}

// Up to three GEMVs of one input x over matrices of one type and row length
// in one launch (attention's Q, K and V projections): blocks 0 .. start1 - 1
// are matrix 0's launch, start1 .. start2 - 1 matrix 1's, the rest matrix
// 2's, each exactly as its own gemv launch would run them (its warps per
// row, its staging), so each output has the bits of gemv alone. A matrix of
// 0 rows is absent (its pointers may be null). `norm_out`: see stage_x.
template <typename T>
__device__ void gemv3(const u8* w0, const u8* w1, const u8* w2, u64 row_bytes, const float* x, const float* b0,
                      const float* b1, const float* b2, float* y0, float* y1, float* y2, int n_tokens, int rows0,
                      int rows1, int rows2, int n_cols, int flags0, int flags1, int flags2, int wpr0, int wpr1,
                      int wpr2, int staged0, int staged1, int staged2, int start1, int start2, const float* norm_w,
                      float* norm_out, float eps, int x_staged) {
    // Block-uniform branches: every thread of a block takes the same one.
    // One block of rows each (a step of gridDim.x passes every segment's end).
    const int b = blockIdx.x, step = gridDim.x;
    if (b < start1) {
        gemv<T>(w0, row_bytes, x, b0, nullptr, y0, nullptr, n_tokens, rows0, n_cols, flags0, wpr0, staged0, b, step,
                norm_w, norm_out, eps, x_staged);
    } else if (b < start2) {
        gemv<T>(w1, row_bytes, x, b1, nullptr, y1, nullptr, n_tokens, rows1, n_cols, flags1, wpr1, staged1, b - start1,
                step, norm_w, norm_out, eps, x_staged);
    } else {
        gemv<T>(w2, row_bytes, x, b2, nullptr, y2, nullptr, n_tokens, rows2, n_cols, flags2, wpr2, staged2, b - start2,
                step, norm_w, norm_out, eps, x_staged);
    }
}

// The gated activation act(g) * u of swiglu_f32 (below) and gemv_glu: act 0,
// silu(g) = g / (1 + exp(-g)); act 1 (a fault): gelu, tanh approximation,
// 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
__device__ __forceinline__ float gated(float g, float u, int act) {
    const float a = act == 0 ? g / (1.0f + expf(-g))
                             : 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    return a * u;
}

// y[t, r] = act(x Wa^T)[t, r] * (x Wb^T)[t, r]: the FFN's gate, up and
// SwiGLU in one pass over x, each product summed as gemv sums it (so the
// bits of gemv, gemv, swiglu_f32). Wa and Wb share type and shape. Row
// r of both matrices in one row_dot (both loads in flight together); the
// blocks of rows, x and the fused norm as in gemv (blocks blockIdx.x,
// + gridDim.x, ...). `ya`, `yb`, when not null (checkpoints observe the
// products): x Wa^T and x Wb^T as gemv writes them.
template <typename T>
__device__ void gemv_glu(const u8* __restrict__ wa, const u8* __restrict__ wb, u64 row_bytes,
                         const float* __restrict__ x, float* __restrict__ y, float* __restrict__ ya,
                         float* __restrict__ yb, int n_tokens, int n_rows, int n_cols, int flags, int warps_per_row,
                         int act, int staged, const float* __restrict__ norm_w, float* __restrict__ norm_out,
                         float eps, int x_staged) {
    __shared__ float partial[2][GEMV_WARPS];
    extern __shared__ uint4 shared[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rows_per_block = GEMV_WARPS / warps_per_row;
    const int part = warp % warps_per_row;
    uint4* stage;
    const GemvX xv = gemv_input(x, norm_w, norm_out, eps, x_staged, n_tokens, n_cols, shared, &stage);
    for (int b = blockIdx.x; b * rows_per_block < n_rows; b += gridDim.x) {
        const int r0 = b * rows_per_block;
        const int r = r0 + warp / warps_per_row;
        const u8* rows_a = wa;
        const u8* rows_b = wb;
        if (staged) {
            // Wa's rows, then Wb's, each region starting 16-byte aligned.
            const int n = min(rows_per_block, n_rows - r0);
            const u64 region = ((u64)rows_per_block * row_bytes + 31) / 16;
            rows_a = stage_rows(wa, row_bytes, n_rows, r0, n, stage) - (u64)r0 * row_bytes;
            rows_b = stage_rows(wb, row_bytes, n_rows, r0, n, stage + region) - (u64)r0 * row_bytes;
        }
        const u64 at = (u64)min(r, n_rows - 1) * row_bytes;
        const u8* row[2] = {rows_a + at, rows_b + at};
        const int r_next = r + (int)gridDim.x * rows_per_block;
        if (part == 0 && r_next < n_rows) {
            prefetch_row(wa, row_bytes, r_next, lane);
            prefetch_row(wb, row_bytes, r_next, lane);
        }
        for (int t = 0; t < n_tokens; t++) {
            float acc[2] = {0.0f, 0.0f};
            if (r < n_rows) {
                if (WideGroup<T>::value) {
                    row_dot<T, 2>(row, xv, t, n_cols, flags, part, lane, warps_per_row, acc);
                } else {
                    row_dot<T, 1>(row, xv, t, n_cols, flags, part, lane, warps_per_row, acc);
                    row_dot<T, 1>(row + 1, xv, t, n_cols, flags, part, lane, warps_per_row, acc + 1);
                }
            }
            float sums[2];
            if (row_sums<2>(acc, partial, warp, lane, part, warps_per_row, sums) && r < n_rows) {
                const u64 i = (u64)t * n_rows + r;
                y[i] = gated(sums[0], sums[1], act);
                if (ya) ya[i] = sums[0];
                if (yb) yb[i] = sums[1];
            }
            // `partial` (and, after the last token, the staged rows) are
            // written again by the next token or block of rows.
            __syncthreads();
        }
    }
}

// act(gate) * up, element-wise (see `gated`).
extern "C" __global__ void swiglu_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                      float* __restrict__ out, u64 n, int act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = gated(gate[i], up[i], act);
    }
}

// out[t, c] = W[tokens[t], c]; transposed (a fault): the flat element
// c * n_rows + tokens[t] of the same storage read as [n_cols, n_rows].
// Token ids are range-checked on the host.
template <typename T>
__device__ void get_rows(const u8* __restrict__ w, u64 row_bytes, const int* __restrict__ tokens, float* __restrict__ out,
                         int n_tokens, int n_rows, int n_cols, int transposed, int flags) {
    const u64 total = (u64)n_tokens * n_cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const u64 t = i / n_cols, c = i % n_cols;
        const u64 flat = transposed ? c * (u64)n_rows + (u64)tokens[t] : (u64)tokens[t] * n_cols + c;
        out[i] = elem<T>(w + (flat / n_cols) * row_bytes, (int)(flat % n_cols), flags);
    }
}

#define QUANT_KERNELS(T)                                                                                           \
    extern "C" __global__ void dequant_##T(const u8* w, u64 row_bytes, float* out, int n_rows, int n_cols,        \
                                           int flags) {                                                            \
        dequant<T>(w, row_bytes, out, n_rows, n_cols, flags);                                                      \
    }                                                                                                              \
    extern "C" __global__ void dequant_f16_##T(const u8* w, u64 row_bytes, unsigned short* out, int n_rows,       \
                                               int n_cols, int flags) {                                            \
        dequant<T>(w, row_bytes, out, n_rows, n_cols, flags);                                                      \
    }                                                                                                              \
    extern "C" __global__ void GEMV_BOUNDS gemv_##T(                                                               \
        const u8* w, u64 row_bytes, const float* x, const float* bias, const float* residual, float* y,            \
        float* proj, int n_tokens, int n_rows, int n_cols, int flags, int warps_per_row, int staged,               \
        int x_staged) {                                                                                            \
        gemv<T>(w, row_bytes, x, bias, residual, y, proj, n_tokens, n_rows, n_cols, flags, warps_per_row, staged,  \
                blockIdx.x, gridDim.x, nullptr, nullptr, 0.0f, x_staged);                                          \
    }                                                                                                              \
    extern "C" __global__ void GEMV_BOUNDS gemv3_##T(                                                              \
        const u8* w0, const u8* w1, const u8* w2, u64 row_bytes, const float* x, const float* b0, const float* b1, \
        const float* b2, float* y0, float* y1, float* y2, int n_tokens, int rows0, int rows1, int rows2, int n_cols,\
        int flags0, int flags1, int flags2, int wpr0, int wpr1, int wpr2, int staged0, int staged1, int staged2,   \
        int start1, int start2, const float* norm_w, float* norm_out, float eps, int x_staged) {                   \
        gemv3<T>(w0, w1, w2, row_bytes, x, b0, b1, b2, y0, y1, y2, n_tokens, rows0, rows1, rows2, n_cols, flags0,  \
                 flags1, flags2, wpr0, wpr1, wpr2, staged0, staged1, staged2, start1, start2, norm_w, norm_out,    \
                 eps, x_staged);                                                                                   \
    }                                                                                                              \
    extern "C" __global__ void GEMV_BOUNDS gemv_glu_##T(                                                           \
        const u8* wa, const u8* wb, u64 row_bytes, const float* x, float* y, float* ya, float* yb, int n_tokens,   \
        int n_rows, int n_cols, int flags, int warps_per_row, int act, int staged, const float* norm_w,            \
        float* norm_out, float eps, int x_staged) {                                                                \
        gemv_glu<T>(wa, wb, row_bytes, x, y, ya, yb, n_tokens, n_rows, n_cols, flags, warps_per_row, act, staged,  \
                    norm_w, norm_out, eps, x_staged);                                                              \
    }                                                                                                              \
    extern "C" __global__ void get_rows_##T(const u8* w, u64 row_bytes, const int* tokens, float* out,             \
                                            int n_tokens, int n_rows, int n_cols, int transposed, int flags) {     \
        get_rows<T>(w, row_bytes, tokens, out, n_tokens, n_rows, n_cols, transposed, flags);                       \
    }

QUANT_KERNELS(F32)
QUANT_KERNELS(F16)
QUANT_KERNELS(BF16)
QUANT_KERNELS(Q4_0)
QUANT_KERNELS(Q4_1)
QUANT_KERNELS(Q5_0)
QUANT_KERNELS(Q5_1)
QUANT_KERNELS(Q8_0)
QUANT_KERNELS(Q2_K)
QUANT_KERNELS(Q3_K)
QUANT_KERNELS(Q4_K)
QUANT_KERNELS(Q5_K)
QUANT_KERNELS(Q6_K)

// ---- ggml's rounding of activations (numerics ggml) ----
//
// Each row of x replaced by the values ggml's CPU matmul effectively sees
// after converting it to the weight's vec_dot_type: the dequantized q8
// block, or the f16/bf16 value. Bit for bit `gguf::quant::round_like_ggml`
// (itself proved against ggml's from_float through FFI): the same f32
// operations, explicitly rounded. Rows that are not whole blocks are left
// as they are (ggml would not accept such a weight), like the host.

__device__ __forceinline__ float f16_round(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> bf16 -> f32 as the `half` crate's bf16::from_f32 rounds (nearest,
// ties to even; a NaN keeps its top bits, made quiet), in integer operations
// (cvt.rn.bf16.f32 needs sm_80 PTX; NVRTC's default target is older).
__device__ __forceinline__ float bf16_round(float x) {
    const unsigned int u = __float_as_uint(x);
    unsigned int h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h = (u >> 16) | 0x0040u;
    } else {
        h = u >> 16;
        if ((u & 0x8000u) != 0 && (u & (3u * 0x8000u - 1u)) != 0) h += 1;
    }
    return __uint_as_float((h & 0xffffu) << 16);
}

// _mm256_cvtps_epi32 of a rounded value, then the saturating packs to i8:
// out of i32 range or NaN gives i32::MIN, so -128.
__device__ __forceinline__ int cvt_pack_i8(float r) {
    int v = (r == r && r >= -2147483648.0f && r < 2147483648.0f) ? (int)r : (int)0x80000000;
    return v < -128 ? -128 : v > 127 ? 127 : v;
}

// kind 0: f16, 1: bf16 (element-wise, grid-stride over n values).
extern "C" __global__ void round_half(float* __restrict__ x, u64 n, int kind) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        x[i] = kind == 0 ? f16_round(x[i]) : bf16_round(x[i]);
    }
}

// q8_0 / q8_1 (their values are the same): one warp per block of 32.
// amax = max |x| (NaN ignored, as the AVX max), d = f16(amax / 127),
// id = 127 / amax, q = pack_i8(rint(x * id)), value d * q.
extern "C" __global__ void round_q8_0(float* __restrict__ x, u64 n_blocks) {
    const u64 b = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (b >= n_blocks) return;
    const int lane = threadIdx.x & 31;
    float* p = x + b * 32;
    const float v = p[lane];
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float d = f16_round(__fdiv_rn(amax, 127.0f));
    const float id = amax != 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
    const int q = cvt_pack_i8(rintf(__fmul_rn(v, id)));
    p[lane] = __fmul_rn(d, (float)q);
}

// q8_K: one block of 256 threads per block of 256 values. max is the first
// element of largest |x| with its sign (NaN never wins), iscale = -127/max,
// q = min(127, nearest_int(iscale * x)) with ggml's FMA-contracted
// nearest_int (fma(iscale, x, 1.5 * 2^23), the integer read from the
// mantissa; stored to int8 by truncation), d = 1 / iscale, value d * q.
// An all-zero block stays zero. One difference is left on purpose: a NaN
// element's quant comes from the NaN's mantissa bits, the input's payload
// on x86 and the canonical NaN here, so the two may differ there; a NaN
// activation fails every comparison anyway.
extern "C" __global__ void round_q8_k(float* __restrict__ x, u64 n_blocks) {
    __shared__ float s_abs[256];
    __shared__ int s_idx[256];
    const u64 b = blockIdx.x;
    if (b >= n_blocks) return;
    const int t = threadIdx.x;
    float* p = x + b * 256;
    const float v = p[t];
    const float a = fabsf(v);
    // NaN compares false: give it -1 so it never wins.
    s_abs[t] = a == a ? a : -1.0f;
    s_idx[t] = t;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (t < s) {
            const float a1 = s_abs[t], a2 = s_abs[t + s];
            const int i1 = s_idx[t], i2 = s_idx[t + s];
            if (a2 > a1 || (a2 == a1 && i2 < i1)) {
                s_abs[t] = a2;
                s_idx[t] = i2;
            }
        }
        __syncthreads();
    }
    // Every thread reads the winner from `v` values kept in shared memory
    // (not from p, which threads overwrite below).
    __shared__ float s_max;
    if (t == s_idx[0]) s_max = v;
    __syncthreads();
    const float amax = s_abs[0];
    if (!(amax > 0.0f)) {
        p[t] = 0.0f;
        return;
    }
    const float max = s_max;
    const float iscale = __fdiv_rn(-127.0f, max);
    const int bits = __float_as_int(__fmaf_rn(iscale, v, 12582912.0f));
    int q = (bits & 0x7fffff) - 0x400000;
    q = q < 127 ? q : 127;
    const signed char q8 = (signed char)q;
    p[t] = __fmul_rn(__fdiv_rn(1.0f, iscale), (float)q8);
}

// ---- activations for the tensor-core prefill (QWEN2_PARITY_CUDA_MATMUL=f16) ----

#define F16_ROW_THREADS 256

// Row r of x [n_rows, n_cols] as f16 bits, scaled by a power of two so that
// its largest magnitude lands in [2^14, 2^15): f16 keeps its 11 bits for
// every row however large its activations (f16 overflows at 65504) or
// small, and the scaling is exact. `scales[r]` is the factor to multiply
// the product back by (1 for a row of zeros, or with a NaN or infinity,
// which then reaches the product as it is). One block of F16_ROW_THREADS per row.
extern "C" __global__ void rows_to_f16(const float* __restrict__ x, unsigned short* __restrict__ out,
                                       float* __restrict__ scales, int n_cols) {
    __shared__ float smax[F16_ROW_THREADS];
    const u64 row = blockIdx.x;
    const float* xr = x + row * (u64)n_cols;
    float m = 0.0f;
    for (int c = threadIdx.x; c < n_cols; c += blockDim.x) m = fmaxf(m, fabsf(xr[c]));
    // fmaxf drops NaN: a row with one becomes 1-scaled and keeps it below.
    for (int c = threadIdx.x; c < n_cols; c += blockDim.x) if (xr[c] != xr[c]) m = __int_as_float(0x7f800000);
    smax[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
        __syncthreads();
    }
    m = smax[0];
    int e = 0;
    if (m > 0.0f && m <= 3.4e38f) {
        frexpf(m, &e);  // m = f * 2^e, 0.5 <= f < 1
    } else {
        e = 15;  // zeros, NaN or infinity: unscaled
    }
    // x * 2^(15 - e) has magnitudes below 2^15.
    const float up = ldexpf(1.0f, 15 - e);
    if (threadIdx.x == 0) scales[row] = ldexpf(1.0f, e - 15);
    for (int c = threadIdx.x; c < n_cols; c += blockDim.x) out[row * (u64)n_cols + c] = to_f16(__fmul_rn(xr[c], up));
}
