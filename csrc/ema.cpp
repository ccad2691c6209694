// Validation and routing for the fused EMA update (see ema.h).
//
// Validation lives here rather than in Python because a model has hundreds of parameter
// tensors: a per-pair Python check costs ~1 us each, more than the whole update on a GPU.
#include "ema.h"

#include <ATen/core/grad_mode.h>

#include <string>

namespace kdlib {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Messages are built with std::string alone: on the GPU machine (torch 2.11, built there) building
// this message with c10::str(..., tensor.sizes(), ...) crashed the process (seen twice, 2026-11-22).
std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t k = 0; k < shape.size(); ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + "]";
}

std::optional<Problem> check_pair(size_t i, const at::Tensor& e, const at::Tensor& p) {
  const std::string ema_i = "ema[" + std::to_string(i) + "]", params_i = "params[" + std::to_string(i) + "]";
  if (!e.defined() || !p.defined()) return Problem{false, ema_i + " or " + params_i + " is undefined"};
  if (e.sizes() != p.sizes())
    return Problem{false, ema_i + " has shape " + shape_str(e.sizes()) + " but " + params_i + " has shape " +
                              shape_str(p.sizes()) + "; each EMA tensor must match its parameter"};
  const std::string e_dtype = c10::toString(e.scalar_type()), p_dtype = c10::toString(p.scalar_type());
  if (e_dtype != p_dtype)
    return Problem{true, ema_i + " has dtype " + e_dtype + " but " + params_i + " has dtype " + p_dtype};
  if (!supported_dtype(e.scalar_type()))
    return Problem{true, ema_i + " has dtype " + e_dtype + "; supported: Float, Double, Half, BFloat16"};
  if (e.device() != p.device())
    return Problem{false, ema_i + " is on " + e.device().str() + " but " + params_i + " is on " + p.device().str()};
  return std::nullopt;
}

}  // namespace

bool with_cuda() {
#ifdef KDLIB_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::optional<Problem> check_ema_pairs(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params,
                                       double weight) {
  if (ema.size() != params.size())
    return Problem{false, "got " + std::to_string(ema.size()) + " ema tensors but " +
                              std::to_string(params.size()) + " params; the lists must pair up"};
  if (!(weight >= 0.0 && weight <= 1.0))
    return Problem{false, "weight (1 - decay) must be in [0, 1], got " + std::to_string(weight)};
  for (size_t i = 0; i < ema.size(); ++i) {
    if (auto problem = check_pair(i, ema[i], params[i])) return problem;
  }
  return std::nullopt;
}

void ema_update_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double weight) {
  // The EMA copies never take part in autograd; like any in-place op we bump their version.
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> cpu_ema, cpu_params;
#ifdef KDLIB_WITH_CUDA
  std::vector<at::Tensor> cuda_ema, cuda_params;
#endif
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& p = params[i];
    const bool dense = e.is_contiguous() && p.is_contiguous() && !e.is_neg() && !p.is_neg();
    if (dense && e.device().is_cpu()) {
      cpu_ema.push_back(e);
      cpu_params.push_back(p);
#ifdef KDLIB_WITH_CUDA
    } else if (dense && e.device().is_cuda()) {
      cuda_ema.push_back(e);
      cuda_params.push_back(p);
#endif
    } else {
      // Strided views and other devices: correct, one op per tensor.
      e.lerp_(p, weight);
      continue;
    }
    e.unsafeGetTensorImpl()->bump_version();
  }
  if (!cpu_ema.empty()) ema_update_cpu_(cpu_ema, cpu_params, weight);
#ifdef KDLIB_WITH_CUDA
  if (!cuda_ema.empty()) ema_update_cuda_(cuda_ema, cuda_params, weight);
#endif
}

}  // namespace kdlib
