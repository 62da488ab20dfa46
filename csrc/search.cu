// Fused top-k code search on the GPU: the CUDA twin of search.cpp, in plain CUDA C++ (no torch
// headers, so nvcc compiles it anywhere; search_cuda.cpp binds it to torch when torch has CUDA).
//
// One launch covers every head: block (b, h) takes kRows query rows of head h and walks over all
// codes in tiles of kCodes. Per tile, query and code slices of kDims dimensions are staged in
// shared memory, each thread accumulates a 4 x 4 patch of the kRows x kCodes scores in registers,
// and the patch goes to a shared-memory score tile: scores never reach global memory. Each warp
// then folds the tile into the running top-k of its kRows / 8 rows, sorted lists of 64 places in
// shared memory; while a warp works on a row, lane l holds places l and l + 32 in registers
// (so k <= 64). A score enters only if it beats the row's k-th best, kept beside the list; a warp
// vote finds those (rare after the first tiles, when the list is not even read), and each is
// inserted with a few shuffles.
//
// Ranking, scores and the NaN rule are those of search.cpp: higher score first, equal scores by
// lower code id; a NaN score counts as -inf. The caller passes codes already normalised (cosine)
// or the squared norms |x|^2 and |c|^2 (euclidean), computed with the same torch expressions as
// the CPU path, and output buffers of (heads, tokens, k).
//
// tests/test_extension.py compares it with the torch reference wherever CUDA is available
// (csrc/gpu_check.sh runs those tests; csrc/README.md has their result on an H200).

#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

