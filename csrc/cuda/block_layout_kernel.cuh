// Launchers of the CUDA block-sparse layout kernels. Plain C++ with the CUDA runtime only (no torch
// headers), so the .cu compiles standalone with nvcc and CI can compile-check it.
//
// Both launchers only enqueue kernels on `stream`: no host sync, no allocation, no memset, so they
// can be captured in a CUDA graph. They return the first launch error, or cudaSuccess.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdlib {
namespace cuda {

// A 4-D tensor as raw device memory: element (a, b, c, d) is at
// data + a*stride[0] + b*stride[1] + c*stride[2] + d*stride[3] (strides in elements, any value,
// 0 for expanded dims). All sizes are >= 1 and size[2], size[3] < 2^31.
struct Strided4 {
  const void* data;
  int64_t size[4];
  int64_t stride[4];
};

enum class ScoreKind : int { f32 = 0, f16 = 1, bf16 = 2 };

// mask: bool (one byte, 0 / non-zero) [Bm, Hm, Mq, Mk]. Fills the contiguous int32 outputs
// kv_count [Bm, Hm, Mq], kv_index [Bm, Hm, Mq, Mk] (per query block the selected key blocks
// ascending, then 0), q_count [Bm, Hm, Mk], q_index [Bm, Hm, Mk, Mq] (the transpose). Every output
// element is written.
cudaError_t block_layout_launch(const Strided4& mask, int32_t* kv_count, int32_t* kv_index, int32_t* q_count,
                                int32_t* q_index, cudaStream_t stream);

// scores: [B, H, Mq, Mk] of `kind`. Fills the contiguous bool mask out [B, H, Mq, Mk]: per row the
// ratio_keep top-ranked blocks (mass = false) or the top blocks whose softmax mass before them is
// < keep (mass = true), plus the diagonal when keep_diagonal. max_shared_bytes: the device's
// opt-in shared memory per block; rows that fit it are sorted in shared memory, longer ones ranked
// by counting (O(Mk^2) per row).
cudaError_t select_blocks_launch(const Strided4& scores, ScoreKind kind, int64_t ratio_keep, double keep, bool mass,
                                 bool keep_diagonal, bool* out, int max_shared_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdlib
