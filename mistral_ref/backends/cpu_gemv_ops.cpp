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
#include <torch/library.h>

#include <algorithm>
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

// One transformer block (layer `layer`) of a decode step for one token per row (B rows, h (B, 1, dim)) at the
// positions pos[0 .. B), into out (h's shape), with the steps and roundings of the "torch" backend's eager step
// (model.TransformerBlock with backends/pytorch.py's functions, in h's dtype), row by row:
//   x = rms_norm(h, attn_norm); q, k, v = x wq.T, x wk.T, x wv.T; rotate q and k by rot[position] (rot: (N,
//   head_dim / 2, 2) fp32, cos and sin of every pair for positions 0 .. N-1; position -1 as 0); write k, v and the
//   position into slot position % slots of the row's cache (a row at -1 is padding: nothing written); a =
//   attention of q to the cache
//   (window: -1 for none); h1 = h + a wo.T; x = rms_norm(h1, ffn_norm); h2 = h1 + w2(silu(x w1.T) * x w3.T) (a
//   dense block: ffn = w1, w3, w2) or h1 + Mixtral's experts (gate: the router; ffn = the stacked w1, w3, w2, or
//   every expert's own w1, then w3, then w2: moe.route's choice as C loops, then the chosen experts' products).
// attn = wq, wk, wv, wo and ffn: bf16 / fp32 weights of h's dtype (scales empty), or int8 / int4 codes with their
// scales (group_size for int4).  Mixtral's experts: one row only.
void block_step(int64_t layer, const Tensor &h, Tensor &out, const int64_t *pos, int64_t last, const Tensor &rot,
                const Tensor &attn_norm, const Tensor &ffn_norm, double eps, at::TensorList attn,
                at::TensorList attn_scales, at::TensorList ffn, at::TensorList ffn_scales, const Tensor *gate_,
                int64_t top_k, int64_t group, const Tensor &cache_k, const Tensor &cache_v, const Tensor &cache_pos,
                int64_t window, int threads) {
  const at::ScalarType dtype = h.scalar_type();
  const int io = dtype == at::kBFloat16 ? 1 : 0;
  const int64_t rows = h.size(0), dim = h.size(-1);
  TORCH_CHECK_VALUE(cache_k.dim() == 4 && cache_k.size(0) == rows && cache_k.sizes() == cache_v.sizes() &&
                        cache_k.scalar_type() == dtype && cache_v.scalar_type() == dtype && cache_k.is_contiguous() &&
                        cache_v.is_contiguous() && cache_k.is_cpu() && cache_v.is_cpu() && cache_pos.dim() == 2 &&
                        cache_pos.size(0) == rows && cache_pos.size(1) == cache_k.size(1) &&
                        cache_pos.scalar_type() == at::kLong && cache_pos.is_contiguous() && cache_pos.is_cpu() &&
                        cache_k.size(1) > 0 && window >= -1,
                    "decode_model: layer ", layer, ": the cache must be k, v (", rows, ", slots, kv_heads, head_dim) "
                    "of h's dtype and pos (", rows, ", slots) int64, got ", cache_k.sizes(), " ",
                    cache_k.scalar_type(), ", ", cache_pos.sizes());
  const int64_t slots = cache_k.size(1), kv_heads = cache_k.size(2), head_dim = cache_k.size(3);
  TORCH_CHECK_VALUE(attn.size() == 4 && (attn_scales.empty() || attn_scales.size() == 4) && head_dim % 2 == 0 &&
                        attn[0].dim() == 2 && attn[0].size(0) % head_dim == 0 && attn[0].size(0) > 0,
                    "decode_model: layer ", layer, ": attn must be wq, wk, wv, wo (and their scales, if quantized)");
  const int64_t heads = attn[0].size(0) / head_dim, q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
  TORCH_CHECK_VALUE(heads % kv_heads == 0 && rot.scalar_type() == at::kFloat && rot.dim() == 3 &&
                        rot.size(1) * 2 == head_dim && rot.size(2) == 2 && last < rot.size(0) &&
                        attn_norm.numel() == dim && ffn_norm.numel() == dim && attn_norm.scalar_type() == dtype &&
                        ffn_norm.scalar_type() == dtype && attn_norm.is_contiguous() && ffn_norm.is_contiguous(),
                    "decode_model: layer ", layer, ": ", heads, " query heads for ", kv_heads, " kv heads, rotations ",
                    rot.sizes(), " (positions to ", last, ", head_dim ", head_dim, " fp32), norms of ", dim, " ", dtype,
                    " values");
  const int64_t outs[4] = {q_dim, kv_dim, kv_dim, dim}, ins[4] = {dim, dim, dim, q_dim};
  const char *attn_names[4] = {"wq", "wk", "wv", "wo"};
  for (size_t p = 0; p < 4; p++)
    check_weight(layer, attn_names[p], attn, attn_scales, p, outs[p], ins[p], dtype, group);
  const bool moe = gate_ != nullptr, quantized_ffn = !ffn_scales.empty();
  Tensor gate = moe ? gate_->contiguous() : Tensor();
  const int64_t n_experts = moe ? gate.size(0) : 0;
  // Mixtral's experts stacked (w1, w3, w2: (E, out, in) each), or each expert's own tensors (w1 of experts 0 ..
  // E-1, then w3, then w2); a dense block's w1, w3, w2
  const bool stacked = moe && ffn.size() == 3 && ffn[0].dim() == 3;
  TORCH_CHECK_VALUE((ffn.size() == 3 || (moe && !stacked && ffn.size() == static_cast<size_t>(3 * n_experts))) &&
                        (!quantized_ffn || ffn_scales.size() == ffn.size()) && !ffn.empty(),
                    "decode_model: layer ", layer, ": ffn must be w1, w3, w2 (stacked, for experts) or every "
                    "expert's w1, w3 and w2 (and their scales, if quantized), got ", ffn.size(), " tensors for ",
                    n_experts, " experts");
  int64_t hidden = ffn[0].dim() == 3 ? ffn[0].size(1) : ffn[0].size(0);
  TORCH_CHECK_VALUE(!moe || rows == 1, "decode_model: Mixtral's experts take one row, got ", rows);
  if (moe)
    TORCH_CHECK_VALUE(gate.dim() == 2 && gate.size(1) == dim && is_float(gate) && gate.is_cpu() && top_k >= 1 &&
                          top_k <= std::min<int64_t>(n_experts, 64),
                      "decode_model: layer ", layer, ": the router must be (E, ", dim, ") bf16 or fp32, top_k 1 .. "
                      "min(E, 64); got ", gate.sizes(), ", ", top_k);
  if (stacked) {
    const int64_t kind = quantized_ffn ? scheme(ffn[0]) : float_kind(ffn[0]);
    auto [experts, hid, d] = check_experts_swiglu(h.view({1, dim}), kind, ffn[0], quantized_ffn ? ffn_scales[0] :
                                                  Tensor(), ffn[1], quantized_ffn ? ffn_scales[1] : Tensor(), ffn[2],
                                                  quantized_ffn ? ffn_scales[2] : Tensor(), group);
    TORCH_CHECK_VALUE(experts == n_experts, "decode_model: layer ", layer, ": ", experts,
                      " stacked experts for a router of ", n_experts);
    hidden = hid;
  } else {
    const int64_t e = moe ? n_experts : 1, f_outs[3] = {hidden, hidden, dim}, f_ins[3] = {dim, dim, hidden};
    const char *ffn_names[3] = {"w1", "w3", "w2"};
    for (size_t p = 0; p < ffn.size(); p++)
      check_weight(layer, ffn_names[p / e], ffn, ffn_scales, p, f_outs[p / e], f_ins[p / e], dtype, group);
  }

  // scratch of h's dtype: x (dim), q, k, v, the attention's output, its projection, h1 (dim), gate, up (hidden)
  const int64_t size = io ? 2 : 4;
  Tensor scratch = at::empty({rows * (4 * dim + 2 * q_dim + 2 * kv_dim + 2 * hidden) * size},
                             h.options().dtype(at::kByte));
  char *p = static_cast<char *>(scratch.data_ptr());
  const int64_t b = rows * size;  // bytes of one value in every row
  char *x = p, *q = x + dim * b, *k = q + q_dim * b, *v = k + kv_dim * b, *a = v + kv_dim * b;
  char *o = a + q_dim * b, *h1 = o + dim * b, *ff = h1 + dim * b, *up = ff + dim * b;
  char *g = up + hidden * b;
  std::vector<float> logits(n_experts);  // the router's (the layers' step returns them for the auxiliary loss)

  rms_norm_rows(h.data_ptr(), attn_norm.data_ptr(), x, io, rows, dim, static_cast<float>(eps));
  void *qkv[3] = {q, k, v};
  products(x, io, rows, dim, attn, attn_scales, 0, 3, group, qkv, threads);
  for (int64_t r = 0; r < rows; r++) {
    const float *rotation = rot.data_ptr<float>() + std::max<int64_t>(pos[r], 0) * head_dim;  // (cos, sin) pairs
    char *qr = q + r * q_dim * size, *kr = k + r * kv_dim * size, *vr = v + r * kv_dim * size;
    rope_heads(qr, io, heads, head_dim, rotation);
    rope_heads(kr, io, kv_heads, head_dim, rotation);
    if (pos[r] >= 0) {  // backends/pytorch.py: update_cache (a row at -1 is padding: nothing written)
      const int64_t slot = r * slots + pos[r] % slots;
      std::copy(kr, kr + kv_dim * size, static_cast<char *>(cache_k.data_ptr()) + slot * kv_dim * size);
      std::copy(vr, vr + kv_dim * size, static_cast<char *>(cache_v.data_ptr()) + slot * kv_dim * size);
      cache_pos.data_ptr<int64_t>()[slot] = pos[r];
    }
  }
  TORCH_CHECK(attend_one(q, cache_k.data_ptr(), cache_v.data_ptr(), cache_pos.data_ptr<int64_t>(), pos, window, a, io,
                         rows, slots, heads, kv_heads, head_dim, threads) == 0,
              "decode_model: no memory for the attention's scores");
  void *wo_out[1] = {o};
  products(a, io, rows, q_dim, attn, attn_scales, 3, 1, group, wo_out, threads);
  add_rows(h.data_ptr(), o, h1, io, rows * dim);
  rms_norm_rows(h1, ffn_norm.data_ptr(), x, io, rows, dim, static_cast<float>(eps));
  if (moe && !stacked) {  // moe.route (the C loops of moe_one_token), then the chosen experts' own tensors
    int64_t index[64];
    float weights[64];
    route_one_token(x, io, gate.data_ptr(), bf16(gate), n_experts, dim, top_k, logits.data(), index, weights);
    std::vector<const void *> chosen(6 * top_k, nullptr);  // w1, s1, w3, s3, w2, s2: top_k each
    for (int64_t k = 0; k < top_k; k++)
      for (int64_t p = 0; p < 3; p++) {
        TORCH_CHECK_INDEX(index[k] >= 0 && index[k] < n_experts, "decode_model: the router chose no expert");
        chosen[(2 * p) * top_k + k] = ffn[p * n_experts + index[k]].data_ptr();
        if (quantized_ffn) chosen[(2 * p + 1) * top_k + k] = ffn_scales[p * n_experts + index[k]].data_ptr();
      }
    const void *const *c = chosen.data();
    done(swiglu_chosen(x, io, quantized_ffn ? scheme(ffn[0]) : float_kind(ffn[0]), c, c + top_k, c + 2 * top_k,
                       c + 3 * top_k, c + 4 * top_k, c + 5 * top_k, quantized_ffn ? bf16(ffn_scales[0]) : 0, group,
                       weights, top_k, hidden, dim, ff, threads),
         1, dim);
  } else if (moe) {
    const bool quantized = quantized_ffn;
    done(moe_one_token(x, io, gate.data_ptr(), bf16(gate), top_k, quantized ? scheme(ffn[0]) : float_kind(ffn[0]),
                       ffn[0].data_ptr(), quantized ? ffn_scales[0].data_ptr() : nullptr, ffn[1].data_ptr(),
                       quantized ? ffn_scales[1].data_ptr() : nullptr, ffn[2].data_ptr(),
                       quantized ? ffn_scales[2].data_ptr() : nullptr, quantized ? bf16(ffn_scales[0]) : 0, group,
                       n_experts, hidden, dim, ff, logits.data(), threads),
         1, dim);
  } else {
    void *gate_up[2] = {g, up};
    products(x, io, rows, dim, ffn, ffn_scales, 0, 2, group, gate_up, threads);
    silu_mul(g, up, g, io, rows * hidden, threads);
    void *down[1] = {ff};
    products(g, io, rows, hidden, ffn, ffn_scales, 2, 1, group, down, threads);
  }
  add_rows(h1, ff, out.data_ptr(), io, rows * dim);
}

