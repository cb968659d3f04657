// Rotary embedding applied in place to q [num_tokens, num_heads, head_dim] and k (same layout,
// num_kv_heads), given each token's cos/sin [num_tokens, head_dim / 2] (already rounded to T).
// The cos/sin come from RotaryEmbedding.cos_sin (gpu_worker/layers/rotary.py), which owns the
// 1-D and M-RoPE position logic, so one kernel serves both. Rounds as torch does in T:
//   x1' = x1*cos - x2*sin,  x2' = x2*cos + x1*sin  (each product rounded, then the sum).
#include "common.cuh"

// One rotated pair (x1 at j, x2 at j + half of a head), rounded as torch does in T.
template <typename T>
__device__ __forceinline__ void rotate_pair(T x1_in, T x2_in, T cos_j, T sin_j, T& y1, T& y2) {
  const float c = to_float(cos_j), s = to_float(sin_j);
  const float x1 = to_float(x1_in), x2 = to_float(x2_in);
  const float a = to_float(from_float<T>(x1 * c)), b = to_float(from_float<T>(-x2 * s));
  const float e = to_float(from_float<T>(x2 * c)), f = to_float(from_float<T>(x1 * s));
  y1 = from_float<T>(a + b);
  y2 = from_float<T>(e + f);
}

template <typename T>
__device__ void rotate(T* __restrict__ x, int num_heads, const T* __restrict__ cos_row,
                       const T* __restrict__ sin_row, int half) {
  for (int i = threadIdx.x; i < num_heads * half; i += blockDim.x) {
    const int head = i / half, j = i % half;
    T* h = x + (long)head * 2 * half;
    rotate_pair<T>(h[j], h[j + half], cos_row[j], sin_row[j], h[j], h[j + half]);
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
    pdl_begin(); rotary<T>(q, k, cos, sin, num_heads, num_kv_heads, head_dim);                                \
  }
MM_FOR_EACH_DTYPE(ROTARY)

// The decoder's rotary and cache write in one pass over the fused QKV projection
// [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]: q rotated into q_out [num_tokens,
// num_heads, head_dim], k rotated and v copied into slot slot_mapping[t] of the paged cache
// [2, num_blocks, block_size, num_kv_heads, head_dim] (a negative slot, padding, writes no K/V).
// Where the unfused path made q, k and v contiguous (three copies), rotated q and k in place and
// wrote the cache (five kernels), this reads the projection once. Same arithmetic as `rotary`.
// References: RotaryEmbedding.apply then write_kv_cache (gpu_worker/layers/). One block per token.
template <typename T>
__device__ void rotary_kv_cache(T* __restrict__ q_out, T* __restrict__ cache, const T* __restrict__ qkv,
                                const T* __restrict__ cos, const T* __restrict__ sin,
                                const long* __restrict__ slot_mapping, long v_offset, int num_heads,
                                int num_kv_heads, int head_dim) {
  const long token = blockIdx.x;
  const int half = head_dim / 2;
  const int q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const T* row = qkv + token * (q_size + 2 * kv_size);  // q heads, then k heads, then v heads
  const T* cos_row = cos + token * half;
  const T* sin_row = sin + token * half;
  const long slot = slot_mapping[token];
  T* q_row = q_out + token * q_size;
  for (int i = threadIdx.x; i < (num_heads + num_kv_heads) * half; i += blockDim.x) {
    const int head = i / half, j = i % half;  // q's heads, then k's
    const T* h = row + head * head_dim;
    T y1, y2;
    rotate_pair<T>(h[j], h[j + half], cos_row[j], sin_row[j], y1, y2);
    if (head < num_heads) {
      q_row[head * head_dim + j] = y1;
      q_row[head * head_dim + j + half] = y2;
    } else if (slot >= 0) {
      T* k_head = cache + slot * kv_size + (head - num_heads) * head_dim;
      k_head[j] = y1;
      k_head[j + half] = y2;
    }
  }
  if (slot < 0) return;
  const T* v_row = row + q_size + kv_size;
  for (int i = threadIdx.x; i < kv_size; i += blockDim.x) cache[v_offset + slot * kv_size + i] = v_row[i];
}

#define ROTARY_KV_CACHE(NAME, T)                                                                   \
  extern "C" __global__ void rotary_kv_cache_##NAME(T* q_out, T* cache, const T* qkv, const T* cos, \
                                                    const T* sin, const long* slot_mapping,        \
                                                    long v_offset, int num_heads,                  \
                                                    int num_kv_heads, int head_dim) {              \
    pdl_begin();                                                                                   \
    rotary_kv_cache<T>(q_out, cache, qkv, cos, sin, slot_mapping, v_offset, num_heads,             \
                       num_kv_heads, head_dim);                                                    \
  }
MM_FOR_EACH_DTYPE(ROTARY_KV_CACHE)

// The Qwen2-VL ViT's 2-D rotary, in place on the fused QKV output [num_tokens, 3, num_heads,
// head_dim] (q and k are its first two thirds, so no copy is made). cos/sin [num_tokens,
// head_dim / 2] stay float32 and the rotation is computed in float32 and rounded once, as
// transformers' apply_rotary_pos_emb_vision does. One block per token; a thread rotates two
// adjacent pairs (j, j+1 with j+half, j+half+1) of one q or k head with 4-byte loads (head_dim a
// multiple of 4). 32-bit index math: a flat 64-bit index's division cost more than the memory
// traffic (1.2 TB/s on an H200, where the data moves at three times that).
template <typename T> struct alignas(2 * sizeof(T)) Two { T a, b; };

template <typename T>
__device__ void rotary_vision(T* __restrict__ qkv, const float* __restrict__ cos,
                              const float* __restrict__ sin, int num_heads, int head_dim) {
  const long token = blockIdx.x;
  const int half = head_dim / 2, pairs = half / 2;  // pairs of adjacent elements per half-head
  T* base = qkv + token * 3 * num_heads * head_dim;
  const float2* cos2 = reinterpret_cast<const float2*>(cos + token * half);
  const float2* sin2 = reinterpret_cast<const float2*>(sin + token * half);
  for (int i = threadIdx.x; i < 2 * num_heads * pairs; i += blockDim.x) {
    const int head = i / pairs, p = i % pairs;  // q's heads, then k's
    Two<T>* lo = reinterpret_cast<Two<T>*>(base + head * head_dim) + p;
    Two<T>* hi = reinterpret_cast<Two<T>*>(base + head * head_dim + half) + p;
    const float2 c = cos2[p], s = sin2[p];
    const Two<T> x1 = *lo, x2 = *hi;
    const float x1a = to_float(x1.a), x1b = to_float(x1.b), x2a = to_float(x2.a), x2b = to_float(x2.b);
    *lo = Two<T>{from_float<T>(x1a * c.x - x2a * s.x), from_float<T>(x1b * c.y - x2b * s.y)};
    *hi = Two<T>{from_float<T>(x2a * c.x + x1a * s.x), from_float<T>(x2b * c.y + x1b * s.y)};
  }
}

#define ROTARY_VISION(NAME, T)                                                                     \
  extern "C" __global__ void rotary_vision_##NAME(T* qkv, const float* cos, const float* sin,      \
                                                  int num_heads, int head_dim) {                   \
    pdl_begin(); rotary_vision<T>(qkv, cos, sin, num_heads, head_dim);                                        \
  }
MM_FOR_EACH_DTYPE(ROTARY_VISION)
