// int8 scan of memory keys for decode-sized query batches: AVX512-VNNI, or AVX2 when built with -DEM_AVX2.
//
// Keys are packed per head in blocks of 16 keys: block b holds, for each group of 4 dimensions g, the 4 int8 codes
// of its 16 keys (64 bytes). With VNNI one vpdpbusd multiplies 4 dimensions of one query row with 16 keys at once.
// vpdpbusd takes unsigned x signed bytes: the query is shifted to unsigned (q + 128) and 128 * (sum of the key's
// codes) is subtracted afterwards. With AVX2, vpmaddubsw + vpmaddwd do the same for 8 keys per 256-bit half; their
// int16 pair sums would saturate with 8-bit unsigned queries (2 x 255 x 127 > 32767), so the query is split as
// q = 2 h + l with h = q >> 1 (7 bits, shifted by 64 to unsigned) and l = q & 1: h's products fit, l's (0 or 1 times
// a code) are summed in int16 over all groups, and the score 2 (h . k) + l . k is exact, as with VNNI (a 7-bit
// query alone lost too much: queries have outlier dimensions). `scan_int8_topk` keeps only the best `size` keys per query row while it scans, so neither the
// (rows x keys) score matrix nor a top-k pass over it is ever materialized.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <utility>
#include <vector>

namespace {

#ifdef EM_AVX2
struct Acc {  // scores of the 16 keys of a block: keys 0-7 and 8-15
  __m256i lo, hi;
};
constexpr int kWords = 2;  // per query group: the bytes of h + 64, then those of l (see the top of the file)
#else
using Acc = __m512i;
constexpr int kWords = 1;  // per query group: the bytes of q + 128
#endif

// Per query row and group of 4 dimensions: the query's bytes as vpdpbusd / vpmaddubsw broadcast them.
std::vector<uint32_t> unsigned_groups(const int8_t* q, int64_t rows, int64_t dim) {
  const int64_t groups = dim / 4;
  std::vector<uint32_t> out(rows * groups * kWords);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t b[kWords][4];
      for (int t = 0; t < 4; ++t) {
        const int v = q[r * dim + 4 * g + t];
#ifdef EM_AVX2
        b[0][t] = static_cast<uint8_t>((v >> 1) + 64);  // arithmetic shift: v = 2 (v >> 1) + (v & 1)
        b[1][t] = static_cast<uint8_t>(v & 1);
#else
        b[0][t] = static_cast<uint8_t>(v + 128);
#endif
      }
      std::memcpy(&out[(r * groups + g) * kWords], b, 4 * kWords);
    }
  return out;
}

// Scores of NR query rows against key block `block`: acc[r] holds the 16 keys' q . k.
template <int NR>
inline void block_scores(const uint32_t* qu, int64_t groups, const int8_t* block, const int32_t* colsum, Acc* acc) {
#ifdef EM_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i low_lo[NR], low_hi[NR];  // l . k per key pair in int16: at most 2 x 127 per group, 128 groups fit
  for (int r = 0; r < NR; ++r) acc[r].lo = acc[r].hi = low_lo[r] = low_hi[r] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i klo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + g * 64));
    const __m256i khi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + g * 64 + 32));
    for (int r = 0; r < NR; ++r) {
      const uint32_t* w = qu + (r * groups + g) * 2;
      const __m256i h = _mm256_set1_epi32(static_cast<int>(w[0]));
      const __m256i l = _mm256_set1_epi32(static_cast<int>(w[1]));
      acc[r].lo = _mm256_add_epi32(acc[r].lo, _mm256_madd_epi16(_mm256_maddubs_epi16(h, klo), ones));
      acc[r].hi = _mm256_add_epi32(acc[r].hi, _mm256_madd_epi16(_mm256_maddubs_epi16(h, khi), ones));
      low_lo[r] = _mm256_add_epi16(low_lo[r], _mm256_maddubs_epi16(l, klo));
      low_hi[r] = _mm256_add_epi16(low_hi[r], _mm256_maddubs_epi16(l, khi));
    }
  }
  // q . k = 2 (h . k) + l . k, with h . k = (h + 64) . k - 64 colsum: 2 acc - 128 colsum + l . k
  const __m256i slo = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum)), 7);
  const __m256i shi = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + 8)), 7);
  for (int r = 0; r < NR; ++r) {
    acc[r].lo = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(acc[r].lo, 1), slo), _mm256_madd_epi16(low_lo[r], ones));
    acc[r].hi = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(acc[r].hi, 1), shi), _mm256_madd_epi16(low_hi[r], ones));
  }
