// Fused top-k code search on the CPU (codebook.py, section 2): for queries x (heads, tokens, d)
// and codebooks (heads, codes, d), the k best codes of every query row, best first, without ever
// holding the (tokens x codes) score matrix. Registered as torch.ops.codebook.topk_codes.
//
// How: a task takes one head and a block of 256 query rows. Each row keeps its k best codes so
// far as a sorted list; a score enters only if it beats the row's k-th best, and after the first
// few hundred codes almost none does, so the top-k costs little next to the dot products. Those
// come from one of two engines:
//   - with AVX-512 (built with -march=native on such a CPU): a register-blocked micro-kernel,
//     8 query rows x 32 codes in 16 vector registers, the codes packed d-major once per call;
//     the scores are compared with each row's k-th best while still in registers.
//   - otherwise: BLAS (at::mm) on 256 x 512 tiles into a buffer that stays in cache, then the
//     same compare, 64 scores at a time (AVX2 or plain C++).
// Tasks run in parallel across heads and row blocks (at::parallel_for, OpenMP), handed out one
// at a time.
//
// Scores, as codebook.code_scores defines them (computed in float32 whatever the input dtype):
//   cosine     x . c / max(|c|, 1e-12)           (codes normalised, the query not)
//   euclidean  -sqrt(max(|x|^2 - 2 x.c + |c|^2, 0))
// Order: higher score first; equal scores: lower code id first.
// NaN / inf: scores follow IEEE arithmetic (an inf input gives +-inf or NaN scores), and a NaN
// score counts as -inf: it is returned as -inf and ranks with the -inf scores, below all others.
// A row whose scores are all NaN therefore returns codes 0..k-1 with score -inf.
// codebook.code_scores applies the same rule, so the torch paths agree.
//
// Extra memory: one normalised (cosine) or packed copy of the codebook; per thread the k best
// of 256 rows (and, without AVX-512, a 256 x 512 score tile); the (heads, tokens, k) outputs.
// Inputs that are not float32 are converted first (float32 copies of x and codebook).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 256;  // query rows per task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// (score, id) packed into one integer that sorts like the ranking: higher score first, then the
// lower id. Scores map to unsigned integers in float order; NaN has become -inf before this.
uint64_t pack(float score, int64_t id) {
  uint32_t bits;
  score += 0.0f;  // -0 -> +0: equal floats, equal keys
  std::memcpy(&bits, &score, 4);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t(bits) << 32) | uint32_t(~uint32_t(id));
}
float score_of(uint64_t key) {
  uint32_t bits = uint32_t(key >> 32);
  bits = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
  float score;
  std::memcpy(&score, &bits, 4);
  return score;
}
int64_t id_of(uint64_t key) { return int64_t(~uint32_t(key)); }

// One query row's k best codes so far, as packed keys sorted best first. Slots not yet filled
// hold 0, below every real key, so inserting needs no bookkeeping: each slot becomes the larger
// of itself and what would shift into it, a branch-free loop the compiler vectorises.
struct Row {
  uint64_t* keys;  // k of them, zeroed
  int64_t k, size = 0;
  float worst = kNegInf;  // the k-th best score once k are held: what a new code must beat

  void add(float score, int64_t id) {
    const uint64_t key = pack(score, id);
    for (int64_t j = k - 1; j > 0; --j) keys[j] = std::max(keys[j], std::min(keys[j - 1], key));
    keys[0] = std::max(keys[0], key);
    if (size < k) ++size;
    if (size == k) worst = score_of(keys[k - 1]);
  }
};

// Folds keys[j] = the ranking key of code first_id + j, j < n <= 64, into a row: the first k
// codes join unconditionally (NaN as -inf), later ones if they beat the k-th best. Codes arrive
// in increasing id order, so a later code whose key equals the k-th best ranks below it: strict >
// is the whole test (false for NaN). `above` has bit j set where keys[j] > row.worst.
void fold_some(const float* keys, int64_t n, int64_t first_id, Row& row, uint64_t above) {
  int64_t j = 0;
  for (; j < n && row.size < row.k; ++j) row.add(std::isnan(keys[j]) ? kNegInf : keys[j], first_id + j);
  if (j > 0) above &= j >= 64 ? 0 : ~uint64_t(0) << j;  // those already in
  for (; above; above &= above - 1) {
    const int at = __builtin_ctzll(above);
    if (keys[at] > row.worst) row.add(keys[at], first_id + at);  // worst may have risen meanwhile
  }
}

}  // namespace

// Each error message is one string: TORCH_CHECK formats several arguments through an ostringstream
// compiled into this library, and with torch 2.11's CUDA 13 build (g++ 13) that crashed
// (SIGSEGV in ostream::_M_insert<long>) instead of raising.
static std::string shape_of(const at::Tensor& t) {
  std::string shape = "(";
  for (int64_t i = 0; i < t.dim(); ++i) shape += (i ? ", " : "") + std::to_string(t.size(i));
  return shape + ")";
}

