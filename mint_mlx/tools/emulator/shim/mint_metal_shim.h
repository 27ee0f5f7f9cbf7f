// A small C++20 stand-in for the Metal Shading Language, enough to compile mint-mlx's kernel
// sources (the text mx.fast.metal_kernel would receive) with g++ and run them on a CPU through
// mint_runtime. It is a test instrument, not a port: what it supplies follows the MSL
// specification's semantics where our kernels depend on them (per-operation half rounding,
// simdgroup collectives over the active lanes, barrier memory ordering); what it lacks fails to
// compile rather than being approximated (vector swizzles, textures, imageblocks).
//
// Address-space keywords (device, constant, thread, threadgroup, kernel) become empty macros at the
// end of this file. Threadgroup *declarations* are rewritten by emulate.py into mint::tg_alloc
// calls before compilation, because in C++ a local array cannot be shared between threads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mint_runtime.h"

// -------------------------------------------------------------------------------------------------
// Scalar types

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;  // IEEE binary16; g++ rounds every operation to half (FLT_EVAL_METHOD 0)

namespace mint {

constexpr uint16_t f32_to_bf16_bits(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return (uint16_t)(u >> 16);
}

constexpr float bf16_bits_to_f32(uint16_t b) {
  return __builtin_bit_cast(float, (uint32_t)b << 16);
}

}  // namespace mint

// bfloat16 with the semantics of Metal's native `bfloat`: bfloat op bfloat rounds to bfloat,
// bfloat op float is float, bfloat op integer is bfloat.
struct bfloat {
  uint16_t bits_;
  bfloat() = default;
  constexpr bfloat(float f) : bits_(mint::f32_to_bf16_bits(f)) {}
  constexpr bfloat(double f) : bits_(mint::f32_to_bf16_bits((float)f)) {}
  constexpr bfloat(_Float16 f) : bits_(mint::f32_to_bf16_bits((float)f)) {}
  template <class U, std::enable_if_t<std::is_integral_v<U>, int> = 0>
  constexpr bfloat(U v) : bits_(mint::f32_to_bf16_bits((float)v)) {}
  constexpr operator float() const { return mint::bf16_bits_to_f32(bits_); }
};

typedef half float16_t;
typedef bfloat bfloat16_t;

namespace mint {

template <class T>
inline constexpr bool is_float_v = std::is_floating_point_v<T> || std::is_same_v<T, _Float16> ||
                                   std::is_same_v<T, bfloat>;
template <class T>
inline constexpr bool is_num_v = std::is_arithmetic_v<T> || is_float_v<T>;

// Result type of bfloat (op) U.
template <class U>
using bf_result = std::conditional_t<std::is_same_v<U, float> || std::is_same_v<U, double>, U,
                                     std::conditional_t<std::is_same_v<U, _Float16>, float, bfloat>>;
template <class U>
using bf_compute = std::conditional_t<std::is_same_v<U, double>, double, float>;

}  // namespace mint

#define MINT_BF_BINOP(op)                                                                  \
  inline bfloat operator op(bfloat a, bfloat b) { return bfloat(float(a) op float(b)); }   \
  template <class U, std::enable_if_t<mint::is_num_v<U> && !std::is_same_v<U, bfloat>, int> = 0> \
  inline mint::bf_result<U> operator op(bfloat a, U b) {                                    \
    using C = mint::bf_compute<U>;                                                          \
    return mint::bf_result<U>(C(float(a)) op C(b));                                         \
  }                                                                                         \
  template <class U, std::enable_if_t<mint::is_num_v<U> && !std::is_same_v<U, bfloat>, int> = 0> \
  inline mint::bf_result<U> operator op(U a, bfloat b) {                                    \
    using C = mint::bf_compute<U>;                                                          \
    return mint::bf_result<U>(C(a) op C(float(b)));                                         \
  }                                                                                         \
  template <class U, std::enable_if_t<mint::is_num_v<U>, int> = 0>                          \
  inline bfloat& operator op##=(bfloat & a, U b) {                                          \
    a = bfloat(float(a) op float(b));                                                       \
    return a;                                                                               \
  }
MINT_BF_BINOP(+)
MINT_BF_BINOP(-)
MINT_BF_BINOP(*)
MINT_BF_BINOP(/)
#undef MINT_BF_BINOP

#define MINT_BF_CMP(op)                                                                    \
  inline bool operator op(bfloat a, bfloat b) { return float(a) op float(b); }             \
  template <class U, std::enable_if_t<mint::is_num_v<U> && !std::is_same_v<U, bfloat>, int> = 0> \
  inline bool operator op(bfloat a, U b) {                                                  \
    return mint::bf_compute<U>(float(a)) op mint::bf_compute<U>(b);                         \
  }                                                                                         \
  template <class U, std::enable_if_t<mint::is_num_v<U> && !std::is_same_v<U, bfloat>, int> = 0> \
  inline bool operator op(U a, bfloat b) {                                                  \
    return mint::bf_compute<U>(a) op mint::bf_compute<U>(float(b));                         \
  }
MINT_BF_CMP(==)
MINT_BF_CMP(!=)
MINT_BF_CMP(<)
MINT_BF_CMP(<=)
MINT_BF_CMP(>)
MINT_BF_CMP(>=)
#undef MINT_BF_CMP

inline bfloat operator-(bfloat a) {
  bfloat r;
  r.bits_ = (uint16_t)(a.bits_ ^ 0x8000u);
  return r;
}
inline bfloat operator+(bfloat a) { return a; }
inline bfloat& operator++(bfloat& a) { return a += 1; }
inline bfloat& operator--(bfloat& a) { return a -= 1; }

