// CUDA kernels of the block-sparse layout ops (see block_layout_kernel.cuh).
//
// kv lists: one warp per query block. The row is read 32 key blocks at a time (adjacent lanes,
// adjacent bytes: coalesced), a ballot says which are set, and each set lane writes its column at
// the running count plus the set lanes below it, so the list comes out ascending with no sort.
//
// q lists (the transpose): one block of 8 warps per 32 adjacent key blocks of one head. Lane l
// owns key block j0 + l and each warp takes 32 consecutive query blocks, so a load instruction
// reads 32 adjacent bytes of one mask row (coalesced, unlike a warp walking one column). A lane
// packs its 32 rows into a bit mask; the warps' counts, shared through shared memory, give each
// warp its offset in the list.
//
// select_blocks: one block per row. The row's scores become unique 64-bit keys that sort in rank
// order (the same encoding as the CPU op), sorted by a bitonic network in shared memory; ratio mode
// keeps the first ratio_keep ranks, mass mode scans e = exp(s - max) in rank order (float64) and
// keeps the ranks whose mass before them is < keep * total. Rows too long for shared memory are
// ranked by counting, each thread comparing its blocks with shared-memory tiles of the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "block_layout_kernel.cuh"

namespace kdlib {
namespace cuda {
namespace {

constexpr unsigned kFullWarp = 0xFFFFFFFFu;
constexpr int kLayoutWarps = 8;
constexpr int kLayoutThreads = 32 * kLayoutWarps;
constexpr int kRowUnroll = 4;          // 32-column chunks a kv warp loads before it ballots
constexpr int kMaxSortThreads = 1024;  // a row of P padded keys is sorted by min(P / 2, 1024) threads
constexpr int kCountTile = 2048;       // keys per shared-memory tile of the counting path
constexpr int64_t kMaxGrid = 1 << 30;  // blocks loop over the rows beyond this
constexpr int64_t kMaxSortedRow = 1 << 20;  // longer rows never fit shared memory (8 MiB of keys)

// The first element of row `flat` of a 4-D view, rows numbered over [size[0], size[1], size[2]].
template <typename T>
__device__ __forceinline__ const T* row_start(const Strided4& t, int64_t flat) {
  const int64_t i = flat % t.size[2], bh = flat / t.size[2];
  return static_cast<const T*>(t.data) + (bh / t.size[1]) * t.stride[0] + (bh % t.size[1]) * t.stride[1] +
         i * t.stride[2];
}

// ---- block_layout ------------------------------------------------------------------------------

__global__ void __launch_bounds__(kLayoutThreads)
    kv_lists_kernel(const Strided4 mask, int32_t* __restrict__ kv_count, int32_t* __restrict__ kv_index) {
  const int64_t mk = mask.size[3], sk = mask.stride[3];
  const int64_t rows = mask.size[0] * mask.size[1] * mask.size[2];
  const int lane = threadIdx.x & 31;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kLayoutWarps;
  // The loop bound is the same for the whole warp, so every ballot has all 32 lanes.
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kLayoutWarps + (threadIdx.x >> 5); r < rows; r += warps) {
    const uint8_t* row = row_start<uint8_t>(mask, r);
    int32_t* list = kv_index + r * mk;
    int32_t count = 0;
    for (int64_t j0 = 0; j0 < mk; j0 += 32 * kRowUnroll) {
      bool on[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {  // all loads first: kRowUnroll in flight per lane
        const int64_t j = j0 + u * 32 + lane;
        on[u] = j < mk && row[j * sk] != 0;
      }
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const unsigned set = __ballot_sync(kFullWarp, on[u]);
        if (on[u]) list[count + __popc(set & lanes_below)] = static_cast<int32_t>(j0 + u * 32 + lane);
        count += __popc(set);
      }
    }
    for (int64_t j = count + lane; j < mk; j += 32) list[j] = 0;
    if (lane == 0) kv_count[r] = count;
  }
}

__global__ void __launch_bounds__(kLayoutThreads)
    q_lists_kernel(const Strided4 mask, int32_t* __restrict__ q_count, int32_t* __restrict__ q_index) {
  __shared__ int32_t warp_counts[kLayoutWarps][32];
  __shared__ int32_t list_length[32];
  const uint8_t* data = static_cast<const uint8_t*>(mask.data);
  const int64_t hm = mask.size[1], mq = mask.size[2], mk = mask.size[3], sq = mask.stride[2], sk = mask.stride[3];
  const int64_t groups_per_head = (mk + 31) / 32, groups = mask.size[0] * hm * groups_per_head;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t bh = g / groups_per_head, j0 = (g % groups_per_head) * 32, j = j0 + lane;
    const bool column = j < mk;  // lanes past Mk only take part in the block's barriers
    const uint8_t* col = data + (bh / hm) * mask.stride[0] + (bh % hm) * mask.stride[1] + (column ? j : 0) * sk;
    int32_t* list = q_index + (bh * mk + j) * mq;
    int32_t count = 0;  // the list length so far; every warp tracks the same value for its lane
    for (int64_t r0 = 0; r0 < mq; r0 += 32 * kLayoutWarps) {
      const int64_t i0 = r0 + warp * 32;
      unsigned set = 0;  // bit k: query block i0 + k selected key block j
#pragma unroll 8
      for (int k = 0; k < 32; ++k) {
        const int64_t i = i0 + k;
        if (column && i < mq && col[i * sq] != 0) set |= 1u << k;
      }
      warp_counts[warp][lane] = __popc(set);
      __syncthreads();
      int32_t offset = count;
      for (int w = 0; w < kLayoutWarps; ++w) {
        const int32_t c = warp_counts[w][lane];
        offset += w < warp ? c : 0;
        count += c;
      }
      for (; set != 0; set &= set - 1) list[offset++] = static_cast<int32_t>(i0 + __ffs(set) - 1);
      __syncthreads();  // warp_counts is rewritten by the next round
    }
    if (warp == 0) {
      list_length[lane] = count;
      if (column) q_count[bh * mk + j] = count;
    }
    __syncthreads();
    // Zero the unused slots together: consecutive threads write consecutive slots of one list.
    for (int c = 0; c < 32 && j0 + c < mk; ++c) {
      int32_t* tail = q_index + (bh * mk + j0 + c) * mq;
      for (int64_t i = list_length[c] + threadIdx.x; i < mq; i += kLayoutThreads) tail[i] = 0;
    }
    __syncthreads();  // list_length is rewritten by the next group
  }
}

// ---- select_blocks -----------------------------------------------------------------------------

struct SelectParams {
  int64_t ratio_keep;
  double keep;
  bool mass;
  bool keep_diagonal;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// A unique key that sorts ascending in rank order: higher score first, ties to the lower column,
// -0.0 tying with +0.0. Integer operations only, so --use_fast_math (flush-to-zero) cannot merge
// a denormal score with zero. Same encoding as rank_key in csrc/block_layout_cpu.cpp.
__device__ __forceinline__ uint64_t rank_key(float score, int64_t col) {
  uint32_t u = __float_as_uint(score);
  if ((u & 0x7FFFFFFFu) == 0) u = 0;
  const uint32_t desc = (u & 0x80000000u) ? u : (~u & 0x7FFFFFFFu);
  return (static_cast<uint64_t>(desc) << 32) | static_cast<uint64_t>(col);
}

__device__ __forceinline__ double key_score(uint64_t key) {
  const uint32_t desc = static_cast<uint32_t>(key >> 32);
  return static_cast<double>(__uint_as_float((desc & 0x80000000u) ? desc : (~desc & 0x7FFFFFFFu)));
}

__device__ __forceinline__ int64_t key_column(uint64_t key) { return static_cast<int64_t>(key & 0xFFFFFFFFu); }

// Mass mode's shift: the row max, or the lowest double for an all -inf row (e = 0, not NaN).
__device__ __forceinline__ double mass_shift(double rowmax) { return fmax(rowmax, -DBL_MAX); }

// Exclusive prefix sum of one double per thread over the block, and the block total. Every thread
// of the block must call it; blockDim.x is a multiple of 32. `spill`: 32 doubles of shared memory.
__device__ double block_exclusive_sum(double v, double* total, double* spill) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  double inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const double up = __shfl_up_sync(kFullWarp, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  double exclusive = __shfl_up_sync(kFullWarp, inclusive, 1);
  if (lane == 0) exclusive = 0.0;
  if (lane == 31) spill[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    double w = lane < warps ? spill[lane] : 0.0;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const double up = __shfl_up_sync(kFullWarp, w, offset);
      if (lane >= offset) w += up;
    }
    spill[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const double result = (warp > 0 ? spill[warp - 1] : 0.0) + exclusive;
  *total = spill[warps - 1];
  __syncthreads();  // spill is reused by the next call
  return result;
}

// Ascending bitonic sort of n (a power of two) keys in shared memory by the whole block.
__device__ void bitonic_sort(uint64_t* keys, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;  // pair t of this stage
        const uint64_t a = keys[lo], b = keys[hi];
        if ((a > b) == ((lo & size) == 0)) {  // ascending where bit `size` of lo is clear
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// One block per row: sort the row's keys (padded to a power of two with ~0) in shared memory,
// then mark the kept ranks' columns in out.
template <typename T>
__global__ void __launch_bounds__(kMaxSortThreads)
    select_sorted_kernel(const Strided4 scores, const SelectParams p, int padded, bool* __restrict__ out) {
  extern __shared__ uint64_t keys[];  // padded entries
  __shared__ double spill[32];
  const int64_t mq = scores.size[2], mk = scores.size[3], sk = scores.stride[3];
  const int64_t rows = scores.size[0] * scores.size[1] * mq;
  // Mass mode: thread t scans ranks [t * per, t * per + per), in order.
  const int64_t per = (mk + blockDim.x - 1) / blockDim.x, lo = threadIdx.x * per, hi = lo + per < mk ? lo + per : mk;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = row_start<T>(scores, r);
    for (int j = threadIdx.x; j < padded; j += blockDim.x) keys[j] = j < mk ? rank_key(to_float(row[j * sk]), j) : ~0ull;
    __syncthreads();
    bitonic_sort(keys, padded);
    bool* out_row = out + r * mk;
    const int64_t i = r % mq, diagonal = p.keep_diagonal && i < mk ? i : -1;
    if (!p.mass) {
      for (int64_t k = threadIdx.x; k < mk; k += blockDim.x) {
        const int64_t col = key_column(keys[k]);
        out_row[col] = k < p.ratio_keep || col == diagonal;
      }
    } else {
      const double shift = mass_shift(key_score(keys[0]));  // rank 0 holds the row max
      double mine = 0.0;
      for (int64_t k = lo; k < hi; ++k) mine += exp(key_score(keys[k]) - shift);
      double total;
      double before = block_exclusive_sum(mine, &total, spill);
      const double threshold = p.keep * total;
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t col = key_column(keys[k]);
        out_row[col] = k == 0 || before < threshold || col == diagonal;
        before += exp(key_score(keys[k]) - shift);
      }
    }
    __syncthreads();  // keys are rewritten for the next row
  }
}

__device__ float block_max(float v, float* spill) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, offset));
  if (lane == 0) spill[warp] = v;
  __syncthreads();
  float m = spill[0];
  for (int w = 1; w < warps; ++w) m = fmaxf(m, spill[w]);
  __syncthreads();  // spill is reused by the next call
  return m;
}