#else
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i k = _mm512_loadu_si512(static_cast<const void*>(block + g * 64));
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(static_cast<int>(qu[r * groups + g])), k);
  }
  const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(static_cast<const void*>(colsum)), 7);
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_sub_epi32(acc[r], shift);
#endif
}

inline void store16(int32_t* out, const Acc& a) {
#ifdef EM_AVX2
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), a.lo);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), a.hi);
#else
  _mm512_storeu_si512(static_cast<void*>(out), a);
#endif
}

// Bit i set: key i of the block scores above `floor`.
inline uint32_t above_mask(const Acc& a, int32_t floor) {
#ifdef EM_AVX2
  const __m256i f = _mm256_set1_epi32(floor);
  const uint32_t lo = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a.lo, f)));
  const uint32_t hi = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(a.hi, f)));
  return lo | (hi << 8);
#else
  return _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(floor));
#endif
}

template <int NR>
void scores_rows(const uint32_t* qu, int64_t groups, const int8_t* packed, const int32_t* colsum, int64_t blocks,
                 int32_t* out, int64_t ld) {
  Acc acc[NR];
  for (int64_t b = 0; b < blocks; ++b) {
    block_scores<NR>(qu, groups, packed + b * groups * 64, colsum + b * 16, acc);
    for (int r = 0; r < NR; ++r) store16(out + r * ld + b * 16, acc[r]);
  }
}

// The best `size` (score, key) pairs of one row, kept in a buffer that is cut back to `size` when it fills up;
// `floor` is then the size-th best score, and a block is only looked at when it has a key above it.
struct RowBest {
  std::vector<std::pair<int32_t, int64_t>> items;
  int32_t floor = INT32_MIN;

