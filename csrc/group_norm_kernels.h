// GroupNorm family kernels, written once over at::vec::Vectorized and compiled once per instruction set.
//
// Include only from a group_norm_isa_*.cpp file, after it has defined CPU_CAPABILITY (the namespace that
// keeps each instruction set's copy apart) and included <ATen/cpu/vec/vec.h> for that instruction set.
//
// Work split (every reduction has a fixed order that does not depend on the number of threads):
//   contiguous (n, c, s): one work item per (n, g); its M = D * S elements are contiguous. Statistics
//     (pivot-shifted two-pass moments per cache-sized chunk, merged with Chan's formula) and the
//     normalisation run back to back, so the group is read from memory once and re-read from cache.
//   channels-last (n, s, c): work items are (n, block of rows); per-channel partial moments (or gradient
//     sums) per item go to a buffer that is merged in item order, then an elementwise pass per item.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "group_norm.h"

namespace fastdiff::gn::CPU_CAPABILITY {

using at::vec::Vectorized;

// Accumulation type: double for double inputs, float for float, bfloat16 and half.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements per statistics chunk (contiguous layout): small enough that the second pass hits L1.
constexpr int64_t kChunk = 4096;
// Elements per row block (channels-last layout): small enough that the second pass hits L2.
constexpr int64_t kRowBlockElems = 32768;

// Elements of work below which a task is not worth waking another thread for.
constexpr int64_t kMinTaskElems = 32768;

// at::parallel_for over `items` independent work items of about `work_per_item` elements each. Results
// never depend on the split: every item is computed by one thread in a fixed order.
template <typename F>
inline void parallel_items(int64_t items, int64_t work_per_item, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(work_per_item, 1));
  at::parallel_for(0, items, grain, body);
}

// Moves kSize = 2 * Vectorized<acc>::size() elements of T to and from two accumulation-type vectors.
template <typename T>
struct Block {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kW = V::size();
  static constexpr int64_t kSize = 2 * kW;
  static constexpr bool kReduced = !std::is_same_v<T, A>;

  static void load(const T* p, V& lo, V& hi) {
    if constexpr (kReduced) {
      static_assert(Vectorized<T>::size() == kSize, "reduced-precision vector must hold two float vectors");
      auto pair = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
      lo = std::get<0>(pair);
      hi = std::get<1>(pair);
    } else {
      lo = V::loadu(p);
      hi = V::loadu(p + kW);
    }
  }

  // 0 < n <= kSize elements; lanes from n on are zero.
  static void load(const T* p, int64_t n, V& lo, V& hi) {
    if (n == kSize) {
      load(p, lo, hi);
      return;
    }
    if constexpr (kReduced) {
      auto pair = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p, n));
      lo = std::get<0>(pair);
      hi = std::get<1>(pair);
    } else if (n <= kW) {
      lo = V::loadu(p, n);
      hi = V(A(0));
    } else {
      lo = V::loadu(p);
      hi = V::loadu(p + kW, n - kW);
    }
    zero_from(lo, hi, n);
  }

  static void store(T* p, const V& lo, const V& hi) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + kW);
    }
  }

  // Stores the first 0 < n <= kSize elements.
  static void store(T* p, const V& lo, const V& hi, int64_t n) {
    if (n == kSize) {
      store(p, lo, hi);
      return;
    }
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(lo, hi).store(p, n);
    } else if (n <= kW) {
      lo.store(p, n);
    } else {
      lo.store(p);
      hi.store(p + kW, n - kW);
    }
  }

  // Zeroes lanes n, n + 1, ... of the pair (lo holds lanes 0..kW-1, hi lanes kW..kSize-1).
  static void zero_from(V& lo, V& hi, int64_t n) {
    const V zero(A(0));
    if (n < kW) {
      lo = V::set(zero, lo, n);
      hi = zero;
    } else if (n < kSize) {
      hi = V::set(zero, hi, n - kW);
    }
  }
};

// Loads 0 < n <= 2 * V::size() accumulation-type values (per-channel coefficients) into two vectors.
template <typename A>
inline void load_coefficients(const A* p, int64_t n, Vectorized<A>& lo, Vectorized<A>& hi) {
  using V = Vectorized<A>;
  constexpr int64_t kW = V::size();
  if (n >= 2 * kW) {
    lo = V::loadu(p);
    hi = V::loadu(p + kW);
  } else if (n > kW) {
    lo = V::loadu(p);
    hi = V::loadu(p + kW, n - kW);
  } else {
    lo = V::loadu(p, n);
    hi = V(A(0));
  }
}

