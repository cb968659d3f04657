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
    pdl_begin(); rms_norm<T>(out, residual, x, weight, hidden, eps, has_residual);                             \
  }
MM_FOR_EACH_DTYPE(RMS_NORM)

// LayerNorm with fused residual add, as the Qwen2-VL ViT's blocks (`x = x + attn(...)`, then
// norm2(x)):  residual <- to_T(residual + x);  out <- to_T((residual - mean) * rstd * weight + bias),
// mean and variance over the rounded sum in float32 (two passes over registers). With
// has_residual == 0, x is normalized alone. Where torch runs an add and then its LayerNorm kernel
// (the add reads two rows and writes one, the norm reads one and writes one), this reads two and
// writes two. One warp per row; the row lives in registers as 16-byte vectors, VECS per lane, so
// rows of up to 32 * VECS * (16 / sizeof(T)) elements (hidden a multiple of 16 / sizeof(T)).
// Reference: torch.nn.functional.layer_norm after the add (gpu_worker/models/qwen2_vl_vision.py).
template <typename T, int VECS>
__device__ void layer_norm(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                           const T* __restrict__ weight, const T* __restrict__ bias, long rows,
                           int hidden, float eps, int has_residual) {
  constexpr int E = 16 / sizeof(T);  // elements per vector
  const long row = blockIdx.x * (long)(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, num_vecs = hidden / E;
  const uint4* x_row = reinterpret_cast<const uint4*>(x + row * hidden);
  uint4* res_row = reinterpret_cast<uint4*>(residual + row * hidden);
  float v[VECS][E];
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int c = lane + 32 * i;
    if (c >= num_vecs) break;
    uint4 packed = x_row[c];
    T* e = reinterpret_cast<T*>(&packed);
    if (has_residual) {
      uint4 res = res_row[c];
      const T* r = reinterpret_cast<const T*>(&res);
#pragma unroll
      for (int j = 0; j < E; ++j) e[j] = from_float<T>(to_float(e[j]) + to_float(r[j]));
      res_row[c] = packed;
    }
#pragma unroll
    for (int j = 0; j < E; ++j) {
      v[i][j] = to_float(e[j]);
      sum += v[i][j];
    }
  }
  const float mean = warp_sum(sum) / hidden;
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    if (lane + 32 * i >= num_vecs) break;
#pragma unroll
    for (int j = 0; j < E; ++j) sum_sq += (v[i][j] - mean) * (v[i][j] - mean);
  }
  const float rstd = rsqrtf(warp_sum(sum_sq) / hidden + eps);
  const uint4* w_vecs = reinterpret_cast<const uint4*>(weight);
  const uint4* b_vecs = reinterpret_cast<const uint4*>(bias);
  uint4* out_row = reinterpret_cast<uint4*>(out + row * hidden);
#pragma unroll
  for (int i = 0; i < VECS; ++i) {
    const int c = lane + 32 * i;
    if (c >= num_vecs) break;
    uint4 w_packed = w_vecs[c], b_packed = b_vecs[c], packed;
    const T* w = reinterpret_cast<const T*>(&w_packed);
    const T* b = reinterpret_cast<const T*>(&b_packed);
    T* o = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int j = 0; j < E; ++j) o[j] = from_float<T>((v[i][j] - mean) * rstd * to_float(w[j]) + to_float(b[j]));
    out_row[c] = packed;
  }
}

// Entry points layer_norm_v{VECS}_{f32,f16,bf16}: the launcher picks the smallest VECS that
// holds the row (fewer registers, more warps resident).
#define LAYER_NORM_VECS(NAME, T, VECS)                                                             \
  extern "C" __global__ void layer_norm_v##VECS##_##NAME(T* out, T* residual, const T* x,          \
                                                         const T* weight, const T* bias, long rows, \
                                                         int hidden, float eps, int has_residual) { \
    pdl_begin(); layer_norm<T, VECS>(out, residual, x, weight, bias, rows, hidden, eps, has_residual);        \
  }
#define LAYER_NORM(NAME, T) \
  LAYER_NORM_VECS(NAME, T, 2) LAYER_NORM_VECS(NAME, T, 4) LAYER_NORM_VECS(NAME, T, 8) LAYER_NORM_VECS(NAME, T, 16)
MM_FOR_EACH_DTYPE(LAYER_NORM)