// -------------------------------------------------------------------------------------------------
// Vector types: vec<T, N> with members x, y, z, w, operator[] and element-wise arithmetic.
// Sizes and alignments follow Metal (a 3-vector is padded to 4 elements). No swizzles.

namespace mint {
template <class T, int N>
struct vec_base;
template <class T>
struct vec_base<T, 2> {
  T x, y;
};
template <class T>
struct vec_base<T, 3> {
  T x, y, z;
};
template <class T>
struct vec_base<T, 4> {
  T x, y, z, w;
};
constexpr size_t vec_align(size_t s, int n) { return s * (n == 3 ? 4 : n); }
}  // namespace mint

template <class T, int N>
struct alignas(mint::vec_align(sizeof(T), N)) vec;

namespace mint {
template <class V, class S, std::enable_if_t<is_num_v<S>, int> = 0>
inline void vec_put(V& v, int& k, const S& s) {
  v[k++] = typename V::value_type(s);
}
template <class V, class U, int M>
inline void vec_put(V& v, int& k, const ::vec<U, M>& o) {
  for (int i = 0; i < M; i++) v[k++] = typename V::value_type(o[i]);
}
template <class A>
constexpr int vec_count() {
  if constexpr (is_num_v<A>) {
    return 1;
  } else {
    return A::size;
  }
}
}  // namespace mint

template <class T, int N>
struct alignas(mint::vec_align(sizeof(T), N)) vec : mint::vec_base<T, N> {
  using value_type = T;
  static constexpr int size = N;
  vec() = default;
  template <class U, std::enable_if_t<mint::is_num_v<U>, int> = 0>
  vec(U s) {
    for (int i = 0; i < N; i++) (*this)[i] = T(s);
  }
  template <class A, class B, class... R,
            std::enable_if_t<(mint::vec_count<A>() + mint::vec_count<B>() +
                              (0 + ... + mint::vec_count<R>())) == N,
                             int> = 0>
  vec(const A& a, const B& b, const R&... r) {
    int k = 0;
    mint::vec_put(*this, k, a);
    mint::vec_put(*this, k, b);
    (mint::vec_put(*this, k, r), ...);
  }
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; i++) (*this)[i] = T(o[i]);
  }
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
};

#define MINT_VEC_BINOP(op)                                                                 \
  template <class T, int N>                                                                \
  inline vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                   \
    vec<T, N> r;                                                                           \
    for (int i = 0; i < N; i++) r[i] = T(a[i] op b[i]);                                    \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N, class U, std::enable_if_t<mint::is_num_v<U>, int> = 0>        \
  inline vec<T, N> operator op(const vec<T, N>& a, U b) {                                  \
    vec<T, N> r;                                                                           \
    for (int i = 0; i < N; i++) r[i] = T(a[i] op T(b));                                    \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N, class U, std::enable_if_t<mint::is_num_v<U>, int> = 0>        \
  inline vec<T, N> operator op(U a, const vec<T, N>& b) {                                  \
    vec<T, N> r;                                                                           \
    for (int i = 0; i < N; i++) r[i] = T(T(a) op b[i]);                                    \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N, class U>                                                       \
  inline vec<T, N>& operator op##=(vec<T, N>& a, const U& b) {                             \
    a = a op b;                                                                            \
    return a;                                                                              \
  }
MINT_VEC_BINOP(+)
MINT_VEC_BINOP(-)
MINT_VEC_BINOP(*)
MINT_VEC_BINOP(/)
MINT_VEC_BINOP(%)
MINT_VEC_BINOP(&)
MINT_VEC_BINOP(|)
MINT_VEC_BINOP(^)
MINT_VEC_BINOP(<<)
MINT_VEC_BINOP(>>)
#undef MINT_VEC_BINOP

#define MINT_VEC_CMP(op)                                                                   \
  template <class T, int N>                                                                \
  inline vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                \
    vec<bool, N> r;                                                                        \
    for (int i = 0; i < N; i++) r[i] = a[i] op b[i];                                       \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N, class U, std::enable_if_t<mint::is_num_v<U>, int> = 0>        \
  inline vec<bool, N> operator op(const vec<T, N>& a, U b) {                               \
    vec<bool, N> r;                                                                        \
    for (int i = 0; i < N; i++) r[i] = a[i] op T(b);                                       \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N, class U, std::enable_if_t<mint::is_num_v<U>, int> = 0>        \
  inline vec<bool, N> operator op(U a, const vec<T, N>& b) {                               \
    vec<bool, N> r;                                                                        \
    for (int i = 0; i < N; i++) r[i] = T(a) op b[i];                                       \
    return r;                                                                              \
  }
MINT_VEC_CMP(==)
MINT_VEC_CMP(!=)
MINT_VEC_CMP(<)
MINT_VEC_CMP(<=)
MINT_VEC_CMP(>)
MINT_VEC_CMP(>=)
#undef MINT_VEC_CMP

template <class T, int N>
inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = T(-a[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> operator+(const vec<T, N>& a) {
  return a;
}
template <class T, int N>
inline vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = T(~a[i]);
  return r;
}
template <int N>
inline vec<bool, N> operator!(const vec<bool, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; i++) r[i] = !a[i];
  return r;
}

// Packed vectors: no padding, element alignment; convert to and from vec.
template <class T, int N>
struct packed_vec : mint::vec_base<T, N> {
  using value_type = T;
  packed_vec() = default;
  packed_vec(const vec<T, N>& v) {
    for (int i = 0; i < N; i++) (*this)[i] = v[i];
  }
  operator vec<T, N>() const {
    vec<T, N> v;
    for (int i = 0; i < N; i++) v[i] = (*this)[i];
    return v;
  }
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
};

#define MINT_VEC_TYPES(T, name)                   \
  typedef vec<T, 2> name##2;                      \
  typedef vec<T, 3> name##3;                      \
  typedef vec<T, 4> name##4;                      \
  typedef packed_vec<T, 2> packed_##name##2;      \
  typedef packed_vec<T, 3> packed_##name##3;      \
  typedef packed_vec<T, 4> packed_##name##4;
MINT_VEC_TYPES(float, float)
MINT_VEC_TYPES(half, half)
MINT_VEC_TYPES(bfloat, bfloat)
MINT_VEC_TYPES(int, int)
MINT_VEC_TYPES(uint, uint)
MINT_VEC_TYPES(short, short)
MINT_VEC_TYPES(ushort, ushort)
MINT_VEC_TYPES(char, char)
MINT_VEC_TYPES(uchar, uchar)
MINT_VEC_TYPES(long, long)
MINT_VEC_TYPES(ulong, ulong)
MINT_VEC_TYPES(bool, bool)
#undef MINT_VEC_TYPES

// -------------------------------------------------------------------------------------------------
// The metal namespace: math, integer, relational and conversion functions

namespace metal {

template <class To, class From>
inline To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of the same size");
  To t;
  __builtin_memcpy(&t, &f, sizeof(To));
  return t;
}

template <class T, class = void>
struct numeric_limits : std::numeric_limits<T> {};

template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr int digits = 11;
  static constexpr half min() { return __builtin_bit_cast(half, (uint16_t)0x0400); }
  static constexpr half max() { return __builtin_bit_cast(half, (uint16_t)0x7BFF); }
  static constexpr half lowest() { return __builtin_bit_cast(half, (uint16_t)0xFBFF); }
  static constexpr half epsilon() { return __builtin_bit_cast(half, (uint16_t)0x1400); }
  static constexpr half infinity() { return __builtin_bit_cast(half, (uint16_t)0x7C00); }
  static constexpr half quiet_NaN() { return __builtin_bit_cast(half, (uint16_t)0x7E00); }
  static constexpr half denorm_min() { return __builtin_bit_cast(half, (uint16_t)0x0001); }
};

template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr int digits = 8;
  static constexpr bfloat bits(uint16_t b) {
    bfloat r{};
    r.bits_ = b;
    return r;
  }
  static constexpr bfloat min() { return bits(0x0080); }
  static constexpr bfloat max() { return bits(0x7F7F); }
  static constexpr bfloat lowest() { return bits(0xFF7F); }
  static constexpr bfloat epsilon() { return bits(0x3C00); }
  static constexpr bfloat infinity() { return bits(0x7F80); }
  static constexpr bfloat quiet_NaN() { return bits(0x7FC0); }
  static constexpr bfloat denorm_min() { return bits(0x0001); }
};