template <typename A>
inline void store_values(A* p, int64_t n, const Vectorized<A>& lo, const Vectorized<A>& hi) {
  constexpr int64_t kW = Vectorized<A>::size();
  if (n >= 2 * kW) {
    lo.store(p);
    hi.store(p + kW);
  } else if (n > kW) {
    lo.store(p);
    hi.store(p + kW, n - kW);
  } else {
    lo.store(p, n);
  }
}

// Sum of the lanes by a fixed shuffle tree (the same order on every call and thread).
template <typename V>
inline double lane_sum(const V& v) {
  using A = typename V::value_type;
  return static_cast<double>(at::vec::vec_reduce_all<A>([](const V& a, const V& b) { return a + b; }, v));
}

// exp(u) for u <= 0: float uses ATen's inlined polynomial exp (a few ulp), double the full-precision exp
// so that float64 results stay exact to ~1e-15.
template <typename V>
inline V exp_nonpositive(const V& u) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return u.exp_u20();
  } else {
    return u.exp();
  }
}

// 1 / d for d in [1, 2]. float on AVX2 / AVX-512: the hardware reciprocal estimate refined by one Newton
// step (within ~2 ulp), which avoids the long-latency vector division; otherwise an exact division.
template <typename V>
inline V reciprocal_1_to_2(const V& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    const __m512 dv = d;
    const __m512 r = _mm512_rcp14_ps(dv);
    return V(_mm512_mul_ps(r, _mm512_fnmadd_ps(dv, r, _mm512_set1_ps(2.0f))));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    const __m256 dv = d;
    const __m256 r = _mm256_rcp_ps(dv);
    return V(_mm256_mul_ps(r, _mm256_fnmadd_ps(dv, r, _mm256_set1_ps(2.0f))));
  }
#endif
  const V one(typename V::value_type(1));
  return one / d;
}

// sigmoid(u) and sigmoid(-u) = 1 - sigmoid(u), each to a few ulp (also where one of them is tiny), from
// e = exp(-|u|) in [0, 1] so that nothing overflows: 1 / (1 + e) and e / (1 + e).
template <typename V>
inline void sigmoid_pair(const V& u, V& sig, V& sig_neg) {
  const V zero(typename V::value_type(0));
  const V one(typename V::value_type(1));
  const V e = exp_nonpositive(u.abs().neg());
  const V r = reciprocal_1_to_2(one + e);
  const V er = e * r;
  const V positive = u >= zero;
  sig = V::blendv(er, r, positive);
  sig_neg = V::blendv(r, er, positive);
}

template <typename V>
inline V silu(const V& u) {
  V sig, sig_neg;
  sigmoid_pair(u, sig, sig_neg);
  return u * sig;
}

// d silu(u) / du = s * (1 + u * (1 - s)), s = sigmoid(u).
template <typename V>
inline V silu_grad(const V& u) {
  const V one(typename V::value_type(1));
  V sig, sig_neg;
  sigmoid_pair(u, sig, sig_neg);
  return sig * at::vec::fmadd(u, sig_neg, one);
}

// Gradient w.r.t. u = (x - mean) * alpha + beta from the gradient w.r.t. the output.
template <bool SILU, typename V>
inline V grad_u(const V& x, const V& dy, const V& mean, const V& alpha, const V& beta) {
  if constexpr (SILU) {
    return dy * silu_grad(at::vec::fmadd(x - mean, alpha, beta));
  } else {
    return dy;
  }
}

// count, mean (relative to a pivot) and sum of squared deviations; merged with Chan's formula.
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;

  void merge(double n_b, double mean_b, double m2_b) {
    if (n_b <= 0.0) {
      return;
    }
    const double n = count + n_b;
    const double delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
};

// Per-(n, c) affine coefficients: u = (x - mean) * alpha + beta, and k = weight * (1 + scale), the factor
// from u to xhat's gradient.
struct Affine {
  double alpha, beta, k;
};

template <typename A>
inline Affine affine_at(const A* weight, const A* bias, const A* scale, const A* shift, int64_t C, int64_t n,
                        int64_t c, double rstd) {
  const double w = weight ? static_cast<double>(weight[c]) : 1.0;
  const double b = bias ? static_cast<double>(bias[c]) : 0.0;
  const double s = scale ? 1.0 + static_cast<double>(scale[n * C + c]) : 1.0;
  const double sh = shift ? static_cast<double>(shift[n * C + c]) : 0.0;
  return {rstd * w * s, b * s + sh, w * s};
}

