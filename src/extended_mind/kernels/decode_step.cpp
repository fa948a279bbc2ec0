// One decode token (one row) through every decoder layer of a Llama-style model (engine/fast_step.py), in one
// call: the same ATen operators transformers' modules run, without the Python between them. At one token on a
// small model that Python is a third of the step (docs/measurements.md: ~7.5 of 22 ms on SmolLM2 with 4-bit
// weights). Each layer: RMS norm, q/k/v projections (float, int8 or 4-bit weights), per-head q/k norms where the
// model has them (Qwen3), rotary embedding, the new key and value written into the cache's buffers, attention
// over the filled part (in a layer that reads block memory: over its slots and the filled part in one softmax, by
// kernels/slot_attend.cpp's slot_attend, which this file is compiled with), output projection, RMS norm, SiLU-gated
// MLP; residuals in between.
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> slot_attend(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                                       torch::Tensor mask, torch::Tensor slot_keys, torch::Tensor slot_values,
                                       torch::Tensor slot_weights, double scaling, bool cite);

namespace {

enum Kind : int64_t { kFloat = 0, kInt8 = 1, kInt4 = 2 };

// One projection: `kind` says what the two tensors are (float: the weight; int8: codes and per-channel scales;
// 4-bit: packed codes and scales-and-zeros per `group` inputs); `bias` may be empty.
at::Tensor project(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& bias, int64_t group) {
  at::Tensor y;
  if (kind == kFloat) {
    y = at::matmul(x, a.t());
  } else if (kind == kInt8) {
    y = at::_weight_int8pack_mm(x.to(at::kBFloat16), a, b).to(x.scalar_type());
  } else {
    y = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), a, group, b).to(x.scalar_type());
  }
  return bias.numel() ? y + bias : y;
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

}  // namespace

// x (1, hidden) float32; cos/sin (1, 1, 1, head_dim); per layer: 4 norms (input, post-attention, q, k; the last
// two empty where absent), 7 projections (q, k, v, o, gate, up, down) as 3 tensors each (a, b, bias) with their
// kinds, and the cache's key and value buffers (1, kv_heads, room, head_dim) of which `filled` rows are set; per
// layer its slots' keys and values (kv_heads, slots, head_dim), empty where the layer reads no memory, and their
// citation weights (empty: the probabilities alone). Returns the hidden state after the last layer (before the
// final norm), then per layer the slots' citation weights when `cite` (empty where the layer reads no memory).
std::vector<torch::Tensor> decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin,
                            std::vector<torch::Tensor> norms, std::vector<torch::Tensor> linears,
                            std::vector<int64_t> kinds,
                            std::vector<torch::Tensor> key_buffers, std::vector<torch::Tensor> value_buffers,
                            int64_t filled, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
                            double scaling, int64_t group, std::vector<torch::Tensor> slot_keys,
                            std::vector<torch::Tensor> slot_values, std::vector<torch::Tensor> slot_weights,
                            bool cite) {
  const int64_t layers = static_cast<int64_t>(key_buffers.size());
  TORCH_CHECK(norms.size() == static_cast<size_t>(4 * layers) &&
                  linears.size() == static_cast<size_t>(21 * layers) &&
                  kinds.size() == static_cast<size_t>(7 * layers) && value_buffers.size() == key_buffers.size() &&
                  slot_keys.size() == key_buffers.size() && slot_values.size() == key_buffers.size() &&
                  slot_weights.size() == key_buffers.size(),
              "decode_layers: per-layer lists of the wrong length");
  const int64_t hidden = x.size(-1);
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(key_buffers[l].size(2) > filled && value_buffers[l].size(2) > filled,
                "decode_layers: no room in the cache");
  }
  auto proj = [&](const at::Tensor& in, int64_t l, int64_t p) {
    const size_t i = static_cast<size_t>(21 * l + 3 * p);
    return project(in, kinds[7 * l + p], linears[i], linears[i + 1], linears[i + 2], group);
  };
  std::vector<torch::Tensor> out(1 + layers);
  const auto none = at::empty({0}, x.options());  // slot_attend's "no mask"
  for (int64_t l = 0; l < layers; ++l) {
    const auto& q_norm = norms[4 * l + 2];
    const auto& k_norm = norms[4 * l + 3];
    auto n = at::rms_norm(x, {hidden}, norms[4 * l], eps);
    auto q = proj(n, l, 0).view({1, 1, heads, head_dim});
    auto k = proj(n, l, 1).view({1, 1, kv_heads, head_dim});
    auto v = proj(n, l, 2).view({1, 1, kv_heads, head_dim}).transpose(1, 2);
    if (q_norm.numel()) q = at::rms_norm(q, {head_dim}, q_norm, eps);
    if (k_norm.numel()) k = at::rms_norm(k, {head_dim}, k_norm, eps);
    q = rotate(q.transpose(1, 2), cos, sin);
    k = rotate(k.transpose(1, 2), cos, sin);
    key_buffers[l].narrow(2, filled, 1).copy_(k);
    value_buffers[l].narrow(2, filled, 1).copy_(v);
    auto keys = key_buffers[l].narrow(2, 0, filled + 1);
    auto values = value_buffers[l].narrow(2, 0, filled + 1);
    at::Tensor o;
    if (slot_keys[l].numel()) {
      auto read = slot_attend(q.reshape({heads, head_dim}).contiguous(), keys[0], values[0], none,
                              slot_keys[l], slot_values[l], slot_weights[l], scaling, cite);
      o = read[0];
      out[1 + l] = read[1];
    } else {
      o = at::scaled_dot_product_attention(q, keys, values, {}, 0.0, false, scaling, kv_heads != heads);
    }
    x = x + proj(o.reshape({1, heads * head_dim}), l, 3);
    n = at::rms_norm(x, {hidden}, norms[4 * l + 1], eps);
    x = x + proj(at::silu(proj(n, l, 4)) * proj(n, l, 5), l, 6);
  }
  out[0] = x;
  for (auto& t : out)
    if (!t.defined()) t = none;
  return out;
}
