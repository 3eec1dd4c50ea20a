// The operators torch.ops.mistral_ref.gemv_* (defined in backends/cpu_gemv.py) as C++ kernels for the CPU
// dispatch key: the same checks and the same calls into cpu_gemv.c as the Python functions of cpu_gemv.py, without
// the Python between the dispatcher and the kernel.  A compiled decode step calls these operators 30-50 times a
// step; through Python each call costs ~20-60 us besides the product (README, "Speed on a CPU").
//
// Built by cpu_gemv.py (build_ops) from this file and cpu_gemv.c, linked against the torch it runs with, loaded with
// torch.ops.load_library; until it is loaded (or where it cannot be built) the Python functions serve the
// operators, registered under CompositeExplicitAutograd, which a CPU kernel registered here takes precedence over.
#include <ATen/core/Tensor.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rms_norm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

extern "C" {
int gemv_float(const void *x, const void *w, int w_f32, void *y, int io_bf16, int64_t rows, int64_t out, int64_t in,
               int threads);
int gemv_int8(const void *x, const int8_t *q, const void *scales, int scales_bf16, void *y, int io_bf16,
              int64_t rows, int64_t out, int64_t in, int threads);
int gemv_int4(const void *x, const uint8_t *q, const void *sz, int scales_bf16, void *y, int io_bf16, int64_t rows,
              int64_t out, int64_t in, int64_t group, int threads);
int gemv_float_many(const void *x, int64_t n, const void *const *w, int w_f32, void *const *y, const int64_t *outs,
                    int io_bf16, int64_t rows, int64_t in, int threads);
int gemv_int8_many(const void *x, int64_t n, const int8_t *const *q, const void *const *scales, int scales_bf16,
                   void *const *y, const int64_t *outs, int io_bf16, int64_t rows, int64_t in, int threads);
int gemv_int4_many(const void *x, int64_t n, const uint8_t *const *q, const void *const *sz, int scales_bf16,
                   void *const *y, const int64_t *outs, int io_bf16, int64_t rows, int64_t in, int64_t group,
                   int threads);
int gemv_bf16_experts(const void *x, int64_t x_rows, const uint16_t *w, int64_t n_experts, const int64_t *index,
                      int64_t k, void *y, int io_bf16, int64_t out, int64_t in, int threads);
int gemv_quantized_experts(const void *x, int64_t x_rows, const void *q, const void *scales, int scales_bf16,
                           int64_t n_experts, const int64_t *index, int64_t k, void *y, int io_bf16, int64_t out,
                           int64_t in, int64_t group, int threads);
int swiglu_experts(const void *x, int io_bf16, int kind, const void *w1, const void *s1, const void *w3,
                   const void *s3, const void *w2, const void *s2, int scales_bf16, int64_t group, int64_t n_experts,
                   const int64_t *index, const float *weights, int64_t k, int64_t hidden, int64_t dim, void *out,
                   int threads);
int moe_one_token(const void *x, int io_bf16, const void *gate, int gate_bf16, int64_t top_k, int kind,
                  const void *w1, const void *s1, const void *w3, const void *s3, const void *w2, const void *s2,
                  int scales_bf16, int64_t group, int64_t n_experts, int64_t hidden, int64_t dim, void *out,
                  float *logits, int threads);
int attend_one(const void *q, const void *k, const void *v, const int64_t *k_pos, const int64_t *q_pos,
               int64_t window, void *out, int io_bf16, int64_t batch, int64_t slots, int64_t heads, int64_t kv_heads,
               int64_t head_dim, int threads);
int rms_norm_rows(const void *x, const void *weight, void *out, int io_bf16, int64_t rows, int64_t dim, float eps);
int route_one_token(const void *x, int io_bf16, const void *gate, int gate_bf16, int64_t n_experts, int64_t dim,
                    int64_t k, float *logits, int64_t *index, float *weights);
int route_fine_one(const void *x, int io_bf16, const void *gate, int gate_bf16, const void *bias, int bias_bf16,
                   int64_t n_experts, int64_t dim, int scoring, int64_t n_group, int64_t topk_group, int64_t k,
                   int norm, float routed_scale, float *logits, int64_t *index, float *weights);
int attend_latent_one(const void *q, const void *latents, const void *k_rope, const int64_t *k_pos, int64_t q_pos,
                      const void *kv_b, int kv_b_kind, const void *kv_b_scales, int64_t kv_b_group, void *out,
                      int io_bf16, int rounded, int64_t slots, int64_t heads, int64_t n, int64_t r, int64_t v,
                      int64_t c, float scale, int threads);
int swiglu_chosen(const void *x, int io_bf16, int kind, const void *const *w1, const void *const *s1,
                  const void *const *w3, const void *const *s3, const void *const *w2, const void *const *s2,
                  int scales_bf16, int64_t group, const float *weights, int64_t k, int64_t hidden, int64_t dim,
                  void *out, int threads);
void rope_heads(void *x, int io_bf16, int64_t heads, int64_t head_dim, const float *rot);
void add_rows(const void *a, const void *b, void *out, int io_bf16, int64_t n);
void silu_mul(const void *gate, const void *up, void *out, int io_bf16, int64_t n, int threads);
}