  void cut(int64_t size) {
    if (static_cast<int64_t>(items.size()) <= size) return;
    std::nth_element(items.begin(), items.begin() + (size - 1), items.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    items.resize(size);
    floor = items[size - 1].first;
  }
};

// Rare path, kept out of the scan loop (a call there would force the accumulators through memory): add the keys
// of block `b` that beat their row's floor.
template <int NR>
__attribute__((noinline)) void add_above(const int32_t (*lane)[16], const uint32_t* above, int64_t b, int64_t valid,
                                         int64_t size, RowBest* best) {
  const int64_t capacity = 4 * size + 16;
  for (int r = 0; r < NR; ++r) {
    for (uint32_t m = above[r]; m; m &= m - 1) {
      const int bit = __builtin_ctz(m);
      const int64_t key = b * 16 + bit;
      if (key < valid) best[r].items.emplace_back(lane[r][bit], key);
    }
    if (static_cast<int64_t>(best[r].items.size()) >= capacity) best[r].cut(size);
  }
}

template <int NR>
void topk_rows(const uint32_t* qu, int64_t groups, const int8_t* packed, const int32_t* colsum, int64_t first,
               int64_t last, int64_t valid, int64_t size, RowBest* best) {
  Acc acc[NR];
  alignas(64) int32_t lane[NR][16];
  uint32_t above[NR];
  for (int64_t b = first; b < last; ++b) {
    block_scores<NR>(qu, groups, packed + b * groups * 64, colsum + b * 16, acc);
    uint32_t any = 0;
    for (int r = 0; r < NR; ++r) {
      above[r] = above_mask(acc[r], best[r].floor);
      any |= above[r];
    }
    if (__builtin_expect(any != 0, 0)) {
      for (int r = 0; r < NR; ++r) store16(lane[r], acc[r]);
      add_above<NR>(lane, above, b, valid, size, best);
    }
  }
}

template <typename F>
void for_row_tiles(int64_t rows, F&& f) {
  int64_t r0 = 0;
  for (; r0 + 4 <= rows; r0 += 4) f(std::integral_constant<int, 4>{}, r0);
  switch (rows - r0) {
    case 3: f(std::integral_constant<int, 3>{}, r0); break;
    case 2: f(std::integral_constant<int, 2>{}, r0); break;
    case 1: f(std::integral_constant<int, 1>{}, r0); break;
    default: break;
  }
}

void check(const torch::Tensor& q, const torch::Tensor& packed, const torch::Tensor& colsum) {
  TORCH_CHECK(q.dtype() == torch::kInt8 && packed.dtype() == torch::kInt8 && colsum.dtype() == torch::kInt32,
              "scan_int8: int8 queries and keys, int32 column sums");
  TORCH_CHECK(q.dim() == 3 && packed.dim() == 3 && colsum.dim() == 2, "scan_int8: (H, R, D), (H, B, D*16), (H, B*16)");
  TORCH_CHECK(q.size(2) % 4 == 0 && packed.size(2) == q.size(2) * 16, "scan_int8: dimension must be a multiple of 4");
#ifdef EM_AVX2
  TORCH_CHECK(q.size(2) <= 512, "scan_int8 (AVX2): head size at most 512 (int16 sums of the low query bits)");
#endif
  TORCH_CHECK(packed.size(0) == q.size(0) && colsum.size(0) == q.size(0) && colsum.size(1) == packed.size(1) * 16,
              "scan_int8: shapes do not match");
  TORCH_CHECK(packed.is_contiguous() && colsum.is_contiguous(), "scan_int8: packed keys must be contiguous");
}

}  // namespace

// Scores of every key: q (H, R, D) int8, packed (H, B, D*16) int8, colsum (H, B*16) int32 -> (H, R, B*16) int32.
torch::Tensor scan_int8(torch::Tensor q, torch::Tensor packed, torch::Tensor colsum) {
  check(q, packed, colsum);
  q = q.contiguous();
  const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2), blocks = packed.size(1), groups = dim / 4;
  auto out = torch::empty({heads, rows, blocks * 16}, torch::kInt32);
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const auto qu = unsigned_groups(q.data_ptr<int8_t>() + h * rows * dim, rows, dim);
      const int8_t* p = packed.data_ptr<int8_t>() + h * blocks * groups * 64;
      const int32_t* cs = colsum.data_ptr<int32_t>() + h * blocks * 16;
      int32_t* o = out.data_ptr<int32_t>() + h * rows * blocks * 16;
      for_row_tiles(rows, [&](auto nr, int64_t r0) {
        scores_rows<decltype(nr)::value>(qu.data() + r0 * groups * kWords, groups, p, cs, blocks, o + r0 * blocks * 16,
                                         blocks * 16);
      });
    }
  });
  return out;
}

