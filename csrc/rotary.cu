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

// The Qwen2-VL ViT's 2-D rotary, in place on the fused QKV output [num_tokens, 3, num_heads,
// head_dim] (q and k are its first two thirds, so no copy is made). cos/sin [num_tokens,
// head_dim / 2] stay float32 and the rotation is computed in float32 and rounded once, as
// transformers' apply_rotary_pos_emb_vision does. One thread per rotated pair, flat over
// (token, q/k head, j): consecutive threads touch consecutive elements.
template <typename T>
__device__ void rotary_vision(T* __restrict__ qkv, const float* __restrict__ cos,
                              const float* __restrict__ sin, long num_tokens, int num_heads,
                              int head_dim) {
  const int half = head_dim / 2;
  const long per_token = 2L * num_heads * half;  // q's heads, then k's
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= num_tokens * per_token) return;
  const long token = i / per_token;
  const int rest = i % per_token, head = rest / half, j = rest % half;
  T* h = qkv + token * 3 * num_heads * head_dim + (long)head * head_dim;
  const float c = cos[token * half + j], s = sin[token * half + j];
  const float x1 = to_float(h[j]), x2 = to_float(h[j + half]);
  h[j] = from_float<T>(x1 * c - x2 * s);
  h[j + half] = from_float<T>(x2 * c + x1 * s);
}

#define ROTARY_VISION(NAME, T)                                                                     \
  extern "C" __global__ void rotary_vision_##NAME(T* qkv, const float* cos, const float* sin,      \
                                                  long num_tokens, int num_heads, int head_dim) {  \
    rotary_vision<T>(qkv, cos, sin, num_tokens, num_heads, head_dim);                              \
  }
MM_FOR_EACH_DTYPE(ROTARY_VISION)
