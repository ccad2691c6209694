// Torch-side wrapper of the CUDA layout kernels: hands raw pointers, sizes and strides to the
// launchers in csrc/cuda/block_layout_kernel.cu, on the tensor's device and its current stream.
// Nothing here syncs or allocates (the outputs come from block_layout.cpp, through torch's caching
// allocator), so both ops can be captured in a CUDA graph.
#ifdef KDLIB_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "block_layout.h"
#include "cuda/block_layout_kernel.cuh"

namespace kdlib {
namespace {

cuda::Strided4 strided4(const at::Tensor& t) {
  cuda::Strided4 view{t.const_data_ptr(), {}, {}};
  for (int k = 0; k < 4; ++k) {
    view.size[k] = t.size(k);
    view.stride[k] = t.stride(k);
  }
  return view;
}

cuda::ScoreKind score_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::ScoreKind::f32;
    case at::kHalf: return cuda::ScoreKind::f16;
    case at::kBFloat16: return cuda::ScoreKind::bf16;
    default: TORCH_CHECK(false, "select_blocks: unsupported dtype ", t);  // validated before; unreachable
  }
}

}  // namespace

void block_layout_cuda(const at::Tensor& block_mask, const LayoutTensors& out) {
  const c10::cuda::CUDAGuard guard(block_mask.device());
  const cudaError_t err = cuda::block_layout_launch(
      strided4(block_mask), std::get<0>(out).data_ptr<int32_t>(), std::get<1>(out).data_ptr<int32_t>(),
      std::get<2>(out).data_ptr<int32_t>(), std::get<3>(out).data_ptr<int32_t>(),
      at::cuda::getCurrentCUDAStream(block_mask.get_device()));
  TORCH_CHECK(err == cudaSuccess, "block_layout: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void select_blocks_cuda(const at::Tensor& scores, int64_t ratio_keep, double keep, SelectMode mode,
                        bool keep_diagonal, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(scores.device());
  // Cached by torch per device: no driver call, nothing that would break a graph capture.
  const int max_shared = static_cast<int>(at::cuda::getDeviceProperties(scores.get_device())->sharedMemPerBlockOptin);
  const cudaError_t err = cuda::select_blocks_launch(strided4(scores), score_kind(scores.scalar_type()), ratio_keep,
                                                     keep, mode == SelectMode::mass, keep_diagonal,
                                                     out.data_ptr<bool>(), max_shared,
                                                     at::cuda::getCurrentCUDAStream(scores.get_device()));
  TORCH_CHECK(err == cudaSuccess, "select_blocks: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace kdlib

#endif  // KDLIB_WITH_CUDA
