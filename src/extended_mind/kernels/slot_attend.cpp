// One decode row of block memory's slot attention (attention/slot_step.py), fused: per KV head, the scores of its
// query heads against the slots and the local keys, one softmax over both, the weighted values, and the slots'
// citation weights, streaming every slot key and value once. At one query row the torch version spends its time in
// a dozen small operations per layer and reads the slots' keys and values at well under the memory bandwidth; this
// reads them once per layer, at the bandwidth. Plain C++ loops with fixed-width inner blocks that the compiler
// vectorizes (built with -O3 and the CPU's vector flags, native.py); float32 throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 16;  // independent partial sums: one or two vector registers, no reassociation needed

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

}  // namespace

// query (Hq, D); keys, values (H, L, D), last dim contiguous; mask (L) bool or empty (every local key read);
// slot_keys, slot_values (H, S, D) contiguous; slot_weights (H, S) or empty: the citation weight of each slot's
// probability (|v| for "attention_value"). Returns the output (Hq, D) and, when `cite`, the slots' probabilities
// (times their weights) summed over the query heads (S), else an empty tensor.
std::vector<torch::Tensor> slot_attend(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                                       torch::Tensor mask, torch::Tensor slot_keys, torch::Tensor slot_values,
                                       torch::Tensor slot_weights, double scaling, bool cite) {
  TORCH_CHECK(query.dtype() == torch::kFloat32 && keys.dtype() == torch::kFloat32 &&
                  values.dtype() == torch::kFloat32 && slot_keys.dtype() == torch::kFloat32 &&
                  slot_values.dtype() == torch::kFloat32,
              "slot_attend: float32 only");
  TORCH_CHECK(query.is_contiguous() && slot_keys.is_contiguous() && slot_values.is_contiguous() &&
                  keys.stride(2) == 1 && values.stride(2) == 1,
              "slot_attend: layout");
  const int64_t hq = query.size(0), d = query.size(1), h = slot_keys.size(0), s = slot_keys.size(1);
  const int64_t l = keys.size(1), g = hq / h, row = s + l;
  const bool masked = mask.numel() > 0, weighted = slot_weights.numel() > 0;
  TORCH_CHECK(!masked || (mask.dtype() == torch::kBool && mask.numel() == l && mask.is_contiguous()), "slot_attend: mask");
  TORCH_CHECK(!weighted || (slot_weights.dtype() == torch::kFloat32 && slot_weights.is_contiguous()),
              "slot_attend: weights");
  auto out = torch::zeros({hq, d}, query.options());
  auto per_head = torch::zeros({h, cite ? s : 0}, query.options());
  const float* q = query.data_ptr<float>();
  const float* sk = slot_keys.data_ptr<float>();
  const float* sv = slot_values.data_ptr<float>();
  const float* lk = keys.data_ptr<float>();
  const float* lv = values.data_ptr<float>();
  const bool* m = masked ? mask.data_ptr<bool>() : nullptr;
  const float* sw = weighted ? slot_weights.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  float* c = per_head.data_ptr<float>();
  const int64_t kh = keys.stride(0), kl = keys.stride(1), vh = values.stride(0), vl = values.stride(1);
  const float scale = static_cast<float>(scaling);
  at::parallel_for(0, h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(g * row);
    for (int64_t head = begin; head < end; ++head) {
      const float* qh = q + head * g * d;
      for (int64_t j = 0; j < s; ++j) {  // each slot key read once for the g query heads
        const float* k = sk + (head * s + j) * d;
        for (int64_t r = 0; r < g; ++r) p[r * row + j] = dot(qh + r * d, k, d) * scale;
      }
      for (int64_t j = 0; j < l; ++j) {
        const float* k = lk + head * kh + j * kl;
        for (int64_t r = 0; r < g; ++r)
          p[r * row + s + j] = (m && !m[j]) ? -std::numeric_limits<float>::infinity() : dot(qh + r * d, k, d) * scale;
      }
      for (int64_t r = 0; r < g; ++r) {  // one softmax over the slots and the local keys
        float* pr = p.data() + r * row;
        const float top = *std::max_element(pr, pr + row);
        float sum = 0;
        for (int64_t j = 0; j < row; ++j) sum += (pr[j] = std::exp(pr[j] - top));
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < row; ++j) pr[j] *= inv;
      }
      float* oh = o + head * g * d;
      for (int64_t j = 0; j < s; ++j) {  // each slot value read once
        const float* v = sv + (head * s + j) * d;
        float weight_sum = 0;
        for (int64_t r = 0; r < g; ++r) {
          axpy(p[r * row + j], v, oh + r * d, d);
          weight_sum += p[r * row + j];
        }
        if (cite) c[head * s + j] = weight_sum * (sw ? sw[head * s + j] : 1.0f);
      }
      for (int64_t j = 0; j < l; ++j) {
        const float* v = lv + head * vh + j * vl;
        for (int64_t r = 0; r < g; ++r) axpy(p[r * row + s + j], v, oh + r * d, d);
      }
    }
  });
  return {out, cite ? per_head.sum(0) : torch::Tensor()};
}
