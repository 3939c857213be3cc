// What the CUDA op layer uses of torch, on the LibTorch Stable ABI only (see stable_tensor.h): the
// device guard, the current stream and the launch check. Custom ops get no device guard from the
// dispatcher: each op sets x's device and launches on that device's current stream.
#pragma once
#include <cuda_runtime.h>
// aoti_torch_get_current_cuda_stream is declared under USE_CUDA (CMakeLists.txt defines it for the
// CUDA sources).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "stable_tensor.h"

namespace torchslim {

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

inline cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

// After each launch: a bad configuration or a missing kernel image is reported here, by name.
inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCHSLIM_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace torchslim

// A CUDA runtime call that must succeed.
#define TORCHSLIM_CUDA_CHECK(call)                                                             \
  do {                                                                                         \
    const cudaError_t torchslim_err = (call);                                                  \
    TORCHSLIM_CHECK(torchslim_err == cudaSuccess, #call, ": ", cudaGetErrorString(torchslim_err)); \
  } while (false)
