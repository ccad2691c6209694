// Multi-tensor CUDA kernel of the fused EMA update (see ema_kernel.cuh).
//
// One launch covers up to kMaxTensors tensors: their pointers and sizes travel in the kernel
// arguments (no device buffer, no host-to-device copy), and each block updates one chunk of
// kChunk elements of one tensor. The grid is the launch's total chunk count, so a large model
// fills the GPU in a few launches whatever its tensor sizes. Loads and stores are 16 bytes wide
// where both tensors are 16-byte aligned (always, for torch's own allocations).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ema_kernel.cuh"

namespace kdlib {
namespace cuda {
namespace {

// The table must stay under the classic 4 KiB kernel-argument limit: 128 * 28 + 4 * 2 bytes.
constexpr int kMaxTensors = 128;
constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kUnroll = 4;         // 16-byte vectors in flight per thread

struct Table {
  void* ema[kMaxTensors];
  const void* param[kMaxTensors];
  int64_t numel[kMaxTensors];
  int first_chunk[kMaxTensors + 1];  // tensor t owns blocks [first_chunk[t], first_chunk[t + 1])
  int count;
};

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// torch's lerp: weights under 0.5 step from `e`, others from `p`, so that weight 1 gives p exactly.
template <typename T>
__device__ __forceinline__ T lerp(T e, T p, typename Acc<T>::type w, bool small) {
  using acc_t = typename Acc<T>::type;
  const acc_t a = to_acc(e), b = to_acc(p);
  return from_acc<T>(small ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ema_kernel(const Table table, typename Acc<T>::type w) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector
  const int block = blockIdx.x;
  int lo = 0, hi = table.count - 1;  // the last tensor whose first chunk is at or before this block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.first_chunk[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t start = static_cast<int64_t>(block - table.first_chunk[lo]) * kChunk;
  T* __restrict__ e = static_cast<T*>(table.ema[lo]) + start;
  const T* __restrict__ p = static_cast<const T*>(table.param[lo]) + start;
  const int n = static_cast<int>(min(kChunk, table.numel[lo] - start));
  const bool small = w < 0.5;

  int vec_end = 0;  // elements [0, vec_end) go through 16-byte vectors, the rest one by one
  if (((reinterpret_cast<uintptr_t>(e) | reinterpret_cast<uintptr_t>(p)) & 15) == 0) {
    vec_end = n - n % V;
    for (int base = threadIdx.x * V; base < vec_end; base += kThreads * V * kUnroll) {
      alignas(16) T ev[kUnroll][V];
      alignas(16) T pv[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first, so kUnroll * 32 bytes are in flight
        const int i = base + u * kThreads * V;
        if (i < vec_end) {
          *reinterpret_cast<uint4*>(ev[u]) = *reinterpret_cast<const uint4*>(e + i);
          *reinterpret_cast<uint4*>(pv[u]) = *reinterpret_cast<const uint4*>(p + i);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads * V;
        if (i < vec_end) {
#pragma unroll
          for (int k = 0; k < V; ++k) ev[u][k] = lerp(ev[u][k], pv[u][k], w, small);
          *reinterpret_cast<uint4*>(e + i) = *reinterpret_cast<const uint4*>(ev[u]);
        }
      }
    }
  }
  for (int i = vec_end + threadIdx.x; i < n; i += kThreads) e[i] = lerp(e[i], p[i], w, small);
}

template <typename T>
cudaError_t launch_all(void* const* ema, const void* const* param, const int64_t* numel, int64_t count,
                       double weight, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  Table table;
  table.count = 0;
  int chunks = 0;
  auto flush = [&]() -> cudaError_t {
    if (table.count == 0) return cudaSuccess;
    table.first_chunk[table.count] = chunks;
    ema_kernel<T><<<chunks, kThreads, 0, stream>>>(table, static_cast<acc_t>(weight));
    table.count = 0;
    chunks = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < count; ++i) {
    if (numel[i] == 0) continue;
    const int64_t need = (numel[i] + kChunk - 1) / kChunk;
    if (table.count == kMaxTensors || chunks + need > INT32_MAX / 2) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    table.ema[table.count] = ema[i];
    table.param[table.count] = param[i];
    table.numel[table.count] = numel[i];
    table.first_chunk[table.count] = chunks;
    table.count += 1;
    chunks += static_cast<int>(need);
  }
  return flush();
}

}  // namespace

cudaError_t ema_update_launch(FloatKind kind, void* const* ema, const void* const* param, const int64_t* numel,
                              int64_t count, double weight, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::f32: return launch_all<float>(ema, param, numel, count, weight, stream);
    case FloatKind::f64: return launch_all<double>(ema, param, numel, count, weight, stream);
    case FloatKind::f16: return launch_all<__half>(ema, param, numel, count, weight, stream);
    case FloatKind::bf16: return launch_all<__nv_bfloat16>(ema, param, numel, count, weight, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kdlib
