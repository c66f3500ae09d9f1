// GroupNorm kernels for AVX-512 (F, BW, VL, DQ), compiled with a raised target for this file's kernels
// only (see vec_prelude.h) and selected at run time when the CPU supports them.
#include "vec_prelude.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTDIFF_GN_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// sleef.h declares its vector functions only under these macros, which the target pragma does not set.
#ifndef __AVX__
#define __AVX__ 1
#define FASTDIFF_GN_UNDEF__AVX__
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define FASTDIFF_GN_UNDEF__AVX2__
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#define FASTDIFF_GN_UNDEF__AVX512F__
#endif
#include <sleef.h>
#ifdef FASTDIFF_GN_UNDEF__AVX__
#undef __AVX__
#undef FASTDIFF_GN_UNDEF__AVX__
#endif
#ifdef FASTDIFF_GN_UNDEF__AVX2__
#undef __AVX2__
#undef FASTDIFF_GN_UNDEF__AVX2__
#endif
#ifdef FASTDIFF_GN_UNDEF__AVX512F__
#undef __AVX512F__
#undef FASTDIFF_GN_UNDEF__AVX512F__
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "group_norm_kernels.h"
#pragma GCC pop_options
#endif

namespace fastdiff::gn {

const KernelTable* kernels_avx512() {
#ifdef FASTDIFF_GN_AVX512
  static constexpr KernelTable table{"avx512", &AVX512::forward, &AVX512::backward};
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace fastdiff::gn
