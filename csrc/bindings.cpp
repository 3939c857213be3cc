// torchslim._C: importing it registers the ops (static initializers in ops.cpp and the
// TORCH_LIBRARY_IMPL files); the functions here report what this build and this CPU can do.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu/kernels/int8_gemm.h"
#include "cpu/kernels/csr.h"
#include "cpu/kernels/lowrank.h"
#include "cpu/kernels/sparse24.h"

// manylinux_2_28: glibc 2.28 has no __libc_single_threaded (it came in 2.32), which GCC 12's libstdc++
// headers read to skip atomic reference counts in a single-threaded process. This module's own copy
// (hidden: its references bind here, not to glibc) says "not single-threaded": always the atomic
// operations, correct in every process, and the wheel needs nothing of glibc beyond 2.14.
extern "C" __attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

namespace py = pybind11;
using namespace torchslim::cpu;

namespace {
std::string known_names() {
  std::string names;
  for (Isa isa : kAllIsas) names += std::string(names.empty() ? "" : ", ") + isa_name(isa);
  return names;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchslim native kernels";
  m.attr("__version__") = TORCHSLIM_VERSION;
  m.attr("built_with_torch") = TORCHSLIM_TORCH_VERSION;
#ifdef TORCHSLIM_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
  m.def("best_cpu_isa", [] { return std::string(isa_name(best_isa())); },
        "Best CPU instruction set of this machine: amx, avx512_vnni, avx_vnni, avx2 or scalar.");
  m.def("known_cpu_isas", [] {
    py::list names;
    for (Isa isa : kAllIsas) names.append(isa_name(isa));
    return names;
  }, "Every CPU instruction set torchslim has kernels for, slowest first.");
  m.def("supported_cpu_isas", [] {
    py::list names;
    for (Isa isa : kAllIsas)
      if (isa_supported(isa)) names.append(isa_name(isa));
    return names;
  }, "The CPU instruction sets this machine can run, slowest first.");
  m.def("cpu_isa", [] { return std::string(isa_name(active_isa())); },
        "The CPU instruction set the int8 kernels use now.");
  m.def("sparse24_cpu_kernels", [] {
    const bool avx512 = s24_avx512_supported() && active_isa() >= Isa::Avx512Vnni;
    const bool amx = avx512 && active_isa() == Isa::Amx && s24_amx_supported();
    return std::string(amx ? "amx-bf16 + avx512" : avx512 ? "avx512" : "scalar");
  }, "The 2:4 CPU kernels the active instruction set selects: amx-bf16 + avx512, avx512 or scalar.");
  m.def("csr_cpu_kernels", [] { return std::string(csr_avx512_active() ? "avx512" : "scalar"); },
        "The CSR CPU kernels the active instruction set selects: avx512 or scalar.");
  m.def("lowrank_cpu_kernels", [] {
    const bool avx512 = lr_avx512_supported() && active_isa() >= Isa::Avx512Vnni;
    const bool amx = active_isa() == Isa::Amx && lr_amx_supported();
    return std::string(amx ? "amx-bf16 + avx512" : avx512 ? (lr_avx512_bf16_supported() ? "avx512-bf16" : "avx512") : "scalar");
  }, "The low-rank CPU kernels the active instruction set selects: amx-bf16 + avx512, avx512-bf16, avx512 or scalar.");
  m.def("set_cpu_isa", [](const std::string& name) {
    switch (set_active_isa(name.c_str())) {
      case SetIsa::Ok: return;
      case SetIsa::Unknown:
        throw std::invalid_argument("set_cpu_isa: unknown instruction set '" + name + "'; known: " + known_names());
      case SetIsa::Unsupported:
        throw std::invalid_argument("set_cpu_isa: this CPU does not support '" + name + "' (best: " +
                                    isa_name(best_isa()) + ")");
    }
  }, "Choose the instruction set of the int8 kernels (case-insensitive name; for tests and comparisons).");
}