inline double inverse_std(double m2, double count, double eps) {
  const double var = count > 0.0 ? std::max(m2 / count, 0.0) : 0.0;
  return 1.0 / std::sqrt(var + eps);
}

// ---------------------------------------------------------------------------------------------------
// Contiguous layout: one work item per (n, g).

// Moments of len contiguous elements about `pivot`: a sum pass, then a squared-deviation pass that
// re-reads the chunk from L1.
template <typename T>
inline Moments chunk_moments(const T* p, int64_t len, acc_t<T> pivot) {
  using B = Block<T>;
  using V = typename B::V;
  using A = acc_t<T>;
  const V vp(pivot);
  V s0(A(0)), s1(A(0)), lo, hi;
  int64_t i = 0;
  for (; i + B::kSize <= len; i += B::kSize) {
    B::load(p + i, lo, hi);
    s0 += lo - vp;
    s1 += hi - vp;
  }
  if (i < len) {
    B::load(p + i, len - i, lo, hi);
    lo = lo - vp;
    hi = hi - vp;
    B::zero_from(lo, hi, len - i);
    s0 += lo;
    s1 += hi;
  }
  const double mean = lane_sum(s0 + s1) / static_cast<double>(len);
  const V vm(static_cast<A>(mean));
  V q0(A(0)), q1(A(0));
  for (i = 0; i + B::kSize <= len; i += B::kSize) {
    B::load(p + i, lo, hi);
    const V d0 = (lo - vp) - vm;
    const V d1 = (hi - vp) - vm;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
  }
  if (i < len) {
    B::load(p + i, len - i, lo, hi);
    V d0 = (lo - vp) - vm;
    V d1 = (hi - vp) - vm;
    B::zero_from(d0, d1, len - i);
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
  }
  // The sum of squares is about the rounded mean vm; shift it to the exact chunk mean.
  const double offset = mean - static_cast<double>(static_cast<A>(mean));
  const double m2 = lane_sum(q0 + q1) - static_cast<double>(len) * offset * offset;
  return {static_cast<double>(len), mean, std::max(m2, 0.0)};
}

// (mean, m2) of M contiguous elements (M >= 1).
template <typename T>
inline Moments group_moments(const T* p, int64_t M) {
  const acc_t<T> pivot = static_cast<acc_t<T>>(p[0]);
  Moments total;
  for (int64_t i = 0; i < M; i += kChunk) {
    const Moments part = chunk_moments(p + i, std::min(kChunk, M - i), pivot);
    total.merge(part.count, part.mean, part.m2);
  }
  total.mean += static_cast<double>(pivot);
  return total;
}

// y = act((x - mean) * alpha + beta) over len contiguous elements.
template <typename T, bool SILU>
inline void normalize_row(const T* x, T* y, int64_t len, acc_t<T> mean, acc_t<T> alpha, acc_t<T> beta) {
  using B = Block<T>;
  using V = typename B::V;
  const V vm(mean), va(alpha), vb(beta);
  V lo, hi;
  int64_t i = 0;
  for (; i + B::kSize <= len; i += B::kSize) {
    B::load(x + i, lo, hi);
    lo = at::vec::fmadd(lo - vm, va, vb);
    hi = at::vec::fmadd(hi - vm, va, vb);
    if constexpr (SILU) {
      lo = silu(lo);
      hi = silu(hi);
    }
    B::store(y + i, lo, hi);
  }
  if (i < len) {
    B::load(x + i, len - i, lo, hi);
    lo = at::vec::fmadd(lo - vm, va, vb);
    hi = at::vec::fmadd(hi - vm, va, vb);
    if constexpr (SILU) {
      lo = silu(lo);
      hi = silu(hi);
    }
    B::store(y + i, lo, hi, len - i);
  }
}

