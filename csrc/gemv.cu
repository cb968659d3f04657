// The projections of a small decode batch (1 or 2 token rows), as weight streams:
//   with has_norm:  residual_out <- to_T(x + residual);  h <- RMSNorm(residual_out)
//                   (as csrc/norm.cu's rms_norm; without has_residual x is normalized alone and
//                   residual_out is not written)
//   without:        h <- x
//   out <- to_T(h @ weight^T + bias)                                   (silu_pairs == 0)
//   out <- silu_and_mul(to_T(h @ weight^T + bias))                      (silu_pairs == 1)
// weight is an nn.Linear's [N, K]; with silu_pairs its first N / 2 rows are the gate's and the
// rest the up projection's (MergedLinear), and out is [M, N / 2]: the SiLU-and-mul of
// csrc/activation.cu, rounded as it rounds.
//
// Why: at batch 1 a decode step reads every weight once and does two FLOPs a weight; its time is
// how close each projection gets to streaming its weight at the memory's rate. cuBLAS's GEMV and
// the norm and activation kernels around it are separate launches, each with its ramp-up and
// tail. Here the norm (and the activation) ride in the projection's kernel, and the weight is
// spread so every SM has many 16-byte loads in flight from the start:
//   - a warp computes a group of R weight rows (R output rows, or R / 2 gate rows and their up
//     rows), each lane loading V vectors of every row per step (R * V loads in flight), and the
//     normed rows are read from shared memory once per R weight rows;
//   - when the rows alone give too few warps to fill the GPU (the O projection, the down
//     projection), `parts` warps of a block share a group, each over a slice of K, and their
//     float sums meet in shared memory;
//   - the first step's weight loads are issued before the norm, and in a CUDA graph before the
//     kernel ahead has ended (csrc/common.cuh's pdl_wait): they depend on nothing.
// With the norm, every block normalizes the M rows itself into shared memory (M * K elements
// read from L2) and block 0 writes the summed residual.
// References: RMSNorm then nn.Linear (then SiluAndMul), gpu_worker/layers/. fp16/bf16, K a
// multiple of 16 / sizeof(T), weight 16-byte aligned. Grid: ceil(groups * parts / GEMV_WARPS)
// blocks of 32 * GEMV_WARPS threads; GEMV_WARPS * R * M * 4 bytes of dynamic shared memory, plus
// M * K * sizeof(T) with the norm (gpu_worker/kernels.py's _gemv).
#include "common.cuh"

constexpr int GEMV_WARPS = 8;  // GEMV_WARPS in gpu_worker/kernels.py

template <typename T, int M, int R, int V>
__device__ void gemv(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                     const T* __restrict__ residual, const T* __restrict__ norm_weight, float eps,
                     const T* __restrict__ weight, const T* __restrict__ bias, int K, int N,
                     int has_norm, int has_residual, int silu_pairs, int parts) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  float* sums = reinterpret_cast<float*>(gemv_smem);  // [GEMV_WARPS, R, M]
  T* normed = reinterpret_cast<T*>(sums + GEMV_WARPS * R * M);  // [M, K] (with has_norm)

  constexpr int E = 16 / sizeof(T);  // elements per 16-byte vector
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int num_out = silu_pairs ? N / 2 : N;
  const int out_rows = silu_pairs ? R / 2 : R;  // output rows a group
  const int groups_per_block = GEMV_WARPS / parts;
  const int group = blockIdx.x * groups_per_block + warp / parts;
  const int num_vecs = K / E;
  const int span = (num_vecs + parts - 1) / parts;
  const int begin = (warp % parts) * span;
  const int end = min(num_vecs, begin + span);

  // This warp's weight rows; a row past the end reads row 0 (its sums are never written).
  const uint4* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int o = group * out_rows + (r % out_rows);  // the output row it feeds
    const long n = silu_pairs && r >= out_rows ? o + num_out : o;
    rows[r] = reinterpret_cast<const uint4*>(weight + (o < num_out ? n : 0) * K);
  }
  uint4 w[R][V];
  auto load_step = [&](int first) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int c = first + 32 * v;
#pragma unroll
      for (int r = 0; r < R; ++r) w[r][v] = c < end ? rows[r][c] : make_uint4(0, 0, 0, 0);
    }
  };
  load_step(begin + lane);
  pdl_begin();  // the weight loads above read nothing an earlier kernel writes

  // The norm, each row in turn (block_sum synchronizes the block). Without one the rows are
  // read where they are: every warp of an SM reads the same vectors, so L1 serves them (a copy
  // to shared memory would take M * K * 2 bytes a block: 76 KB at 2 rows of Qwen2-VL-7B's down
  // projection, which would cap an SM at two blocks).
  const T* h_rows = has_norm ? normed : x;
  for (int m = 0; m < M && has_norm; ++m) {
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

  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  for (int first = begin + lane; first < end; first += 32 * V) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int c = first + 32 * v;
      if (c >= end) continue;  // the slice's last step is partial
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 hv = reinterpret_cast<const uint4*>(h_rows + m * K)[c];
        const T* hm = reinterpret_cast<const T*>(&hv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const T* wr = reinterpret_cast<const T*>(&w[r][v]);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r][m] += to_float(wr[e]) * to_float(hm[e]);
        }
      }
    }
    if (first + 32 * V < end) load_step(first + 32 * V);
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float s = warp_sum(acc[r][m]);
      if (lane == 0) sums[(warp * R + r) * M + m] = s;
    }
  __syncthreads();

  // One thread an output element: the parts' sums, the bias, the activation.
  for (int t = threadIdx.x; t < groups_per_block * out_rows * M; t += blockDim.x) {
    const int local = t / (out_rows * M), r = t / M % out_rows, m = t % M;
    const int n = (blockIdx.x * groups_per_block + local) * out_rows + r;
    if (n >= num_out) continue;
    float a = 0.f, b = 0.f;
    for (int p = 0; p < parts; ++p) {
      const float* s = sums + (local * parts + p) * R * M;
      a += s[r * M + m];
      if (silu_pairs) b += s[(r + out_rows) * M + m];
    }
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

#define GEMV_MRV(NAME, T, M, R, V)                                                                 \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                    \
      gemv_##NAME##_m##M##_r##R##_v##V(T* out, T* residual_out, const T* x, const T* residual,     \
                                       const T* norm_weight, float eps, const T* weight,           \
                                       const T* bias, int K, int N, int has_norm,                  \
                                       int has_residual, int silu_pairs, int parts) {              \
    gemv<T, M, R, V>(out, residual_out, x, residual, norm_weight, eps, weight, bias, K, N,         \
                     has_norm, has_residual, silu_pairs, parts);                                   \
  }
#define GEMV_M(NAME, T, M)                                                                         \
  GEMV_MRV(NAME, T, M, 2, 2) GEMV_MRV(NAME, T, M, 2, 4) GEMV_MRV(NAME, T, M, 4, 2)                 \
      GEMV_MRV(NAME, T, M, 4, 4)
#define GEMV(NAME, T) GEMV_M(NAME, T, 1) GEMV_M(NAME, T, 2)  // GEMV_MAX_TOKENS in kernels.py
GEMV(f16, __half)
GEMV(bf16, __nv_bfloat16)
