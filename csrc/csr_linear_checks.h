// The argument checks of torchslim::csr_linear, shared by its CPU and CUDA implementations: the C++
// twin of ops.check_csr_linear_args, in the same words and order. (The values of crow and col are
// checked by the CPU op as it reads them; the CUDA kernels bound every read instead.)
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

namespace torchslim {

inline void check_csr_linear_args(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                                  const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  const char* op = "csr_linear";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const std::pair<const char*, const at::Tensor*> csr[] = {{"crow", &crow}, {"col", &col}, {"values", &values}};
  for (const auto& [name, t] : csr) {
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on ", x.device(), " like x, got ", t->device());
    TORCH_CHECK(t->dim() == 1, op, ": ", name, " must be 1-D, got shape ", t->sizes());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(crow.scalar_type() == at::kInt, op, ": crow must be int32, got ", crow.scalar_type());
  TORCH_CHECK(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt, op,
              ": col must be int16 or int32, got ", col.scalar_type());
  TORCH_CHECK(values.scalar_type() == dt, op, ": values must have x's dtype ", dt, ", got ", values.scalar_type());
  TORCH_CHECK(crow.size(0) >= 1, op, ": crow must have N + 1 >= 1 entries, got 0");
  TORCH_CHECK(col.size(0) == values.size(0), op, ": col and values must have one entry per stored value, got ",
              col.size(0), " and ", values.size(0));
  const int64_t N = crow.size(0) - 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point, got ", bias->scalar_type());
  }
  TORCH_CHECK(x.size(1) < (int64_t(1) << 31), op, ": K must be below 2**31, got ", x.size(1));
}

}  // namespace torchslim
