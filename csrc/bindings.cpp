// Python bindings of fastdiff._C: C++ CPU kernels for fastdiff.ops.
#include <torch/extension.h>

#include "group_norm_host.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff C++ CPU kernels";
  m.def("group_norm_forward", &fastdiff::gn::group_norm_forward, py::arg("x"), py::arg("num_groups"),
        py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("eps"), py::arg("silu"),
        py::call_guard<py::gil_scoped_release>(),
        "GroupNorm [+ scale-shift] [+ SiLU] forward of x [N, C, *spatial] (contiguous or channels-last; "
        "float32, float64, bfloat16, float16). weight/bias [C] or None, scale/shift [N, C] or both None.\n"
        "y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift). Returns (y in x's dtype and "
        "layout, mean [N, G], rstd [N, G]); statistics are float64 for float64 x, float32 otherwise.");
  m.def("group_norm_backward", &fastdiff::gn::group_norm_backward, py::arg("dy"), py::arg("x"),
        py::arg("num_groups"), py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"),
        py::arg("mean"), py::arg("rstd"), py::arg("silu"), py::arg("needs_input_grad"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradients (dx, dweight, dbias, dscale, dshift) of group_norm_forward w.r.t. (x, weight, bias, "
        "scale, shift), each in its input's dtype and shape, None where needs_input_grad is False or the "
        "input is None. The activation is recomputed from x and the saved mean/rstd.");
  m.def("group_norm_autograd", &fastdiff::gn::group_norm_autograd, py::arg("x"), py::arg("num_groups"),
        py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"), py::arg("eps"), py::arg("silu"),
        py::call_guard<py::gil_scoped_release>(),
        "y of group_norm_forward, differentiable: one autograd node whose backward runs group_norm_backward "
        "in C++ (the activation recomputed from x and the saved statistics).");
  m.def("_group_norm_isa", &fastdiff::gn::group_norm_isa, "GroupNorm kernel set in use.");
  m.def("_group_norm_isas", &fastdiff::gn::group_norm_isas, "GroupNorm kernel sets this CPU can run.");
  m.def("_set_group_norm_isa", &fastdiff::gn::set_group_norm_isa, py::arg("isa"),
        "Force a GroupNorm kernel set ('avx512', 'avx2', 'default'), or 'auto'. For tests.");
}
