// Validation and routing of the block-sparse layout ops (see block_layout.h).
//
// The Python dispatcher checks the same things first; the checks are repeated here because the
// bindings are public (kdlib._C.block_layout) and a bad shape or dtype must never reach a kernel
// that indexes raw pointers.
#include "block_layout.h"

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace kdlib {
namespace {

// Python's spelling ("float32", "bool"), so messages read like those of the Python dispatcher.
std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

// std::string alone, as in ema.cpp (c10::str of sizes crashed on the GPU machine's torch).
std::string shape_str(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t k = 0; k < shape.size(); ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

// The checks both ops share: a dense 4-D tensor with no empty dim whose last two dims fit the
// int32 indices, on a device this build has kernels for.
std::optional<Problem> check_4d(const std::string& op, const std::string& name, const std::string& dims,
                                const at::Tensor& t) {
  if (!t.defined()) return Problem{true, op + ": " + name + " is undefined"};
  if (t.layout() != at::kStrided)
    return Problem{true, op + ": " + name + " must be a dense (strided) tensor; use .to_dense()"};
  if (t.dim() != 4) return Problem{false, op + ": " + name + " must have 4 dims " + dims + ", got shape " +
                                              shape_str(t.sizes())};
  for (int64_t d = 0; d < 4; ++d) {
    if (t.size(d) == 0) return Problem{false, op + ": " + name + " has an empty dim: shape " + shape_str(t.sizes())};
  }
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();
  if (t.size(2) > kMaxBlocks || t.size(3) > kMaxBlocks)
    return Problem{false, op + ": " + name + " has shape " + shape_str(t.sizes()) +
                              "; the block counts (last two dims) must fit int32 indices"};
  const at::Device device = t.device();
  if (device.is_cpu()) return std::nullopt;
  if (device.is_cuda()) {
    if (with_cuda()) return std::nullopt;
    return Problem{false, op + ": " + name + " is on " + device.str() +
                              " but kdlib._C was built without CUDA kernels; use backend='reference' or rebuild "
                              "with nvcc and a CUDA build of torch"};
  }
  return Problem{false, op + ": " + name + " is on " + device.str() + "; the native op runs on cpu and cuda"};
}

}  // namespace

int64_t ratio_count(double keep, int64_t mk) {
  const auto count = static_cast<int64_t>(std::ceil(keep * static_cast<double>(mk) - 1e-9));
  return std::min(mk, std::max<int64_t>(1, count));
}

std::optional<Problem> check_block_layout(const at::Tensor& block_mask) {
  const std::string op = "block_layout";
  if (block_mask.defined() && block_mask.scalar_type() != at::kBool)
    return Problem{true, op + ": block_mask has dtype " + dtype_name(block_mask.scalar_type()) +
                             "; it must be bool (True = the tile is computed): use mask > 0 or mask.bool()"};
  return check_4d(op, "block_mask", "[Bm, Hm, Mq, Mk]", block_mask);
}

std::optional<Problem> check_select_blocks(const at::Tensor& scores, double keep, const std::string& mode_name,
                                           SelectMode* mode) {
  const std::string op = "select_blocks";
  if (scores.defined()) {
    const at::ScalarType t = scores.scalar_type();
    if (t != at::kFloat && t != at::kHalf && t != at::kBFloat16)
      return Problem{true, op + ": scores has dtype " + dtype_name(t) +
                               "; supported: float32, float16, bfloat16 (e.g. scores.float())"};
  }
  if (auto problem = check_4d(op, "scores", "[B, H, Mq, Mk]", scores)) return problem;
  if (mode_name == "ratio") {
    *mode = SelectMode::ratio;
  } else if (mode_name == "mass") {
    *mode = SelectMode::mass;
  } else {
    return Problem{false, op + ": unknown mode '" + mode_name + "'; choose one of ('ratio', 'mass')"};
  }
  if (!(keep > 0.0 && keep <= 1.0)) {  // also rejects NaN
    const std::string what = *mode == SelectMode::ratio ? "a fraction of key blocks" : "a fraction of softmax mass";
    return Problem{false, op + ": keep must be in (0, 1] (" + what + "), got " + std::to_string(keep)};
  }
  return std::nullopt;
}

LayoutTensors block_layout(const at::Tensor& block_mask) {
  const int64_t bm = block_mask.size(0), hm = block_mask.size(1), mq = block_mask.size(2), mk = block_mask.size(3);
  const at::TensorOptions int32 = block_mask.options().dtype(at::kInt);
  // Every element of the outputs is written by the kernels (unused slots get 0): no zero fill here.
  LayoutTensors out{at::empty({bm, hm, mq}, int32), at::empty({bm, hm, mq, mk}, int32), at::empty({bm, hm, mk}, int32),
                    at::empty({bm, hm, mk, mq}, int32)};
#ifdef KDLIB_WITH_CUDA
  if (block_mask.is_cuda()) {
    block_layout_cuda(block_mask, out);
    return out;
  }
#endif
  block_layout_cpu(block_mask, out);
  return out;
}

std::optional<Problem> select_blocks(const at::Tensor& scores_in, double keep, SelectMode mode, bool keep_diagonal,
                                     at::Tensor* out) {
  // A lazily negated view (torch._neg_view) stores -x: the kernels read raw memory, so resolve it.
  const at::Tensor scores = scores_in.is_neg() ? scores_in.resolve_neg() : scores_in;
  *out = at::empty(scores.sizes(), scores.options().dtype(at::kBool));  // every element is written
  const int64_t ratio_keep = ratio_count(keep, scores.size(3));
#ifdef KDLIB_WITH_CUDA
  if (scores.is_cuda()) {
    select_blocks_cuda(scores, ratio_keep, keep, mode, keep_diagonal, *out);
    return std::nullopt;
  }
#endif
  if (select_blocks_cpu(scores, ratio_keep, keep, mode, keep_diagonal, *out))
    return Problem{false, "select_blocks: scores contain NaN; the selection would be unspecified"};
  return std::nullopt;
}

}  // namespace kdlib
