// RMSNorm fused into the projection after it, for the few token rows of a small decode batch:
//   residual_out <- to_T(x + residual);  h <- RMSNorm(residual_out) (as csrc/norm.cu's rms_norm)
//   out <- to_T(h @ weight^T + bias)                                   (silu_pairs == 0)
//   out <- silu_and_mul(to_T(h @ weight^T + bias))                      (silu_pairs == 1)
// With has_residual == 0, x is normalized alone and residual_out is not written. weight is an
// nn.Linear's [N, K]; with silu_pairs its first N / 2 rows are the gate's and the rest the up
// projection's (MergedLinear), and out is [M, N / 2]: the SiLU-and-mul of csrc/activation.cu,
// rounded as it rounds.
//
// Why: at batch 1 a decode layer is a chain of small kernels whose launch gaps and ramp-up, not
// their bytes, set its time. This takes the norm (and the activation) out of the chain. Every
// block normalizes the M rows itself into shared memory (M * K elements, a few KB read from L2)
// and block 0 writes the summed residual; then each warp computes GEMV_ROWS output rows,
// streaming the weight rows with 16-byte loads and accumulating in float32.
// References: RMSNorm then nn.Linear (then SiluAndMul), gpu_worker/layers/. M of 1 to 4, fp16/bf16,
// K a multiple of 16 / sizeof(T), weight 16-byte aligned. Grid: ceil(N_out / (GEMV_WARPS *
// GEMV_ROWS)) blocks of 32 * GEMV_WARPS threads, M * K * sizeof(T) bytes of dynamic shared memory.
#include "common.cuh"

constexpr int GEMV_WARPS = 8;  // GEMV_WARPS in gpu_worker/kernels.py
constexpr int GEMV_ROWS = 2;   // output rows per warp; GEMV_ROWS there

template <typename T, int M>
__device__ void norm_gemv(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                          const T* __restrict__ residual, const T* __restrict__ norm_weight,
                          float eps, const T* __restrict__ weight, const T* __restrict__ bias, int K,
                          int N, int has_residual, int silu_pairs) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  T* normed = reinterpret_cast<T*>(gemv_smem);  // [M, K]

  // The norm, each row in turn (block_sum synchronizes the block).
  for (int m = 0; m < M; ++m) {
    const T* x_row = x + (long)m * K;
    T* h = normed + m * K;
    float sum_sq = 0.f;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      float v = to_float(x_row[j]);
      if (has_residual) {
        const T summed = from_float<T>(v + to_float(residual[(long)m * K + j]));
        if (blockIdx.x == 0) residual_out[(long)m * K + j] = summed;
        v = to_float(summed);
      }
      h[j] = from_float<T>(v);  // exact: v is a T already
      sum_sq += v * v;
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / K + eps);
    for (int j = threadIdx.x; j < K; j += blockDim.x) {  // each thread its own elements
      const float v = to_float(h[j]);
      h[j] = from_float<T>(to_float(norm_weight[j]) * to_float(from_float<T>(v * inv_rms)));
    }
  }
  __syncthreads();

  constexpr int E = 16 / sizeof(T);  // elements per 16-byte vector
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int num_out = silu_pairs ? N / 2 : N;
  const int num_vecs = K / E;
  const int first = (blockIdx.x * GEMV_WARPS + warp) * GEMV_ROWS;
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; ++r) {
    const int n = first + r;
    if (n >= num_out) break;
    float acc[2][M];
#pragma unroll
    for (int p = 0; p < 2; ++p)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[p][m] = 0.f;
    for (int p = 0; p < 1 + silu_pairs; ++p) {  // the row, or the gate's row and the up row
      const uint4* w_row = reinterpret_cast<const uint4*>(weight + (long)(n + p * num_out) * K);
#pragma unroll 4
      for (int c = lane; c < num_vecs; c += 32) {
        const uint4 packed = w_row[c];
        const T* w = reinterpret_cast<const T*>(&packed);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const uint4 hv = reinterpret_cast<const uint4*>(normed + m * K)[c];
          const T* hm = reinterpret_cast<const T*>(&hv);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[p][m] += to_float(w[e]) * to_float(hm[e]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float a = warp_sum(acc[0][m]), b = silu_pairs ? warp_sum(acc[1][m]) : 0.f;
      if (lane != 0) continue;
      const T y = from_float<T>(a + (bias ? to_float(bias[n]) : 0.f));
      if (!silu_pairs) {
        out[(long)m * num_out + n] = y;
        continue;
      }
      const float g = to_float(y);
      const float up = to_float(from_float<T>(b + (bias ? to_float(bias[n + num_out]) : 0.f)));
      const float silu = to_float(from_float<T>(g / (1.f + __expf(-g))));
      out[(long)m * num_out + n] = from_float<T>(silu * up);
    }
  }
}

#define NORM_GEMV_M(NAME, T, M)                                                                    \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                    \
      norm_gemv_##NAME##_m##M(T* out, T* residual_out, const T* x, const T* residual,              \
                              const T* norm_weight, float eps, const T* weight, const T* bias,     \
                              int K, int N, int has_residual, int silu_pairs) {                    \
    norm_gemv<T, M>(out, residual_out, x, residual, norm_weight, eps, weight, bias, K, N,          \
                    has_residual, silu_pairs);                                                     \
  }
#define NORM_GEMV(NAME, T)                                                                         \
  NORM_GEMV_M(NAME, T, 1) NORM_GEMV_M(NAME, T, 2) NORM_GEMV_M(NAME, T, 3) NORM_GEMV_M(NAME, T, 4)
NORM_GEMV(f16, __half)
NORM_GEMV(bf16, __nv_bfloat16)
