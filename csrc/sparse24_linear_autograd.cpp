// Autograd of torchslim::sparse24_linear, for every device (TORCH_LIBRARY_IMPL(torchslim, Autograd)),
// in C++ for the reason given in int8_linear_autograd.cpp (a Python autograd kernel costs ~14 us on
// every call made with grad mode on).
//
// The compressed weight is a frozen buffer: values and meta get no gradient (values that require
// grad are an error at backward, never a silent None). dx = dy @ W in x's dtype, W the dense pruned
// weight rebuilt from (values, meta) with ATen ops (any device, symbolic shapes) for the backward
// only: nothing dense is kept between calls. dbias = sum_m dy.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace torchslim {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<Sig>& sparse24_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("torchslim::sparse24_linear", "").typed<Sig>();
  return op;
}

// Dense rows (nb, K_pad) of a compressed block: value j of a meta word sits at column
// 4 * (j / 2) + (2-bit field j of the word) of its 16-column span (formats/sparse24.py).
at::Tensor dense_rows(const at::Tensor& values, const at::Tensor& meta) {
  const c10::SymInt nb = values.sym_size(0), half = values.sym_size(1);
  const auto i32 = meta.options().dtype(at::kInt);
  const at::Tensor words = meta.to(at::kInt).bitwise_and(0xFFFF).unsqueeze(-1);
  const at::Tensor fields = words.bitwise_right_shift(at::arange(0, 16, 2, i32)).bitwise_and(3).reshape_symint({nb, half});
  const at::Tensor base = at::arange(c10::Scalar(half), i32).div(2, "floor").mul(4);
  return at::zeros_symint({nb, 2 * half}, values.options()).scatter_(1, (fields + base).to(at::kLong), values);
}

struct Sparse24LinearFunction : torch::autograd::Function<Sparse24LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({values, meta});
    ctx->saved_data["K"] = x.sym_size(1);
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return sparse24_op().call(x, values, meta, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->needs_input_grad(1), "sparse24_linear: values requires grad, but the 2:4 weight is a frozen "
                "buffer: this op has no gradient for it (call values.requires_grad_(False))");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& values = saved[0];
    const at::Tensor& meta = saved[1];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      // As dense nn.Linear's backward (one GEMM in x's dtype), with W rebuilt for this call only.
      const at::Tensor w = dense_rows(values, meta).narrow_symint(1, 0, ctx->saved_data["K"].toSymInt());
      grad_x = at::mm(grad, w);
    }
    // needs_input_grad counts the tensors given: bias is the fourth only when there is one.
    if (ctx->saved_data.count("bias_dtype") && ctx->needs_input_grad(3))
      grad_bias = grad.to(at::kFloat).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    return {grad_x, at::Tensor(), at::Tensor(), grad_bias};
  }
};

bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

at::Tensor sparse24_linear_autograd(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                    const std::optional<at::Tensor>& bias) {
  const bool needed = at::GradMode::is_enabled() &&
                      (requires_grad(x) || requires_grad(values) || (bias.has_value() && requires_grad(*bias)));
  if (!needed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return sparse24_op().call(x, values, meta, bias);
  }
  return Sparse24LinearFunction::apply(x, values, meta, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchslim, Autograd, m) {
  m.impl("sparse24_linear", &sparse24_linear_autograd);
}

}  // namespace torchslim
