// What the op layer uses of torch, on the LibTorch Stable ABI only (torch/csrc/stable, torch/headeronly):
// tensors, argument checks with clear messages, and the ATen ops it calls. Nothing in csrc/ may use
// libtorch's C++ API (at::, c10:: beyond the header-only types, torch:: beyond torch::stable): built for
// the stable ABI of torch 2.11 (TORCH_TARGET_VERSION, CMakeLists.txt), one wheel then loads under every
// torch from 2.11 on. tests/test_abi.py checks the compiled module's undefined symbols for that.
// Each accessor of a Tensor (sizes, data pointers, dtype) is a call into torch's shim: read them once,
// never in a per-element loop.
#pragma once
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace torchslim {

using Tensor = torch::stable::Tensor;
using torch::headeronly::ScalarType;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;

// ---- messages, printed as ATen prints them ------------------------------------------------------
struct Dims {  // a tensor's shape, [2, 3], or its strides
  const Tensor& t;
  bool strides;
};
inline std::ostream& operator<<(std::ostream& os, Dims s) {
  os << '[';
  for (int64_t d = 0; d < s.t.dim(); ++d) os << (d ? ", " : "") << (s.strides ? s.t.stride(d) : s.t.size(d));
  return os << ']';
}
inline Dims shape(const Tensor& t) { return {t, false}; }
inline Dims strides(const Tensor& t) { return {t, true}; }

inline std::ostream& operator<<(std::ostream& os, const Device& d) {  // cpu, cuda:0, meta
  switch (d.type()) {
    case DeviceType::CPU: return os << "cpu";
    case DeviceType::CUDA: return os << "cuda:" << int(d.index());
    case DeviceType::Meta: return os << "meta";
    default: return os << "device type " << int(d.type());
  }
}

template <class... A>
[[noreturn]] void fail(const A&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw std::runtime_error(s.str());  // RuntimeError in Python, like TORCH_CHECK's c10::Error
}

// TORCH_CHECK's shape: the message is the concatenation of the arguments after the condition.
#define TORCHSLIM_CHECK(cond, ...)                             \
  do {                                                         \
    if (!(cond)) [[unlikely]] ::torchslim::fail(__VA_ARGS__); \
  } while (false)

// ---- dtypes --------------------------------------------------------------------------------------
inline bool is_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half;
}
inline bool is_floating_point(ScalarType t) { return is_float(t) || t == ScalarType::Double; }

// ---- tensors -------------------------------------------------------------------------------------
// An uninitialized tensor of `sizes` on `device`.
inline Tensor empty(std::initializer_list<int64_t> sizes, ScalarType dtype, const Device& device) {
  return torch::stable::empty(torch::headeronly::IntHeaderOnlyArrayRef(sizes), dtype, std::nullopt, device);
}

// `t` in dtype `dtype`, contiguous (t itself where it already is both: each dispatcher call through
// the stable ABI costs ~1 us, a small layer's whole budget at one token).
inline Tensor contiguous_as(const Tensor& t, ScalarType dtype) {
  const Tensor c = t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
  return c.is_contiguous() ? c : torch::stable::contiguous(c);
}

// narrow, copy_ and zero_ of the stable API take a non-const Tensor& (the handle; the data is shared
// either way): these take any tensor expression. (Other names than the stable ones: both would match.)
inline Tensor narrowed(Tensor t, int64_t dim, int64_t start, int64_t length) {
  return torch::stable::narrow(t, dim, start, length);
}
inline void copy_into(Tensor dst, const Tensor& src) { torch::stable::copy_(dst, src); }  // src broadcasts
inline void zero(Tensor t) { torch::stable::zero_(t); }

// An ATen op by schema name through the dispatcher, for the few the stable API does not wrap; every
// argument of the schema is given (no defaults), in order, and it returns its first result.
template <class... A>
Tensor call_aten(const char* name, const char* overload, const A&... args) {
  std::array<StableIValue, sizeof...(A)> stack{torch::stable::detail::from(args)...};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// out = x @ w^T (+ bias broadcast over rows), written into out (which may be a strided view): linear.out,
// which takes no Scalar (the stable ABI passes none, so not addmm.out).
inline void linear_out(Tensor& out, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  call_aten("aten::linear", "out", x, w, bias, out);
}

}  // namespace torchslim
