// GroupNorm family on CPU, host side: tensor layout and dtype handling, instruction-set selection, and
// the parameter gradients built from the kernels' per-(n, c) sums.
#include "group_norm_host.h"

#include <ATen/Version.h>
#include <c10/core/GradMode.h>

#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "group_norm.h"

namespace fastdiff::gn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------------
// Instruction-set selection.

bool cpu_has_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// The kernel tables this build holds and this CPU can run, widest first.
std::vector<const KernelTable*> usable_tables() {
  std::vector<const KernelTable*> tables;
  if (kernels_avx512() != nullptr && cpu_has_avx512()) {
    tables.push_back(kernels_avx512());
  }
  if (kernels_avx2() != nullptr && cpu_has_avx2()) {
    tables.push_back(kernels_avx2());
  }
  tables.push_back(kernels_default());
  return tables;
}

// The widest table that both the CPU and torch's own capability setting (ATEN_CPU_CAPABILITY) allow.
const KernelTable* automatic_table() {
  static const KernelTable* const chosen = [] {
    const std::string torch_capability = at::get_cpu_capability();
    const bool allow_avx512 = torch_capability.find("AVX512") != std::string::npos;
    const bool allow_avx2 = allow_avx512 || torch_capability.find("AVX2") != std::string::npos;
    for (const KernelTable* table : usable_tables()) {
      const std::string isa = table->isa;
      if ((isa == "avx512" && allow_avx512) || (isa == "avx2" && allow_avx2) || isa == "default") {
        return table;
      }
    }
    return kernels_default();
  }();
  return chosen;
}

std::atomic<const KernelTable*> forced_table{nullptr};

const KernelTable* active_table() {
  const KernelTable* forced = forced_table.load();
  return forced != nullptr ? forced : automatic_table();
}

// ---------------------------------------------------------------------------------------------------
// Tensors.

ScalarKind scalar_kind(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return ScalarKind::Float;
    case at::kDouble:
      return ScalarKind::Double;
    case at::kBFloat16:
      return ScalarKind::BFloat16;
    case at::kHalf:
      return ScalarKind::Half;
    default:
      TORCH_CHECK_TYPE(false, "x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  }
}

at::ScalarType accumulation_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// True when x is stored (n, *spatial, c) densely: channels_last / channels_last_3d, or the same for 3-D.
bool is_channels_last(const Tensor& x) {
  return x.dim() >= 3 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
}

// x itself when stored contiguously or channels-last; otherwise one contiguous copy.
Tensor dense(const Tensor& x) {
  return x.is_contiguous() || is_channels_last(x) ? x : x.contiguous();
}

// t stored in the layout chosen for x (a copy only when t is laid out differently).
Tensor in_layout(const Tensor& t, bool channels_last) {
  return channels_last ? t.movedim(1, -1).contiguous().movedim(-1, 1) : t.contiguous();
}

// An uninitialised tensor with exactly the strides of the dense tensor `like` (also in its size-1 dims).
Tensor empty_like_dense(const Tensor& like) {
  return at::empty_strided(like.sizes(), like.strides(), like.options());
}

Shape shape_of(const Tensor& x, int64_t num_groups, bool channels_last) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must be [N, C, *spatial], got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(num_groups > 0 && x.size(1) % num_groups == 0, "num_groups must divide C = ", x.size(1),
                    ", got ", num_groups);
  Shape shape;
  shape.N = x.size(0);
  shape.C = x.size(1);
  shape.G = num_groups;
  shape.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    shape.S *= x.size(d);
  }
  // With one element per (n, c) both layouts are the same memory; the channels-last kernels vectorise
  // across channels.
  shape.channels_last = channels_last || shape.S == 1;
  return shape;
}

// A parameter converted once to the accumulation type, flattened to `numel` values; undefined if absent.
Tensor parameter(const OptTensor& t, const char* name, at::ScalarType acc, int64_t numel) {
  if (!t.has_value() || !t->defined()) {
    return Tensor();
  }
  TORCH_CHECK_VALUE(t->numel() == numel, name, " must hold ", numel, " values, got shape ", t->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), name, " must be a float tensor, got ",
                   t->scalar_type());
  return t->to(acc).reshape({numel}).contiguous();
}

const void* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

