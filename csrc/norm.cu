// RMSNorm with fused residual add, as transformers' LlamaRMSNorm after `residual + x`:
//   residual <- residual + x (rounded to T);  out <- weight * to_T(residual * rsqrt(mean(residual^2) + eps))
// With has_residual == 0 the input is normalized alone and residual is not touched.
// Reference: gpu_worker/layers/norm.py (RMSNorm). One block per token row.
#include "common.cuh"

template <typename T>
__device__ void rms_norm(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                         const T* __restrict__ weight, int hidden, float eps, int has_residual) {
  const long row = blockIdx.x;
  const T* x_row = x + row * hidden;
  T* res_row = residual + row * hidden;
  float sum_sq = 0.f;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
    float v = to_float(x_row[j]);
    if (has_residual) {
      const T summed = from_float<T>(v + to_float(res_row[j]));
      res_row[j] = summed;
      v = to_float(summed);
    }
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / hidden + eps);
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
    // Each thread re-reads only the elements it wrote itself above, so no barrier is needed.
    const float v = has_residual ? to_float(res_row[j]) : to_float(x_row[j]);
    out[row * hidden + j] = from_float<T>(to_float(weight[j]) * to_float(from_float<T>(v * inv_rms)));
  }
}

#define RMS_NORM(NAME, T)                                                                          \
  extern "C" __global__ void rms_norm_##NAME(T* out, T* residual, const T* x, const T* weight,      \
                                             int hidden, float eps, int has_residual) {             \
    rms_norm<T>(out, residual, x, weight, hidden, eps, has_residual);                               \
  }
MM_FOR_EACH_DTYPE(RMS_NORM)