namespace {

using at::Tensor;

bool is_float(const Tensor &t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat;
}

// cpu_gemv.py: _check
void check(const Tensor &x, const Tensor &weight, int64_t in_features, at::ScalarType dtype, bool fits) {
  TORCH_CHECK_VALUE(fits && x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == dtype && x.is_cpu() &&
                        weight.is_cpu(),
                    "cpu_gemv: arguments that do not fit: x ", x.sizes(), " ", x.scalar_type(), ", weight ",
                    weight.sizes(), " ", weight.scalar_type(), " (in_features ", in_features, ", x dtype ", dtype, ")");
}

// cpu_gemv.py: _fits_quantized (q, s: the shapes of one expert's codes and scales)
bool fits_quantized(int64_t in, at::ScalarType codes, at::IntArrayRef q, at::IntArrayRef s, int64_t group) {
  if (q.size() != 2) return false;
  if (codes == at::kChar) return q[1] == in && s.size() == 1 && s[0] == q[0];
  return codes == at::kByte && group > 0 && in % group == 0 && q[0] % 16 == 0 && 2 * q[1] == in && s.size() == 3 &&
         s[0] == in / group && s[1] == q[0] && s[2] == 2;
}

void check_floats(const Tensor &x, const Tensor &scales) {
  TORCH_CHECK(is_float(x) && is_float(scales), "the C kernels take bf16 or fp32 inputs and scales, not ",
              x.scalar_type(), " / ", scales.scalar_type());
}

// cpu_gemv.py: _check_quantized
void check_quantized(const Tensor &x, const Tensor &qweight, const Tensor &scales, int64_t group) {
  check_floats(x, scales);
  int64_t in = x.size(-1);
  check(x, qweight, in, x.scalar_type(),
        fits_quantized(in, qweight.scalar_type(), qweight.sizes(), scales.sizes(), group) &&
            qweight.is_contiguous() && scales.is_contiguous() && scales.is_cpu());
}

void done(int code, int64_t rows, int64_t in) {
  TORCH_CHECK_INDEX(code != -2, "cpu_gemv: an expert index is out of range");
  TORCH_CHECK(code == 0, "cpu_gemv: no memory for the fp32 copies of a (", rows, ", ", in, ") product");
}

int bf16(const Tensor &t) { return t.scalar_type() == at::kBFloat16 ? 1 : 0; }

// x and weight both bf16 or both fp32 (cpu_gemv.py: gemv_float)
Tensor op_gemv_float(const Tensor &x_, const Tensor &weight, int64_t threads) {
  Tensor x = x_.contiguous();
  TORCH_CHECK_VALUE(weight.dim() == 2, "cpu_gemv: the weight must be (out, in), got ", weight.sizes());
  check(x, weight, weight.size(1), weight.scalar_type(), is_float(weight) && weight.is_contiguous());
  Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
  done(gemv_float(x.data_ptr(), weight.data_ptr(), 1 - bf16(weight), y.data_ptr(), bf16(x), x.size(0), weight.size(0),
                  x.size(1), static_cast<int>(threads)),
       x.size(0), x.size(1));
  return y;
}

Tensor op_gemv_quantized(const Tensor &x_, const Tensor &qweight, const Tensor &scales, int64_t group,
                         int64_t threads) {
  Tensor x = x_.contiguous();
  check_quantized(x, qweight, scales, group);
  int64_t rows = x.size(0), in = x.size(1), out = qweight.size(0);
  Tensor y = at::empty({rows, out}, x.options());
  int code = qweight.scalar_type() == at::kChar
                 ? gemv_int8(x.data_ptr(), static_cast<const int8_t *>(qweight.data_ptr()), scales.data_ptr(),
                             bf16(scales), y.data_ptr(), bf16(x), rows, out, in, static_cast<int>(threads))
                 : gemv_int4(x.data_ptr(), static_cast<const uint8_t *>(qweight.data_ptr()), scales.data_ptr(),
                             bf16(scales), y.data_ptr(), bf16(x), rows, out, in, group, static_cast<int>(threads));
  done(code, rows, in);
  return y;
}

std::vector<Tensor> op_gemv_float_many(const Tensor &x_, at::TensorList weights, int64_t threads) {
  Tensor x = x_.contiguous();
  TORCH_CHECK_VALUE(!weights.empty(), "gemv_float_many: no weights");
  const int64_t n = static_cast<int64_t>(weights.size());
  const at::ScalarType dtype = weights[0].scalar_type();
  std::vector<Tensor> ys;
  std::vector<const void *> ws;
  std::vector<void *> yp;
  std::vector<int64_t> outs;
  for (const Tensor &w : weights) {
    TORCH_CHECK_VALUE(w.dim() == 2, "cpu_gemv: a weight must be (out, in), got ", w.sizes());
    check(x, w, w.size(-1), dtype, is_float(w) && w.scalar_type() == dtype && w.is_contiguous());
    ys.push_back(at::empty({x.size(0), w.size(0)}, x.options()));
    ws.push_back(w.data_ptr());
    yp.push_back(ys.back().data_ptr());
    outs.push_back(w.size(0));
  }
  done(gemv_float_many(x.data_ptr(), n, ws.data(), 1 - bf16(weights[0]), yp.data(), outs.data(), bf16(x),
                       x.size(0), x.size(1), static_cast<int>(threads)),
       x.size(0), x.size(1));
  return ys;
}

std::vector<Tensor> op_gemv_quantized_many(const Tensor &x_, at::TensorList qweights, at::TensorList scales,
                                           int64_t group, int64_t threads) {
  Tensor x = x_.contiguous();
  TORCH_CHECK_VALUE(!qweights.empty() && qweights.size() == scales.size(),
                    "gemv_quantized_many: every weight needs a code tensor and a scale tensor");
  const int64_t n = static_cast<int64_t>(qweights.size());
  std::vector<Tensor> ys;
  std::vector<const void *> qs, ss;
  std::vector<void *> yp;
  std::vector<int64_t> outs;
  for (int64_t p = 0; p < n; p++) {
    const Tensor &q = qweights[p], &s = scales[p];
    TORCH_CHECK_VALUE(q.scalar_type() == qweights[0].scalar_type() && s.scalar_type() == scales[0].scalar_type(),
                      "gemv_quantized_many: weights of one scheme and one scale dtype, got ", q.scalar_type(), "/",
                      s.scalar_type(), " after ", qweights[0].scalar_type(), "/", scales[0].scalar_type());
    check_quantized(x, q, s, group);
    ys.push_back(at::empty({x.size(0), q.size(0)}, x.options()));
    qs.push_back(q.data_ptr());
    ss.push_back(s.data_ptr());
    yp.push_back(ys.back().data_ptr());
    outs.push_back(q.size(0));
  }
  int code = qweights[0].scalar_type() == at::kChar
                 ? gemv_int8_many(x.data_ptr(), n, reinterpret_cast<const int8_t *const *>(qs.data()), ss.data(),
                                  bf16(scales[0]), yp.data(), outs.data(), bf16(x), x.size(0), x.size(1),
                                  static_cast<int>(threads))
                 : gemv_int4_many(x.data_ptr(), n, reinterpret_cast<const uint8_t *const *>(qs.data()), ss.data(),
                                  bf16(scales[0]), yp.data(), outs.data(), bf16(x), x.size(0), x.size(1), group,
                                  static_cast<int>(threads));
  done(code, x.size(0), x.size(1));
  return ys;
}

void check_experts(const Tensor &x, const Tensor &index, int64_t k, int64_t n_experts, const char *name) {
  TORCH_CHECK_VALUE(x.dim() == 2 && (x.size(0) == 1 || x.size(0) == k) && index.dim() == 1 &&
                        index.scalar_type() == at::kLong && index.is_cpu() && n_experts > 0,
                    name, ": x ", x.sizes(), " must have 1 or ", k, " rows, index int64 on the CPU (got ",
                    index.scalar_type(), "), at least one expert");
}

Tensor op_gemv_bf16_experts(const Tensor &x_, const Tensor &weights, const Tensor &index_, int64_t threads) {
  Tensor x = x_.contiguous(), index = index_.contiguous();
  int64_t k = index.dim() == 1 ? index.size(0) : -1;
  TORCH_CHECK_VALUE(weights.dim() == 3 && weights.is_contiguous(),
                    "gemv_bf16_experts: the weights must be stacked (E, out, in) and contiguous, got ",
                    weights.sizes());
  check_experts(x, index, k, weights.size(0), "gemv_bf16_experts");
  check(x, weights, weights.size(2), at::kBFloat16, weights.scalar_type() == at::kBFloat16);
  int64_t out = weights.size(1), in = weights.size(2);
  Tensor y = at::empty({k, out}, x.options());
  done(gemv_bf16_experts(x.data_ptr(), x.size(0), static_cast<const uint16_t *>(weights.data_ptr()), weights.size(0),
                         index.data_ptr<int64_t>(), k, y.data_ptr(), 1, out, in, static_cast<int>(threads)),
       k, in);
  return y;
}

Tensor op_gemv_quantized_experts(const Tensor &x_, const Tensor &qweight, const Tensor &scales, const Tensor &index_,
                                 int64_t group, int64_t threads) {
  Tensor x = x_.contiguous(), index = index_.contiguous();
  int64_t k = index.dim() == 1 ? index.size(0) : -1;
  TORCH_CHECK_VALUE(qweight.dim() >= 1 && scales.dim() >= 1 && qweight.size(0) == scales.size(0),
                    "gemv_quantized_experts: codes (E, out, in) and scales of E experts, got ", qweight.sizes(),
                    ", ", scales.sizes());
  check_experts(x, index, k, qweight.size(0), "gemv_quantized_experts");
  check_floats(x, scales);
  int64_t in = x.size(1);
  check(x, qweight, in, x.scalar_type(),
        fits_quantized(in, qweight.scalar_type(), qweight.sizes().slice(1), scales.sizes().slice(1), group) &&
            qweight.is_contiguous() && scales.is_contiguous() && scales.is_cpu());
  int64_t out = qweight.size(1);
  Tensor y = at::empty({k, out}, x.options());
  done(gemv_quantized_experts(x.data_ptr(), x.size(0), qweight.data_ptr(), scales.data_ptr(), bf16(scales),
                              qweight.size(0), index.data_ptr<int64_t>(), k, y.data_ptr(), bf16(x), out, in,
                              qweight.scalar_type() == at::kByte ? group : 0, static_cast<int>(threads)),
       k, in);
  return y;
}

// cpu_gemv.py: _check_experts (kind 0 bf16, 3 fp32: s1, s3, s2 undefined; 1 int8, 2 int4)
std::tuple<int64_t, int64_t, int64_t> check_experts_swiglu(const Tensor &x, int64_t kind, const Tensor &w1,
                                                           const Tensor &s1, const Tensor &w3, const Tensor &s3,
                                                           const Tensor &w2, const Tensor &s2, int64_t group) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == 1 && w1.dim() == 3, "experts: x must be one row (got ", x.sizes(),
                    ") and the experts stacked (E, out, in) (got ", w1.sizes(), ")");
  const int64_t n_experts = w1.size(0), hidden = w1.size(1), dim = x.size(1);
  const Tensor *ws[3] = {&w1, &w3, &w2}, *ss[3] = {&s1, &s3, &s2};
  const int64_t outs[3] = {hidden, hidden, dim}, ins[3] = {dim, dim, hidden};
  for (int p = 0; p < 3; p++) {
    const Tensor &w = *ws[p];
    TORCH_CHECK_VALUE(w.dim() == 3 && w.size(0) == n_experts && w.scalar_type() == w1.scalar_type(),
                      "experts: w1, w3 and w2 must stack as many experts of one dtype, got ", w1.sizes(), " ",
                      w1.scalar_type(), " and ", w.sizes(), " ", w.scalar_type());
    if (kind == 0 || kind == 3) {  // bf16 experts with bf16 x, fp32 ones with fp32 x
      const at::ScalarType dtype = kind == 0 ? at::kBFloat16 : at::kFloat;
      check(x, w, dim, dtype,
            w.scalar_type() == dtype && w.dim() == 3 && w.size(1) == outs[p] && w.size(2) == ins[p] &&
                w.is_contiguous());
    } else {
      const Tensor &s = *ss[p];
      TORCH_CHECK_VALUE(s.dim() >= 2 && s.size(0) == n_experts && s.scalar_type() == s1.scalar_type(),
                        "experts: scales of ", n_experts, " experts of one dtype, got ", s.sizes());
      check_floats(x, s);
      check(x, w, dim, x.scalar_type(),
            fits_quantized(ins[p], w.scalar_type(), w.sizes().slice(1), s.sizes().slice(1), group) &&
                w.size(1) == outs[p] && w.is_contiguous() && s.is_contiguous() && s.is_cpu());
    }
  }
  return {n_experts, hidden, dim};
}

