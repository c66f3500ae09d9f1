// Every header that <ATen/cpu/vec/vec.h> pulls in, apart from the vector headers themselves.
//
// An ISA file includes this first, with the compiler's default target, and only then raises the target
// (AVX2, AVX-512) for the vector headers and the kernels. The inline functions of these headers are
// therefore compiled for the default target only, so the linker never picks an AVX-512 copy of one of
// them for code that runs on a CPU without AVX-512. Everything compiled under the raised target lives in
// the at::vec::CPU_CAPABILITY and fastdiff::gn::CPU_CAPABILITY namespaces, distinct per ISA file.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/jiterator_macros.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

#include "group_norm.h"
