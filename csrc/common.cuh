// Shared helpers of the runtime's kernels: float <-> storage-type conversions and a block sum.
// Compiled with NVRTC (gpu_worker/kernels.py); every kernel computes in float32 and rounds once.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Sum of `value` over the warp; every lane gets it.
__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

// Sum of `value` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  const int num_warps = blockDim.x / 32;
  value = lane < num_warps ? warp_sums[lane] : 0.f;
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  __syncthreads();  // warp_sums may be reused by a second call
  return value;
}

// Programmatic dependent launch (sm_90+). Inside a CUDA graph, gpu_worker/kernels.py launches
// every kernel of csrc/ allowed to start before the kernel ahead of it in the stream has ended,
// so its launch and ramp-up hide under that kernel's tail (at batch 1 a decode step is some 250
// short kernels). pdl_wait() returns once the kernel ahead has ended and its writes are visible:
// a kernel calls it before it reads an earlier kernel's output or writes anything, so starting
// early never shows it a half-written input nor lets it overwrite one still being read; and since
// every kernel waits, "the kernel ahead has ended" covers all kernels before it. Only the weight
// loads of csrc/gemv.cu (nothing writes weights) come before. pdl_launch_dependents() lets the
// next kernel start. Outside a graph, or launched the usual way, both do nothing.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_begin() {
  pdl_wait();
  pdl_launch_dependents();
}

// One extern "C" entry point per storage type: NAME_f32, NAME_f16, NAME_bf16.
#define MM_FOR_EACH_DTYPE(MACRO) MACRO(f32, float) MACRO(f16, __half) MACRO(bf16, __nv_bfloat16)