const void *ptr(const Tensor &t) { return t.defined() ? t.data_ptr() : nullptr; }

int64_t scheme(const Tensor &codes) { return codes.scalar_type() == at::kChar ? 1 : 2; }

int64_t float_kind(const Tensor &weights) { return weights.scalar_type() == at::kFloat ? 3 : 0; }

Tensor swiglu(const Tensor &x_, int64_t kind, const Tensor &w1, const Tensor &s1, const Tensor &w3, const Tensor &s3,
              const Tensor &w2, const Tensor &s2, const Tensor &index_, const Tensor &weights_, int64_t group,
              int64_t threads) {
  Tensor x = x_.contiguous(), index = index_.contiguous(), weights = weights_.contiguous();
  TORCH_CHECK_VALUE(index.dim() == 1 && index.scalar_type() == at::kLong && weights.sizes() == index.sizes() &&
                        weights.scalar_type() == at::kFloat && index.is_cpu() && weights.is_cpu(),
                    "swiglu experts: index (k,) int64 and weights (k,) fp32 on the CPU (got index ", index.sizes(),
                    " ", index.scalar_type(), ", weights ", weights.sizes(), " ", weights.scalar_type(), ")");
  auto [n_experts, hidden, dim] = check_experts_swiglu(x, kind, w1, s1, w3, s3, w2, s2, group);
  Tensor out = at::empty({1, dim}, x.options());
  done(swiglu_experts(x.data_ptr(), bf16(x), static_cast<int>(kind), w1.data_ptr(), ptr(s1), w3.data_ptr(), ptr(s3),
                      w2.data_ptr(), ptr(s2), s1.defined() ? bf16(s1) : 0, group, n_experts,
                      index.data_ptr<int64_t>(), weights.data_ptr<float>(), index.size(0), hidden, dim,
                      out.data_ptr(), static_cast<int>(threads)),
       1, dim);
  return out;
}

std::tuple<Tensor, Tensor> moe(const Tensor &x_, const Tensor &gate_, int64_t top_k, int64_t kind, const Tensor &w1,
                               const Tensor &s1, const Tensor &w3, const Tensor &s3, const Tensor &w2,
                               const Tensor &s2, int64_t group, int64_t threads) {
  Tensor x = x_.contiguous(), gate = gate_.contiguous();
  auto [n_experts, hidden, dim] = check_experts_swiglu(x, kind, w1, s1, w3, s3, w2, s2, group);
  TORCH_CHECK_VALUE(gate.dim() == 2 && gate.size(0) == n_experts && gate.size(1) == dim && is_float(gate) &&
                        gate.is_cpu(),
                    "experts: the router's weight must be (", n_experts, ", ", dim, ") bf16 or fp32 on the CPU, got ",
                    gate.sizes(), " ", gate.scalar_type());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= std::min<int64_t>(n_experts, 64), "experts: top_k must be 1 .. ",
                    std::min<int64_t>(n_experts, 64), ", got ", top_k);
  Tensor out = at::empty({1, dim}, x.options()), logits = at::empty({1, n_experts}, x.options().dtype(at::kFloat));
  done(moe_one_token(x.data_ptr(), bf16(x), gate.data_ptr(), bf16(gate), top_k, static_cast<int>(kind),
                     w1.data_ptr(), ptr(s1), w3.data_ptr(), ptr(s3), w2.data_ptr(), ptr(s2),
                     s1.defined() ? bf16(s1) : 0, group, n_experts, hidden, dim, out.data_ptr(),
                     logits.data_ptr<float>(), static_cast<int>(threads)),
       1, dim);
  return {out, logits};
}

Tensor op_swiglu_float_experts(const Tensor &x, const Tensor &w1, const Tensor &w3, const Tensor &w2,
                              const Tensor &index, const Tensor &weights, int64_t threads) {
  return swiglu(x, float_kind(w1), w1, Tensor(), w3, Tensor(), w2, Tensor(), index, weights, 0, threads);
}

Tensor op_swiglu_quantized_experts(const Tensor &x, const Tensor &q1, const Tensor &s1, const Tensor &q3,
                                   const Tensor &s3, const Tensor &q2, const Tensor &s2, const Tensor &index,
                                   const Tensor &weights, int64_t group, int64_t threads) {
  return swiglu(x, scheme(q1), q1, s1, q3, s3, q2, s2, index, weights, group, threads);
}

std::tuple<Tensor, Tensor> op_moe_float_experts(const Tensor &x, const Tensor &gate_weight, const Tensor &w1,
                                               const Tensor &w3, const Tensor &w2, int64_t top_k, int64_t threads) {
  return moe(x, gate_weight, top_k, float_kind(w1), w1, Tensor(), w3, Tensor(), w2, Tensor(), 0, threads);
}

std::tuple<Tensor, Tensor> op_moe_quantized_experts(const Tensor &x, const Tensor &gate_weight, const Tensor &q1,
                                                    const Tensor &s1, const Tensor &q3, const Tensor &s3,
                                                    const Tensor &q2, const Tensor &s2, int64_t top_k, int64_t group,
                                                    int64_t threads) {
  return moe(x, gate_weight, top_k, scheme(q1), q1, s1, q3, s3, q2, s2, group, threads);
}

// cpu_gemv.py: attend_one (attention_applies and the positions' shapes)
Tensor op_attend_one(const Tensor &q_, const Tensor &k_, const Tensor &v_, const Tensor &q_pos_, const Tensor &k_pos_,
                     int64_t window, int64_t threads) {
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), q_pos = q_pos_.contiguous(),
         k_pos = k_pos_.contiguous();
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(1) == 1 && k.dim() == 4 && k.sizes() == v.sizes() && q.is_cpu() &&
                        k.is_cpu() && v.is_cpu() && is_float(q) && k.scalar_type() == q.scalar_type() &&
                        v.scalar_type() == q.scalar_type() && k.size(2) > 0 && q.size(2) % k.size(2) == 0 &&
                        k.size(3) == q.size(3) && q.size(0) == k.size(0) && q_pos.dim() == 2 &&
                        q_pos.size(0) == q.size(0) && q_pos.size(1) == 1 && k_pos.dim() == 2 &&
                        k_pos.size(0) == k.size(0) && k_pos.size(1) == k.size(1) &&
                        q_pos.scalar_type() == at::kLong && k_pos.scalar_type() == at::kLong && q_pos.is_cpu() &&
                        k_pos.is_cpu() && window >= -1,
                    "attend_one: arguments that do not fit: q ", q.sizes(), " ", q.scalar_type(), ", k / v ",
                    k.sizes(), " ", k.scalar_type(), " / ", v.sizes(), " ", v.scalar_type(), ", q_pos ",
                    q_pos.sizes(), " ", q_pos.scalar_type(), ", k_pos ", k_pos.sizes(), " ", k_pos.scalar_type(),
                    ", window ", window);
  Tensor out = at::empty(q.sizes(), q.options());
  const int64_t batch = k.size(0), slots = k.size(1);
  TORCH_CHECK(attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), k_pos.data_ptr<int64_t>(),
                         q_pos.data_ptr<int64_t>(), window, out.data_ptr(), bf16(q), batch, slots, q.size(2),
                         k.size(2), k.size(3), static_cast<int>(threads)) == 0,
              "attend_one: no memory for the scores of ", batch, " x ", q.size(2), " heads x ", slots, " slots");
  return out;
}

// ---- one token's transformer block in one call (backends/decode_step.py) -------------------------------------

