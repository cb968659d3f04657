// Activations of the MLPs: SiLU-and-mul over a fused gate-up projection (the decoders) and
// QuickGELU in place (the Qwen2-VL ViT). References: gpu_worker/layers/activation.py.
#include "common.cuh"

template <typename T>
__device__ void silu_and_mul(T* __restrict__ out, const T* __restrict__ in, int d) {
  const long row = blockIdx.x;
  const T* gate = in + row * 2 * d;
  const T* up = gate + d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float g = to_float(gate[j]);
    // Rounded to T between the two ops, as torch's F.silu(gate) * up does in T.
    const float silu = to_float(from_float<T>(g / (1.f + __expf(-g))));
    out[row * d + j] = from_float<T>(silu * to_float(up[j]));
  }
}

#define SILU_AND_MUL(NAME, T) \
  extern "C" __global__ void silu_and_mul_##NAME(T* out, const T* in, int d) { pdl_begin(); silu_and_mul<T>(out, in, d); }
MM_FOR_EACH_DTYPE(SILU_AND_MUL)

// QuickGELU, x * sigmoid(1.702 x), in place over n elements: one read and one write, where
// torch's three ops (mul, sigmoid, mul) read and write the 5120-wide ViT activations three times.
// 16-byte vectors (x is 16-byte aligned), grid-stride; computed in float32 and rounded once.
template <typename T>
__device__ __forceinline__ T quick_gelu_one(T x) {
  const float v = to_float(x);
  return from_float<T>(v / (1.f + __expf(-1.702f * v)));
}

template <typename T>
__device__ void quick_gelu(T* __restrict__ x, long n) {
  constexpr int kVec = 16 / sizeof(T);
  const long stride = (long)gridDim.x * blockDim.x;
  const long first = blockIdx.x * (long)blockDim.x + threadIdx.x;
  uint4* vectors = reinterpret_cast<uint4*>(x);
  const long num_vectors = n / kVec;
  for (long i = first; i < num_vectors; i += stride) {
    uint4 packed = vectors[i];
    T* e = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int j = 0; j < kVec; ++j) e[j] = quick_gelu_one(e[j]);
    vectors[i] = packed;
  }
  for (long i = num_vectors * kVec + first; i < n; i += stride) x[i] = quick_gelu_one(x[i]);
}

#define QUICK_GELU(NAME, T) \
  extern "C" __global__ void quick_gelu_##NAME(T* x, long n) { pdl_begin(); quick_gelu<T>(x, n); }
MM_FOR_EACH_DTYPE(QUICK_GELU)
