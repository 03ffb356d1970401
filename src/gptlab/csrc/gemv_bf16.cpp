// y = x @ weight.T + bias for a few rows of bfloat16 activations: the matrix-vector products of decoding, on CPUs
// with AVX512-BF16.
//
// Decoding one token multiplies one activation row per sequence by every weight matrix, so its speed is the rate
// at which the weights stream from memory. PyTorch's CPU bfloat16 path for this shape reads about half as many
// bytes per second as its float32 path (docs/benchmarks.md), which left bfloat16 weights barely faster than
// float32 ones. This kernel reads each weight row once, front to back, with four independent accumulators so the
// loads never wait on one chain of adds, prefetches ahead of the stream, and splits the rows across threads.
// Sums are float32 and rounded to bfloat16 once, as PyTorch's own bfloat16 matmul does.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/torch.h>

namespace {

// How far ahead of the loads the weight stream is prefetched: 4 KiB measured best among 0-16 KiB here.
constexpr int64_t kPrefetchBytes = 4096;

inline __m512bh load(const uint16_t* p) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p)); }
inline __m512bh load(const uint16_t* p, __mmask32 m) { return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, p)); }

// The dot product of a weight row and an activation row, both K bfloat16 values. vdpbf16ps multiplies 32
// bfloat16 pairs and adds them, pairwise, into 16 float32 sums.
inline float dot(const uint16_t* w, const uint16_t* x, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {  // 128 bfloat16 = four 64-byte cache lines
    for (int line = 0; line < 4; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + 32 * line) + kPrefetchBytes, _MM_HINT_T0);
    }
    a0 = _mm512_dpbf16_ps(a0, load(w + k), load(x + k));
    a1 = _mm512_dpbf16_ps(a1, load(w + k + 32), load(x + k + 32));
    a2 = _mm512_dpbf16_ps(a2, load(w + k + 64), load(x + k + 64));
    a3 = _mm512_dpbf16_ps(a3, load(w + k + 96), load(x + k + 96));
  }
  for (; k < K; k += 32) {  // the rest, 32 at a time; lanes past K load as zero and add nothing
    const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (K - k)) - 1);
    a0 = _mm512_dpbf16_ps(a0, load(w + k, m), load(x + k, m));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// x (M, K), weight (N, K), bias (N) or undefined -> (M, N), all bfloat16.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_bf16: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "linear_bf16: bfloat16 x and weight expected, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_bf16: x (M, K) and weight (N, K) expected, got ", x.sizes(), " and ", weight.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kBFloat16 && bias->numel() == weight.size(0)),
              "linear_bf16: bias must be bfloat16 with ", weight.size(0), " elements");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());

  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  const at::BFloat16* bp = has_bias ? bc.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // Each thread takes a contiguous block of weight rows (at least 64 KiB of them, so small matrices are not
  // split into pieces smaller than the cost of waking a thread); a row read for activation row 0 is still in L1
  // for the others.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float b = bp ? static_cast<float>(bp[n]) : 0.0f;
      for (int64_t m = 0; m < M; ++m) {
        yp[m * N + n] = static_cast<at::BFloat16>(dot(wp + n * K, xp + m * K, K) + b);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gptlab, m) { m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(gptlab, CPU, m) { m.impl("linear_bf16", &linear_bf16); }