// The products y_p = x @ w_p.T of one row x (in values of x's dtype) by weights w[first .. first + n) with their
// scales s (empty for bf16 / fp32 weights), as backends/linear.py calls the kernels eagerly: one weight through
// gemv_float / gemv_int8 / gemv_int4, several through the *_many forms (x converted once).
void products(const void *x, int io_bf16, int64_t rows, int64_t in, at::TensorList w, at::TensorList s, size_t first,
              size_t n, int64_t group, void *const *y, int threads) {
  std::vector<const void *> ws, ss;
  std::vector<int64_t> outs;
  for (size_t p = first; p < first + n; p++) {
    ws.push_back(w[p].data_ptr());
    ss.push_back(s.empty() ? nullptr : s[p].data_ptr());
    outs.push_back(w[p].size(0));
  }
  int code;
  if (s.empty()) {
    const int w_f32 = w[first].scalar_type() == at::kFloat;
    code = n == 1 ? gemv_float(x, ws[0], w_f32, y[0], io_bf16, rows, outs[0], in, threads)
                  : gemv_float_many(x, n, ws.data(), w_f32, y, outs.data(), io_bf16, rows, in, threads);
  } else if (w[first].scalar_type() == at::kChar) {
    const int sb = bf16(s[first]);
    code = n == 1 ? gemv_int8(x, static_cast<const int8_t *>(ws[0]), ss[0], sb, y[0], io_bf16, rows, outs[0], in,
                              threads)
                  : gemv_int8_many(x, n, reinterpret_cast<const int8_t *const *>(ws.data()), ss.data(), sb, y,
                                   outs.data(), io_bf16, rows, in, threads);
  } else {
    const int sb = bf16(s[first]);
    code = n == 1 ? gemv_int4(x, static_cast<const uint8_t *>(ws[0]), ss[0], sb, y[0], io_bf16, rows, outs[0], in,
                              group, threads)
                  : gemv_int4_many(x, n, reinterpret_cast<const uint8_t *const *>(ws.data()), ss.data(), sb, y,
                                   outs.data(), io_bf16, rows, in, group, threads);
  }
  done(code, rows, in);
}

// w[p] (`what`: its name; (out, in)) with its scales s[p] (none: a float weight of x's dtype) fits a product
void check_weight(int64_t layer, const char *what, at::TensorList w, at::TensorList s, size_t p, int64_t out,
                  int64_t in, at::ScalarType dtype, int64_t group) {
  const Tensor &q = w[p];
  bool fits = q.is_cpu() && q.is_contiguous() && q.dim() == 2 && q.size(0) == out;
  if (s.empty())
    fits = fits && q.scalar_type() == dtype && q.size(1) == in;
  else
    fits = fits && s[p].scalar_type() == dtype && s[p].is_contiguous() && s[p].is_cpu() &&
           s[p].scalar_type() == s[0].scalar_type() && q.scalar_type() == w[0].scalar_type() &&
           fits_quantized(in, q.scalar_type(), q.sizes(), s[p].sizes(), group);
  TORCH_CHECK_VALUE(fits, "decode_model: ", layer < 0 ? "" : "layer ", layer < 0 ? "" : std::to_string(layer),
                    layer < 0 ? "" : ": ", what, " ", q.sizes(), " ", q.scalar_type(), s.empty() ? "" : " (quantized)",
                    " does not fit (", out, ", ", in, ") ", dtype);
}

// ---- a decode step of the whole model in one call (backends/decode_step.py) ----------------------------------

// decode_model's layout: these ints for each layer (see op_decode_model), then 3 for the output
enum Lay : int64_t {
  N_ATTN,         // attention weights: 4 (grouped-query: wq, wk, wv, wo; latent: q_proj, kv_a, kv_b, wo) or 5
                  // (latent with a low-rank query: q_a, kv_a, kv_b, wo, q_b)
  ATTN_SCALES,    // their scales: 0 (float weights) or as many (quantized)
  N_FFN,          // feed-forward tensors: w1, w3, w2 (dense, or experts stacked), or every expert's w1, w3, w2
  FFN_SCALES,     // their scales: 0 or as many
  ROUTER,         // a router's weight: 0 or 1
  TOP_K,          // experts a token visits
  GROUP,          // the int4 group size (0: none)
  WINDOW,         // the sliding window, -1 for none
  LATENT,         // 0: grouped-query attention, 1: latent attention in fp32, 2: latent attention with its
                  // products rounded to bf16 (attend_latent_one: a bf16 model on a CPU with bf16 instructions)
  LATENT_HEADS,   // latent attention's heads
  NOPE,           // ... and qk_nope_head_dim
  QUERY_SCALING,  // the query scaling's original_max_position_embeddings (0: none)
  ROUTER_KIND,    // 0: Mixtral's (softmax of the top k), 1 / 2: fine-grained (fine_moe.route_fine), softmax / sigmoid
  N_GROUP,        // fine-grained: groups of experts
  TOPK_GROUP,     // ... the groups kept
  NORM_TOPK,      // ... 1: the k weights divided by their sum
  SHARED,         // a shared expert's w1, w3, w2: 0 or 1
  SHARED_SCALES,  // ... and their scales: 0 or 1
  ROUTER_BIAS,    // fine-grained: the score-correction bias (0 or 1)
  LAYOUT
};
// and these floats for each layer, then the final norm's eps
enum Scalar : int64_t { EPS, Q_A_EPS, KV_A_EPS, LATENT_SCALE, QUERY_BETA, ROUTED_SCALE, SCALARS };

// One layer of decode_model's arguments, and the sizes check_layer finds its tensors to have
struct Layer {
  int64_t index = 0;
  const int64_t *lay = nullptr;
  const double *scalars = nullptr;
  const Tensor *attn_norm = nullptr, *ffn_norm = nullptr, *gate = nullptr, *bias = nullptr;
  at::TensorList attn, attn_scales, latent_norms, ffn, ffn_scales, shared, shared_scales;
  Tensor cache_k, cache_v, cache_pos;
  // the cache's slots; grouped-query attention: heads, kv heads, head_dim; latent: heads, qk_nope (n), qk_rope (r),
  // v_head_dim (v), kv_lora_rank (c), q_lora_rank (0: none); the feed-forward's width, experts, shared width
  int64_t slots = 0, heads = 0, kv_heads = 0, head_dim = 0, nope = 0, rope = 0, value = 0, rank = 0, q_rank = 0;
  int64_t hidden = 0, n_experts = 0, shared_hidden = 0;
  bool stacked = false;
  int64_t at(Lay i) const { return lay[i]; }
  float scalar(Scalar i) const { return static_cast<float>(scalars[i]); }
};

// a norm's weight: (n) of the model's dtype
void check_norm(const Layer &L, const Tensor &t, const char *what, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.scalar_type() == dtype && t.is_contiguous() && t.is_cpu(),
                    "decode_model: layer ", L.index, ": ", what, " must be (", n, ") ", dtype, ", got ", t.sizes(),
                    " ", t.scalar_type());
}

