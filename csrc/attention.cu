// Paged attention over the KV cache [2, num_blocks, block_size, num_kv_heads, head_dim], one kernel
// for prefill chunks and decodes (reference: gpu_worker/layers/attention.py, TorchAttentionBackend).
//
// Work: a CTA takes one tile of queries of one request and one KV head. The tile's rows are
// (token, query head of the KV head's group) pairs, token-major: GQA heads that share K/V share
// the CTA, so a decode of a model with 6 query heads per KV head fills 6 rows, and K/V are read
// once per group, not once per head. `attention_plan` lists the tiles of the step (a request with
// q query tokens has ceil(q / tokens_per_tile) of them) on the device, so nothing here needs the
// host and CUDA graphs capture it.
//
// Each CTA runs FlashAttention-2's loop: 4 (or 8) warps own 16 rows each; K/V tiles of 64 keys
// stream through shared memory (cp.async, STAGES stages), S = Q K^T and O += P V run on tensor cores
// (mma.sync m16n8k16, fp32 accumulators) with an online softmax in registers. Keys past a
// query's position (causal) or past the tile's range are masked. Long contexts with few tiles
// split the keys over gridDim.z CTAs ("split-K" / flash-decoding): each writes its rows' partial
// output and log-sum-exp in fp32 and `attention_merge` combines them.
//
// Three instantiations: 64 query rows and two stages (prefill chunks, mixed steps); 128 rows, 8
// warps and two stages (prefill-heavy GQA steps: 8 warps share each K/V tile, so shared memory
// fills half as often a FLOP; paged_attention.py's tile_rows says when); and for steps of decodes
// only 16 rows (one warp's: a decode's GQA group) and three stages. A decode tile fills one
// warp's rows whatever the tile size, so the larger tile only held shared memory that could
// carry keys: with 16 rows, two CTAs an SM keep two tiles of K/V each in flight, not one, and a
// decode step streams the cache at a rate its latency, not its compute, had capped.
#include "common.cuh"

constexpr int ATTN_ROWS = 64;      // query rows per CTA (4 warps x 16); ATTN_ROWS in paged_attention.py
constexpr int WIDE_ROWS = 128;     // query rows per CTA of paged_wide (8 warps x 16); WIDE_ROWS there
constexpr int DECODE_ROWS = 16;    // query rows per CTA of the decode kernel; DECODE_ROWS there
constexpr int ATTN_KEYS = 64;      // keys per K/V tile
constexpr int ATTN_THREADS = 128;
constexpr int SMEM_PAD = 8;        // elements of padding per shared row: conflict-free ldmatrix
#define NEG_INF (-__int_as_float(0x7f800000))  // NVRTC has no <cmath> INFINITY

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; with valid == false the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x16, row-major fragment) * b (16x8, col-major fragment), fp32 accumulate. One body
// for both types: the PTX instruction differs only in the operand type's name.
#define MMA16816(T, PTX_TYPE)                                                                      \
  template <> __device__ __forceinline__ void mma16816<T>(float (&c)[4], const unsigned (&a)[4],   \
                                                          unsigned b0, unsigned b1) {              \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE                     \
                 ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                    \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                   \
  }
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4],
                                                               unsigned b0, unsigned b1);
MMA16816(__nv_bfloat16, "bf16")
MMA16816(__half, "f16")

template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// Lists the step's query tiles: tiles[2 * t] = request, tiles[2 * t + 1] = first query token of
// the tile within the request; unused entries up to `capacity` get request -1 (their CTAs exit).
// One CTA of 1024 threads scans the per-request tile counts in chunks of 1024 requests.
extern "C" __global__ void attention_plan(int* __restrict__ tiles, const long* __restrict__ query_start_loc,
                                          int num_reqs, int tokens_per_tile, int capacity) {
  __shared__ int scan[1024];
  __shared__ int carry;
  pdl_begin();
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < num_reqs; base += blockDim.x) {
    const int r = base + threadIdx.x;
    const int count =
        r < num_reqs ? (int)((query_start_loc[r + 1] - query_start_loc[r] + tokens_per_tile - 1) / tokens_per_tile) : 0;
    scan[threadIdx.x] = count;
    __syncthreads();
    for (int offset = 1; offset < blockDim.x; offset <<= 1) {  // inclusive Hillis-Steele scan
      const int add = threadIdx.x >= offset ? scan[threadIdx.x - offset] : 0;
      __syncthreads();
      scan[threadIdx.x] += add;
      __syncthreads();
    }
    const int first = carry + scan[threadIdx.x] - count;
    for (int i = 0; i < count && first + i < capacity; ++i) {
      tiles[2 * (first + i)] = r;
      tiles[2 * (first + i) + 1] = i * tokens_per_tile;
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry += scan[threadIdx.x];
    __syncthreads();
  }
  for (int t = carry + threadIdx.x; t < capacity; t += blockDim.x) tiles[2 * t] = -1;
}

struct AttentionParams {
  void* out;               // [num_tokens, num_heads, head_dim], T
  float* partial_out;      // [num_splits, num_tokens, num_heads, head_dim] (num_splits > 1)
  float* partial_lse;      // [num_splits, num_tokens, num_heads], log2 domain
  const void* q;           // [num_tokens, num_heads, head_dim], T
  const void* kv_cache;    // K at 0, V at v_offset elements
  const long* query_start_loc;
  const long* seq_lens;
  const long* block_tables;  // [num_reqs, max_blocks]
  const int* tiles;
  long v_offset;
  int num_tokens, num_heads, num_kv_heads, max_blocks, block_size_log2;
  float scale_log2;        // softmax scale * log2(e): the kernel works with exp2
};

