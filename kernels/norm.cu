// RMSNorm over the last dim times the weight: one block per row, any row
// length (threads stride over the row). The sum of squares is accumulated
// in f64 (like the CPU oracle), the scale 1/sqrt(mean + eps) computed in f64.

#define NORM_THREADS 256

extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ out, int n_cols, float eps) {
    __shared__ double partial[NORM_THREADS];
    const unsigned long long row = blockIdx.x;
    const float* xr = x + row * (unsigned long long)n_cols;
    float* yr = out + row * (unsigned long long)n_cols;
    double acc = 0.0;
    for (int c = threadIdx.x; c < n_cols; c += blockDim.x) {
        double v = (double)xr[c];
        acc += v * v;
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    const double scale = 1.0 / sqrt(partial[0] / (double)n_cols + (double)eps);
    for (int c = threadIdx.x; c < n_cols; c += blockDim.x) {
        yr[c] = (float)((double)xr[c] * scale * (double)w[c]);
    }
}