// Check every tensor of layer L against the sizes the others give (h: (rows, 1, dim); positions up to `last`; rot:
// the table of rotations), and keep those sizes in L: nothing is read by a shape not checked here.
void check_layer(Layer &L, const Tensor &h, int64_t last, const Tensor &rot) {
  const int64_t layer = L.index, group = L.at(GROUP), rows = h.size(0), dim = h.size(-1);
  const at::ScalarType dtype = h.scalar_type();
  const bool latent = L.at(LATENT) != 0;
  const Tensor &ck = L.cache_k, &cv = L.cache_v, &cp = L.cache_pos;
  TORCH_CHECK_VALUE(ck.dim() == 4 && cv.dim() == 4 && ck.size(0) == rows && cv.size(0) == rows &&
                        ck.size(1) == cv.size(1) &&
                        (latent ? ck.size(2) == 1 && cv.size(2) == 1 : ck.sizes() == cv.sizes()) &&
                        ck.scalar_type() == dtype && cv.scalar_type() == dtype && ck.is_contiguous() &&
                        cv.is_contiguous() && ck.is_cpu() && cv.is_cpu() && cp.dim() == 2 && cp.size(0) == rows &&
                        cp.size(1) == ck.size(1) && cp.scalar_type() == at::kLong && cp.is_contiguous() &&
                        cp.is_cpu() && ck.size(1) > 0 && L.at(WINDOW) >= -1 && (!latent || L.at(WINDOW) == -1),
                    "decode_model: layer ", layer, ": the cache must be ",
                    latent ? "latents (rows, slots, 1, kv_lora_rank) and rotary keys (rows, slots, 1, qk_rope_head_dim)"
                           : "k, v (rows, slots, kv_heads, head_dim)",
                    " of h's dtype and pos (rows, slots) int64 (", rows, " rows), got ", ck.sizes(), " ",
                    ck.scalar_type(), ", ", cv.sizes(), ", ", cp.sizes(), " (window ", L.at(WINDOW), ")");
  L.slots = ck.size(1);
  check_norm(L, *L.attn_norm, "attention_norm", dim, dtype);
  check_norm(L, *L.ffn_norm, "ffn_norm", dim, dtype);
  TORCH_CHECK_VALUE(L.at(QUERY_SCALING) >= 0, "decode_model: layer ", layer, ": a query scaling over ",
                    L.at(QUERY_SCALING), " positions");
  int64_t rotated;  // the width of the rotated part of a head
  if (!latent) {
    const int64_t kv_heads = ck.size(2), head_dim = ck.size(3);
    TORCH_CHECK_VALUE(L.attn.size() == 4 && head_dim % 2 == 0 && L.attn[0].dim() == 2 &&
                          L.attn[0].size(0) % head_dim == 0 && L.attn[0].size(0) > 0 &&
                          L.attn[0].size(0) / head_dim % kv_heads == 0,
                      "decode_model: layer ", layer, ": attn must be wq, wk, wv, wo (and their scales, if quantized) "
                      "of query heads a multiple of ", kv_heads, " kv heads of ", head_dim, ", got wq ",
                      L.attn[0].sizes());
    L.heads = L.attn[0].size(0) / head_dim, L.kv_heads = kv_heads, L.head_dim = rotated = head_dim;
    const int64_t q_dim = L.heads * head_dim, kv_dim = kv_heads * head_dim;
    const int64_t outs[4] = {q_dim, kv_dim, kv_dim, dim}, ins[4] = {dim, dim, dim, q_dim};
    const char *names[4] = {"wq", "wk", "wv", "wo"};
    for (size_t p = 0; p < 4; p++)
      check_weight(layer, names[p], L.attn, L.attn_scales, p, outs[p], ins[p], dtype, group);
  } else {
    const int64_t H = L.at(LATENT_HEADS), n = L.at(NOPE), c = ck.size(3), r = cv.size(3);
    const Tensor &kv_b = L.attn[2];
    TORCH_CHECK_VALUE(H > 0 && H <= (int64_t{1} << 20) && n >= 0 && n <= (int64_t{1} << 20) && r > 0 &&
                          r % 2 == 0 && c > 0 && kv_b.dim() == 2 && kv_b.size(0) % H == 0 && kv_b.size(0) / H > n,
                      "decode_model: layer ", layer, ": latent attention of ", H, " heads with qk_nope ", n,
                      " and a cache of latents ", c, " and rotary keys ", r, " (even) needs kv_b_proj (heads x "
                      "(qk_nope + v_head_dim), ", c, "); got ", kv_b.sizes(), " ", kv_b.scalar_type());
    L.heads = H, L.nope = n, L.rope = rotated = r, L.rank = c, L.value = kv_b.size(0) / H - n;
    L.q_rank = L.attn.size() == 5 && L.attn[0].dim() == 2 ? L.attn[0].size(0) : 0;
    TORCH_CHECK_VALUE(L.attn.size() == 4 || L.q_rank > 0, "decode_model: layer ", layer,
                      ": q_a_proj must be (q_lora_rank, ", dim, "), got ", L.attn[0].sizes());
    const int64_t q_dim = H * (n + r);
    if (L.q_rank) {
      const int64_t outs[5] = {L.q_rank, c + r, H * (n + L.value), dim, q_dim};
      const int64_t ins[5] = {dim, dim, c, H * L.value, L.q_rank};
      const char *names[5] = {"q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj", "wo", "q_b_proj"};
      for (size_t p = 0; p < 5; p++)
        check_weight(layer, names[p], L.attn, L.attn_scales, p, outs[p], ins[p], dtype, group);
      check_norm(L, L.latent_norms[0], "q_a_layernorm", L.q_rank, dtype);
    } else {
      const int64_t outs[4] = {q_dim, c + r, H * (n + L.value), dim}, ins[4] = {dim, dim, c, H * L.value};
      const char *names[4] = {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "wo"};
      for (size_t p = 0; p < 4; p++)
        check_weight(layer, names[p], L.attn, L.attn_scales, p, outs[p], ins[p], dtype, group);
    }
    check_norm(L, L.latent_norms[L.latent_norms.size() - 1], "kv_a_layernorm", c, dtype);
  }
  TORCH_CHECK_VALUE(rot.scalar_type() == at::kFloat && rot.dim() == 3 && rot.size(1) * 2 == rotated &&
                        rot.size(2) == 2 && last < rot.size(0),
                    "decode_model: layer ", layer, ": rotations ", rot.sizes(), " ", rot.scalar_type(),
                    " do not fit positions to ", last, " of ", rotated, " rotated values (fp32 (cos, sin) pairs)");

  // the feed-forward: a dense SwiGLU, Mixtral's experts, or fine-grained ones with a shared expert
  const bool moe = L.gate != nullptr, quantized_ffn = !L.ffn_scales.empty();
  const int64_t kind = L.at(ROUTER_KIND), top_k = L.at(TOP_K);
  L.n_experts = moe && L.gate->dim() == 2 ? L.gate->size(0) : 0;
  TORCH_CHECK_VALUE((moe || (kind == 0 && !L.bias && L.shared.empty())) && kind >= 0 && kind <= 2 &&
                        (kind != 0 || !L.bias) && (!moe || rows == 1),
                    "decode_model: layer ", layer, ": a router of kind ", kind, " (0 Mixtral's, 1 or 2 fine-grained),"
                    " a score-correction bias and a shared expert need a router's weight; experts take one row (got ",
                    rows, ")");
  if (moe) {
    const Tensor &gate = *L.gate;
    TORCH_CHECK_VALUE(gate.dim() == 2 && gate.size(1) == dim && is_float(gate) && gate.is_contiguous() &&
                          gate.is_cpu() && top_k >= 1 && top_k <= std::min<int64_t>(L.n_experts, 64),
                      "decode_model: layer ", layer, ": the router must be (E, ", dim, ") bf16 or fp32, top_k 1 .. "
                      "min(E, 64); got ", gate.sizes(), ", ", top_k);
    if (kind)
      TORCH_CHECK_VALUE(L.at(N_GROUP) >= 1 && L.n_experts % L.at(N_GROUP) == 0 && L.at(TOPK_GROUP) >= 1 &&
                            L.at(TOPK_GROUP) <= L.at(N_GROUP),
                        "decode_model: layer ", layer, ": ", L.n_experts, " experts in ", L.at(N_GROUP),
                        " groups, ", L.at(TOPK_GROUP), " of them kept");
    if (L.bias)
      TORCH_CHECK_VALUE(L.bias->dim() == 1 && L.bias->size(0) == L.n_experts && is_float(*L.bias) &&
                            L.bias->is_contiguous() && L.bias->is_cpu(),
                        "decode_model: layer ", layer, ": the score-correction bias must be (", L.n_experts,
                        ") bf16 or fp32, got ", L.bias->sizes(), " ", L.bias->scalar_type());
  }
  const at::TensorList &ffn = L.ffn, &ffn_scales = L.ffn_scales;
  L.stacked = moe && ffn.size() == 3 && ffn[0].dim() == 3;
  TORCH_CHECK_VALUE((ffn.size() == 3 || (moe && !L.stacked && ffn.size() == static_cast<size_t>(3 * L.n_experts))) &&
                        (!quantized_ffn || ffn_scales.size() == ffn.size()),
                    "decode_model: layer ", layer, ": ffn must be w1, w3, w2 (stacked, for experts) or every "
                    "expert's w1, w3 and w2 (and their scales, if quantized), got ", ffn.size(), " tensors for ",
                    L.n_experts, " experts");
  L.hidden = ffn[0].dim() == 3 ? ffn[0].size(1) : ffn[0].size(0);
  if (L.stacked) {
    const int64_t experts_kind = quantized_ffn ? scheme(ffn[0]) : float_kind(ffn[0]);
    auto [experts, hid, d] = check_experts_swiglu(h.select(0, 0), experts_kind, ffn[0],
                                                  quantized_ffn ? ffn_scales[0] : Tensor(), ffn[1],
                                                  quantized_ffn ? ffn_scales[1] : Tensor(), ffn[2],
                                                  quantized_ffn ? ffn_scales[2] : Tensor(), group);
    TORCH_CHECK_VALUE(experts == L.n_experts, "decode_model: layer ", layer, ": ", experts,
                      " stacked experts for a router of ", L.n_experts);
    L.hidden = hid;
  } else {
    const int64_t e = moe ? L.n_experts : 1, outs[3] = {L.hidden, L.hidden, dim}, ins[3] = {dim, dim, L.hidden};
    const char *names[3] = {"w1", "w3", "w2"};
    for (size_t p = 0; p < ffn.size(); p++)
      check_weight(layer, names[p / e], ffn, ffn_scales, p, outs[p / e], ins[p / e], dtype, group);
  }
  if (!L.shared.empty()) {
    L.shared_hidden = L.shared[0].dim() == 2 ? L.shared[0].size(0) : 0;
    const int64_t outs[3] = {L.shared_hidden, L.shared_hidden, dim}, ins[3] = {dim, dim, L.shared_hidden};
    const char *names[3] = {"the shared expert's w1", "the shared expert's w3", "the shared expert's w2"};
    for (size_t p = 0; p < 3; p++)
      check_weight(layer, names[p], L.shared, L.shared_scales, p, outs[p], ins[p], dtype, group);
  }
}

