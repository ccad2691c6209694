// Python bindings of kdlib._C. Every op here has a PyTorch fallback in kdlib; the module is
// optional (kdlib/_ext.py loads it and says what is slower without it).
#include <torch/extension.h>

#include "block_layout.h"
#include "ema.h"

namespace {

// The layout ops answer (None, result) or ((error class name, message), None), the contract of
// _call_native in kdlib/kernels/block_layout.py.
py::tuple failed(const kdlib::Problem& problem) {
  return py::make_tuple(py::make_tuple(problem.type_error ? "TypeError" : "ValueError", problem.message), py::none());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdlib native ops (C++/OpenMP on CPU, CUDA when built with it)";
  m.def("with_cuda", &kdlib::with_cuda, "True when the module was compiled with its CUDA kernels.");
  m.def(
      "ema_update_",
      [](const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double weight) -> py::object {
        if (auto problem = kdlib::check_ema_pairs(ema, params, weight))
          return py::make_tuple(problem->type_error ? "TypeError" : "ValueError", "ema_update_: " + problem->message);
        {
          py::gil_scoped_release no_gil;  // the update may take milliseconds on CPU
          kdlib::ema_update_(ema, params, weight);
        }
        return py::none();
      },
      py::arg("ema"), py::arg("params"), py::arg("weight"),
      "In place, for every pair: ema[i] = lerp(ema[i], params[i], weight) (weight = 1 - decay), the semantics "
      "of torch._foreach_lerp_. Tensors of one pair share shape, dtype and device. Returns None, or, having "
      "done nothing, (error class name, message) for the first bad input.");
  m.def(
      "block_layout",
      [](const at::Tensor& block_mask) -> py::tuple {
        if (auto problem = kdlib::check_block_layout(block_mask)) return failed(*problem);
        kdlib::LayoutTensors layout;
        {
          py::gil_scoped_release no_gil;  // milliseconds on CPU for large masks
          layout = kdlib::block_layout(block_mask);
        }
        return py::make_tuple(py::none(), layout);
      },
      py::arg("block_mask"),
      "block_mask: bool [Bm, Hm, Mq, Mk] (any strides) -> (None, (kv_count [Bm, Hm, Mq], kv_index [Bm, Hm, Mq, Mk], "
      "q_count [Bm, Hm, Mk], q_index [Bm, Hm, Mk, Mq])): int32, contiguous, on the mask's device; per query block "
      "the selected key blocks ascending (unused slots 0), and the transpose. For a bad input: ((error class "
      "name, message), None).");
  m.def(
      "select_blocks",
      [](const at::Tensor& scores, double keep, const std::string& mode_name, bool keep_diagonal) -> py::tuple {
        kdlib::SelectMode mode;
        if (auto problem = kdlib::check_select_blocks(scores, keep, mode_name, &mode)) return failed(*problem);
        at::Tensor mask;
        std::optional<kdlib::Problem> problem;
        {
          py::gil_scoped_release no_gil;
          problem = kdlib::select_blocks(scores, keep, mode, keep_diagonal, &mask);
        }
        if (problem) return failed(*problem);
        return py::make_tuple(py::none(), mask);
      },
      py::arg("scores"), py::arg("keep"), py::arg("mode"), py::arg("keep_diagonal"),
      "scores: float32/float16/bfloat16 [B, H, Mq, Mk] (any strides), keep in (0, 1], mode 'ratio' or 'mass' -> "
      "(None, a fresh bool mask [B, H, Mq, Mk]) of the top blocks per row, as "
      "kdlib.kernels.reference.block_layout.select_blocks_reference. For a bad input (NaN scores on CPU "
      "included): ((error class name, message), None).");
}