template <typename T, int D, int ROWS, int STAGES, int THREADS>
__device__ void paged_attention(const AttentionParams& p) {
  constexpr int ROW = D + SMEM_PAD;   // shared row stride, elements
  constexpr int CHUNKS = D / 8;       // 16-byte chunks per row
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);            // [ROWS][ROW]
  T* k_smem = q_smem + ROWS * ROW;                       // [STAGES][ATTN_KEYS][ROW]
  T* v_smem = k_smem + STAGES * ATTN_KEYS * ROW;         // [STAGES][ATTN_KEYS][ROW]

  // Tiles in reverse: the plan lists each request's tiles first to last (several requests'
  // sorted by their keys: gpu_worker/paged_attention.py's tiles_by_keys), and a causal tile's
  // keys grow with its position, so the CTAs that start first are the longest and the last wave
  // holds short ones (FlashAttention's order for causal prefill); unused entries exit at once.
  const int tile = gridDim.x - 1 - blockIdx.x;
  const int req = p.tiles[2 * tile];
  if (req < 0) return;
  const int tile_start = p.tiles[2 * tile + 1];
  const int kv_head = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
  const int group = p.num_heads / p.num_kv_heads;
  const int tokens_per_tile = ROWS / group;
  const long q0 = p.query_start_loc[req];
  const int query_len = (int)(p.query_start_loc[req + 1] - q0);
  const int seq_len = (int)p.seq_lens[req];
  const int num_tile_tokens = min(tokens_per_tile, query_len - tile_start);
  const int num_rows = num_tile_tokens * group;
  const int first_pos = seq_len - query_len + tile_start;  // absolute position of the tile's first query
  // Keys [0, kv_end) are visible to some row; this split takes one 64-aligned slice of them.
  const int kv_end = first_pos + num_tile_tokens;
  const int per_split = ((kv_end + num_splits - 1) / num_splits + ATTN_KEYS - 1) / ATTN_KEYS * ATTN_KEYS;
  const int kv_lo = split * per_split, kv_hi = min(kv_end, kv_lo + per_split);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tig = lane % 4;  // mma fragment coordinates: row group, thread in group

  const T* q = static_cast<const T*>(p.q);
  const T* k_cache = static_cast<const T*>(p.kv_cache);
  const T* v_cache = k_cache + p.v_offset;
  const long* table = p.block_tables + (long)req * p.max_blocks;
  const int block_mask = (1 << p.block_size_log2) - 1;

  // Row m of the tile: token m / group, head kv_head * group + m % group.
  auto store_rows = [&](int m, int dim, float v0, float v1, float lse, bool write_lse) {
    if (m >= num_rows) return;
    const long token = q0 + tile_start + m / group;
    const int head = kv_head * group + m % group;
    const long idx = (token * p.num_heads + head) * D + dim;
    if (num_splits == 1) {
      *reinterpret_cast<unsigned*>(static_cast<T*>(p.out) + idx) = pack2<T>(v0, v1);
    } else {
      const long base = (long)split * p.num_tokens * p.num_heads * D;
      *reinterpret_cast<float2*>(p.partial_out + base + idx) = make_float2(v0, v1);
      if (write_lse) p.partial_lse[((long)split * p.num_tokens + token) * p.num_heads + head] = lse;
    }
  };

  if (kv_lo >= kv_hi) {  // an empty split (short context): -inf, which the merge skips
    for (int m = tid; m < num_rows; m += THREADS) {
      const long token = q0 + tile_start + m / group;
      p.partial_lse[((long)split * p.num_tokens + token) * p.num_heads + kv_head * group + m % group] = NEG_INF;
    }
    return;
  }

  // Q tile -> shared (rows past the tile are zeros).
  for (int i = tid; i < ROWS * CHUNKS; i += THREADS) {
    const int m = i / CHUNKS, c = i % CHUNKS;
    const bool valid = m < num_rows;
    const long token = q0 + tile_start + (valid ? m / group : 0);
    const int head = kv_head * group + (valid ? m % group : 0);
    cp_async16(q_smem + m * ROW + c * 8, q + (token * p.num_heads + head) * D + c * 8, valid);
  }
  auto load_kv = [&](int stage, int key0) {
    for (int i = tid; i < ATTN_KEYS * CHUNKS; i += THREADS) {
      const int j = i / CHUNKS, c = i % CHUNKS;
      const int pos = key0 + j;
      const bool valid = pos < kv_hi;
      const long slot = valid ? (table[pos >> p.block_size_log2] << p.block_size_log2) + (pos & block_mask) : 0;
      const long offset = (slot * p.num_kv_heads + kv_head) * D + c * 8;
      cp_async16(k_smem + (stage * ATTN_KEYS + j) * ROW + c * 8, k_cache + offset, valid);
      cp_async16(v_smem + (stage * ATTN_KEYS + j) * ROW + c * 8, v_cache + offset, valid);
    }
  };
  const int num_key_tiles = (kv_hi - kv_lo + ATTN_KEYS - 1) / ATTN_KEYS;
  // The first STAGES - 1 tiles (Q rides with the first); one commit group per tile, empty ones
  // included, so the wait below counts the same in every iteration.