template <typename T, bool SILU>
void forward_contiguous(const ForwardArgs& args) {
  using A = acc_t<T>;
  const auto& sh = args.shape;
  const int64_t C = sh.C, S = sh.S, G = sh.G, D = C / G, M = D * S;
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  A* mean_out = static_cast<A*>(args.mean);
  A* rstd_out = static_cast<A*>(args.rstd);
  const A* weight = static_cast<const A*>(args.weight);
  const A* bias = static_cast<const A*>(args.bias);
  const A* scale = static_cast<const A*>(args.scale);
  const A* shift = static_cast<const A*>(args.shift);
  parallel_items(sh.N * G, M, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / G, g = item % G;
      const int64_t offset = (n * C + g * D) * S;
      const Moments m = group_moments(x + offset, M);
      const double rstd = inverse_std(m.m2, m.count, args.eps);
      mean_out[item] = static_cast<A>(m.mean);
      rstd_out[item] = static_cast<A>(rstd);
      for (int64_t d = 0; d < D; ++d) {
        const Affine f = affine_at(weight, bias, scale, shift, C, n, g * D + d, rstd);
        normalize_row<T, SILU>(x + offset + d * S, y + offset + d * S, S, static_cast<A>(m.mean),
                               static_cast<A>(f.alpha), static_cast<A>(f.beta));
      }
    }
  });
}

// Sums over len contiguous elements of one (n, c) plane: A = sum du * xhat, B = sum du. Also stores du
// to du_out (accumulation type) when given, so that the dx pass need not recompute the activation.
template <typename T, bool SILU>
inline void row_grad_sums(const T* x, const T* dy, int64_t len, acc_t<T> mean, acc_t<T> rstd, acc_t<T> alpha,
                          acc_t<T> beta, acc_t<T>* du_out, double& sum_du_xhat, double& sum_du) {
  using B = Block<T>;
  using V = typename B::V;
  using A = acc_t<T>;
  const V vm(mean), vr(rstd), va(alpha), vb(beta);
  V a0(A(0)), a1(A(0)), b0(A(0)), b1(A(0)), xl, xh, gl, gh;
  int64_t i = 0;
  for (; i + B::kSize <= len; i += B::kSize) {
    B::load(x + i, xl, xh);
    B::load(dy + i, gl, gh);
    const V dul = grad_u<SILU>(xl, gl, vm, va, vb);
    const V duh = grad_u<SILU>(xh, gh, vm, va, vb);
    if (du_out != nullptr) {
      dul.store(du_out + i);
      duh.store(du_out + i + B::kW);
    }
    a0 = at::vec::fmadd(dul, (xl - vm) * vr, a0);
    a1 = at::vec::fmadd(duh, (xh - vm) * vr, a1);
    b0 += dul;
    b1 += duh;
  }
  if (i < len) {
    B::load(x + i, len - i, xl, xh);
    B::load(dy + i, len - i, gl, gh);
    V dul = grad_u<SILU>(xl, gl, vm, va, vb);
    V duh = grad_u<SILU>(xh, gh, vm, va, vb);
    B::zero_from(dul, duh, len - i);
    if (du_out != nullptr) {
      store_values(du_out + i, len - i, dul, duh);
    }
    V tl = (xl - vm) * vr, th = (xh - vm) * vr;
    B::zero_from(tl, th, len - i);
    a0 = at::vec::fmadd(dul, tl, a0);
    a1 = at::vec::fmadd(duh, th, a1);
    b0 += dul;
    b1 += duh;
  }
  sum_du_xhat = lane_sum(a0 + a1);
  sum_du = lane_sum(b0 + b1);
}

// dx = du * p + (x - mean) * q + r over len contiguous elements, du read back from row_grad_sums.
template <typename T>
inline void row_dx(const T* x, const acc_t<T>* du, T* dx, int64_t len, acc_t<T> mean, acc_t<T> p, acc_t<T> q,
                   acc_t<T> r) {
  using B = Block<T>;
  using V = typename B::V;
  const V vm(mean), vp(p), vq(q), vr(r);
  V xl, xh, dl, dh;
  int64_t i = 0;
  for (; i + B::kSize <= len; i += B::kSize) {
    B::load(x + i, xl, xh);
    load_coefficients(du + i, B::kSize, dl, dh);
    B::store(dx + i, at::vec::fmadd(dl, vp, at::vec::fmadd(xl - vm, vq, vr)),
             at::vec::fmadd(dh, vp, at::vec::fmadd(xh - vm, vq, vr)));
  }
  if (i < len) {
    B::load(x + i, len - i, xl, xh);
    load_coefficients(du + i, len - i, dl, dh);
    B::store(dx + i, at::vec::fmadd(dl, vp, at::vec::fmadd(xl - vm, vq, vr)),
             at::vec::fmadd(dh, vp, at::vec::fmadd(xh - vm, vq, vr)), len - i);
  }
}

// dx coefficients of one group from c1 = sum k * A, c2 = sum k * B over its channels:
// dx = rstd * (k * du - (c2 + xhat * c1) / M) = du * (rstd * k) + (x - mean) * q + r.
struct DxGroup {
  double q, r;
};