// Floating point: computed in float (double for double) and rounded back to the argument type.
#define MINT_MATH1(name, ff, fd)                                                             \
  template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>                         \
  inline T name(T x) {                                                                       \
    if constexpr (std::is_same_v<T, double>) {                                               \
      return fd(x);                                                                          \
    } else {                                                                                 \
      return T(ff(float(x)));                                                                \
    }                                                                                        \
  }                                                                                          \
  template <class T, int N>                                                                  \
  inline vec<T, N> name(const vec<T, N>& v) {                                                \
    vec<T, N> r;                                                                             \
    for (int i = 0; i < N; i++) r[i] = name(v[i]);                                           \
    return r;                                                                                \
  }

MINT_MATH1(acos, __builtin_acosf, __builtin_acos)
MINT_MATH1(acosh, __builtin_acoshf, __builtin_acosh)
MINT_MATH1(asin, __builtin_asinf, __builtin_asin)
MINT_MATH1(asinh, __builtin_asinhf, __builtin_asinh)
MINT_MATH1(atan, __builtin_atanf, __builtin_atan)
MINT_MATH1(atanh, __builtin_atanhf, __builtin_atanh)
MINT_MATH1(cbrt, __builtin_cbrtf, __builtin_cbrt)
MINT_MATH1(ceil, __builtin_ceilf, __builtin_ceil)
MINT_MATH1(cos, __builtin_cosf, __builtin_cos)
MINT_MATH1(cosh, __builtin_coshf, __builtin_cosh)
MINT_MATH1(exp, __builtin_expf, __builtin_exp)
MINT_MATH1(exp2, __builtin_exp2f, __builtin_exp2)
MINT_MATH1(fabs, __builtin_fabsf, __builtin_fabs)
MINT_MATH1(floor, __builtin_floorf, __builtin_floor)
MINT_MATH1(log, __builtin_logf, __builtin_log)
MINT_MATH1(log2, __builtin_log2f, __builtin_log2)
MINT_MATH1(log10, __builtin_log10f, __builtin_log10)
MINT_MATH1(rint, __builtin_rintf, __builtin_rint)
MINT_MATH1(round, __builtin_roundf, __builtin_round)
MINT_MATH1(sin, __builtin_sinf, __builtin_sin)
MINT_MATH1(sinh, __builtin_sinhf, __builtin_sinh)
MINT_MATH1(sqrt, __builtin_sqrtf, __builtin_sqrt)
MINT_MATH1(tan, __builtin_tanf, __builtin_tan)
MINT_MATH1(tanh, __builtin_tanhf, __builtin_tanh)
MINT_MATH1(trunc, __builtin_truncf, __builtin_trunc)
#undef MINT_MATH1