// Checks the arguments and returns {x, codes, x_sq, code_sq, code_norm} in float32 as both
// devices score them: x with unit stride along d, codes contiguous; euclidean: the squared norms
// |x|^2 (heads, tokens) and |c|^2 (heads, codes); cosine: |c| clamped at 1e-12, to divide the codes
// by (the very division of codebook.code_scores). Those a similarity does not use are undefined.
// Also used by search_cuda.cpp.
std::vector<at::Tensor> codebook_search_inputs(const at::Tensor& x_in, const at::Tensor& codebook_in, int64_t k,
                                               c10::string_view similarity) {
  TORCH_CHECK(x_in.dim() == 3 && codebook_in.dim() == 3, "topk_codes: x must be (heads, tokens, d) and codebook (heads, codes, d)");
  TORCH_CHECK(x_in.size(0) == codebook_in.size(0) && x_in.size(2) == codebook_in.size(2),
              "topk_codes: x " + shape_of(x_in) + " and codebook " + shape_of(codebook_in) + " disagree on heads or d");
  TORCH_CHECK(x_in.device() == codebook_in.device(), "topk_codes: x and codebook must be on the same device");
  TORCH_CHECK(x_in.is_floating_point() && codebook_in.is_floating_point(), "topk_codes: inputs must be floating point");
  TORCH_CHECK(similarity == "cosine" || similarity == "euclidean", "topk_codes: similarity must be 'cosine' or 'euclidean'");
  const int64_t C = codebook_in.size(1), d = codebook_in.size(2);
  TORCH_CHECK(1 <= k && k <= C, "topk_codes: k=" + std::to_string(k) + " must be between 1 and num_codes=" + std::to_string(C));
  TORCH_CHECK(C < (int64_t(1) << 31) && x_in.size(1) < (int64_t(1) << 31), "topk_codes: at most 2^31 - 1 codes and tokens");
  // no gradient flows through a search: detached, the worker threads' ATen calls never record one
  at::Tensor x = x_in.detach().to(at::kFloat);
  if (x.stride(2) != 1 || x.stride(1) < d) x = x.contiguous();  // a transposed (tokens, heads, d) view is fine
  at::Tensor codes = codebook_in.detach().to(at::kFloat).contiguous();
  if (similarity == "euclidean")  // the same expressions as codebook.code_scores
    return {x, codes, (x * x).sum(-1).contiguous(), (codes * codes).sum(-1).contiguous(), at::Tensor()};
  return {x, codes, at::Tensor(), at::Tensor(), codes.norm(2, -1).clamp_min(1e-12).contiguous()};
}

namespace {

// What every task shares: the float32 inputs (see codebook_search_inputs) and the shapes.
struct Search {
  const float* x;  // (heads, tokens, d), unit stride along d
  int64_t x_head_stride, x_row_stride;
  const float* x_sq;     // euclidean: |x|^2 (heads, tokens); cosine: null
  const float* codes;    // the codebook as the engine below wants it
  const float* code_sq;  // euclidean: |c|^2 (heads, codes); cosine: null
  int64_t N, C, d;
};

#if defined(__AVX512F__)
constexpr int64_t kPanel = 32;  // codes per micro-kernel call: two AVX-512 registers
constexpr int64_t kGroup = 8;   // query rows per micro-kernel call: 8 x 2 accumulators

// codes (heads, C, d) -> panels (heads, ceil(C / 32), d, 32): panel p, dimension t holds codes
// 32p .. 32p + 31 side by side (zeros past C), divided by `norm` (cosine) when it is defined.
at::Tensor prepare_codes(const at::Tensor& codes, const at::Tensor& norm) {
  const int64_t H = codes.size(0), C = codes.size(1), d = codes.size(2), P = (C + kPanel - 1) / kPanel;
  at::Tensor panels = at::zeros({H, P, d, kPanel}, codes.options());
  const float* c = codes.data_ptr<float>();
  const float* scale = norm.defined() ? norm.data_ptr<float>() : nullptr;
  float* out = panels.data_ptr<float>();
  at::parallel_for(0, H * C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t hc = begin; hc < end; ++hc) {
      const int64_t h = hc / C, code = hc % C;
      float* dst = out + (h * P + code / kPanel) * d * kPanel + code % kPanel;
      for (int64_t t = 0; t < d; ++t)  // the division of codebook.code_scores: the same values
        dst[t * kPanel] = scale ? c[hc * d + t] / scale[hc] : c[hc * d + t];
    }
  });
  return panels;
}

