// Autograd of torchslim::csr_linear, for every device (TORCH_LIBRARY_IMPL(torchslim, Autograd)), in
// C++ for the reason given in int8_linear_autograd.cpp (a Python autograd kernel costs ~14 us on
// every call made with grad mode on).
//
// The CSR weight is a frozen buffer: crow, col and values get no gradient (values that require grad
// are an error at backward, never a silent None). dx = dy @ W in x's dtype, W the dense weight rebuilt
// from the CSR with ATen ops (any device, symbolic shapes; index_put checks the indices) for the
// backward only: nothing dense is kept between calls. dbias = sum_m dy.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace torchslim {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<Sig>& csr_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("torchslim::csr_linear", "").typed<Sig>();
  return op;
}

// The dense (N, K) weight: entry j sits in the row whose pointer range holds j (formats/csr.py).
at::Tensor dense_weight(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values, const c10::SymInt& K) {
  const at::Tensor rows = at::searchsorted(crow.to(at::kLong), at::arange(values.sym_size(0), crow.options().dtype(at::kLong)),
                                           /*out_int32=*/false, /*right=*/true) - 1;
  return at::zeros_symint({crow.sym_size(0) - 1, K}, values.options())
      .index_put_({rows, col.to(at::kLong)}, values, /*accumulate=*/true);
}

struct CsrLinearFunction : torch::autograd::Function<CsrLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& values, const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({crow, col, values});
    ctx->saved_data["K"] = x.sym_size(1);
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return csr_op().call(x, crow, col, values, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->needs_input_grad(3), "csr_linear: values requires grad, but the CSR weight is a frozen buffer: "
                "this op has no gradient for it (call values.requires_grad_(False))");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0))  // as dense nn.Linear's backward, with W rebuilt for this call only
      grad_x = at::mm(grad, dense_weight(saved[0], saved[1], saved[2], ctx->saved_data["K"].toSymInt()));
    // needs_input_grad counts the tensors given: bias is the fifth only when there is one.
    if (ctx->saved_data.count("bias_dtype") && ctx->needs_input_grad(4))
      grad_bias = grad.to(at::kFloat).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), grad_bias};
  }
};

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

at::Tensor csr_linear_autograd(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                               const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  const bool needed = at::GradMode::is_enabled() &&
                      (requires_grad(x) || requires_grad(values) || (bias.has_value() && requires_grad(*bias)));
  if (!needed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return csr_op().call(x, crow, col, values, bias);
  }
  return CsrLinearFunction::apply(x, crow, col, values, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchslim, Autograd, m) {
  m.impl("csr_linear", &csr_linear_autograd);
}

}  // namespace torchslim
