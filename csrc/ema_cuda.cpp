// Torch-side wrapper of the CUDA EMA kernel: groups the tensors by device and dtype and hands raw
// pointers to the launcher in csrc/cuda/ema_kernel.cu, on each device's current stream.
#ifdef KDLIB_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <utility>

#include "cuda/ema_kernel.cuh"
#include "ema.h"

namespace kdlib {
namespace {

cuda::FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::FloatKind::f32;
    case at::kDouble: return cuda::FloatKind::f64;
    case at::kHalf: return cuda::FloatKind::f16;
    case at::kBFloat16: return cuda::FloatKind::bf16;
    default: TORCH_CHECK(false, "ema_update_: unsupported dtype ", t);  // validated before; unreachable
  }
}

struct Group {
  std::vector<void*> ema;
  std::vector<const void*> param;
  std::vector<int64_t> numel;
};

}  // namespace

void ema_update_cuda_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double weight) {
  std::map<std::pair<c10::DeviceIndex, at::ScalarType>, Group> groups;
  for (size_t i = 0; i < ema.size(); ++i) {
    Group& g = groups[{ema[i].get_device(), ema[i].scalar_type()}];
    g.ema.push_back(ema[i].data_ptr());
    g.param.push_back(params[i].const_data_ptr());
    g.numel.push_back(ema[i].numel());
  }
  for (auto& [key, g] : groups) {
    const c10::cuda::CUDAGuard guard(key.first);
    const cudaError_t err = cuda::ema_update_launch(float_kind(key.second), g.ema.data(), g.param.data(),
                                                    g.numel.data(), static_cast<int64_t>(g.ema.size()), weight,
                                                    at::cuda::getCurrentCUDAStream(key.first));
    TORCH_CHECK(err == cudaSuccess, "ema_update_: CUDA kernel launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace kdlib

#endif  // KDLIB_WITH_CUDA