namespace {

constexpr int kRows = 64;     // query rows per block
constexpr int kCodes = 64;    // codes per tile
constexpr int kDims = 32;     // dimensions staged per step
constexpr int kThreads = 256; // 16 x 16 threads, each a 4 x 4 patch of scores
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr unsigned kAll = 0xffffffffu;

struct Entry {
  float score;
  int id;
};

// a ranks above b: a higher score, or the same score and a lower id
__device__ __forceinline__ bool above(float sa, int ia, float sb, int ib) {
  return sa > sb || (sa == sb && ia < ib);
}

// The k-th best of a row's list (place k - 1), known to every lane.
__device__ __forceinline__ Entry kth(const Entry (&e)[2], int k) {
  const int place = k - 1;
  const Entry& slot = place < 32 ? e[0] : e[1];
  return {__shfl_sync(kAll, slot.score, place & 31), __shfl_sync(kAll, slot.id, place & 31)};
}

// Inserts (s, id), which beats the k-th best, into the sorted list; called by the whole warp.
__device__ __forceinline__ void insert(Entry (&e)[2], float s, int id, int lane) {
  // place of the newcomer = number of entries ranked above it (a prefix of the sorted list)
  const int place = __popc(__ballot_sync(kAll, above(e[0].score, e[0].id, s, id))) +
                    __popc(__ballot_sync(kAll, above(e[1].score, e[1].id, s, id)));
  // what shifts in from the place before: lane - 1's entry, and for place 32 lane 31's first
  float prev0_s = __shfl_up_sync(kAll, e[0].score, 1), prev1_s = __shfl_up_sync(kAll, e[1].score, 1);
  int prev0_i = __shfl_up_sync(kAll, e[0].id, 1), prev1_i = __shfl_up_sync(kAll, e[1].id, 1);
  const float last0_s = __shfl_sync(kAll, e[0].score, 31);
  const int last0_i = __shfl_sync(kAll, e[0].id, 31);
  if (lane == 0) prev1_s = last0_s, prev1_i = last0_i;
  const int here[2] = {lane, lane + 32};
  const float prev_s[2] = {prev0_s, prev1_s};
  const int prev_i[2] = {prev0_i, prev1_i};
#pragma unroll
  for (int slot = 0; slot < 2; ++slot) {
    if (here[slot] == place) e[slot] = {s, id};
    else if (here[slot] > place) e[slot] = {prev_s[slot], prev_i[slot]};
  }
}

// Shared memory of one block (65 KiB: more than the 48 KiB a launch gets without asking).
struct Shared {
  float xs[kDims][kRows + 1];  // +1: transposed stores without bank conflicts
  float cs[kDims][kCodes + 1];
  float tile[kRows][kCodes + 1];
  float best_score[kRows][64];  // each row's top-k so far, best first
  int best_id[kRows][64];
  float bar_score[kRows];  // each row's k-th best: what a new code must beat
  int bar_id[kRows];
};

__global__ void __launch_bounds__(kThreads)
topk_codes_kernel(const float* __restrict__ x, long long x_head_stride, long long x_row_stride,
                  const float* __restrict__ codes, const float* __restrict__ x_sq,
                  const float* __restrict__ code_sq, int N, int C, int d, int k,
                  float* __restrict__ out_scores, long long* __restrict__ out_ids) {
  extern __shared__ float4 shared_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(shared_raw);
  auto& xs = sh.xs;
  auto& cs = sh.cs;
  auto& tile = sh.tile;

  const int h = blockIdx.y, row0 = blockIdx.x * kRows;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tx = tid % 16, ty = tid / 16;  // this thread's patch: rows ty + 16 i, codes tx + 16 j
  const float* xh = x + h * x_head_stride;
  const float* ch = codes + (long long)h * C * d;
  const bool euclid = x_sq != nullptr;

  for (int i = tid; i < kRows * 64; i += kThreads)  // below any real code, even one at -inf
    sh.best_score[i / 64][i % 64] = -CUDART_INF_F, sh.best_id[i / 64][i % 64] = 0x7fffffff;
  for (int i = tid; i < kRows; i += kThreads) sh.bar_score[i] = -CUDART_INF_F, sh.bar_id[i] = 0x7fffffff;

  for (int c0 = 0; c0 < C; c0 += kCodes) {
    float acc[4][4] = {};
    for (int d0 = 0; d0 < d; d0 += kDims) {
      // stage x[row0 : row0 + kRows, d0 : d0 + kDims] and the code slice, zero-padded, reading
      // along d (coalesced) and storing transposed (d-major) for the inner product below
      for (int i = tid; i < kRows * kDims; i += kThreads) {
        const int q = i / kDims, t = i % kDims;
        const bool ok = row0 + q < N && d0 + t < d;
        xs[t][q] = ok ? xh[(long long)(row0 + q) * x_row_stride + d0 + t] : 0.0f;
      }
      for (int i = tid; i < kCodes * kDims; i += kThreads) {
        const int c = i / kDims, t = i % kDims;
        const bool ok = c0 + c < C && d0 + t < d;
        cs[t][c] = ok ? ch[(long long)(c0 + c) * d + d0 + t] : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int t = 0; t < kDims; ++t) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[t][ty + 16 * i], b[i] = cs[t][tx + 16 * i];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) tile[ty + 16 * i][tx + 16 * j] = acc[i][j];
    __syncthreads();

    // fold the tile into each row's top-k: one warp per row at a time, lane l sees codes
    // c0 + l and c0 + 32 + l; the row's list is touched only when some code beats its bar
#pragma unroll 1
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int q = warp * kRowsPerWarp + r;
      float key[2];
      int id[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        id[half] = c0 + 32 * half + lane;
        float s = tile[q][32 * half + lane];
        if (euclid && row0 + q < N && id[half] < C) {  // rank by -max(|x|^2 - 2 x.c + |c|^2, 0)
          const float dist = (x_sq[(long long)h * N + row0 + q] - 2.0f * s) + code_sq[(long long)h * C + id[half]];
          s = -(dist < 0.0f ? 0.0f : dist);
        }
        key[half] = isnan(s) ? -CUDART_INF_F : s;
      }
      Entry bar = {sh.bar_score[q], sh.bar_id[q]};
      const bool beats0 = id[0] < C && above(key[0], id[0], bar.score, bar.id);
      const bool beats1 = id[1] < C && above(key[1], id[1], bar.score, bar.id);
      if (!__any_sync(kAll, beats0 || beats1)) continue;  // the common case after the first tiles
      Entry best[2] = {{sh.best_score[q][lane], sh.best_id[q][lane]},
                       {sh.best_score[q][lane + 32], sh.best_id[q][lane + 32]}};
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const bool real = id[half] < C;
        bar = kth(best, k);
        unsigned todo = __ballot_sync(kAll, real && above(key[half], id[half], bar.score, bar.id));
        while (todo) {  // warp-uniform: every lane sees the same mask
          const int src = __ffs(todo) - 1;
          insert(best, __shfl_sync(kAll, key[half], src), c0 + 32 * half + src, lane);
          bar = kth(best, k);
          const unsigned later = src == 31 ? 0u : (kAll << (src + 1));
          todo = __ballot_sync(kAll, real && above(key[half], id[half], bar.score, bar.id)) & later;
        }
      }
      sh.best_score[q][lane] = best[0].score, sh.best_id[q][lane] = best[0].id;
      sh.best_score[q][lane + 32] = best[1].score, sh.best_id[q][lane + 32] = best[1].id;
      if (lane == 0) sh.bar_score[q] = bar.score, sh.bar_id[q] = bar.id;
    }
    __syncthreads();  // the tile is overwritten next round
  }

  for (int i = tid; i < kRows * k; i += kThreads) {  // each row's list is complete: write it out
    const int q = i / k, place = i % k;
    if (row0 + q >= N) break;
    const float s = sh.best_score[q][place];
    out_scores[((long long)h * N + row0 + q) * k + place] = euclid ? -sqrtf(-s) : s;
    out_ids[((long long)h * N + row0 + q) * k + place] = sh.best_id[q][place];
  }
}

}  // namespace

extern "C" {

// x: (heads, N, d) float32 with unit stride along d; codes: (heads, C, d) float32, contiguous;
// x_sq (heads, N) and code_sq (heads, C): squared norms for euclidean, both null for cosine.
// Returns a cudaError_t (0 on success).
int codebook_topk_cuda(const float* x, long long x_head_stride, long long x_row_stride, const float* codes,
                       const float* x_sq, const float* code_sq, int heads, int N, int C, int d, int k,
                       float* out_scores, long long* out_ids, cudaStream_t stream) {
  if (k < 1 || k > 64 || k > C) return cudaErrorInvalidValue;
  if (N == 0 || heads == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(topk_codes_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sizeof(Shared));
  if (err != cudaSuccess) return err;
  dim3 grid((N + kRows - 1) / kRows, heads);
  topk_codes_kernel<<<grid, kThreads, sizeof(Shared), stream>>>(x, x_head_stride, x_row_stride, codes, x_sq, code_sq, N, C, d,
                                                   k, out_scores, out_ids);
  return cudaGetLastError();
}

}  // extern "C"