#pragma unroll
  for (int t = 0; t < STAGES - 1; ++t) {
    if (t < num_key_tiles) load_kv(t, kv_lo + t * ATTN_KEYS);
    cp_async_commit();
  }

  const bool warp_active = warp * 16 < num_rows;
  // The absolute positions of this thread's two rows (g and g + 8 of the warp's 16).
  const int row0 = warp * 16 + g, row1 = row0 + 8;
  const int pos0 = first_pos + row0 / group, pos1 = first_pos + row1 / group;

  unsigned q_frag[D / 16][4];
  float o_acc[D / 8][4];
  float row_max[2] = {NEG_INF, NEG_INF}, row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;

  for (int t = 0; t < num_key_tiles; ++t) {
    const int key0 = kv_lo + t * ATTN_KEYS, stage = t % STAGES;
    // The stage this prefetch fills was last read in iteration t - 1, behind its final barrier.
    if (t + STAGES - 1 < num_key_tiles) load_kv((t + STAGES - 1) % STAGES, key0 + (STAGES - 1) * ATTN_KEYS);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();  // tile t has landed; the STAGES - 1 after it may be in flight
    __syncthreads();
    if (warp_active) {
      if (t == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          ldmatrix_x4(q_frag[kk], q_smem + (warp * 16 + (lane & 15)) * ROW + kk * 16 + (lane >> 4) * 8);
      }
      const T* ks = k_smem + stage * ATTN_KEYS * ROW;
      const T* vs = v_smem + stage * ATTN_KEYS * ROW;
      float s[ATTN_KEYS / 8][4];
#pragma unroll
      for (int n = 0; n < ATTN_KEYS / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < ATTN_KEYS / 16; ++np) {
          unsigned b[4];
          ldmatrix_x4(b, ks + (np * 16 + (lane & 7) + (lane >> 4) * 8) * ROW + kk * 16 + ((lane >> 3) & 1) * 8);
          mma16816<T>(s[2 * np], q_frag[kk], b[0], b[1]);
          mma16816<T>(s[2 * np + 1], q_frag[kk], b[2], b[3]);
        }
      }
      // Scale, mask, online softmax. Element (n, e): row (e < 2 ? row0 : row1), key n*8 + 2*tig + e%2.
      const bool needs_mask = key0 + ATTN_KEYS > kv_hi || key0 + ATTN_KEYS - 1 > first_pos;
      float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
      for (int n = 0; n < ATTN_KEYS / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + n * 8 + 2 * tig + (e & 1);
          float x = s[n][e] * p.scale_log2;
          if (needs_mask && (key >= kv_hi || key > (e < 2 ? pos0 : pos1))) x = NEG_INF;
          s[n][e] = x;
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
        }
      }
      float correction[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
        const float new_max = fmaxf(row_max[r], tile_max[r]);
        // A row that has seen only masked keys keeps max -inf: subtract 0, so exp2 gives 0, not NaN.
        const float base = new_max == NEG_INF ? 0.f : new_max;
        correction[r] = exp2f(row_max[r] - base);
        row_max[r] = new_max;
        tile_max[r] = base;
        row_sum[r] *= correction[r];
      }
#pragma unroll
      for (int n = 0; n < ATTN_KEYS / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = exp2f(s[n][e] - tile_max[e >> 1]);
          row_sum[e >> 1] += s[n][e];
        }
      }
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o_acc[n][0] *= correction[0];
        o_acc[n][1] *= correction[0];
        o_acc[n][2] *= correction[1];
        o_acc[n][3] *= correction[1];
      }
      // O += P V: P's accumulator layout is the A-fragment layout of the next mma (FA2's trick).
#pragma unroll
      for (int kk = 0; kk < ATTN_KEYS / 16; ++kk) {
        const unsigned a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          unsigned b[4];
          ldmatrix_x4_trans(b, vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW + np * 16 + (lane >> 4) * 8);
          mma16816<T>(o_acc[2 * np], a, b[0], b[1]);
          mma16816<T>(o_acc[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();
  if (!warp_active) return;

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
  }
  const float inv0 = row_sum[0] > 0.f ? 1.f / row_sum[0] : 0.f;
  const float inv1 = row_sum[1] > 0.f ? 1.f / row_sum[1] : 0.f;
  const float lse0 = row_sum[0] > 0.f ? row_max[0] + __log2f(row_sum[0]) : NEG_INF;
  const float lse1 = row_sum[1] > 0.f ? row_max[1] + __log2f(row_sum[1]) : NEG_INF;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int dim = n * 8 + 2 * tig;
    store_rows(row0, dim, o_acc[n][0] * inv0, o_acc[n][1] * inv0, lse0, dim == 0);
    store_rows(row1, dim, o_acc[n][2] * inv1, o_acc[n][3] * inv1, lse1, dim == 0);
  }
}

// Combines the splits: out = sum_i 2^(lse_i - max) o_i / sum_i 2^(lse_i - max). One CTA per
// (token, head), one thread per dim. The first warp reads all the splits' log-sum-exps at once
// and lists the live ones (an empty split, the tail of a short context, has -inf and wrote no
// output) with their weights in shared memory; each thread's loop over that list then issues
// independent loads. (A loop reading one split's values after another waited out a memory
// latency per split: 64 splits of a batch-1 decode cost tens of microseconds a layer.)
constexpr int MERGE_MAX_SPLITS = 64;  // MAX_SPLITS in gpu_worker/paged_attention.py

