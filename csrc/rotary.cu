// Rotary embedding applied in place to q [num_tokens, num_heads, head_dim] and k (same layout,
// num_kv_heads), given each token's cos/sin [num_tokens, head_dim / 2] (already rounded to T).
// The cos/sin come from RotaryEmbedding.cos_sin (gpu_worker/layers/rotary.py), which owns the
// 1-D and M-RoPE position logic, so one kernel serves both. Rounds as torch does in T:
//   x1' = x1*cos - x2*sin,  x2' = x2*cos + x1*sin  (each product rounded, then the sum).
#include "common.cuh"

template <typename T>
__device__ void rotate(T* __restrict__ x, int num_heads, const T* __restrict__ cos_row,
                       const T* __restrict__ sin_row, int half) {
  for (int i = threadIdx.x; i < num_heads * half; i += blockDim.x) {
    const int head = i / half, j = i % half;
    T* h = x + (long)head * 2 * half;
    const float c = to_float(cos_row[j]), s = to_float(sin_row[j]);
    const float x1 = to_float(h[j]), x2 = to_float(h[j + half]);
    const float a = to_float(from_float<T>(x1 * c)), b = to_float(from_float<T>(-x2 * s));
    const float e = to_float(from_float<T>(x2 * c)), f = to_float(from_float<T>(x1 * s));
    h[j] = from_float<T>(a + b);
    h[j + half] = from_float<T>(e + f);
  }
}

template <typename T>
__device__ void rotary(T* q, T* k, const T* cos, const T* sin, int num_heads, int num_kv_heads,
                       int head_dim) {
  const long token = blockIdx.x;
  const int half = head_dim / 2;
  rotate<T>(q + token * num_heads * head_dim, num_heads, cos + token * half, sin + token * half, half);
  rotate<T>(k + token * num_kv_heads * head_dim, num_kv_heads, cos + token * half, sin + token * half, half);
}

#define ROTARY(NAME, T)                                                                            \
  extern "C" __global__ void rotary_##NAME(T* q, T* k, const T* cos, const T* sin, int num_heads,  \
                                           int num_kv_heads, int head_dim) {                       \
    rotary<T>(q, k, cos, sin, num_heads, num_kv_heads, head_dim);                                  \
  }
MM_FOR_EACH_DTYPE(ROTARY)