// Rows too long to sort in shared memory: the rank of block j is the number of smaller keys, and
// in mass mode the e-mass before it is the sum of e over them. Each thread owns one block per pass
// over the row; the row streams through shared-memory tiles of keys (and e) it compares against.
template <typename T>
__global__ void __launch_bounds__(kMaxSortThreads)
    select_counted_kernel(const Strided4 scores, const SelectParams p, bool* __restrict__ out) {
  __shared__ uint64_t tile_key[kCountTile];
  __shared__ double tile_e[kCountTile];
  __shared__ double spill[32];
  __shared__ float max_spill[32];
  const int64_t mq = scores.size[2], mk = scores.size[3], sk = scores.stride[3];
  const int64_t rows = scores.size[0] * scores.size[1] * mq;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = row_start<T>(scores, r);
    double shift = 0.0, threshold = 0.0;
    if (p.mass) {
      float m = __int_as_float(0xFF800000);  // -inf
      for (int64_t j = threadIdx.x; j < mk; j += blockDim.x) m = fmaxf(m, to_float(row[j * sk]));
      shift = mass_shift(static_cast<double>(block_max(m, max_spill)));
      double mine = 0.0;
      for (int64_t j = threadIdx.x; j < mk; j += blockDim.x) mine += exp(static_cast<double>(to_float(row[j * sk])) - shift);
      double total;
      block_exclusive_sum(mine, &total, spill);
      threshold = p.keep * total;
    }
    const int64_t i = r % mq, diagonal = p.keep_diagonal && i < mk ? i : -1;
    for (int64_t j0 = 0; j0 < mk; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      const uint64_t key = j < mk ? rank_key(to_float(row[j * sk]), j) : 0;
      int64_t rank = 0;
      double before = 0.0;
      for (int64_t k0 = 0; k0 < mk; k0 += kCountTile) {
        const int n = static_cast<int>(mk - k0 < kCountTile ? mk - k0 : kCountTile);
        for (int k = threadIdx.x; k < n; k += blockDim.x) {
          const float s = to_float(row[(k0 + k) * sk]);
          tile_key[k] = rank_key(s, k0 + k);
          if (p.mass) tile_e[k] = exp(static_cast<double>(s) - shift);
        }
        __syncthreads();
        for (int k = 0; k < n; ++k) {
          const bool smaller = tile_key[k] < key;
          rank += smaller;
          if (p.mass && smaller) before += tile_e[k];
        }
        __syncthreads();  // the tile is rewritten next
      }
      if (j < mk) out[r * mk + j] = (p.mass ? rank == 0 || before < threshold : rank < p.ratio_keep) || j == diagonal;
    }
  }
}