namespace detail {
inline float exp10f(float x) { return __builtin_powf(10.0f, x); }
inline double exp10d(double x) { return __builtin_pow(10.0, x); }
inline float rsqrtf(float x) { return 1.0f / __builtin_sqrtf(x); }
inline double rsqrtd(double x) { return 1.0 / __builtin_sqrt(x); }
inline float fractf(float x) { return __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f); }
inline double fractd(double x) { return __builtin_fmin(x - __builtin_floor(x), 0x1.fffffffffffffp-1); }
inline float signf(float x) { return x > 0 ? 1.0f : (x < 0 ? -1.0f : (x != x ? 0.0f : x)); }
inline double signd(double x) { return x > 0 ? 1.0 : (x < 0 ? -1.0 : (x != x ? 0.0 : x)); }
constexpr float kPi = 3.14159265358979323846f;
inline float sinpif(float x) { return __builtin_sinf(kPi * x); }
inline double sinpid(double x) { return __builtin_sin(3.14159265358979323846 * x); }
inline float cospif(float x) { return __builtin_cosf(kPi * x); }
inline double cospid(double x) { return __builtin_cos(3.14159265358979323846 * x); }
}  // namespace detail

#define MINT_MATH1_D(name)                                                                   \
  template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>                         \
  inline T name(T x) {                                                                       \
    if constexpr (std::is_same_v<T, double>) {                                               \
      return detail::name##d(x);                                                             \
    } else {                                                                                 \
      return T(detail::name##f(float(x)));                                                   \
    }                                                                                        \
  }                                                                                          \
  template <class T, int N>                                                                  \
  inline vec<T, N> name(const vec<T, N>& v) {                                                \
    vec<T, N> r;                                                                             \
    for (int i = 0; i < N; i++) r[i] = name(v[i]);                                           \
    return r;                                                                                \
  }
MINT_MATH1_D(exp10)
MINT_MATH1_D(rsqrt)
MINT_MATH1_D(fract)
MINT_MATH1_D(sign)
MINT_MATH1_D(sinpi)
MINT_MATH1_D(cospi)
#undef MINT_MATH1_D

#define MINT_MATH2(name, ff, fd)                                                             \
  template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>                         \
  inline T name(T x, T y) {                                                                  \
    if constexpr (std::is_same_v<T, double>) {                                               \
      return fd(x, y);                                                                       \
    } else {                                                                                 \
      return T(ff(float(x), float(y)));                                                      \
    }                                                                                        \
  }                                                                                          \
  template <class T, int N>                                                                  \
  inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {                            \
    vec<T, N> r;                                                                             \
    for (int i = 0; i < N; i++) r[i] = name(a[i], b[i]);                                     \
    return r;                                                                                \
  }
MINT_MATH2(atan2, __builtin_atan2f, __builtin_atan2)
MINT_MATH2(fmod, __builtin_fmodf, __builtin_fmod)
MINT_MATH2(pow, __builtin_powf, __builtin_pow)
MINT_MATH2(powr, __builtin_powf, __builtin_pow)
MINT_MATH2(fmax, __builtin_fmaxf, __builtin_fmax)
MINT_MATH2(fmin, __builtin_fminf, __builtin_fmin)
MINT_MATH2(copysign, __builtin_copysignf, __builtin_copysign)
MINT_MATH2(fdim, __builtin_fdimf, __builtin_fdim)
#undef MINT_MATH2

template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline T divide(T x, T y) {
  return T(x / y);
}

template <class T, std::enable_if_t<mint::is_num_v<T>, int> = 0>
inline T abs(T x) {
  if constexpr (mint::is_float_v<T>) {
    return fabs(x);
  } else {
    return x < 0 ? T(-x) : x;
  }
}
template <class T, int N>
inline vec<T, N> abs(const vec<T, N>& v) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = abs(v[i]);
  return r;
}