// the query scaling (attention.llama4_query_scale) of a query at position p, in x's dtype: 1 + beta ln(1 +
// floor(p / original)) in fp32 (p = -1, padding, as 0)
float query_scale(const Layer &L, int64_t p, int io) {
  const float stretch = static_cast<float>(std::max<int64_t>(p, 0) / L.at(QUERY_SCALING));
  const float s = 1.0f + L.scalar(QUERY_BETA) * std::log(1.0f + stretch);
  return io ? static_cast<float>(c10::BFloat16(s)) : s;
}

// x[0 .. n) *= s, each product rounded to x's dtype (q * s in the model's dtype)
void scale_values(char *x, int io, int64_t n, float s) {
  if (s == 1.0f) return;
  for (int64_t i = 0; i < n; i++) {
    if (io) {
      auto *v = reinterpret_cast<c10::BFloat16 *>(x) + i;
      *v = c10::BFloat16(static_cast<float>(*v) * s);
    } else {
      reinterpret_cast<float *>(x)[i] *= s;
    }
  }
}

// grouped-query attention of block_step: a (rows, heads x head_dim) from x (rows, dim) (attention.Attention)
void gqa_attention(const Layer &L, const char *x, char *a, int io, int64_t rows, int64_t dim, const int64_t *pos,
                   const Tensor &rot, int threads) {
  const int64_t size = io ? 2 : 4, head_dim = L.head_dim, q_dim = L.heads * head_dim, kv_dim = L.kv_heads * head_dim;
  Tensor scratch = at::empty({rows * (q_dim + 2 * kv_dim) * size}, L.cache_pos.options().dtype(at::kByte));
  char *q = static_cast<char *>(scratch.data_ptr()), *k = q + rows * q_dim * size, *v = k + rows * kv_dim * size;
  void *qkv[3] = {q, k, v};
  products(x, io, rows, dim, L.attn, L.attn_scales, 0, 3, L.at(GROUP), qkv, threads);
  for (int64_t r = 0; r < rows; r++) {
    const float *rotation = rot.data_ptr<float>() + std::max<int64_t>(pos[r], 0) * head_dim;  // (cos, sin) pairs
    char *qr = q + r * q_dim * size, *kr = k + r * kv_dim * size, *vr = v + r * kv_dim * size;
    rope_heads(qr, io, L.heads, head_dim, rotation);
    rope_heads(kr, io, L.kv_heads, head_dim, rotation);
    if (L.at(QUERY_SCALING)) scale_values(qr, io, q_dim, query_scale(L, pos[r], io));
    if (pos[r] >= 0) {  // backends/pytorch.py: update_cache (a row at -1 is padding: nothing written)
      const int64_t slot = r * L.slots + pos[r] % L.slots;
      std::copy(kr, kr + kv_dim * size, static_cast<char *>(L.cache_k.data_ptr()) + slot * kv_dim * size);
      std::copy(vr, vr + kv_dim * size, static_cast<char *>(L.cache_v.data_ptr()) + slot * kv_dim * size);
      L.cache_pos.data_ptr<int64_t>()[slot] = pos[r];
    }
  }
  TORCH_CHECK(attend_one(q, L.cache_k.data_ptr(), L.cache_v.data_ptr(), L.cache_pos.data_ptr<int64_t>(), pos,
                         L.at(WINDOW), a, io, rows, L.slots, L.heads, L.kv_heads, head_dim, threads) == 0,
              "decode_model: no memory for the attention's scores");
}

// latent attention of block_step: a (rows, heads x v) from x (rows, dim) (mla.LatentAttention, attending in
// latent space as backends/mla.py does for a decode step)
void latent_attention(const Layer &L, const char *x, char *a, int io, int64_t rows, int64_t dim, const int64_t *pos,
                      const Tensor &rot, int threads) {
  const int64_t size = io ? 2 : 4, H = L.heads, n = L.nope, r = L.rope, c = L.rank, qr = L.q_rank;
  const int64_t q_dim = H * (n + r);
  Tensor scratch = at::empty({rows * (2 * qr + (c + r) + q_dim + c) * size}, L.cache_pos.options().dtype(at::kByte));
  char *qa = static_cast<char *>(scratch.data_ptr()), *qn = qa + rows * qr * size, *kv = qn + rows * qr * size;
  char *q = kv + rows * (c + r) * size, *lat = q + rows * q_dim * size;
  if (qr) {  // q = q_b(q_a_layernorm(q_a(x)))
    void *y[2] = {qa, kv};
    products(x, io, rows, dim, L.attn, L.attn_scales, 0, 2, L.at(GROUP), y, threads);
    rms_norm_rows(qa, L.latent_norms[0].data_ptr(), qn, io, rows, qr, L.scalar(Q_A_EPS));
    void *yq[1] = {q};
    products(qn, io, rows, qr, L.attn, L.attn_scales, 4, 1, L.at(GROUP), yq, threads);
  } else {  // q = q_proj(x)
    void *y[2] = {q, kv};
    products(x, io, rows, dim, L.attn, L.attn_scales, 0, 2, L.at(GROUP), y, threads);
  }
  const Tensor &kv_norm = L.latent_norms[L.latent_norms.size() - 1];
  const Tensor &kv_b = L.attn[2];
  for (int64_t row = 0; row < rows; row++) {
    const float *rotation = rot.data_ptr<float>() + std::max<int64_t>(pos[row], 0) * r;
    char *q_row = q + row * q_dim * size, *kv_row = kv + row * (c + r) * size, *lat_row = lat + row * c * size;
    char *k_rope = kv_row + c * size;  // kv = latent | k_rope
    rms_norm_rows(kv_row, kv_norm.data_ptr(), lat_row, io, 1, c, L.scalar(KV_A_EPS));
    for (int64_t h = 0; h < H; h++) rope_heads(q_row + (h * (n + r) + n) * size, io, 1, r, rotation);
    rope_heads(k_rope, io, 1, r, rotation);
    if (L.at(QUERY_SCALING)) scale_values(q_row, io, q_dim, query_scale(L, pos[row], io));
    char *latents = static_cast<char *>(L.cache_k.data_ptr()) + row * L.slots * c * size;
    char *k_ropes = static_cast<char *>(L.cache_v.data_ptr()) + row * L.slots * r * size;
    int64_t *k_pos = L.cache_pos.data_ptr<int64_t>() + row * L.slots;
    if (pos[row] >= 0) {  // the latent cache: the normed latent and the rotated key part
      const int64_t slot = pos[row] % L.slots;
      std::copy(lat_row, lat_row + c * size, latents + slot * c * size);
      std::copy(k_rope, k_rope + r * size, k_ropes + slot * r * size);
      k_pos[slot] = pos[row];
    }
    const int kv_b_kind = L.attn_scales.empty() ? 0 : static_cast<int>(scheme(kv_b));
    TORCH_CHECK(attend_latent_one(q_row, latents, k_ropes, k_pos, pos[row], kv_b.data_ptr(), kv_b_kind,
                                  kv_b_kind ? L.attn_scales[2].data_ptr() : nullptr, L.at(GROUP),
                                  a + row * H * L.value * size, io, L.at(LATENT) == 2, L.slots, H, n, r, L.value, c,
                                  L.scalar(LATENT_SCALE), threads) == 0,
                "decode_model: no memory for the latent attention's scores");
  }
}

// a dense SwiGLU (moe.FeedForward: w1, w3, w2 with their scales, if quantized): out (rows, dim) =
// w2(silu(x w1.T) * x w3.T) of x (rows, dim)
void swiglu_dense(const char *x, char *out, int io, int64_t rows, int64_t dim, int64_t hidden, at::TensorList w,
                  at::TensorList s, int64_t group, int threads) {
  const int64_t size = io ? 2 : 4;
  Tensor scratch = at::empty({rows * 2 * hidden * size}, w[0].options().dtype(at::kByte));
  char *g = static_cast<char *>(scratch.data_ptr()), *up = g + rows * hidden * size;
  void *gate_up[2] = {g, up};
  products(x, io, rows, dim, w, s, 0, 2, group, gate_up, threads);
  silu_mul(g, up, g, io, rows * hidden, threads);
  void *down[1] = {out};
  products(g, io, rows, hidden, w, s, 2, 1, group, down, threads);
}