template <typename T>
__device__ void attention_merge(T* __restrict__ out, const float* __restrict__ partial_out,
                                const float* __restrict__ partial_lse, int num_splits, int num_tokens,
                                int num_heads, int head_dim) {
  __shared__ float weights[MERGE_MAX_SPLITS];
  __shared__ int live_splits[MERGE_MAX_SPLITS];
  __shared__ int num_live;
  __shared__ float weight_sum;
  const long token = blockIdx.x;
  const int head = blockIdx.y;
  const long row = token * num_heads + head, stride = (long)num_tokens * num_heads;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float lse[MERGE_MAX_SPLITS / 32];
    float max_lse = NEG_INF;
#pragma unroll
    for (int h = 0; h < MERGE_MAX_SPLITS / 32; ++h) {
      const int i = h * 32 + lane;
      lse[h] = i < num_splits ? partial_lse[i * stride + row] : NEG_INF;
      max_lse = fmaxf(max_lse, lse[h]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffff, max_lse, offset));
    int count = 0;
    float sum = 0.f;
#pragma unroll
    for (int h = 0; h < MERGE_MAX_SPLITS / 32; ++h) {
      const bool live = lse[h] != NEG_INF;
      const unsigned ballot = __ballot_sync(0xffffffff, live);
      if (live) {
        const int slot = count + __popc(ballot & ((1u << lane) - 1));
        weights[slot] = exp2f(lse[h] - max_lse);
        live_splits[slot] = h * 32 + lane;
        sum += weights[slot];
      }
      count += __popc(ballot);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (lane == 0) {
      num_live = count;
      weight_sum = sum;
    }
  }
  __syncthreads();
  const int live = num_live;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
#pragma unroll 8
    for (int j = 0; j < live; ++j) acc += weights[j] * partial_out[(live_splits[j] * stride + row) * head_dim + d];
    out[row * head_dim + d] = from_float<T>(weight_sum > 0.f ? acc / weight_sum : 0.f);
  }
}

#define PAGED_ATTENTION(NAME, T, D)                                                                \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                                       \
      paged_attention_##NAME##_d##D(const AttentionParams p) {                                     \
    pdl_begin(); paged_attention<T, D, ATTN_ROWS, 2, ATTN_THREADS>(p);                             \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(ATTN_THREADS)                                       \
      paged_decode_##NAME##_d##D(const AttentionParams p) {                                        \
    pdl_begin(); paged_attention<T, D, DECODE_ROWS, 3, ATTN_THREADS>(p);                           \
  }                                                                                                \
  extern "C" __global__ void __launch_bounds__(2 * ATTN_THREADS)                                   \
      paged_wide_##NAME##_d##D(const AttentionParams p) {                                          \
    pdl_begin(); paged_attention<T, D, WIDE_ROWS, 2, 2 * ATTN_THREADS>(p);                         \
  }
// 64/80/128: the served models; 16/32: the tiny test models, so they take the same path on GPU.
#define PAGED_ATTENTION_ALL_DIMS(NAME, T)                                                     \
  PAGED_ATTENTION(NAME, T, 16) PAGED_ATTENTION(NAME, T, 32) PAGED_ATTENTION(NAME, T, 64)      \
      PAGED_ATTENTION(NAME, T, 80) PAGED_ATTENTION(NAME, T, 128)
PAGED_ATTENTION_ALL_DIMS(f16, __half)
PAGED_ATTENTION_ALL_DIMS(bf16, __nv_bfloat16)

#define ATTENTION_MERGE(NAME, T)                                                                   \
  extern "C" __global__ void attention_merge_##NAME(T* out, const float* partial_out,              \
                                                    const float* partial_lse, int num_splits,      \
                                                    int num_tokens, int num_heads, int head_dim) { \
    pdl_begin();                                                                                   \
    attention_merge<T>(out, partial_out, partial_lse, num_splits, num_tokens, num_heads, head_dim); \
  }
ATTENTION_MERGE(f16, __half)
ATTENTION_MERGE(bf16, __nv_bfloat16)