inline DxGroup dx_group(double rstd, double c1, double c2, double M) {
  return {-rstd * rstd * c1 / M, -rstd * c2 / M};
}

template <typename T, bool SILU>
void backward_contiguous(const BackwardArgs& args) {
  using A = acc_t<T>;
  const auto& sh = args.shape;
  const int64_t C = sh.C, S = sh.S, G = sh.G, D = C / G, M = D * S;
  const T* x = static_cast<const T*>(args.x);
  const T* dy = static_cast<const T*>(args.dy);
  T* dx = static_cast<T*>(args.dx);
  const A* mean_in = static_cast<const A*>(args.mean);
  const A* rstd_in = static_cast<const A*>(args.rstd);
  const A* weight = static_cast<const A*>(args.weight);
  const A* bias = static_cast<const A*>(args.bias);
  const A* scale = static_cast<const A*>(args.scale);
  const A* shift = static_cast<const A*>(args.shift);
  A* sum_a = static_cast<A*>(args.sum_du_xhat);
  A* sum_b = static_cast<A*>(args.sum_du);
  parallel_items(sh.N * G, M, [&](int64_t begin, int64_t end) {
    // du of the current group, kept in cache between the sums pass and the dx pass.
    std::vector<A> du(dx != nullptr ? static_cast<size_t>(M) : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / G, g = item % G;
      const int64_t offset = (n * C + g * D) * S;
      const A mean = mean_in[item];
      const double rstd = static_cast<double>(rstd_in[item]);
      double c1 = 0.0, c2 = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = g * D + d;
        const Affine f = affine_at(weight, bias, scale, shift, C, n, c, rstd);
        double a = 0.0, b = 0.0;
        row_grad_sums<T, SILU>(x + offset + d * S, dy + offset + d * S, S, mean, static_cast<A>(rstd),
                               static_cast<A>(f.alpha), static_cast<A>(f.beta),
                               dx != nullptr ? du.data() + d * S : nullptr, a, b);
        sum_a[n * C + c] = static_cast<A>(a);
        sum_b[n * C + c] = static_cast<A>(b);
        c1 += f.k * a;
        c2 += f.k * b;
      }
      if (dx == nullptr) {
        continue;
      }
      const DxGroup q = dx_group(rstd, c1, c2, static_cast<double>(M));
      for (int64_t d = 0; d < D; ++d) {
        const Affine f = affine_at(weight, bias, scale, shift, C, n, g * D + d, rstd);
        row_dx<T>(x + offset + d * S, du.data() + d * S, dx + offset + d * S, S, mean,
                  static_cast<A>(rstd * f.k), static_cast<A>(q.q), static_cast<A>(q.r));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Channels-last layout: x[n, s, c]. Work items are (n, block of rows).

struct RowBlocks {
  int64_t rows, count;  // rows per block, blocks per sample
};

inline RowBlocks row_blocks(int64_t C, int64_t S) {
  const int64_t rows = std::clamp<int64_t>(kRowBlockElems / std::max<int64_t>(C, 1), 1, std::max<int64_t>(S, 1));
  return {rows, (S + rows - 1) / rows};
}

// Per-channel moments of rows [0, rows) of a channels-last block about the per-channel pivot row;
// writes the mean (relative to the pivot) and m2 of each of the C channels.
template <typename T>
void block_channel_moments(const T* x, int64_t rows, int64_t C, const T* pivot_row, acc_t<T>* mean_out,
                           acc_t<T>* m2_out) {
  using B = Block<T>;
  using V = typename B::V;
  using A = acc_t<T>;
  const V inv_rows(static_cast<A>(1.0 / static_cast<double>(rows)));
  for (int64_t c0 = 0; c0 < C; c0 += B::kSize) {
    const int64_t width = std::min(B::kSize, C - c0);
    V pl, ph, lo, hi;
    B::load(pivot_row + c0, width, pl, ph);
    V s0(A(0)), s1(A(0));
    for (int64_t r = 0; r < rows; ++r) {
      B::load(x + r * C + c0, width, lo, hi);
      s0 += lo - pl;
      s1 += hi - ph;
    }
    const V m0 = s0 * inv_rows, m1 = s1 * inv_rows;
    V q0(A(0)), q1(A(0));
    for (int64_t r = 0; r < rows; ++r) {
      B::load(x + r * C + c0, width, lo, hi);
      const V d0 = (lo - pl) - m0;
      const V d1 = (hi - ph) - m1;
      q0 = at::vec::fmadd(d0, d0, q0);
      q1 = at::vec::fmadd(d1, d1, q1);
    }
    store_values(mean_out + c0, width, m0, m1);
    store_values(m2_out + c0, width, q0, q1);
  }
}

// y rows = act((x - mean_c) * alpha_c + beta_c), coefficients per channel.
template <typename T, bool SILU>
void block_normalize(const T* x, T* y, int64_t rows, int64_t C, const acc_t<T>* mean, const acc_t<T>* alpha,
                     const acc_t<T>* beta) {
  using B = Block<T>;
  using V = typename B::V;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c0 = 0; c0 < C; c0 += B::kSize) {
      const int64_t width = std::min(B::kSize, C - c0);
      V ml, mh, al, ah, bl, bh, lo, hi;
      load_coefficients(mean + c0, width, ml, mh);
      load_coefficients(alpha + c0, width, al, ah);
      load_coefficients(beta + c0, width, bl, bh);
      B::load(x + r * C + c0, width, lo, hi);
      lo = at::vec::fmadd(lo - ml, al, bl);
      hi = at::vec::fmadd(hi - mh, ah, bh);
      if constexpr (SILU) {
        lo = silu(lo);
        hi = silu(hi);
      }
      B::store(y + r * C + c0, lo, hi, width);
    }
  }
}

template <typename T, bool SILU>
void forward_channels_last(const ForwardArgs& args) {
  using A = acc_t<T>;
  const auto& sh = args.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, G = sh.G, D = C / G;
  const RowBlocks blocks = row_blocks(C, S);
  const T* x = static_cast<const T*>(args.x);
  T* y = static_cast<T*>(args.y);
  A* mean_out = static_cast<A*>(args.mean);
  A* rstd_out = static_cast<A*>(args.rstd);
  const A* weight = static_cast<const A*>(args.weight);
  const A* bias = static_cast<const A*>(args.bias);
  const A* scale = static_cast<const A*>(args.scale);
  const A* shift = static_cast<const A*>(args.shift);

  std::vector<A> part_mean(static_cast<size_t>(N * blocks.count * C));
  std::vector<A> part_m2(part_mean.size());
  parallel_items(N * blocks.count, blocks.rows * C, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks.count, r0 = (item % blocks.count) * blocks.rows;
      const int64_t rows = std::min(blocks.rows, S - r0);
      block_channel_moments(x + (n * S + r0) * C, rows, C, x + n * S * C, part_mean.data() + item * C,
                            part_m2.data() + item * C);
    }
  });

  // Merge the row blocks per channel, then the channels per group; build per-(n, c) coefficients.
  std::vector<A> coef_mean(static_cast<size_t>(N * C)), coef_alpha(coef_mean.size()), coef_beta(coef_mean.size());
  parallel_items(N * G, D * blocks.count, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / G, g = item % G;
      Moments group;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        Moments channel;
        for (int64_t k = 0; k < blocks.count; ++k) {
          const int64_t rows = std::min(blocks.rows, S - k * blocks.rows);
          const int64_t idx = (n * blocks.count + k) * C + c;
          channel.merge(static_cast<double>(rows), static_cast<double>(part_mean[idx]),
                        static_cast<double>(part_m2[idx]));
        }
        group.merge(channel.count, channel.mean + static_cast<double>(x[n * S * C + c]), channel.m2);
      }
      const double rstd = inverse_std(group.m2, group.count, args.eps);
      mean_out[item] = static_cast<A>(group.mean);
      rstd_out[item] = static_cast<A>(rstd);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const Affine f = affine_at(weight, bias, scale, shift, C, n, c, rstd);
        coef_mean[n * C + c] = static_cast<A>(group.mean);
        coef_alpha[n * C + c] = static_cast<A>(f.alpha);
        coef_beta[n * C + c] = static_cast<A>(f.beta);
      }
    }
  });

  parallel_items(N * blocks.count, blocks.rows * C, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks.count, r0 = (item % blocks.count) * blocks.rows;
      const int64_t rows = std::min(blocks.rows, S - r0);
      const int64_t offset = (n * S + r0) * C;
      block_normalize<T, SILU>(x + offset, y + offset, rows, C, coef_mean.data() + n * C,
                               coef_alpha.data() + n * C, coef_beta.data() + n * C);
    }
  });
}