// max/min: for floating point Metal follows fmax/fmin (a NaN operand yields the other operand).
template <class T, std::enable_if_t<mint::is_num_v<T>, int> = 0>
inline T max(T a, T b) {
  if constexpr (mint::is_float_v<T>) {
    if (a != a) return b;
    if (b != b) return a;
  }
  return a > b ? a : b;
}
template <class T, std::enable_if_t<mint::is_num_v<T>, int> = 0>
inline T min(T a, T b) {
  if constexpr (mint::is_float_v<T>) {
    if (a != a) return b;
    if (b != b) return a;
  }
  return a < b ? a : b;
}
template <class T, std::enable_if_t<mint::is_num_v<T>, int> = 0>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <class T, int N>
inline vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = max(a[i], b[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = min(a[i], b[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> max(const vec<T, N>& a, T b) {
  return max(a, vec<T, N>(b));
}
template <class T, int N>
inline vec<T, N> min(const vec<T, N>& a, T b) {
  return min(a, vec<T, N>(b));
}
template <class T, int N>
inline vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& lo, const vec<T, N>& hi) {
  return min(max(x, lo), hi);
}
template <class T, int N>
inline vec<T, N> clamp(const vec<T, N>& x, T lo, T hi) {
  return min(max(x, vec<T, N>(lo)), vec<T, N>(hi));
}

template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline T fma(T a, T b, T c) {
  if constexpr (std::is_same_v<T, double>) {
    return __builtin_fma(a, b, c);
  } else {
    return T(__builtin_fmaf(float(a), float(b), float(c)));
  }
}
template <class T, int N>
inline vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = fma(a[i], b[i], c[i]);
  return r;
}
template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline T mix(T x, T y, T a) {
  return T(x + (y - x) * a);
}
template <class T, int N>
inline vec<T, N> mix(const vec<T, N>& x, const vec<T, N>& y, const vec<T, N>& a) {
  return x + (y - x) * a;
}
template <class T, int N>
inline vec<T, N> mix(const vec<T, N>& x, const vec<T, N>& y, T a) {
  return x + (y - x) * a;
}
template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline T step(T edge, T x) {
  return x < edge ? T(0) : T(1);
}

template <class T, int N>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = T(0);
  for (int i = 0; i < N; i++) s = T(s + a[i] * b[i]);
  return s;
}
template <class T, int N>
inline T length(const vec<T, N>& a) {
  return sqrt(dot(a, a));
}

// Relational
template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline bool isnan(T x) {
  return x != x;
}
template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline bool isinf(T x) {
  return !isnan(x) && isnan(T(x - x));
}
template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline bool isfinite(T x) {
  return !isnan(T(x - x));
}
template <class T, std::enable_if_t<mint::is_float_v<T>, int> = 0>
inline bool signbit(T x) {
  return __builtin_signbit(float(x));
}
#define MINT_REL_VEC(name)                           \
  template <class T, int N>                          \
  inline vec<bool, N> name(const vec<T, N>& v) {     \
    vec<bool, N> r;                                  \
    for (int i = 0; i < N; i++) r[i] = name(v[i]);   \
    return r;                                        \
  }
MINT_REL_VEC(isnan)
MINT_REL_VEC(isinf)
MINT_REL_VEC(isfinite)
MINT_REL_VEC(signbit)
#undef MINT_REL_VEC

inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <int N>
inline bool all(const vec<bool, N>& v) {
  for (int i = 0; i < N; i++)
    if (!v[i]) return false;
  return true;
}
template <int N>
inline bool any(const vec<bool, N>& v) {
  for (int i = 0; i < N; i++)
    if (v[i]) return true;
  return false;
}
// select(a, b, c): c ? b : a
template <class T, std::enable_if_t<mint::is_num_v<T>, int> = 0>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) {
  return c ? b : a;
}

