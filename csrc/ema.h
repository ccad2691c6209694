// Fused EMA update over lists of parameter tensors: ema[i] = lerp(ema[i], params[i], weight),
// i.e. decay * ema + (1 - decay) * param with weight = 1 - decay, the semantics of
// torch._foreach_lerp_(ema, params, weight). Low-precision tensors are computed in float32.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace kdlib {

// A bad input found by check_ema_pairs: the Python error class to raise and its message.
struct Problem {
  bool type_error;  // TypeError when true, else ValueError
  std::string message;
};

// Validates lengths, then shape/dtype/device of every pair, and the weight; names the first bad
// pair. Reports instead of throwing, so that the binding can return it and the Python wrapper
// raises the right class (ValueError/TypeError) with a message naming the pair.
std::optional<Problem> check_ema_pairs(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                                       double weight);

// Bound as kdlib._C.ema_update_ after check_ema_pairs passed: runs contiguous CPU pairs through
// the threaded C++ loop, contiguous CUDA pairs through the multi-tensor CUDA kernel (when built
// with it) and anything else (strided views, other devices) through at::lerp_.
void ema_update_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double weight);

// The CPU part: every tensor here is a contiguous CPU tensor of a supported float dtype.
void ema_update_cpu_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double weight);

#ifdef KDLIB_WITH_CUDA
// The CUDA part: every tensor here is a contiguous CUDA tensor of a supported float dtype.
void ema_update_cuda_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double weight);
#endif

// Whether the module was compiled with its CUDA kernels.
bool with_cuda();

}  // namespace kdlib