// Per-channel sums over rows [0, rows) of a channels-last block: A_c = sum du * xhat, B_c = sum du.
template <typename T, bool SILU>
void block_grad_sums(const T* x, const T* dy, int64_t rows, int64_t C, const acc_t<T>* mean,
                     const acc_t<T>* rstd, const acc_t<T>* alpha, const acc_t<T>* beta, acc_t<T>* a_out,
                     acc_t<T>* b_out) {
  using B = Block<T>;
  using V = typename B::V;
  using A = acc_t<T>;
  for (int64_t c0 = 0; c0 < C; c0 += B::kSize) {
    const int64_t width = std::min(B::kSize, C - c0);
    V ml, mh, rl, rh, al, ah, bl, bh;
    load_coefficients(mean + c0, width, ml, mh);
    load_coefficients(rstd + c0, width, rl, rh);
    load_coefficients(alpha + c0, width, al, ah);
    load_coefficients(beta + c0, width, bl, bh);
    V a0(A(0)), a1(A(0)), b0(A(0)), b1(A(0)), xl, xh, gl, gh;
    for (int64_t r = 0; r < rows; ++r) {
      B::load(x + r * C + c0, width, xl, xh);
      B::load(dy + r * C + c0, width, gl, gh);
      const V dul = grad_u<SILU>(xl, gl, ml, al, bl);
      const V duh = grad_u<SILU>(xh, gh, mh, ah, bh);
      a0 = at::vec::fmadd(dul, (xl - ml) * rl, a0);
      a1 = at::vec::fmadd(duh, (xh - mh) * rh, a1);
      b0 += dul;
      b1 += duh;
    }
    store_values(a_out + c0, width, a0, a1);
    store_values(b_out + c0, width, b0, b1);
  }
}