// Dot products of 8 query rows with the 32 codes of a panel: out[r * 32 + j].
inline void micro_kernel(const float* const* x, const float* panel, int64_t d, float* out) {
  __m512 acc[kGroup][2];  // local, so that all 16 stay in registers
  const float* xr[kGroup];
#pragma GCC unroll 8
  for (int r = 0; r < kGroup; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps(), xr[r] = x[r];
  for (int64_t t = 0; t < d; ++t) {
    const __m512 b0 = _mm512_loadu_ps(panel + t * kPanel), b1 = _mm512_loadu_ps(panel + t * kPanel + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kGroup; ++r) {
      const __m512 a = _mm512_set1_ps(xr[r][t]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kGroup; ++r)
    _mm512_store_ps(out + r * kPanel, acc[r][0]), _mm512_store_ps(out + r * kPanel + 16, acc[r][1]);
}

// Rows r0 .. r0 + n_rows - 1 of head h against every code, one panel of 32 codes at a time; the
// scores are compared with each row's k-th best right out of the micro-kernel.
void search_rows(const Search& s, int64_t h, int64_t r0, int64_t n_rows, Row* rows) {
  const int64_t P = (s.C + kPanel - 1) / kPanel;
  const float* xh = s.x + h * s.x_head_stride;
  const __m512 zero = _mm512_setzero_ps(), two = _mm512_set1_ps(2.0f);
  alignas(64) float dots[kGroup * kPanel];
  for (int64_t p = 0; p < P; ++p) {
    const int64_t c0 = p * kPanel, n = std::min(kPanel, s.C - c0);
    const uint32_t real = n == kPanel ? ~0u : (1u << n) - 1;  // the codes that exist
    const float* panel = s.codes + (h * P + p) * s.d * kPanel;
    __m512 cc0 = zero, cc1 = zero;
    if (s.code_sq) {
      cc0 = _mm512_maskz_loadu_ps(__mmask16(real), s.code_sq + h * s.C + c0);
      cc1 = _mm512_maskz_loadu_ps(__mmask16(real >> 16), s.code_sq + h * s.C + c0 + 16);
    }
    for (int64_t g = 0; g < n_rows; g += kGroup) {
      const float* xr[kGroup];  // past the last row, repeat it (and ignore the result)
      for (int r = 0; r < kGroup; ++r) xr[r] = xh + (r0 + std::min<int64_t>(g + r, n_rows - 1)) * s.x_row_stride;
      micro_kernel(xr, panel, s.d, dots);
      for (int r = 0; r < kGroup && g + r < n_rows; ++r) {
        float* keys = dots + r * kPanel;
        __m512 k0 = _mm512_load_ps(keys), k1 = _mm512_load_ps(keys + 16);
        if (s.x_sq) {  // rank by -max(|x|^2 - 2 x.c + |c|^2, 0): the score's order, no sqrt
          const __m512 xx = _mm512_set1_ps(s.x_sq[h * s.N + r0 + g + r]);  // max(0, NaN) is NaN
          k0 = _mm512_sub_ps(zero, _mm512_max_ps(zero, _mm512_add_ps(_mm512_fnmadd_ps(two, k0, xx), cc0)));
          k1 = _mm512_sub_ps(zero, _mm512_max_ps(zero, _mm512_add_ps(_mm512_fnmadd_ps(two, k1, xx), cc1)));
          _mm512_store_ps(keys, k0), _mm512_store_ps(keys + 16, k1);
        }
        const __m512 worst = _mm512_set1_ps(rows[g + r].worst);
        const uint32_t above = real & (_mm512_cmp_ps_mask(k0, worst, _CMP_GT_OQ) |
                                       uint32_t(_mm512_cmp_ps_mask(k1, worst, _CMP_GT_OQ)) << 16);
        if (above || rows[g + r].size < rows[g + r].k) fold_some(keys, n, c0, rows[g + r], above);
      }
    }
  }
}

#else
constexpr int64_t kTile = 512;       // codes per BLAS call
constexpr int64_t kLd = kTile + 16;  // score tile row stride: not a power of two, so rows do not alias in cache

at::Tensor prepare_codes(const at::Tensor& codes, const at::Tensor& norm) {
  return norm.defined() ? codes / norm.unsqueeze(-1) : codes;  // the division of codebook.code_scores
}

// Bit u is set when s[u] > worst, for 64 scores (never for NaN).
inline uint64_t above64(const float* s, float worst) {
  uint64_t mask = 0;
#if defined(__AVX2__)
  for (int u = 0; u < 64; u += 8)
    mask |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + u), _mm256_set1_ps(worst), _CMP_GT_OQ))) << u;
#else
  for (int u = 0; u < 64; ++u) mask |= uint64_t(s[u] > worst) << u;
#endif
  return mask;
}

