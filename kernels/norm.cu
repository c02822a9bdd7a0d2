// RMSNorm over the last dim times the weight: one block per row, any row
// length (threads stride over the row). The sum of squares is accumulated
// in f64 (like the CPU oracle), the scale 1/sqrt(mean + eps) computed in f64.

#define NORM_THREADS 256

extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ out, int n_cols, float eps) {
    // One partial sum per warp (blockDim is a multiple of 32).
    __shared__ double partial[NORM_THREADS / 32];
    const unsigned long long row = blockIdx.x;
    const float* xr = x + row * (unsigned long long)n_cols;
    float* yr = out + row * (unsigned long long)n_cols;
    double acc = 0.0;
    for (int c = threadIdx.x; c < n_cols; c += blockDim.x) {
        double v = (double)xr[c];
        acc += v * v;
    }
    // Within each warp by shuffles, then the warps' sums in order by every
    // thread: one barrier instead of one per halving of a shared array (a
    // decode step's row of 896 is under four values a thread, so the
    // reduction is most of the kernel's work).
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    double total = 0.0;
    for (int k = 0; k < (int)(blockDim.x >> 5); k++) total += partial[k];
    const double scale = 1.0 / sqrt(total / (double)n_cols + (double)eps);
    for (int c = threadIdx.x; c < n_cols; c += blockDim.x) {
        yr[c] = (float)((double)xr[c] * scale * (double)w[c]);
    }
}
