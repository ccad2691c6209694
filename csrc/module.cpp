// Python bindings of kdlib._C. Every op here has a PyTorch fallback in kdlib; the module is
// optional (kdlib/_ext.py loads it and says what is slower without it).
#include <torch/extension.h>

#include "ema.h"

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
}
