// Block-sparse layout ops (the native backend of kdlib/kernels/block_layout.py):
//   block_layout:  bool mask [Bm, Hm, Mq, Mk] -> CSR-style tile lists per query block and their
//                  transpose per key block (int32, contiguous, on the mask's device);
//   select_blocks: block-pair scores [B, H, Mq, Mk] -> bool mask [B, H, Mq, Mk] of the top blocks
//                  per row, by ratio or by softmax mass.
// The specification of both is kdlib/kernels/reference/block_layout.py; the native results equal
// it exactly (mass mode: up to float64 rounding ties, since the sums run in other orders).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "ema.h"  // kdlib::Problem, kdlib::with_cuda

namespace kdlib {

// (kv_count [Bm, Hm, Mq], kv_index [Bm, Hm, Mq, Mk], q_count [Bm, Hm, Mk], q_index [Bm, Hm, Mk, Mq])
using LayoutTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

enum class SelectMode : int { ratio = 0, mass = 1 };

// Blocks kept per row in ratio mode: ceil(keep * mk) clamped to [1, mk]; the 1e-9 slack absorbs
// the rounding of keep * mk (0.1 * 30 = 3.0000000000000004 keeps 3). Same formula as the
// reference's ratio_count.
int64_t ratio_count(double keep, int64_t mk);

// Validates the mask (defined, bool, 4 dims, none empty, sizes that fit int32 indices, a device
// this build runs on). Reports instead of throwing, like check_ema_pairs, so that the binding
// returns the problem and Python raises the right class. Messages start with "block_layout: ".
std::optional<Problem> check_block_layout(const at::Tensor& block_mask);

// Validates scores (float32/float16/bfloat16, 4 dims, none empty, device), keep in (0, 1] and
// the mode name; sets *mode on success. Messages start with "select_blocks: ".
std::optional<Problem> check_select_blocks(const at::Tensor& scores, double keep, const std::string& mode_name,
                                           SelectMode* mode);

// Bound as kdlib._C.block_layout after check_block_layout passed: allocates the four outputs on
// the mask's device and fills them on the CPU (threaded) or on the current CUDA stream.
LayoutTensors block_layout(const at::Tensor& block_mask);

// Bound as kdlib._C.select_blocks after check_select_blocks passed: fills a fresh bool mask *out.
// On CPU, NaN scores are found during the selection (no extra pass) and come back as a Problem
// (*out is then meaningless); on CUDA they are not checked, as that would need a host sync.
std::optional<Problem> select_blocks(const at::Tensor& scores, double keep, SelectMode mode, bool keep_diagonal,
                                     at::Tensor* out);

// The CPU parts: mask / scores are CPU tensors of any strides, the outputs contiguous and of the
// right shape. select_blocks_cpu returns true when it saw a NaN score.
void block_layout_cpu(const at::Tensor& block_mask, const LayoutTensors& out);
bool select_blocks_cpu(const at::Tensor& scores, int64_t ratio_keep, double keep, SelectMode mode,
                       bool keep_diagonal, const at::Tensor& out);

#ifdef KDLIB_WITH_CUDA
// The CUDA parts: same contract, enqueued on the device's current stream without host syncs.
void block_layout_cuda(const at::Tensor& block_mask, const LayoutTensors& out);
void select_blocks_cuda(const at::Tensor& scores, int64_t ratio_keep, double keep, SelectMode mode,
                        bool keep_diagonal, const at::Tensor& out);
#endif

}  // namespace kdlib