// the feed-forward of block_step: ff (rows, dim) from x (rows, dim)
void feed_forward(const Layer &L, const char *x, char *ff, int io, int64_t rows, int64_t dim, int threads) {
  const int64_t group = L.at(GROUP), top_k = L.at(TOP_K), kind = L.at(ROUTER_KIND), size = io ? 2 : 4;
  const bool quantized = !L.ffn_scales.empty();
  const int experts_kind = static_cast<int>(quantized ? scheme(L.ffn[0]) : float_kind(L.ffn[0]));
  const int scales_bf16 = quantized ? bf16(L.ffn_scales[0]) : 0;
  auto scale_of = [&](int64_t p) { return quantized ? L.ffn_scales[p].data_ptr() : nullptr; };
  if (!L.gate) {  // a dense SwiGLU
    swiglu_dense(x, ff, io, rows, dim, L.hidden, L.ffn, L.ffn_scales, group, threads);
    return;
  }
  const Tensor &gate = *L.gate;
  std::vector<float> logits(L.n_experts);  // (the layers' step returns them, for the auxiliary loss)
  int64_t index[64];
  float weights[64];
  if (kind == 0 && L.stacked) {  // Mixtral's router and experts in one call
    done(moe_one_token(x, io, gate.data_ptr(), bf16(gate), top_k, experts_kind, L.ffn[0].data_ptr(), scale_of(0),
                       L.ffn[1].data_ptr(), scale_of(1), L.ffn[2].data_ptr(), scale_of(2), scales_bf16, group,
                       L.n_experts, L.hidden, dim, ff, logits.data(), threads),
         1, dim);
  } else {
    if (kind == 0) {  // moe.route
      route_one_token(x, io, gate.data_ptr(), bf16(gate), L.n_experts, dim, top_k, logits.data(), index, weights);
    } else {  // fine_moe.route_fine
      const int code = route_fine_one(x, io, gate.data_ptr(), bf16(gate), L.bias ? L.bias->data_ptr() : nullptr,
                                      L.bias ? bf16(*L.bias) : 0, L.n_experts, dim, static_cast<int>(kind - 1),
                                      L.at(N_GROUP), L.at(TOPK_GROUP), top_k, L.at(NORM_TOPK) != 0,
                                      L.scalar(ROUTED_SCALE), logits.data(), index, weights);
      TORCH_CHECK(code == 0, "decode_model: no memory for the router's scores");
    }
    for (int64_t k = 0; k < top_k; k++)
      TORCH_CHECK_INDEX(index[k] >= 0 && index[k] < L.n_experts, "decode_model: the router chose no expert");
    if (L.stacked) {
      done(swiglu_experts(x, io, experts_kind, L.ffn[0].data_ptr(), scale_of(0), L.ffn[1].data_ptr(), scale_of(1),
                          L.ffn[2].data_ptr(), scale_of(2), scales_bf16, group, L.n_experts, index, weights, top_k,
                          L.hidden, dim, ff, threads),
           1, dim);
    } else {  // the chosen experts' own tensors
      std::vector<const void *> chosen(6 * top_k, nullptr);  // w1, s1, w3, s3, w2, s2: top_k each
      for (int64_t k = 0; k < top_k; k++)
        for (int64_t p = 0; p < 3; p++) {
          chosen[(2 * p) * top_k + k] = L.ffn[p * L.n_experts + index[k]].data_ptr();
          if (quantized) chosen[(2 * p + 1) * top_k + k] = L.ffn_scales[p * L.n_experts + index[k]].data_ptr();
        }
      const void *const *ch = chosen.data();
      done(swiglu_chosen(x, io, experts_kind, ch, ch + top_k, ch + 2 * top_k, ch + 3 * top_k, ch + 4 * top_k,
                         ch + 5 * top_k, scales_bf16, group, weights, top_k, L.hidden, dim, ff, threads),
           1, dim);
    }
  }
  if (!L.shared.empty()) {  // + the shared expert (a dense SwiGLU every token visits)
    Tensor y = at::empty({dim * size}, gate.options().dtype(at::kByte));
    char *shared = static_cast<char *>(y.data_ptr());
    swiglu_dense(x, shared, io, 1, dim, L.shared_hidden, L.shared, L.shared_scales, group, threads);
    add_rows(ff, shared, ff, io, dim);
  }
}

// One transformer block (layer L, checked by check_layer) of a decode step for one token per row (B rows, h (B,
// 1, dim)) at the positions pos[0 .. B), into out (h's shape), with the steps and roundings of the "torch"
// backend's eager step (model.TransformerBlock with backends/pytorch.py's functions, in h's dtype), row by row:
//   x = rms_norm(h, attention_norm); a = attention(x), grouped-query or latent (writing the position's slot of the
//   row's cache; a row at -1 is padding: nothing written); h1 = h + a wo.T; x = rms_norm(h1, ffn_norm);
//   out = h1 + feed_forward(x): w2(silu(x w1.T) * x w3.T) (dense), or the chosen experts' weighted SwiGLUs (the
//   router's choice as C loops: Mixtral's or the fine-grained one) plus the shared expert.
// Weights: bf16 / fp32 of h's dtype (scales empty), or int8 / int4 codes with their scales of h's dtype (int4
// with the group size).  Experts: one row only.
void block_step(const Layer &L, const Tensor &h, Tensor &out, const int64_t *pos, const Tensor &rot, int threads) {
  const int io = h.scalar_type() == at::kBFloat16 ? 1 : 0;
  const int64_t rows = h.size(0), dim = h.size(-1), size = io ? 2 : 4;
  const int64_t a_dim = L.at(LATENT) ? L.heads * L.value : L.heads * L.head_dim;
  // scratch of h's dtype: x (dim), the attention's output (a_dim), its projection, h1, the feed-forward's (dim)
  Tensor scratch = at::empty({rows * (4 * dim + a_dim) * size}, h.options().dtype(at::kByte));
  char *x = static_cast<char *>(scratch.data_ptr()), *a = x + rows * dim * size, *o = a + rows * a_dim * size;
  char *h1 = o + rows * dim * size, *ff = h1 + rows * dim * size;
  const float eps = L.scalar(EPS);
  rms_norm_rows(h.data_ptr(), L.attn_norm->data_ptr(), x, io, rows, dim, eps);
  if (L.at(LATENT))
    latent_attention(L, x, a, io, rows, dim, pos, rot, threads);
  else
    gqa_attention(L, x, a, io, rows, dim, pos, rot, threads);
  void *wo_out[1] = {o};
  products(a, io, rows, a_dim, L.attn, L.attn_scales, 3, 1, L.at(GROUP), wo_out, threads);
  add_rows(h.data_ptr(), o, h1, io, rows * dim);
  rms_norm_rows(h1, L.ffn_norm->data_ptr(), x, io, rows, dim, eps);
  feed_forward(L, x, ff, io, rows, dim, threads);
  add_rows(h1, ff, out.data_ptr(), io, rows * dim);
}

