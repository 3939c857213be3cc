// The argument checks of torchslim::csr_linear, shared by its CPU and CUDA implementations: the C++
// twin of ops.check_csr_linear_args, in the same words and order. (The values of crow and col are
// checked by the CPU op as it reads them; the CUDA kernels bound every read instead.)
#pragma once
#include <optional>
#include <utility>

#include "stable_tensor.h"

namespace torchslim {

inline void check_csr_linear_args(const Tensor& x, const Tensor& crow, const Tensor& col, const Tensor& values,
                                  const std::optional<Tensor>& bias) {
  const char* op = "csr_linear";
  TORCHSLIM_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", shape(x));
  const ScalarType dt = x.scalar_type();
  TORCHSLIM_CHECK(is_float(dt), op, ": x must be float32, bfloat16 or float16, got ", dt);
  TORCHSLIM_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const Device device = x.device();
  const std::pair<const char*, const Tensor*> csr[] = {{"crow", &crow}, {"col", &col}, {"values", &values}};
  for (const auto& [name, t] : csr) {
    TORCHSLIM_CHECK(t->device() == device, op, ": ", name, " must be on ", device, " like x, got ", t->device());
    TORCHSLIM_CHECK(t->dim() == 1, op, ": ", name, " must be 1-D, got shape ", shape(*t));
    TORCHSLIM_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCHSLIM_CHECK(crow.scalar_type() == ScalarType::Int, op, ": crow must be int32, got ", crow.scalar_type());
  TORCHSLIM_CHECK(col.scalar_type() == ScalarType::Short || col.scalar_type() == ScalarType::Int, op,
                  ": col must be int16 or int32, got ", col.scalar_type());
  TORCHSLIM_CHECK(values.scalar_type() == dt, op, ": values must have x's dtype ", dt, ", got ", values.scalar_type());
  TORCHSLIM_CHECK(crow.size(0) >= 1, op, ": crow must have N + 1 >= 1 entries, got 0");
  TORCHSLIM_CHECK(col.size(0) == values.size(0), op, ": col and values must have one entry per stored value, got ",
                  col.size(0), " and ", values.size(0));
  const int64_t N = crow.size(0) - 1;
  if (bias.has_value()) {
    TORCHSLIM_CHECK(bias->device() == device, op, ": bias must be on ", device, " like x, got ", bias->device());
    TORCHSLIM_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ",
                    shape(*bias));
    TORCHSLIM_CHECK(is_floating_point(bias->scalar_type()), op, ": bias must be floating point, got ",
                    bias->scalar_type());
  }
  TORCHSLIM_CHECK(x.size(1) < (int64_t(1) << 31), op, ": K must be below 2**31, got ", x.size(1));
}

}  // namespace torchslim