template <typename T, bool SILU>
void block_dx(const T* x, const T* dy, T* dx, int64_t rows, int64_t C, const acc_t<T>* mean,
              const acc_t<T>* alpha, const acc_t<T>* beta, const acc_t<T>* p, const acc_t<T>* q,
              const acc_t<T>* r) {
  using B = Block<T>;
  using V = typename B::V;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c0 = 0; c0 < C; c0 += B::kSize) {
      const int64_t width = std::min(B::kSize, C - c0);
      V ml, mh, al, ah, bl, bh, pl, ph, ql, qh, rl, rh, xl, xh, gl, gh;
      load_coefficients(mean + c0, width, ml, mh);
      load_coefficients(alpha + c0, width, al, ah);
      load_coefficients(beta + c0, width, bl, bh);
      load_coefficients(p + c0, width, pl, ph);
      load_coefficients(q + c0, width, ql, qh);
      load_coefficients(r + c0, width, rl, rh);
      B::load(x + row * C + c0, width, xl, xh);
      B::load(dy + row * C + c0, width, gl, gh);
      const V lo = at::vec::fmadd(grad_u<SILU>(xl, gl, ml, al, bl), pl, at::vec::fmadd(xl - ml, ql, rl));
      const V hi = at::vec::fmadd(grad_u<SILU>(xh, gh, mh, ah, bh), ph, at::vec::fmadd(xh - mh, qh, rh));
      B::store(dx + row * C + c0, lo, hi, width);
    }
  }
}

