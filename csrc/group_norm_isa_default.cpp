// GroupNorm kernels for the compiler's default target (no AVX): the fallback on every CPU.
#include "vec_prelude.h"

#define CPU_CAPABILITY DEFAULT
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "group_norm_kernels.h"

namespace fastdiff::gn {

const KernelTable* kernels_default() {
  static constexpr KernelTable table{"default", &DEFAULT::forward, &DEFAULT::backward};
  return &table;
}

}  // namespace fastdiff::gn
