// SiLU-and-mul over a fused gate-up projection: out[i, j] = silu(in[i, j]) * in[i, d + j].
// Reference: gpu_worker/layers/activation.py (SiluAndMul). One block per token row.
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
  extern "C" __global__ void silu_and_mul_##NAME(T* out, const T* in, int d) { silu_and_mul<T>(out, in, d); }
MM_FOR_EACH_DTYPE(SILU_AND_MUL)
