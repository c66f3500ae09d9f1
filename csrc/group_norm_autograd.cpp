// Autograd of the GroupNorm family on CPU in C++: one graph node per call, no Python in the backward.
#include <torch/csrc/autograd/custom_function.h>

#include <vector>

#include "group_norm_host.h"

namespace fastdiff::gn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor or_undefined(const OptTensor& t) {
  return t.has_value() ? *t : Tensor();
}

OptTensor defined_or_nullopt(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// Inputs, in order: x, num_groups, weight, bias, scale, shift, eps, silu.
struct GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, int64_t num_groups, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& scale, const OptTensor& shift, double eps,
                        bool silu) {
    auto [y, mean, rstd] = group_norm_forward(x, num_groups, weight, bias, scale, shift, eps, silu);
    ctx->save_for_backward({x, or_undefined(weight), or_undefined(bias), or_undefined(scale),
                            or_undefined(shift), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["silu"] = silu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    // needs_input_grad counts graph edges: one per tensor input that was given (x first).
    std::vector<bool> needs;
    size_t edge = 0;
    for (size_t i = 0; i < 5; ++i) {
      const bool given = i == 0 || saved[i].defined();
      needs.push_back(given && ctx->needs_input_grad(edge));
      edge += given ? 1 : 0;
    }
    const Tensor dy = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(x);
    auto [dx, dweight, dbias, dscale, dshift] = group_norm_backward(
        dy, x, ctx->saved_data["num_groups"].toInt(), defined_or_nullopt(saved[1]),
        defined_or_nullopt(saved[2]), defined_or_nullopt(saved[3]), defined_or_nullopt(saved[4]), saved[5],
        saved[6], ctx->saved_data["silu"].toBool(), needs);
    return {or_undefined(dx), Tensor(),           or_undefined(dweight), or_undefined(dbias),
            or_undefined(dscale), or_undefined(dshift), Tensor(), Tensor()};
  }
};

}  // namespace

Tensor group_norm_autograd(const Tensor& x, int64_t num_groups, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& scale, const OptTensor& shift, double eps, bool silu) {
  return GroupNormFunction::apply(x, num_groups, weight, bias, scale, shift, eps, silu);
}

}  // namespace fastdiff::gn