int next_power_of_two(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

template <typename T>
cudaError_t launch_select(const Strided4& scores, const SelectParams& p, bool* out, int max_shared_bytes,
                          cudaStream_t stream) {
  const int64_t rows = scores.size[0] * scores.size[1] * scores.size[2], mk = scores.size[3];
  const unsigned grid = static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
  const int padded = next_power_of_two(mk < kMaxSortedRow ? mk : kMaxSortedRow);
  const int64_t sort_bytes = static_cast<int64_t>(padded) * sizeof(uint64_t);
  constexpr int64_t kStaticBytes = 32 * sizeof(double);  // the scan's spill
  if (mk <= kMaxSortedRow && sort_bytes + kStaticBytes <= max_shared_bytes) {
    int threads = padded / 2;
    threads = threads < 32 ? 32 : (threads > kMaxSortThreads ? kMaxSortThreads : threads);
    if (sort_bytes + kStaticBytes > 48 * 1024) {  // above the default limit a kernel must opt in
      const cudaError_t err = cudaFuncSetAttribute(select_sorted_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(sort_bytes));
      if (err != cudaSuccess) return err;
    }
    select_sorted_kernel<T><<<grid, threads, static_cast<size_t>(sort_bytes), stream>>>(scores, p, padded, out);
  } else {
    select_counted_kernel<T><<<grid, kMaxSortThreads, 0, stream>>>(scores, p, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t block_layout_launch(const Strided4& mask, int32_t* kv_count, int32_t* kv_index, int32_t* q_count,
                                int32_t* q_index, cudaStream_t stream) {
  const int64_t heads = mask.size[0] * mask.size[1];
  const int64_t kv_blocks = (heads * mask.size[2] + kLayoutWarps - 1) / kLayoutWarps;
  const int64_t q_blocks = heads * ((mask.size[3] + 31) / 32);
  kv_lists_kernel<<<static_cast<unsigned>(kv_blocks < kMaxGrid ? kv_blocks : kMaxGrid), kLayoutThreads, 0, stream>>>(
      mask, kv_count, kv_index);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  q_lists_kernel<<<static_cast<unsigned>(q_blocks < kMaxGrid ? q_blocks : kMaxGrid), kLayoutThreads, 0, stream>>>(
      mask, q_count, q_index);
  return cudaGetLastError();
}

cudaError_t select_blocks_launch(const Strided4& scores, ScoreKind kind, int64_t ratio_keep, double keep, bool mass,
                                 bool keep_diagonal, bool* out, int max_shared_bytes, cudaStream_t stream) {
  const SelectParams p{ratio_keep, keep, mass, keep_diagonal};
  switch (kind) {
    case ScoreKind::f32: return launch_select<float>(scores, p, out, max_shared_bytes, stream);
    case ScoreKind::f16: return launch_select<__half>(scores, p, out, max_shared_bytes, stream);
    case ScoreKind::bf16: return launch_select<__nv_bfloat16>(scores, p, out, max_shared_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdlib
