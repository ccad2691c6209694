// Launcher of the multi-tensor CUDA EMA kernel. Plain C++ with the CUDA runtime only (no torch
// headers), so the .cu compiles standalone with nvcc and CI can compile-check it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdlib {
namespace cuda {

enum class FloatKind : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// In place, for i < count: ema[i][k] = lerp(ema[i][k], param[i][k], weight) for k < numel[i].
// ema/param/numel are host arrays of device pointers and sizes; every tensor is contiguous and
// of `kind`. f16/bf16 compute in float32. Enqueues a few launches on `stream` (the tensor table
// travels in the kernel arguments) and returns the first launch error, or cudaSuccess.
cudaError_t ema_update_launch(FloatKind kind, void* const* ema, const void* const* param, const int64_t* numel,
                              int64_t count, double weight, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdlib
