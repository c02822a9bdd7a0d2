// Element-wise kernels of the CUDA backend: embedding lookup, bias add,
// residual add. All f32, row-major, grid-stride loops with 64-bit
// indices so any size works (no multiple-of-block-size assumption).
// Compiled at run time by NVRTC; no headers needed.

typedef unsigned long long u64;

// out[t, c] = table[tokens[t], c]; token ids are range-checked on the host.
// transposed != 0 (a fault): the table read as [n_embd, n_vocab], column tokens[t].
extern "C" __global__ void embed_f32(const float* __restrict__ table, const int* __restrict__ tokens,
                                     float* __restrict__ out, int n_tokens, int n_embd, int n_vocab, int transposed) {
    u64 total = (u64)n_tokens * (u64)n_embd;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 t = i / (u64)n_embd;
        u64 c = i % (u64)n_embd;
        out[i] = transposed ? table[c * (u64)n_vocab + (u64)tokens[t]] : table[(u64)tokens[t] * (u64)n_embd + c];
    }
}

// y[r, c] += b[c] for y of n_rows x n_cols.
extern "C" __global__ void add_bias_f32(float* __restrict__ y, const float* __restrict__ b, int n_rows, int n_cols) {
    u64 total = (u64)n_rows * (u64)n_cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        y[i] += b[i % (u64)n_cols];
    }
}

// y[r, c] = y[r, c] * scales[r] (+ b[c] when b is not null): the tensor-core
// prefill's product scaled back (rows_to_f16 in quant.cu), then its bias.
extern "C" __global__ void scale_rows_add_bias(float* __restrict__ y, const float* __restrict__ scales,
                                               const float* __restrict__ b, int n_rows, int n_cols) {
    u64 total = (u64)n_rows * (u64)n_cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        const float v = y[i] * scales[i / (u64)n_cols];
        y[i] = b ? v + b[i % (u64)n_cols] : v;
    }
}

extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                                   u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = a[i] + b[i];
    }
}

// swiglu_f32 is in quant.cu, beside the gated GEMV that shares its activation.