// Rows r0 .. r0 + n_rows - 1 of head h against every code, one BLAS tile of 512 codes at a time.
void search_rows(const Search& s, int64_t h, int64_t r0, int64_t n_rows, Row* rows) {
  thread_local std::vector<float> tile;
  tile.resize(kBlock * kLd);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x_rows = at::from_blob(const_cast<float*>(s.x + h * s.x_head_stride + r0 * s.x_row_stride),
                                          {n_rows, s.d}, {s.x_row_stride, 1}, f32);
  for (int64_t c0 = 0; c0 < s.C; c0 += kTile) {
    const int64_t n = std::min(kTile, s.C - c0);
    at::Tensor dots = at::from_blob(tile.data(), {n_rows, n}, {kLd, 1}, f32);
    at::mm_out(dots, x_rows, at::from_blob(const_cast<float*>(s.codes + (h * s.C + c0) * s.d), {n, s.d}, f32).t());
    for (int64_t r = 0; r < n_rows; ++r) {
      float* keys = tile.data() + r * kLd;
      if (s.x_sq) {  // rank by -max(|x|^2 - 2 x.c + |c|^2, 0): the score's order, no sqrt
        const float xx = s.x_sq[h * s.N + r0 + r], *cc = s.code_sq + h * s.C + c0;
        for (int64_t j = 0; j < n; ++j) {
          const float dist = (xx - 2.0f * keys[j]) + cc[j];
          keys[j] = -(dist < 0.0f ? 0.0f : dist);  // NaN stays NaN
        }
      }
      int64_t j = 0;
      for (; j < n && rows[r].size < rows[r].k; j += 64)  // the first k codes; all bits: a superset
        fold_some(keys + j, std::min<int64_t>(64, n - j), c0 + j, rows[r], n - j >= 64 ? ~uint64_t(0) : (uint64_t(1) << (n - j)) - 1);
      for (; j + 64 <= n; j += 64)
        if (uint64_t above = above64(keys + j, rows[r].worst)) fold_some(keys + j, 64, c0 + j, rows[r], above);
      for (; j < n; ++j)
        if (keys[j] > rows[r].worst) rows[r].add(keys[j], c0 + j);
    }
  }
}
#endif

std::tuple<at::Tensor, at::Tensor> topk_codes_cpu(const at::Tensor& x_in, const at::Tensor& codebook_in,
                                                  int64_t k, c10::string_view similarity) {
  auto inputs = codebook_search_inputs(x_in, codebook_in, k, similarity);
  const at::Tensor &x = inputs[0], &x_sq = inputs[2], &code_sq = inputs[3];
  const int64_t H = inputs[1].size(0), C = inputs[1].size(1), d = inputs[1].size(2), N = x.size(1);
  const at::Tensor codes = prepare_codes(inputs[1], inputs[4]);
  inputs[1] = at::Tensor();  // a float32 copy of the codebook, if one was made, is not needed now
  auto scores = at::empty({H, N, k}, x.options());
  auto ids = at::empty({H, N, k}, x.options().dtype(at::kLong));
  if (N == 0) return {scores, ids};

  const bool euclid = x_sq.defined();
  const Search s{x.data_ptr<float>(), x.stride(0), x.stride(1), euclid ? x_sq.data_ptr<float>() : nullptr,
                 codes.data_ptr<float>(), euclid ? code_sq.data_ptr<float>() : nullptr, N, C, d};
  float* scores_all = scores.data_ptr<float>();
  int64_t* ids_all = ids.data_ptr<int64_t>();
  // tasks are handed out one at a time, so a thread slowed down (other jobs on the machine) holds
  // up no more than the task it is on
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<uint64_t> keys(kBlock * k);
    std::vector<Row> rows;
    for (int64_t task; (task = next_task++) < H * blocks;) {
      const int64_t h = task / blocks, r0 = (task % blocks) * kBlock, n_rows = std::min(kBlock, N - r0);
      rows.clear();
      std::fill(keys.begin(), keys.end(), 0);
      for (int64_t r = 0; r < n_rows; ++r) rows.push_back({keys.data() + r * k, k});
      search_rows(s, h, r0, n_rows, rows.data());
      for (int64_t r = 0; r < n_rows; ++r) {  // best first
        float* out_s = scores_all + (h * N + r0 + r) * k;
        int64_t* out_i = ids_all + (h * N + r0 + r) * k;
        for (int64_t j = 0; j < k; ++j) {
          const float key = score_of(rows[r].keys[j]);
          out_s[j] = euclid ? -std::sqrt(-key) : key;
          out_i[j] = id_of(rows[r].keys[j]);
        }
      }
    }
  });
  return {scores, ids};
}

}  // namespace

TORCH_LIBRARY(codebook, m) {
  m.def("topk_codes(Tensor x, Tensor codebook, int k, str similarity) -> (Tensor scores, Tensor ids)");
}

TORCH_LIBRARY_IMPL(codebook, CPU, m) {
  m.impl("topk_codes", &topk_codes_cpu);
}
