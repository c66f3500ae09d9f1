// GroupNorm family on CPU: the problem descriptions shared by the host code (group_norm.cpp) and the
// per-instruction-set kernels (group_norm_kernels.h, compiled once per ISA by group_norm_isa_*.cpp).
//
// x is [N, C, S] with S the product of the spatial sizes, stored either contiguously (n, c, s) or
// channels-last (n, s, c). Channels split into G groups of D = C / G; a group holds M = D * S elements.
//   xhat = (x - mean[n, g]) * rstd[n, g]
//   u    = (xhat * weight[c] + bias[c]) * (1 + scale[n, c]) + shift[n, c]
//   y    = silu(u) if silu else u
// Statistics and every accumulation use the "accumulation type": double for double inputs, float
// otherwise. weight/bias/scale/shift/mean/rstd and the [N, C] partial sums are in that type.
#pragma once

#include <cstdint>
#include <string>

namespace fastdiff::gn {

enum class ScalarKind : int { Float, Double, BFloat16, Half };

struct Shape {
  int64_t N = 0, C = 0, S = 0, G = 1;
  bool channels_last = false;
};

struct ForwardArgs {
  ScalarKind kind = ScalarKind::Float;
  Shape shape;
  bool silu = false;
  double eps = 1e-5;
  const void* x = nullptr;       // [N, C, S] in `kind`
  void* y = nullptr;             // same layout as x
  void* mean = nullptr;          // [N, G] accumulation type
  void* rstd = nullptr;          // [N, G] accumulation type
  const void* weight = nullptr;  // [C] or null (= 1)
  const void* bias = nullptr;    // [C] or null (= 0)
  const void* scale = nullptr;   // [N, C] or null (= 0); given together with shift
  const void* shift = nullptr;   // [N, C] or null (= 0)
};

// The backward pass writes, per (n, c), A = sum_s du * xhat and B = sum_s du, where du is the gradient
// w.r.t. u; the host turns them into the parameter gradients. dx is written only when non-null.
struct BackwardArgs {
  ScalarKind kind = ScalarKind::Float;
  Shape shape;
  bool silu = false;
  const void* dy = nullptr;  // same layout as x
  const void* x = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* scale = nullptr;
  const void* shift = nullptr;
  void* dx = nullptr;            // same layout as x, or null
  void* sum_du_xhat = nullptr;   // A, [N, C] accumulation type
  void* sum_du = nullptr;        // B, [N, C] accumulation type
};

using ForwardFn = void (*)(const ForwardArgs&);
using BackwardFn = void (*)(const BackwardArgs&);

struct KernelTable {
  const char* isa;
  ForwardFn forward;
  BackwardFn backward;
};

// Each returns null when its instruction set was not compiled in (other compilers or architectures).
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace fastdiff::gn
