// Autograd of the INT8 W8A8 ops, for every device (TORCH_LIBRARY_IMPL(torchslim, Autograd)).
//
// Written in C++ rather than with torch.library.register_autograd because the Autograd kernel runs
// on every call made with grad mode on, which is every call of a model not wrapped in no_grad:
// a Python one cost ~14 us per call here (measured: int8_linear_packed 384x1536 at M = 1 went from
// 14 to 28 us), a third of a small layer's decode time. This one checks whether any input needs a
// gradient and otherwise goes straight to the kernel.
//
// Gradients (straight through the activation quantization, as the issue defines them):
//   int8_linear(x, w_q, w_scale, bias):   dx = (dy * w_scale) @ w_q in x's dtype (float32 for float16
//     x), dbias = sum_m dy;
//     w_q is int8 (never differentiable); a w_scale that requires grad is an error at backward.
//   int8_linear_packed: the same with w_q unpacked for the backward only (nothing kept between calls).
//   quantize_per_token(x) -> (q, scale):   d scale / dx of absmax / 127, shared by tied maxima, 0 on
//     rows whose scale is a constant (0 or NaN); q is integer.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace torchslim {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<LinearSig>& linear_op(bool packed) {
  static const auto plain = c10::Dispatcher::singleton().findSchemaOrThrow("torchslim::int8_linear", "").typed<LinearSig>();
  static const auto pk = c10::Dispatcher::singleton().findSchemaOrThrow("torchslim::int8_linear_packed", "").typed<LinearSig>();
  return packed ? pk : plain;
}

const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>& quantize_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchslim::quantize_per_token", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op;
}

at::Tensor unpack(const at::Tensor& w_packed, const c10::SymInt& N, const c10::SymInt& K) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchslim::int8_unpack_weight", "")
                             .typed<at::Tensor(const at::Tensor&, c10::SymInt, c10::SymInt)>();
  return op.call(w_packed, N, K);
}

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

template <bool kPacked>
struct Int8LinearFunction : torch::autograd::Function<Int8LinearFunction<kPacked>> {
  static constexpr const char* kName = kPacked ? "int8_linear_packed" : "int8_linear";

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({weight, w_scale});
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["K"] = x.sym_size(1);
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return linear_op(kPacked).call(x, weight, w_scale, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->needs_input_grad(2), kName,
                ": w_scale requires grad, but int8 weights and their scales are frozen: this op has no gradient "
                "for them (call w_scale.requires_grad_(False))");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor& w_scale = saved[1];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const auto dtype = ctx->saved_data["x_dtype"].toScalarType();
      // The dequantized weight exists only inside this call, in the compute dtype (exact for int8
      // values): x's dtype, but float32 for float16, whose range dy * w_scale underflows.
      const auto compute = dtype == at::kHalf ? at::kFloat : dtype;
      const at::Tensor w_q = kPacked ? unpack(weight, w_scale.sym_size(0), ctx->saved_data["K"].toSymInt()) : weight;
      grad_x = at::mm((grad.to(at::kFloat) * w_scale).to(compute), w_q.to(compute)).to(dtype);
    }
    // needs_input_grad counts the tensors given: bias is the fourth only when there is one.
    if (ctx->saved_data.count("bias_dtype") && ctx->needs_input_grad(3)) grad_bias = grad.to(at::kFloat).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    return {grad_x, at::Tensor(), at::Tensor(), grad_bias};
  }
};

template <bool kPacked>
at::Tensor int8_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& w_scale,
                                const std::optional<at::Tensor>& bias) {
  const bool needed = at::GradMode::is_enabled() &&
                      (requires_grad(x) || requires_grad(w_scale) || (bias.has_value() && requires_grad(*bias)));
  if (!needed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_op(kPacked).call(x, weight, w_scale, bias);
  }
  return Int8LinearFunction<kPacked>::apply(x, weight, w_scale, bias);
}

struct QuantizePerTokenFunction : torch::autograd::Function<QuantizePerTokenFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [q, scale] = quantize_op().call(x);
    ctx->mark_non_differentiable({q});
    ctx->save_for_backward({x, scale});
    return {q, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& scale = saved[1];
    if (x.sym_size(1) == 0) return {at::zeros_like(x)};  // no elements, scale 0: nothing depends on x
    const at::Tensor xf = x.to(at::kFloat);
    const at::Tensor a = xf.abs();
    const at::Tensor ties = a.eq(a.amax(1, /*keepdim=*/true)).to(at::kFloat);
    const at::Tensor share = ties / ties.sum(1, /*keepdim=*/true).clamp_min(1);
    const at::Tensor live = scale.gt(0).unsqueeze(1);  // zero and NaN scales are constants of x
    const at::Tensor g = grads[1].unsqueeze(1) / 127 * xf.sign() * share;
    return {at::where(live, g, at::zeros_like(g)).to(x.scalar_type())};
  }
};

std::tuple<at::Tensor, at::Tensor> quantize_per_token_autograd(const at::Tensor& x) {
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return quantize_op().call(x);
  }
  auto out = QuantizePerTokenFunction::apply(x);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchslim, Autograd, m) {
  m.impl("quantize_per_token", &quantize_per_token_autograd);
  m.impl("int8_linear", &int8_linear_autograd<false>);
  m.impl("int8_linear_packed", &int8_linear_autograd<true>);
}

}  // namespace torchslim
