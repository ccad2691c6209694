// CPU fused EMA update: one OpenMP parallel region over all tensors at once.
//
// The tensors are treated as one virtual array (their concatenation) that at::parallel_for cuts
// into one equal range per thread; a thread walks its range across tensor boundaries. So a
// model's hundreds of small tensors (biases, norms) cost no parallel region each, and the few
// large ones are still split over every thread. at::parallel_for expands to `#pragma omp
// parallel` in this file (we build with -fopenmp) and shares torch's OpenMP runtime and thread
// count (torch.set_num_threads).
//
// The inner loops are plain loops the compiler vectorizes; on x86-64 with GCC each is compiled
// for AVX-512, AVX2 and baseline and picked at load time, since the wheel cannot assume the CPU.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ema.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define KDLIB_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define KDLIB_HAVE_F16C_PATH 1
#else
#define KDLIB_CLONES
#endif

namespace kdlib {
namespace {

// torch's lerp: weights under 0.5 step from `e`, others from `p`, so that weight 1 gives p exactly.
template <typename acc_t>
inline acc_t lerp(acc_t e, acc_t p, acc_t w, bool small) {
  return small ? e + w * (p - e) : p - (p - e) * (acc_t(1) - w);
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, NaN stays a (quiet) NaN: the same rounding as c10::BFloat16.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

KDLIB_CLONES void lerp_f32(float* __restrict e, const float* __restrict p, int64_t n, float w) {
  const bool small = w < 0.5f;
  for (int64_t i = 0; i < n; ++i) e[i] = lerp(e[i], p[i], w, small);
}

KDLIB_CLONES void lerp_f64(double* __restrict e, const double* __restrict p, int64_t n, double w) {
  const bool small = w < 0.5;
  for (int64_t i = 0; i < n; ++i) e[i] = lerp(e[i], p[i], w, small);
}

KDLIB_CLONES void lerp_bf16(uint16_t* __restrict e, const uint16_t* __restrict p, int64_t n, float w) {
  const bool small = w < 0.5f;
  for (int64_t i = 0; i < n; ++i) e[i] = float_to_bf16(lerp(bf16_to_float(e[i]), bf16_to_float(p[i]), w, small));
}

void lerp_f16_scalar(at::Half* e, const at::Half* p, int64_t n, float w) {
  const bool small = w < 0.5f;
  for (int64_t i = 0; i < n; ++i) e[i] = static_cast<at::Half>(lerp<float>(e[i], p[i], w, small));
}

#ifdef KDLIB_HAVE_F16C_PATH
// GCC does not vectorize half <-> float conversions by itself, so this path spells out F16C.
__attribute__((target("avx2,fma,f16c"))) void lerp_f16_f16c(at::Half* e, const at::Half* p, int64_t n, float w) {
  const bool small = w < 0.5f;
  const __m256 vw = _mm256_set1_ps(small ? w : 1.0f - w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(e + i)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    const __m256 d = _mm256_sub_ps(b, a);
    const __m256 r = small ? _mm256_fmadd_ps(vw, d, a) : _mm256_fnmadd_ps(d, vw, b);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(e + i), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  lerp_f16_scalar(e + i, p + i, n - i, w);
}
#endif

void lerp_f16(at::Half* e, const at::Half* p, int64_t n, float w) {
#ifdef KDLIB_HAVE_F16C_PATH
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  if (f16c) return lerp_f16_f16c(e, p, n, w);
#endif
  lerp_f16_scalar(e, p, n, w);
}

struct Pair {
  void* ema;
  const void* param;
  at::ScalarType dtype;
};

// Updates elements [start, start + n) of one pair.
void lerp_span(const Pair& t, int64_t start, int64_t n, double weight) {
  const float w = static_cast<float>(weight);
  switch (t.dtype) {
    case at::kFloat:
      return lerp_f32(static_cast<float*>(t.ema) + start, static_cast<const float*>(t.param) + start, n, w);
    case at::kDouble:
      return lerp_f64(static_cast<double*>(t.ema) + start, static_cast<const double*>(t.param) + start, n, weight);
    case at::kBFloat16:
      return lerp_bf16(static_cast<uint16_t*>(t.ema) + start, static_cast<const uint16_t*>(t.param) + start, n, w);
    case at::kHalf:
      return lerp_f16(static_cast<at::Half*>(t.ema) + start, static_cast<const at::Half*>(t.param) + start, n, w);
    default:
      TORCH_CHECK(false, "ema_update_: unsupported dtype ", t.dtype);  // validated before; unreachable
  }
}

// Below this many elements in all, one thread does the whole update: waking the team costs more.
constexpr int64_t kGrain = 1 << 15;

}  // namespace

void ema_update_cpu_(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& params, double weight) {
  const size_t count = ema.size();
  std::vector<Pair> pairs(count);
  std::vector<int64_t> offsets(count + 1, 0);  // tensor i covers [offsets[i], offsets[i + 1])
  for (size_t i = 0; i < count; ++i) {
    pairs[i] = {ema[i].data_ptr(), params[i].const_data_ptr(), ema[i].scalar_type()};
    offsets[i + 1] = offsets[i] + ema[i].numel();
  }
  at::parallel_for(0, offsets[count], kGrain, [&](int64_t begin, int64_t end) {
    // The last tensor starting at or before `begin` is the one holding it (empty ones are skipped).
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, offsets[t + 1]);
      lerp_span(pairs[t], begin - offsets[t], stop - begin, weight);
      begin = stop;
      ++t;
    }
  });
}

}  // namespace kdlib
