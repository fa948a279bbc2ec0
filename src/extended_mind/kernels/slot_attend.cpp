// One decode row of block memory's slot attention (attention/slot_step.py), fused: per KV head, the scores of its
// query heads against the slots and the local keys, one softmax over both, the weighted values, and the slots'
// citation weights, streaming every slot key and value once. At one query row the torch version spends its time in
// a dozen small operations per layer and reads the slots' keys and values at well under the memory bandwidth; this
// reads them once per layer. The keys of each head are cut in chunks that the threads share (each chunk keeps its
// own softmax maximum and sum, combined at the end as flash attention does), so two threads read at twice the rate
// of one. Plain C++ loops with fixed-width inner blocks that the compiler vectorizes (built with -O3 and the CPU's
// vector flags, native.py); float32 throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 16;   // independent partial sums: one or two vector registers, no reassociation needed
constexpr int64_t kChunk = 128;  // slots per task with several threads: SmolLM2's 512 slots in 4 per head

inline float dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {0};
  int64_t x = 0;
  for (; x + kLanes <= n; x += kLanes)
    for (int i = 0; i < kLanes; ++i) part[i] += a[x + i] * b[x + i];
  float acc = 0;
  for (int i = 0; i < kLanes; ++i) acc += part[i];
  for (; x < n; ++x) acc += a[x] * b[x];
  return acc;
}

inline void axpy(float w, const float* v, float* out, int64_t n) {
  for (int64_t x = 0; x < n; ++x) out[x] += w * v[x];
}

struct Keys {  // the keys and values of one head (slots or local): row j at `j * step` floats
  const float* k;
  const float* v;
  int64_t step;
};

}  // namespace

std::vector<torch::Tensor> slot_attend(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                                       torch::Tensor mask, torch::Tensor slot_keys, torch::Tensor slot_values,
                                       torch::Tensor slot_weights, double scaling, bool cite) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && keys.dtype() == torch::kFloat32 &&
                  values.dtype() == torch::kFloat32 && slot_keys.dtype() == torch::kFloat32 &&
                  slot_values.dtype() == torch::kFloat32,
              "slot_attend: float32 only");
  TORCH_CHECK(query.is_contiguous() && slot_keys.is_contiguous() && slot_values.is_contiguous() &&
                  keys.stride(2) == 1 && values.stride(2) == 1 && keys.stride(1) == values.stride(1) &&
                  keys.stride(0) == values.stride(0),
              "slot_attend: layout");
  const int64_t hq = query.size(0), d = query.size(1), h = slot_keys.size(0), s = slot_keys.size(1);
  const int64_t l = keys.size(1), g = hq / h, row = s + l;
  const bool masked = mask.numel() > 0, weighted = slot_weights.numel() > 0;
  TORCH_CHECK(!masked || (mask.dtype() == torch::kBool && mask.numel() == l && mask.is_contiguous()),
              "slot_attend: mask");
  TORCH_CHECK(!weighted || (slot_weights.dtype() == torch::kFloat32 && slot_weights.is_contiguous()),
              "slot_attend: weights");
  // one thread: a head's slots in one run (nothing to combine); several: runs of kChunk that the threads share
  const int64_t size = at::get_num_threads() > 1 ? kChunk : std::max<int64_t>(s, 1);
  const int64_t slot_chunks = (s + size - 1) / size, chunks = slot_chunks + 1;  // the last: the local keys
  const float* q = query.data_ptr<float>();
  const float* sk = slot_keys.data_ptr<float>();
  const float* sv = slot_values.data_ptr<float>();
  const float* lk = keys.data_ptr<float>();
  const float* lv = values.data_ptr<float>();
  const bool* m = masked ? mask.data_ptr<bool>() : nullptr;
  const float* sw = weighted ? slot_weights.data_ptr<float>() : nullptr;
  const float scale = static_cast<float>(scaling);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // per (head, chunk, query row): the chunk's maximum, its sum of exp, its unnormalized output; per (head, row, key)
  // the exp of the logit against the chunk's maximum
  std::vector<float> top(h * chunks * g, neg_inf), sum(h * chunks * g, 0.0f), part(h * chunks * g * d, 0.0f);
  std::vector<float> p(h * g * row);
  at::parallel_for(0, h * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / chunks, chunk = task % chunks;
      const bool local = chunk == slot_chunks;
      const int64_t from = local ? 0 : chunk * size, to = local ? l : std::min(s, from + size);
      const int64_t at = local ? s : 0;  // where the chunk's keys sit in a row of p
      const Keys run = local ? Keys{lk + head * keys.stride(0), lv + head * keys.stride(0), keys.stride(1)}
                             : Keys{sk + head * s * d, sv + head * s * d, d};
      const float* qh = q + head * g * d;
      for (int64_t r = 0; r < g; ++r) {
        float* pr = p.data() + (head * g + r) * row + at;
        float best = neg_inf;
        for (int64_t j = from; j < to; ++j) {
          pr[j] = (local && m && !m[j]) ? neg_inf : dot(qh + r * d, run.k + j * run.step, d) * scale;
          best = std::max(best, pr[j]);
        }
        const int64_t slot = (head * chunks + chunk) * g + r;
        top[slot] = best;
        if (best == neg_inf) continue;  // every key masked: the chunk adds nothing
        float total = 0;
        for (int64_t j = from; j < to; ++j) total += (pr[j] = std::exp(pr[j] - best));
        sum[slot] = total;
      }
      float* o = part.data() + (head * chunks + chunk) * g * d;
      for (int64_t j = from; j < to; ++j) {  // each value read once for the g query heads
        const float* v = run.v + j * run.step;
        for (int64_t r = 0; r < g; ++r) {
          if (top[(head * chunks + chunk) * g + r] == neg_inf) continue;
          axpy(p[(head * g + r) * row + at + j], v, o + r * d, d);
        }
      }
    }
  });
  auto out = torch::zeros({hq, d}, query.options());
  auto cited = torch::zeros({cite ? s : 0}, query.options());
  float* od = out.data_ptr<float>();
  float* cd = cited.data_ptr<float>();
  std::vector<float> factor(chunks);
  for (int64_t head = 0; head < h; ++head)
    for (int64_t r = 0; r < g; ++r) {  // the chunks' softmaxes made one
      float best = neg_inf, total = 0;
      for (int64_t c = 0; c < chunks; ++c) best = std::max(best, top[(head * chunks + c) * g + r]);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t slot = (head * chunks + c) * g + r;
        factor[c] = top[slot] == neg_inf ? 0.0f : std::exp(top[slot] - best);
        total += sum[slot] * factor[c];
      }
      const float inv = 1.0f / total;
      float* o = od + (head * g + r) * d;
      for (int64_t c = 0; c < chunks; ++c) axpy(factor[c] * inv, part.data() + ((head * chunks + c) * g + r) * d, o, d);
      if (!cite) continue;
      const float* pr = p.data() + (head * g + r) * row;
      const float* w = sw ? sw + head * s : nullptr;
      for (int64_t c = 0; c < slot_chunks; ++c) {  // chunk by chunk: one factor each, no division per slot
        const float f = factor[c] * inv;
        const int64_t to = std::min(s, (c + 1) * size);
        if (w)
          for (int64_t j = c * size; j < to; ++j) cd[j] += pr[j] * f * w[j];
        else
          for (int64_t j = c * size; j < to; ++j) cd[j] += pr[j] * f;
      }
    }
  return {out, cite ? cited : torch::Tensor()};
}