// Integer functions
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T popcount(T x) {
  return T(__builtin_popcountll((unsigned long long)(std::make_unsigned_t<T>)x));
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T clz(T x) {
  using U = std::make_unsigned_t<T>;
  constexpr int bits = 8 * sizeof(T);
  U u = (U)x;
  return u == 0 ? T(bits) : T(__builtin_clzll((unsigned long long)u) - (64 - bits));
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T ctz(T x) {
  using U = std::make_unsigned_t<T>;
  U u = (U)x;
  return u == 0 ? T(8 * sizeof(T)) : T(__builtin_ctzll((unsigned long long)u));
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T mulhi(T a, T b) {
  if constexpr (sizeof(T) <= 4) {
    return T(((int64_t)a * (int64_t)b) >> (8 * sizeof(T)));
  } else if constexpr (std::is_signed_v<T>) {
    return T(((__int128)a * (__int128)b) >> 64);
  } else {
    return T(((unsigned __int128)a * (unsigned __int128)b) >> 64);
  }
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T extract_bits(T x, uint offset, uint bits) {
  using U = std::make_unsigned_t<T>;
  if (bits == 0) return T(0);
  U u = (U)((U)x >> offset);
  if (bits < 8 * sizeof(T)) u &= (U)(((U)1 << bits) - 1);
  if constexpr (std::is_signed_v<T>) {
    if (bits < 8 * sizeof(T) && (u >> (bits - 1)) & 1) u |= (U)(~(U)0 << bits);
  }
  return T(u);
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T insert_bits(T base, T insert, uint offset, uint bits) {
  using U = std::make_unsigned_t<T>;
  if (bits == 0) return base;
  U mask = bits >= 8 * sizeof(T) ? (U)~(U)0 : (U)(((U)1 << bits) - 1);
  mask = (U)(mask << offset);
  return T(((U)base & ~mask) | (((U)insert << offset) & mask));
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T reverse_bits(T x) {
  using U = std::make_unsigned_t<T>;
  U u = (U)x, r = 0;
  for (unsigned i = 0; i < 8 * sizeof(T); i++) r = (U)((r << 1) | ((u >> i) & 1));
  return T(r);
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline T rotate(T v, T i) {
  using U = std::make_unsigned_t<T>;
  constexpr unsigned bits = 8 * sizeof(T);
  unsigned s = (unsigned)i % bits;
  U u = (U)v;
  return s == 0 ? v : T((U)(u << s) | (U)(u >> (bits - s)));
}

namespace precise {
using namespace ::metal;
}
namespace fast {
using namespace ::metal;
}

// -------------------------------------------------------------------------------------------------
// Synchronization

enum class mem_flags : uint32_t {
  mem_none = 0,
  mem_device = mint_rt::kMemDevice,
  mem_threadgroup = mint_rt::kMemThreadgroup,
  mem_texture = mint_rt::kMemTexture,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(uint32_t(a) | uint32_t(b));
}
constexpr mem_flags operator&(mem_flags a, mem_flags b) {
  return mem_flags(uint32_t(a) & uint32_t(b));
}

// Call site of a barrier or collective (g++ 12 has no __builtin_COLUMN), for matching the lanes
// that wait at it and for messages.
#define MINT_LOC const char *mint_file_ = __builtin_FILE(), unsigned mint_line_ = __builtin_LINE()
#define MINT_LOC_ARGS mint_file_, mint_line_, 0u

inline void threadgroup_barrier(mem_flags flags, MINT_LOC) {
  mint_rt::barrier(uint32_t(flags), MINT_LOC_ARGS);
}

}  // namespace metal

// -------------------------------------------------------------------------------------------------
// Simdgroup and quadgroup collectives

namespace mint {

template <class T>
inline T collective(uint32_t op, uint32_t width, const char* name, const T& v, uint32_t arg,
                    uint32_t arg2, const T* fill, mint_rt::CombineFn fn, const char* file,
                    unsigned line, unsigned col) {
  T in = v;
  T out = v;
  mint_rt::Collective c{op, width, (uint32_t)sizeof(T), arg, arg2, name, file, line, col,
                        &in,  fill,  &out,              fn};
  mint_rt::collective(&c);
  return out;
}

struct OpSum {
  template <class T>
  static T apply(const T& a, const T& b) { return T(a + b); }
  template <class T>
  static T identity() { return T(0); }
};
struct OpProduct {
  template <class T>
  static T apply(const T& a, const T& b) { return T(a * b); }
  template <class T>
  static T identity() { return T(1); }
};
struct OpMax {
  template <class T>
  static T apply(const T& a, const T& b) { return metal::max(a, b); }
};
struct OpMin {
  template <class T>
  static T apply(const T& a, const T& b) { return metal::min(a, b); }
};
struct OpAnd {
  template <class T>
  static T apply(const T& a, const T& b) { return T(a & b); }
};
struct OpOr {
  template <class T>
  static T apply(const T& a, const T& b) { return T(a | b); }
};
struct OpXor {
  template <class T>
  static T apply(const T& a, const T& b) { return T(a ^ b); }
};

// Kind 0: reduction (pairwise tree over the active lanes, every active lane gets the result);
// 1: inclusive prefix; 2: exclusive prefix (over active lanes of lower index).
template <class T, class Op, int Kind>
int combine(mint_rt::Collective* const* lanes, uint32_t nl, char*, size_t) {
  uint32_t W = 32;
  for (uint32_t i = 0; i < nl; i++) {
    if (lanes[i]) {
      W = lanes[i]->width;
      break;
    }
  }
  for (uint32_t base = 0; base < nl; base += W) {
    uint32_t n = nl - base < W ? nl - base : W;
    if constexpr (Kind == 0) {
      T t[32];
      bool p[32];
      for (uint32_t i = 0; i < W; i++) {
        p[i] = i < n && lanes[base + i];
        if (p[i]) __builtin_memcpy(&t[i], lanes[base + i]->in, sizeof(T));
      }
      for (uint32_t s = 1; s < W; s *= 2) {
        for (uint32_t i = 0; i + s < W; i += 2 * s) {
          if (p[i] && p[i + s]) {
            t[i] = Op::apply(t[i], t[i + s]);
          } else if (p[i + s]) {
            t[i] = t[i + s];
            p[i] = true;
          }
        }
      }
      for (uint32_t i = 0; i < n; i++) {
        if (lanes[base + i]) __builtin_memcpy(lanes[base + i]->out, &t[0], sizeof(T));
      }
    } else {
      T acc = Op::template identity<T>();
      for (uint32_t i = 0; i < n; i++) {
        if (!lanes[base + i]) continue;
        T v;
        __builtin_memcpy(&v, lanes[base + i]->in, sizeof(T));
        if constexpr (Kind == 1) {
          acc = Op::apply(acc, v);
          __builtin_memcpy(lanes[base + i]->out, &acc, sizeof(T));
        } else {
          __builtin_memcpy(lanes[base + i]->out, &acc, sizeof(T));
          acc = Op::apply(acc, v);
        }
      }
    }
  }
  return 0;
}

// simd_ballot / simd_active_threads_mask / simd_is_first: the result depends on which lanes are
// active, so it is computed over the whole simdgroup. `out` is a uint64_t pair {mask, active}.
template <int What>
int combine_vote(mint_rt::Collective* const* lanes, uint32_t nl, char*, size_t) {
  uint64_t mask = 0, active = 0;
  for (uint32_t i = 0; i < nl; i++) {
    if (!lanes[i]) continue;
    active |= 1ull << i;
    bool b;
    __builtin_memcpy(&b, lanes[i]->in, 1);
    if (b) mask |= 1ull << i;
  }
  uint32_t first = active ? (uint32_t)__builtin_ctzll(active) : 0;
  for (uint32_t i = 0; i < nl; i++) {
    if (!lanes[i]) continue;
    uint64_t r[2] = {What == 2 ? (uint64_t)(i == first) : (What == 1 ? active : mask), active};
    __builtin_memcpy(lanes[i]->out, r, sizeof r);
  }
  return 0;
}

}  // namespace mint

namespace metal {

struct simd_vote {
  typedef uint64_t vote_t;
  vote_t bits_ = 0;
  vote_t active_ = 0;
  simd_vote() = default;
  explicit simd_vote(vote_t v) : bits_(v), active_(~0ull) {}
  explicit operator vote_t() const { return bits_; }
  bool all() const { return (bits_ & active_) == active_; }
  bool any() const { return bits_ != 0; }
};

#define MINT_REDUCE(name, width, op, kind)                                                   \
  template <class T>                                                                         \
  inline T name(T v, MINT_LOC) {                                                             \
    return mint::collective<T>(mint_rt::kReduce, width, #name, v, 0, 0, nullptr,             \
                               &mint::combine<T, op, kind>, MINT_LOC_ARGS);                  \
  }
MINT_REDUCE(simd_sum, 32, mint::OpSum, 0)
MINT_REDUCE(simd_product, 32, mint::OpProduct, 0)
MINT_REDUCE(simd_max, 32, mint::OpMax, 0)
MINT_REDUCE(simd_min, 32, mint::OpMin, 0)
MINT_REDUCE(simd_and, 32, mint::OpAnd, 0)
MINT_REDUCE(simd_or, 32, mint::OpOr, 0)
MINT_REDUCE(simd_xor, 32, mint::OpXor, 0)
MINT_REDUCE(simd_prefix_inclusive_sum, 32, mint::OpSum, 1)
MINT_REDUCE(simd_prefix_exclusive_sum, 32, mint::OpSum, 2)
MINT_REDUCE(simd_prefix_inclusive_product, 32, mint::OpProduct, 1)
MINT_REDUCE(simd_prefix_exclusive_product, 32, mint::OpProduct, 2)
MINT_REDUCE(quad_sum, 4, mint::OpSum, 0)
MINT_REDUCE(quad_product, 4, mint::OpProduct, 0)
MINT_REDUCE(quad_max, 4, mint::OpMax, 0)
MINT_REDUCE(quad_min, 4, mint::OpMin, 0)
MINT_REDUCE(quad_and, 4, mint::OpAnd, 0)
MINT_REDUCE(quad_or, 4, mint::OpOr, 0)
MINT_REDUCE(quad_xor, 4, mint::OpXor, 0)
MINT_REDUCE(quad_prefix_inclusive_sum, 4, mint::OpSum, 1)
MINT_REDUCE(quad_prefix_exclusive_sum, 4, mint::OpSum, 2)
#undef MINT_REDUCE

inline bool simd_all(bool v, MINT_LOC) {
  return mint::collective<bool>(mint_rt::kReduce, 32, "simd_all", v, 0, 0, nullptr,
                                &mint::combine<bool, mint::OpAnd, 0>, MINT_LOC_ARGS);
}
inline bool simd_any(bool v, MINT_LOC) {
  return mint::collective<bool>(mint_rt::kReduce, 32, "simd_any", v, 0, 0, nullptr,
                                &mint::combine<bool, mint::OpOr, 0>, MINT_LOC_ARGS);
}
inline bool quad_all(bool v, MINT_LOC) {
  return mint::collective<bool>(mint_rt::kReduce, 4, "quad_all", v, 0, 0, nullptr,
                                &mint::combine<bool, mint::OpAnd, 0>, MINT_LOC_ARGS);
}
inline bool quad_any(bool v, MINT_LOC) {
  return mint::collective<bool>(mint_rt::kReduce, 4, "quad_any", v, 0, 0, nullptr,
                                &mint::combine<bool, mint::OpOr, 0>, MINT_LOC_ARGS);
}

namespace detail {
struct VoteOut {
  uint64_t bits, active;
};
template <int What>
inline VoteOut vote(bool v, const char* name, const char* f, unsigned l, unsigned c) {
  // The collective moves sizeof(VoteOut) bytes out; the input is read as one bool.
  VoteOut in{v ? 1ull : 0ull, 0};
  VoteOut out = in;
  mint_rt::Collective call{mint_rt::kReduce, 32, (uint32_t)sizeof(VoteOut), 0, 0, name, f, l, c,
                           &in, nullptr, &out, &mint::combine_vote<What>};
  mint_rt::collective(&call);
  return out;
}
}  // namespace detail

inline simd_vote simd_ballot(bool v, MINT_LOC) {
  detail::VoteOut o = detail::vote<0>(v, "simd_ballot", MINT_LOC_ARGS);
  simd_vote r;
  r.bits_ = o.bits;
  r.active_ = o.active;
  return r;
}
inline simd_vote simd_active_threads_mask(MINT_LOC) {
  detail::VoteOut o = detail::vote<1>(true, "simd_active_threads_mask", MINT_LOC_ARGS);
  simd_vote r;
  r.bits_ = o.bits;
  r.active_ = o.active;
  return r;
}
inline bool simd_is_first(MINT_LOC) {
  return detail::vote<2>(true, "simd_is_first", MINT_LOC_ARGS).bits != 0;
}

#define MINT_SHUFFLE(name, width, op)                                                        \
  template <class T>                                                                         \
  inline T name(T v, ushort arg, MINT_LOC) {                                                 \
    return mint::collective<T>(op, width, #name, v, arg, 0, nullptr, nullptr, MINT_LOC_ARGS); \
  }
MINT_SHUFFLE(simd_shuffle, 32, mint_rt::kShuffle)
MINT_SHUFFLE(simd_shuffle_down, 32, mint_rt::kShuffleDown)
MINT_SHUFFLE(simd_shuffle_up, 32, mint_rt::kShuffleUp)
MINT_SHUFFLE(simd_shuffle_xor, 32, mint_rt::kShuffleXor)
MINT_SHUFFLE(simd_shuffle_rotate_down, 32, mint_rt::kRotateDown)
MINT_SHUFFLE(simd_shuffle_rotate_up, 32, mint_rt::kRotateUp)
MINT_SHUFFLE(simd_broadcast, 32, mint_rt::kBroadcast)
MINT_SHUFFLE(quad_shuffle, 4, mint_rt::kShuffle)
MINT_SHUFFLE(quad_shuffle_down, 4, mint_rt::kShuffleDown)
MINT_SHUFFLE(quad_shuffle_up, 4, mint_rt::kShuffleUp)
MINT_SHUFFLE(quad_shuffle_xor, 4, mint_rt::kShuffleXor)
MINT_SHUFFLE(quad_shuffle_rotate_down, 4, mint_rt::kRotateDown)
MINT_SHUFFLE(quad_shuffle_rotate_up, 4, mint_rt::kRotateUp)
MINT_SHUFFLE(quad_broadcast, 4, mint_rt::kBroadcast)
#undef MINT_SHUFFLE

template <class T>
inline T simd_broadcast_first(T v, MINT_LOC) {
  return mint::collective<T>(mint_rt::kBroadcastFirst, 32, "simd_broadcast_first", v, 0, 0,
                             nullptr, nullptr, MINT_LOC_ARGS);
}
template <class T>
inline T quad_broadcast_first(T v, MINT_LOC) {
  return mint::collective<T>(mint_rt::kBroadcastFirst, 4, "quad_broadcast_first", v, 0, 0,
                             nullptr, nullptr, MINT_LOC_ARGS);
}
template <class T>
inline T simd_shuffle_and_fill_down(T v, T fill, ushort delta, MINT_LOC) {
  return mint::collective<T>(mint_rt::kFillDown, 32, "simd_shuffle_and_fill_down", v, delta, 0,
                             &fill, nullptr, MINT_LOC_ARGS);
}
template <class T>
inline T simd_shuffle_and_fill_down(T v, T fill, ushort delta, ushort modulo, MINT_LOC) {
  return mint::collective<T>(mint_rt::kFillDown, 32, "simd_shuffle_and_fill_down", v, delta,
                             modulo, &fill, nullptr, MINT_LOC_ARGS);
}
template <class T>
inline T simd_shuffle_and_fill_up(T v, T fill, ushort delta, MINT_LOC) {
  return mint::collective<T>(mint_rt::kFillUp, 32, "simd_shuffle_and_fill_up", v, delta, 0,
                             &fill, nullptr, MINT_LOC_ARGS);
}
template <class T>
inline T simd_shuffle_and_fill_up(T v, T fill, ushort delta, ushort modulo, MINT_LOC) {
  return mint::collective<T>(mint_rt::kFillUp, 32, "simd_shuffle_and_fill_up", v, delta, modulo,
                             &fill, nullptr, MINT_LOC_ARGS);
}

inline void simdgroup_barrier(mem_flags flags, MINT_LOC) {
  char c = 0;
  mint::collective<char>(mint_rt::kSimdBarrier, 32, "simdgroup_barrier", c, uint32_t(flags), 0,
                         nullptr, nullptr, MINT_LOC_ARGS);
}

// -------------------------------------------------------------------------------------------------
// Atomics (fibers never run concurrently; the runtime exempts these accesses from race checks)

enum memory_order {
  memory_order_relaxed,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst,
};

template <class T>
struct atomic {
  T v_;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;

namespace detail {
struct AtomicScope {
  AtomicScope() { mint_rt::atomic_enter(); }
  ~AtomicScope() { mint_rt::atomic_exit(); }
};
}  // namespace detail

template <class A>
inline auto atomic_load_explicit(A* o, memory_order) {
  detail::AtomicScope s;
  return o->v_;
}
template <class A, class U>
inline void atomic_store_explicit(A* o, U v, memory_order) {
  detail::AtomicScope s;
  o->v_ = decltype(o->v_)(v);
}
template <class A, class U>
inline auto atomic_exchange_explicit(A* o, U v, memory_order) {
  detail::AtomicScope s;
  auto old = o->v_;
  o->v_ = decltype(o->v_)(v);
  return old;
}
#define MINT_ATOMIC_RMW(name, expr)                                      \
  template <class A, class U>                                            \
  inline auto name(A* o, U v, memory_order) {                            \
    detail::AtomicScope s;                                               \
    using T = std::remove_cv_t<decltype(o->v_)>;                         \
    T old = o->v_;                                                       \
    T val = T(v);                                                        \
    o->v_ = T(expr);                                                     \
    return old;                                                          \
  }
MINT_ATOMIC_RMW(atomic_fetch_add_explicit, old + val)
MINT_ATOMIC_RMW(atomic_fetch_sub_explicit, old - val)
MINT_ATOMIC_RMW(atomic_fetch_and_explicit, old & val)
MINT_ATOMIC_RMW(atomic_fetch_or_explicit, old | val)
MINT_ATOMIC_RMW(atomic_fetch_xor_explicit, old ^ val)
MINT_ATOMIC_RMW(atomic_fetch_max_explicit, old > val ? old : val)
MINT_ATOMIC_RMW(atomic_fetch_min_explicit, old < val ? old : val)
#undef MINT_ATOMIC_RMW
template <class A, class T, class U>
inline bool atomic_compare_exchange_weak_explicit(A* o, T* expected, U desired, memory_order,
                                                  memory_order) {
  detail::AtomicScope s;
  if (o->v_ == *expected) {
    o->v_ = decltype(o->v_)(desired);
    return true;
  }
  *expected = o->v_;
  return false;
}

}  // namespace metal

using namespace metal;

// -------------------------------------------------------------------------------------------------
// What MLX's metal_kernel prefix (mlx/backend/metal/kernels/utils.h) makes available that our
// kernels use: the float16_t/bfloat16_t names above, and these helpers.

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

template <typename T, typename U>
inline T ceildiv(T n, U m) {
  return (n + m - 1) / m;
}

namespace mint {
// Target of the rewritten `threadgroup T name[...];` declarations: one allocation per declaration
// per threadgroup, shared by all of the group's threads.
template <class T>
inline T& tg_alloc(uint32_t slot, const char* name) {
  return *reinterpret_cast<T*>(mint_rt::tg_alloc(slot, sizeof(T), alignof(T), name));
}

inline uint3 u3(const uint32_t v[3]) { return uint3(v[0], v[1], v[2]); }
}  // namespace mint

// -------------------------------------------------------------------------------------------------
// Metal keywords that have no C++ meaning here

#define METAL_FUNC inline
#define device
#define constant
#define thread
#define threadgroup
#define kernel