// The `size` best keys per query row among the key blocks ranges[h] (in order, not overlapping) of each head h:
// (H, R, size) int64 key positions, -1 where the ranges hold fewer than `size` keys.
torch::Tensor topk_in_ranges(torch::Tensor q, const torch::Tensor& packed, const torch::Tensor& colsum, int64_t valid,
                             int64_t size, const std::vector<std::vector<std::pair<int64_t, int64_t>>>& ranges) {
  check(q, packed, colsum);
  TORCH_CHECK(size >= 1 && valid <= packed.size(1) * 16, "scan_int8_topk: need size >= 1 and valid <= keys");
  q = q.contiguous();
  const int64_t heads = q.size(0), rows = q.size(1), dim = q.size(2), blocks = packed.size(1), groups = dim / 4;
  auto out = torch::full({heads, rows, size}, -1, torch::kInt64);
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const auto qu = unsigned_groups(q.data_ptr<int8_t>() + h * rows * dim, rows, dim);
      const int8_t* p = packed.data_ptr<int8_t>() + h * blocks * groups * 64;
      const int32_t* cs = colsum.data_ptr<int32_t>() + h * blocks * 16;
      int64_t* o = out.data_ptr<int64_t>() + h * rows * size;
      for_row_tiles(rows, [&](auto nr, int64_t r0) {
        constexpr int NR = decltype(nr)::value;
        RowBest best[NR];
        for (int r = 0; r < NR; ++r) best[r].items.reserve(4 * size + 32);
        for (const auto& range : ranges[h])
          topk_rows<NR>(qu.data() + r0 * groups * kWords, groups, p, cs, range.first, range.second, valid, size, best);
        for (int r = 0; r < NR; ++r) {
          best[r].cut(size);
          for (size_t i = 0; i < best[r].items.size(); ++i) o[(r0 + r) * size + i] = best[r].items[i].second;
        }
      });
    }
  });
  return out;
}

// Indices (H, R, size) int64 of the `size` best of the first `valid` keys per query row (unordered).
torch::Tensor scan_int8_topk(torch::Tensor q, torch::Tensor packed, torch::Tensor colsum, int64_t valid,
                             int64_t size) {
  TORCH_CHECK(size >= 1 && size <= valid, "scan_int8_topk: need 1 <= size <= keys");
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges(q.size(0), {{0, packed.size(1)}});
  return topk_in_ranges(q, packed, colsum, valid, size, ranges);
}

// As scan_int8_topk, over the probed cells of an IVF index only: keys stored in cell order, cell c of head h holds
// positions [offsets[h, c], offsets[h, c + 1]), probed (H, C) bool. Cells are widened to whole blocks (edge keys
// of neighbouring cells are scored too) and merged where they touch; a head whose probed blocks cover more than
// `max_share` of the keys scans all of them.
torch::Tensor scan_int8_topk_cells(torch::Tensor q, torch::Tensor packed, torch::Tensor colsum, int64_t valid,
                                   int64_t size, torch::Tensor probed, torch::Tensor offsets, double max_share) {
  const int64_t heads = q.size(0), blocks = packed.size(1);
  TORCH_CHECK(probed.dtype() == torch::kBool && offsets.dtype() == torch::kInt64 && probed.dim() == 2 &&
                  probed.size(0) == heads && offsets.dim() == 2 && offsets.size(0) == heads &&
                  offsets.size(1) == probed.size(1) + 1,
              "scan_int8_topk_cells: probed (H, C) bool and offsets (H, C + 1) int64");
  const auto pr = probed.contiguous();
  const auto of = offsets.contiguous();
  const int64_t cells = pr.size(1);
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges(heads);
  for (int64_t h = 0; h < heads; ++h) {
    const bool* mine = pr.data_ptr<bool>() + h * cells;
    const int64_t* off = of.data_ptr<int64_t>() + h * (cells + 1);
    auto& list = ranges[h];
    int64_t covered = 0;
    for (int64_t c = 0; c < cells; ++c) {
      if (!mine[c] || off[c] >= off[c + 1]) continue;
      TORCH_CHECK(0 <= off[c] && off[c + 1] <= valid, "scan_int8_topk_cells: cell offsets out of range");
      const int64_t first = off[c] / 16, last = (off[c + 1] + 15) / 16;
      if (!list.empty() && first <= list.back().second) {
        covered += last - list.back().second;
        list.back().second = std::max(list.back().second, last);
      } else {
        covered += last - first;
        list.emplace_back(first, last);
      }
    }
    if (covered * 16 > max_share * valid) list.assign(1, {0, blocks});
  }
  return topk_in_ranges(q, packed, colsum, valid, size, ranges);
}
