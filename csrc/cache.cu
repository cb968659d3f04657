// Reshape-and-cache: token t's K and V go to flat slot slot_mapping[t] of the paged cache
// [2, num_blocks, block_size, num_kv_heads, head_dim]; a negative slot (padding) is skipped.
// Reference: gpu_worker/layers/attention.py (write_kv_cache). One block per token.
#include "common.cuh"

template <typename T>
__device__ void write_kv_cache(T* __restrict__ cache, const T* __restrict__ k, const T* __restrict__ v,
                               const long* __restrict__ slot_mapping, long v_offset, int width) {
  const long token = blockIdx.x;
  const long slot = slot_mapping[token];
  if (slot < 0) return;
  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    cache[slot * width + j] = k[token * width + j];
    cache[v_offset + slot * width + j] = v[token * width + j];
  }
}

#define WRITE_KV_CACHE(NAME, T)                                                                  \
  extern "C" __global__ void write_kv_cache_##NAME(T* cache, const T* k, const T* v,             \
                                                   const long* slot_mapping, long v_offset,      \
                                                   int width) {                                  \
    pdl_begin(); write_kv_cache<T>(cache, k, v, slot_mapping, v_offset, width);                            \
  }
MM_FOR_EACH_DTYPE(WRITE_KV_CACHE)
