// GroupNorm family on CPU: the functions bound into fastdiff._C (see bindings.cpp for the contract).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastdiff::gn {

// y = act(((x - mean) * rstd * weight + bias) * (1 + scale) + shift); returns (y, mean [N, G], rstd [N, G]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_forward(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, double eps, bool silu);

// Gradients w.r.t. (x, weight, bias, scale, shift); nullopt where not needed or the input is absent.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>, std::optional<at::Tensor>>
group_norm_backward(const at::Tensor& dy, const at::Tensor& x, int64_t num_groups,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                    const at::Tensor& mean, const at::Tensor& rstd, bool silu,
                    const std::vector<bool>& needs_input_grad);

// y of group_norm_forward as one autograd node whose backward is group_norm_backward (C++ only).
at::Tensor group_norm_autograd(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift, double eps, bool silu);

// The kernel set in use ("avx512", "avx2" or "default"), those this CPU can run, and a switch for tests
// ("auto" restores the automatic choice).
std::string group_norm_isa();
std::vector<std::string> group_norm_isas();
void set_group_norm_isa(const std::string& isa);

}  // namespace fastdiff::gn