template <typename T, bool SILU>
void backward_channels_last(const BackwardArgs& args) {
  using A = acc_t<T>;
  const auto& sh = args.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, G = sh.G, D = C / G, M = D * S;
  const RowBlocks blocks = row_blocks(C, S);
  const T* x = static_cast<const T*>(args.x);
  const T* dy = static_cast<const T*>(args.dy);
  T* dx = static_cast<T*>(args.dx);
  const A* mean_in = static_cast<const A*>(args.mean);
  const A* rstd_in = static_cast<const A*>(args.rstd);
  const A* weight = static_cast<const A*>(args.weight);
  const A* bias = static_cast<const A*>(args.bias);
  const A* scale = static_cast<const A*>(args.scale);
  const A* shift = static_cast<const A*>(args.shift);
  A* sum_a = static_cast<A*>(args.sum_du_xhat);
  A* sum_b = static_cast<A*>(args.sum_du);

  // Per-(n, c) coefficients: mean and rstd of the channel's group, alpha and beta of u.
  const size_t nc = static_cast<size_t>(N * C);
  std::vector<A> coef_mean(nc), coef_rstd(nc), coef_alpha(nc), coef_beta(nc);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / D;
      const Affine f = affine_at(weight, bias, scale, shift, C, n, c, static_cast<double>(rstd_in[ng]));
      coef_mean[n * C + c] = mean_in[ng];
      coef_rstd[n * C + c] = rstd_in[ng];
      coef_alpha[n * C + c] = static_cast<A>(f.alpha);
      coef_beta[n * C + c] = static_cast<A>(f.beta);
    }
  }

  std::vector<A> part_a(static_cast<size_t>(N * blocks.count * C)), part_b(part_a.size());
  parallel_items(N * blocks.count, blocks.rows * C, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks.count, r0 = (item % blocks.count) * blocks.rows;
      const int64_t rows = std::min(blocks.rows, S - r0);
      const int64_t offset = (n * S + r0) * C;
      block_grad_sums<T, SILU>(x + offset, dy + offset, rows, C, coef_mean.data() + n * C,
                               coef_rstd.data() + n * C, coef_alpha.data() + n * C, coef_beta.data() + n * C,
                               part_a.data() + item * C, part_b.data() + item * C);
    }
  });

  std::vector<A> coef_p(dx ? nc : 0), coef_q(dx ? nc : 0), coef_r(dx ? nc : 0);
  parallel_items(N * G, D * blocks.count, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / G, g = item % G;
      const double rstd = static_cast<double>(rstd_in[item]);
      double c1 = 0.0, c2 = 0.0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        double a = 0.0, b = 0.0;
        for (int64_t k = 0; k < blocks.count; ++k) {
          const int64_t idx = (n * blocks.count + k) * C + c;
          a += static_cast<double>(part_a[idx]);
          b += static_cast<double>(part_b[idx]);
        }
        sum_a[n * C + c] = static_cast<A>(a);
        sum_b[n * C + c] = static_cast<A>(b);
        const double k = affine_at(weight, bias, scale, shift, C, n, c, rstd).k;
        c1 += k * a;
        c2 += k * b;
      }
      if (dx == nullptr) {
        continue;
      }
      const DxGroup q = dx_group(rstd, c1, c2, static_cast<double>(M));
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const double k = affine_at(weight, bias, scale, shift, C, n, c, rstd).k;
        coef_p[n * C + c] = static_cast<A>(rstd * k);
        coef_q[n * C + c] = static_cast<A>(q.q);
        coef_r[n * C + c] = static_cast<A>(q.r);
      }
    }
  });
  if (dx == nullptr) {
    return;
  }

  parallel_items(N * blocks.count, blocks.rows * C, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks.count, r0 = (item % blocks.count) * blocks.rows;
      const int64_t rows = std::min(blocks.rows, S - r0);
      const int64_t offset = (n * S + r0) * C;
      const int64_t nc0 = n * C;
      block_dx<T, SILU>(x + offset, dy + offset, dx + offset, rows, C, coef_mean.data() + nc0,
                        coef_alpha.data() + nc0, coef_beta.data() + nc0, coef_p.data() + nc0,
                        coef_q.data() + nc0, coef_r.data() + nc0);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Entry points: dispatch on element type, layout and activation.

template <typename T>
void forward_typed(const ForwardArgs& args) {
  if (args.shape.channels_last) {
    args.silu ? forward_channels_last<T, true>(args) : forward_channels_last<T, false>(args);
  } else {
    args.silu ? forward_contiguous<T, true>(args) : forward_contiguous<T, false>(args);
  }
}

template <typename T>
void backward_typed(const BackwardArgs& args) {
  if (args.shape.channels_last) {
    args.silu ? backward_channels_last<T, true>(args) : backward_channels_last<T, false>(args);
  } else {
    args.silu ? backward_contiguous<T, true>(args) : backward_contiguous<T, false>(args);
  }
}

inline void forward(const ForwardArgs& args) {
  switch (args.kind) {
    case ScalarKind::Float:
      return forward_typed<float>(args);
    case ScalarKind::Double:
      return forward_typed<double>(args);
    case ScalarKind::BFloat16:
      return forward_typed<c10::BFloat16>(args);
    case ScalarKind::Half:
      return forward_typed<c10::Half>(args);
  }
}

inline void backward(const BackwardArgs& args) {
  switch (args.kind) {
    case ScalarKind::Float:
      return backward_typed<float>(args);
    case ScalarKind::Double:
      return backward_typed<double>(args);
    case ScalarKind::BFloat16:
      return backward_typed<c10::BFloat16>(args);
    case ScalarKind::Half:
      return backward_typed<c10::Half>(args);
  }
}

}  // namespace fastdiff::gn::CPU_CAPABILITY