constexpr int64_t LAYOUT = 7;  // ints of a layer in decode_model's layout (see there)

// A whole decode step of a model for one token per row (backends/decode_step.py: decode_step), tokens (B, 1) int64
// at positions (B, 1): h = the embedding's rows; every block as block_step; then, if `fold`, the final norm and the
// output product as the "torch" backend's layers compute them (the norm: the C loop for bf16 rows, else F.rms_norm's
// formula; the product: the C kernels, as backends/linear.py sends it there) and the logits (B, 1, vocab) fp32;
// else h (B, 1, dim) before the final norm.
// weights, for each layer: attention_norm, ffn_norm, wq, wk, wv, wo, their scales (if quantized), the feed-forward's
// tensors (w1, w3, w2; or every expert's w1, then w3, then w2), their scales (if quantized), the router (Mixtral);
// then the embedding, the final norm's weight and, if the output product is here, the output weight (and scales).
// layout: 7 ints a layer (attention scales: 0 or 4; feed-forward tensors; their scales; a router: 0 or 1; top_k;
// the int4 group size; the window, -1 for none), then 3 for the output (weight: 0 or 1; scales: 0 or 1; group).
// eps: each layer's norms' eps, then the final norm's.  caches: k, v, pos of each layer (written).
Tensor op_decode_model(const Tensor &tokens_, const Tensor &position_, const Tensor &rot_, at::TensorList weights,
                       at::IntArrayRef layout, at::ArrayRef<double> eps, at::TensorList caches, bool fold,
                       int64_t threads_) {
  Tensor tokens = tokens_.contiguous(), position = position_.contiguous(), rot = rot_.contiguous();
  const int threads = static_cast<int>(threads_);
  const int64_t rows = tokens.dim() == 2 && tokens.size(1) == 1 ? tokens.size(0) : 0;
  const int64_t n_layers = static_cast<int64_t>(caches.size()) / 3;
  TORCH_CHECK_VALUE(rows > 0 && tokens.scalar_type() == at::kLong && tokens.is_cpu() &&
                        caches.size() == static_cast<size_t>(3 * n_layers) &&
                        layout.size() == static_cast<size_t>(LAYOUT * n_layers + 3) &&
                        eps.size() == static_cast<size_t>(n_layers + 1),
                    "decode_model: tokens must be (B, 1) int64 on the CPU (got ", tokens.sizes(), " ",
                    tokens.scalar_type(), "), with k, v, pos of every layer, ", LAYOUT, " ints of layout a layer and "
                    "3 for the output, an eps a layer and one for the final norm; got ", caches.size(), " cache "
                    "tensors, ", layout.size(), " ints, ", eps.size(), " eps");
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
  // each layer's weights, in the order above: the whole layout is checked before any cache is written
  std::vector<at::TensorList> blocks;
  for (int64_t l = 0; l < n_layers; l++) {
    const int64_t *lay = layout.data() + LAYOUT * l;
    TORCH_CHECK_VALUE((lay[0] == 0 || lay[0] == 4) && lay[1] > 0 && (lay[2] == 0 || lay[2] == lay[1]) &&
                          (lay[3] == 0 || lay[3] == 1),
                      "decode_model: layer ", l, ": a layout of ", lay[0], " attention scales (0 or 4), ", lay[1],
                      " feed-forward tensors, ", lay[2], " of their scales (none or as many), ", lay[3],
                      " routers (0 or 1)");
    blocks.push_back(take(6 + lay[0] + lay[1] + lay[2] + lay[3]));
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
  for (int64_t l = 0; l < n_layers; l++) {
    const int64_t *lay = layout.data() + LAYOUT * l;
    at::TensorList w = blocks[l];
    const int64_t n_ffn = lay[1];
    at::TensorList attn = w.slice(2, 4), attn_scales = w.slice(6, lay[0]);
    at::TensorList ffn = w.slice(6 + lay[0], n_ffn), ffn_scales = w.slice(6 + lay[0] + n_ffn, lay[2]);
    const Tensor *gate = lay[3] ? &w[6 + lay[0] + n_ffn + lay[2]] : nullptr;
    block_step(l, h, other, pos, last, rot, w[0], w[1], eps[l], attn, attn_scales, ffn, ffn_scales, gate, lay[4],
               lay[5], caches[3 * l], caches[3 * l + 1], caches[3 * l + 2], lay[6], threads);
    std::swap(h, other);
  }
  if (!fold) return h;
  TORCH_CHECK_VALUE(tail[0] == 1 && norm.dim() == 1 && norm.size(0) == dim && norm.scalar_type() == dtype &&
                        norm.is_contiguous(),
                    "decode_model: the final norm must be (", dim, ") ", dtype, ", with an output weight; got ",
                    norm.sizes(), " ", norm.scalar_type());
  const double norm_eps = eps[n_layers];
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
