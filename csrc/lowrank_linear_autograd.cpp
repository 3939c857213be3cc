// Autograd of torchslim::lowrank_linear, for every device (TORCH_LIBRARY_IMPL(torchslim, Autograd)), in
// C++ for the reason given in int8_linear_autograd.cpp (a Python autograd kernel costs ~14 us on
// every call made with grad mode on).
//
// out = t U^T + b with t = x V^T, so with g = dout: dx = (g U) V, dV = (g U)^T x, dU = g^T t,
// dbias = sum_m g; every product in x's dtype with ATen ops (any device, symbolic shapes). Unlike the
// sparse and int8 weights, the factors are ordinary dense tensors: they get gradients too, so they can
// be fine-tuned after the decomposition (LowRankLinear keeps them as frozen buffers; a user who wants
// to train them makes them parameters). t is recomputed in the backward, not kept.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace torchslim {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<Sig>& lowrank_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("torchslim::lowrank_linear", "").typed<Sig>();
  return op;
}

struct LowRankLinearFunction : torch::autograd::Function<LowRankLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& V, const at::Tensor& U,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, V, U});
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return lowrank_op().call(x, V, U, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &V = saved[1], &U = saved[2];
    const at::Tensor g = grads[0].to(x.scalar_type());
    at::Tensor grad_x, grad_v, grad_u, grad_bias;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      const at::Tensor gu = at::mm(g, U);  // (M, r)
      if (ctx->needs_input_grad(0)) grad_x = at::mm(gu, V);
      if (ctx->needs_input_grad(1)) grad_v = at::mm(gu.t(), x);
    }
    if (ctx->needs_input_grad(2)) grad_u = at::mm(g.t(), at::mm(x, V.t()));
    // needs_input_grad counts the tensors given: bias is the fourth only when there is one.
    if (ctx->saved_data.count("bias_dtype") && ctx->needs_input_grad(3))
      grad_bias = grads[0].to(at::kFloat).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    return {grad_x, grad_v, grad_u, grad_bias};
  }
};

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

at::Tensor lowrank_linear_autograd(const at::Tensor& x, const at::Tensor& V, const at::Tensor& U,
                                   const std::optional<at::Tensor>& bias) {
  const bool needed = at::GradMode::is_enabled() && (requires_grad(x) || requires_grad(V) || requires_grad(U) ||
                                                     (bias.has_value() && requires_grad(*bias)));
  if (!needed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return lowrank_op().call(x, V, U, bias);
  }
  return LowRankLinearFunction::apply(x, V, U, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchslim, Autograd, m) {
  m.impl("lowrank_linear", &lowrank_linear_autograd);
}

}  // namespace torchslim