// A whole decode step of a model for one token per row (backends/decode_step.py: decode_step), tokens (B, 1) int64
// at positions (B, 1): h = the embedding's rows; every block as block_step; then, if `fold`, the final norm and the
// output product as the "torch" backend's layers compute them (the norm: the C loop for bf16 rows, else F.rms_norm's
// formula; the product: the C kernels, as backends/linear.py sends it there) and the logits (B, 1, vocab) fp32;
// else h (B, 1, dim) before the final norm.
// weights, for each layer: attention_norm, ffn_norm; the attention's weights (N_ATTN of them, see Lay) and their
// scales (if quantized); latent attention's norms (q_a_layernorm with a low-rank query, kv_a_layernorm); the
// feed-forward's tensors (w1, w3, w2; or every expert's w1, then w3, then w2) and their scales (if quantized); the
// shared expert's w1, w3, w2 and their scales; the router and its score-correction bias.  Then the embedding, the
// final norm's weight and, if the output product is here, the output weight (and scales).
// layout: LAYOUT ints a layer (Lay), then 3 for the output (weight: 0 or 1; scales: 0 or 1; group).
// scalars: SCALARS floats a layer (Scalar), then the final norm's eps.  caches: k, v, pos of each layer (written;
// latent attention: the latents and rotary keys of cache.LatentLayerCache).  Every layer is checked before any
// cache is written.
Tensor op_decode_model(const Tensor &tokens_, const Tensor &position_, const Tensor &rot_, at::TensorList weights,
                       at::IntArrayRef layout, at::ArrayRef<double> scalars, at::TensorList caches, bool fold,
                       int64_t threads_) {
  Tensor tokens = tokens_.contiguous(), position = position_.contiguous(), rot = rot_.contiguous();
  const int threads = static_cast<int>(threads_);
  const int64_t rows = tokens.dim() == 2 && tokens.size(1) == 1 ? tokens.size(0) : 0;
  const int64_t n_layers = static_cast<int64_t>(caches.size()) / 3;
  TORCH_CHECK_VALUE(rows > 0 && tokens.scalar_type() == at::kLong && tokens.is_cpu() &&
                        caches.size() == static_cast<size_t>(3 * n_layers) &&
                        layout.size() == static_cast<size_t>(LAYOUT * n_layers + 3) &&
                        scalars.size() == static_cast<size_t>(SCALARS * n_layers + 1),
                    "decode_model: tokens must be (B, 1) int64 on the CPU (got ", tokens.sizes(), " ",
                    tokens.scalar_type(), "), with k, v, pos of every layer, ", static_cast<int64_t>(LAYOUT),
                    " ints of layout a layer and 3 for the output, ", static_cast<int64_t>(SCALARS), " scalars a "
                    "layer and the final norm's eps; got ", caches.size(), " cache tensors, ", layout.size(),
                    " ints, ", scalars.size(), " scalars");
  TORCH_CHECK_VALUE(position.dim() == 2 && position.size(0) == rows && position.size(1) == 1 &&
                        position.scalar_type() == at::kLong && position.is_cpu(),
                    "decode_model: position must be (", rows, ", 1) int64 on the CPU, got ", position.sizes());
  const int64_t *pos = position.data_ptr<int64_t>();
  int64_t last = 0;  // the largest position (rope_angles turns -1 as 0)
  for (int64_t r = 0; r < rows; r++) last = std::max(last, pos[r]);
  size_t taken = 0;  // weights handed out so far
  auto take = [&](int64_t n) {
    TORCH_CHECK_VALUE(n >= 0 && taken + static_cast<size_t>(n) <= weights.size(), "decode_model: ", weights.size(),
                      " weights for this layout");
    at::TensorList part = weights.slice(taken, static_cast<size_t>(n));
    taken += static_cast<size_t>(n);
    return part;
  };
  std::vector<Layer> layers(n_layers);
  for (int64_t l = 0; l < n_layers; l++) {
    Layer &L = layers[l];
    L.index = l, L.lay = layout.data() + LAYOUT * l, L.scalars = scalars.data() + SCALARS * l;
    const int64_t *lay = L.lay;
    const bool latent = lay[LATENT] != 0;
    TORCH_CHECK_VALUE(lay[LATENT] >= 0 && lay[LATENT] <= 2 && (lay[N_ATTN] == 4 || (latent && lay[N_ATTN] == 5)) &&
                          (lay[ATTN_SCALES] == 0 || lay[ATTN_SCALES] == lay[N_ATTN]) && lay[N_FFN] > 0 &&
                          (lay[FFN_SCALES] == 0 || lay[FFN_SCALES] == lay[N_FFN]) &&
                          (lay[ROUTER] == 0 || lay[ROUTER] == 1) && (lay[SHARED] == 0 || lay[SHARED] == 1) &&
                          (lay[SHARED_SCALES] == 0 || lay[SHARED_SCALES] == lay[SHARED]) &&
                          (lay[ROUTER_BIAS] == 0 || lay[ROUTER_BIAS] == lay[ROUTER]),
                      "decode_model: layer ", l, ": a layout of ", lay[N_ATTN], " attention weights (4, or 5 for "
                      "latent attention with a low-rank query; latent ", lay[LATENT], "), ", lay[ATTN_SCALES],
                      " attention scales (none or as many), ", lay[N_FFN], " feed-forward tensors, ", lay[FFN_SCALES],
                      " of their scales (none or as many), ", lay[ROUTER], " routers (0 or 1) with ", lay[ROUTER_BIAS],
                      " biases, ", lay[SHARED], " shared experts (0 or 1) with ", lay[SHARED_SCALES], " scales");
    at::TensorList w = take(2);
    L.attn_norm = &w[0], L.ffn_norm = &w[1];
    L.attn = take(lay[N_ATTN]), L.attn_scales = take(lay[ATTN_SCALES]);
    L.latent_norms = take(latent ? lay[N_ATTN] - 3 : 0);
    L.ffn = take(lay[N_FFN]), L.ffn_scales = take(lay[FFN_SCALES]);
    L.shared = take(3 * lay[SHARED]), L.shared_scales = take(3 * lay[SHARED_SCALES]);
    at::TensorList router = take(lay[ROUTER] + lay[ROUTER_BIAS]);
    L.gate = lay[ROUTER] ? &router[0] : nullptr, L.bias = lay[ROUTER_BIAS] ? &router[1] : nullptr;
    L.cache_k = caches[3 * l], L.cache_v = caches[3 * l + 1], L.cache_pos = caches[3 * l + 2];
  }
  const int64_t *tail = layout.data() + LAYOUT * n_layers;
  TORCH_CHECK_VALUE((tail[0] == 0 || tail[0] == 1) && (tail[1] == 0 || tail[1] == tail[0]),
                    "decode_model: an output layout of ", tail[0], " weights (0 or 1) and ", tail[1],
                    " scales (none or as many)");
  at::TensorList end = take(2 + tail[0] + tail[1]);
  TORCH_CHECK_VALUE(taken == weights.size(), "decode_model: ", weights.size(), " weights for a layout of ", taken);
  const Tensor &embedding = end[0], &norm = end[1];
  TORCH_CHECK_VALUE(embedding.dim() == 2 && is_float(embedding) && embedding.is_cpu(),
                    "decode_model: the embedding must be (vocab, dim) bf16 or fp32 on the CPU, got ",
                    embedding.sizes(), " ", embedding.scalar_type());
  Tensor h = at::embedding(embedding, tokens), other = at::empty_like(h);  // (B, 1, dim)
  const at::ScalarType dtype = h.scalar_type();
  const int64_t dim = h.size(-1);
  for (Layer &L : layers) check_layer(L, h, last, rot);
  for (const Layer &L : layers) {
    block_step(L, h, other, pos, rot, threads);
    std::swap(h, other);
  }
  if (!fold) return h;
  TORCH_CHECK_VALUE(tail[0] == 1 && norm.dim() == 1 && norm.size(0) == dim && norm.scalar_type() == dtype &&
                        norm.is_contiguous(),
                    "decode_model: the final norm must be (", dim, ") ", dtype, ", with an output weight; got ",
                    norm.sizes(), " ", norm.scalar_type());
  const double norm_eps = scalars[SCALARS * n_layers];
  const int io = dtype == at::kBFloat16 ? 1 : 0;
  Tensor normed;  // backends/pytorch.py: rms_norm
  if (io) {  // bf16 rows: the C loop (rms_norm_prompt, for more rows, has the same bits)
    normed = at::empty_like(h);
    rms_norm_rows(h.data_ptr(), norm.data_ptr(), normed.data_ptr(), io, rows, dim, static_cast<float>(norm_eps));
  } else {
    normed = at::mul(norm, at::rms_norm(h.to(at::kFloat), {dim}, std::nullopt, norm_eps).to(dtype));
  }
  at::TensorList out_w = end.slice(2, 1), out_s = end.slice(3, tail[1]);
  const int64_t vocab = out_w[0].dim() == 2 ? out_w[0].size(0) : 0;
  check_weight(-1, "the output weight", out_w, out_s, 0, vocab, dim, dtype, tail[2]);
  Tensor logits = at::empty({rows, 1, vocab}, h.options());
  void *y[1] = {logits.data_ptr()};
  products(normed.data_ptr(), io, rows, dim, out_w, out_s, 0, 1, tail[2], y, threads);
  return logits.to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(mistral_ref, CPU, m) {
  m.impl("gemv_float", TORCH_FN(op_gemv_float));
  m.impl("gemv_quantized", TORCH_FN(op_gemv_quantized));
  m.impl("gemv_float_many", TORCH_FN(op_gemv_float_many));
  m.impl("gemv_quantized_many", TORCH_FN(op_gemv_quantized_many));
  m.impl("gemv_bf16_experts", TORCH_FN(op_gemv_bf16_experts));
  m.impl("gemv_quantized_experts", TORCH_FN(op_gemv_quantized_experts));
  m.impl("swiglu_float_experts", TORCH_FN(op_swiglu_float_experts));
  m.impl("swiglu_quantized_experts", TORCH_FN(op_swiglu_quantized_experts));
  m.impl("moe_float_experts", TORCH_FN(op_moe_float_experts));
  m.impl("moe_quantized_experts", TORCH_FN(op_moe_quantized_experts));
  m.impl("attend_one", TORCH_FN(op_attend_one));
  m.impl("decode_model", TORCH_FN(op_decode_model));
}