bool present(const OptTensor& t) {
  return t.has_value() && t->defined();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> group_norm_forward(const Tensor& x_in, int64_t num_groups,
                                                      const OptTensor& weight, const OptTensor& bias,
                                                      const OptTensor& scale, const OptTensor& shift,
                                                      double eps, bool silu) {
  const c10::NoGradGuard no_grad;  // the layout and dtype conversions below are not part of any graph
  const ScalarKind kind = scalar_kind(x_in);
  const Tensor x = dense(x_in);
  const bool channels_last = is_channels_last(x);
  const Shape shape = shape_of(x, num_groups, channels_last);
  TORCH_CHECK_VALUE(present(scale) == present(shift), "scale and shift must be given together");
  const at::ScalarType acc = accumulation_type(x);
  const Tensor w = parameter(weight, "weight", acc, shape.C);
  const Tensor b = parameter(bias, "bias", acc, shape.C);
  const Tensor s = parameter(scale, "scale", acc, shape.N * shape.C);
  const Tensor sh = parameter(shift, "shift", acc, shape.N * shape.C);

  Tensor y = empty_like_dense(x);
  Tensor mean = at::empty({shape.N, shape.G}, x.options().dtype(acc));
  Tensor rstd = at::empty({shape.N, shape.G}, x.options().dtype(acc));
  if (x.numel() == 0) {
    // Empty batch, or empty groups: an empty group has mean 0 and variance 0.
    mean.zero_();
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  ForwardArgs args;
  args.kind = kind;
  args.shape = shape;
  args.silu = silu;
  args.eps = eps;
  args.x = x.const_data_ptr();
  args.y = y.mutable_data_ptr();
  args.mean = mean.mutable_data_ptr();
  args.rstd = rstd.mutable_data_ptr();
  args.weight = data_or_null(w);
  args.bias = data_or_null(b);
  args.scale = data_or_null(s);
  args.shift = data_or_null(sh);
  active_table()->forward(args);
  return {y, mean, rstd};
}

namespace {

// Parameter gradients from A = sum_s du * xhat and B = sum_s du, [N, C] in the accumulation type:
// dweight = sum_n (1 + scale) * A, dbias = sum_n (1 + scale) * B, dscale = w * A + b * B, dshift = B.
template <typename A>
void parameter_grads(const Tensor& sum_a, const Tensor& sum_b, const Tensor& w, const Tensor& b,
                     const Tensor& s, Tensor& dweight, Tensor& dbias, Tensor& dscale) {
  const int64_t N = sum_a.size(0), C = sum_a.size(1);
  const A* a = sum_a.const_data_ptr<A>();
  const A* bb = sum_b.const_data_ptr<A>();
  const A* wp = w.defined() ? w.const_data_ptr<A>() : nullptr;
  const A* bp = b.defined() ? b.const_data_ptr<A>() : nullptr;
  const A* sp = s.defined() ? s.const_data_ptr<A>() : nullptr;
  A* dw = dweight.defined() ? dweight.mutable_data_ptr<A>() : nullptr;
  A* db = dbias.defined() ? dbias.mutable_data_ptr<A>() : nullptr;
  A* ds = dscale.defined() ? dscale.mutable_data_ptr<A>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    double total_w = 0.0, total_b = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = n * C + c;
      const double factor = sp ? 1.0 + static_cast<double>(sp[i]) : 1.0;
      total_w += factor * static_cast<double>(a[i]);
      total_b += factor * static_cast<double>(bb[i]);
      if (ds != nullptr) {
        const double wc = wp ? static_cast<double>(wp[c]) : 1.0;
        const double bc = bp ? static_cast<double>(bp[c]) : 0.0;
        ds[i] = static_cast<A>(wc * static_cast<double>(a[i]) + bc * static_cast<double>(bb[i]));
      }
    }
    if (dw != nullptr) {
      dw[c] = static_cast<A>(total_w);
    }
    if (db != nullptr) {
      db[c] = static_cast<A>(total_b);
    }
  }
}

OptTensor as_input(const Tensor& grad, const OptTensor& input) {
  if (!grad.defined()) {
    return std::nullopt;
  }
  return grad.to(input->scalar_type()).reshape(input->sizes());
}

}  // namespace

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> group_norm_backward(
    const Tensor& dy_in, const Tensor& x_in, int64_t num_groups, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& scale, const OptTensor& shift, const Tensor& mean_in,
    const Tensor& rstd_in, bool silu, const std::vector<bool>& needs_input_grad) {
  const c10::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(needs_input_grad.size() == 5, "needs_input_grad must hold 5 flags, got ",
                    needs_input_grad.size());
  const ScalarKind kind = scalar_kind(x_in);
  const Tensor x = dense(x_in);
  const bool channels_last = is_channels_last(x);
  const Shape shape = shape_of(x, num_groups, channels_last);
  TORCH_CHECK_VALUE(dy_in.sizes() == x.sizes(), "dy must have x's shape ", x.sizes(), ", got ", dy_in.sizes());
  TORCH_CHECK_TYPE(dy_in.scalar_type() == x.scalar_type(), "dy must have x's dtype ", x.scalar_type(),
                   ", got ", dy_in.scalar_type());
  TORCH_CHECK_VALUE(present(scale) == present(shift), "scale and shift must be given together");
  const at::ScalarType acc = accumulation_type(x);
  const Tensor w = parameter(weight, "weight", acc, shape.C);
  const Tensor b = parameter(bias, "bias", acc, shape.C);
  const Tensor s = parameter(scale, "scale", acc, shape.N * shape.C);
  const Tensor sh = parameter(shift, "shift", acc, shape.N * shape.C);
  const Tensor mean = parameter(mean_in, "mean", acc, shape.N * shape.G);
  const Tensor rstd = parameter(rstd_in, "rstd", acc, shape.N * shape.G);

  const bool need_dx = needs_input_grad[0];
  const bool need_dweight = needs_input_grad[1] && w.defined();
  const bool need_dbias = needs_input_grad[2] && b.defined();
  const bool need_dscale = needs_input_grad[3] && s.defined();
  const bool need_dshift = needs_input_grad[4] && sh.defined();
  if (!need_dx && !need_dweight && !need_dbias && !need_dscale && !need_dshift) {
    return {std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt};
  }

  const auto acc_options = x.options().dtype(acc);
  Tensor sum_a = at::empty({shape.N, shape.C}, acc_options);
  Tensor sum_b = at::empty({shape.N, shape.C}, acc_options);
  Tensor dx = need_dx ? empty_like_dense(x) : Tensor();
  if (x.numel() == 0) {
    sum_a.zero_();
    sum_b.zero_();
  } else {
    const Tensor dy = in_layout(dy_in, channels_last);
    BackwardArgs args;
    args.kind = kind;
    args.shape = shape;
    args.silu = silu;
    args.dy = dy.const_data_ptr();
    args.x = x.const_data_ptr();
    args.mean = mean.const_data_ptr();
    args.rstd = rstd.const_data_ptr();
    args.weight = data_or_null(w);
    args.bias = data_or_null(b);
    args.scale = data_or_null(s);
    args.shift = data_or_null(sh);
    args.dx = need_dx ? dx.mutable_data_ptr() : nullptr;
    args.sum_du_xhat = sum_a.mutable_data_ptr();
    args.sum_du = sum_b.mutable_data_ptr();
    active_table()->backward(args);
  }

  Tensor dweight = need_dweight ? at::empty({shape.C}, acc_options) : Tensor();
  Tensor dbias = need_dbias ? at::empty({shape.C}, acc_options) : Tensor();
  Tensor dscale = need_dscale ? at::empty({shape.N, shape.C}, acc_options) : Tensor();
  if (acc == at::kDouble) {
    parameter_grads<double>(sum_a, sum_b, w, b, s, dweight, dbias, dscale);
  } else {
    parameter_grads<float>(sum_a, sum_b, w, b, s, dweight, dbias, dscale);
  }
  OptTensor dx_out = need_dx ? OptTensor(dx) : std::nullopt;
  return {dx_out, as_input(dweight, weight), as_input(dbias, bias), as_input(dscale, scale),
          need_dshift ? as_input(sum_b, shift) : std::nullopt};
}

std::string group_norm_isa() {
  return active_table()->isa;
}

std::vector<std::string> group_norm_isas() {
  std::vector<std::string> names;
  for (const KernelTable* table : usable_tables()) {
    names.emplace_back(table->isa);
  }
  return names;
}

void set_group_norm_isa(const std::string& isa) {
  if (isa.empty() || isa == "auto") {
    forced_table.store(nullptr);
    return;
  }
  for (const KernelTable* table : usable_tables()) {
    if (isa == table->isa) {
      forced_table.store(table);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "isa must be 'auto' or one of this CPU's kernel sets, got '", isa, "'");
}

}  // namespace fastdiff::gn
