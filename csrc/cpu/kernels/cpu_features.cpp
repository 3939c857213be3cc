// Run-time CPU feature detection: cpuid for what the core has, xgetbv for what the OS saves on a
// context switch, and the Linux permission request that AMX tile data needs before first use.
#include <cpuid.h>
#include <strings.h>
#include <atomic>
#include <sys/syscall.h>
#include <unistd.h>

#include "int8_gemm.h"
#include "sparse24.h"

namespace torchslim::cpu {
namespace {

uint64_t xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

bool bit(uint32_t reg, int b) { return (reg >> b) & 1u; }

bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Bit i set: this CPU and OS run the kernels of Isa(i).
unsigned detect() {
  unsigned set = 1u << int(Isa::Scalar);
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return set;
  const bool osxsave = bit(c, 27), fma = bit(c, 12), f16c = bit(c, 29);
  if (!osxsave) return set;
  const uint64_t xcr = xcr0();
  const bool os_avx = (xcr & 0x6) == 0x6;             // SSE + AVX state
  const bool os_avx512 = (xcr & 0xE6) == 0xE6;        // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr & (3ull << 17)) == (3ull << 17);  // XTILECFG + XTILEDATA
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return set;
  const bool avx2 = bit(b, 5) && fma && f16c && os_avx;
  const bool avx512 = bit(b, 16) && bit(b, 17) && bit(b, 30) && bit(b, 31) && os_avx512;
  const bool avx512_vnni = avx512 && bit(c, 11);
  const bool amx_regs = bit(d, 24) && bit(d, 25) && os_amx;
  uint32_t a1 = 0, b1, c1, d1;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool avx_vnni = avx2 && bit(a1, 4);  // VEX-encoded vpdpbusd on 256 bits (Alder Lake and newer)
  // The AMX kernel file is also built for AVX512_BF16 (its bf16 stores): require it too.
  const bool amx = avx512_vnni && amx_regs && bit(a1, 5) && request_amx_permission();
  if (avx2) set |= 1u << int(Isa::Avx2);
  if (avx_vnni) set |= 1u << int(Isa::AvxVnni);
  if (avx512_vnni) set |= 1u << int(Isa::Avx512Vnni);
  if (amx) set |= 1u << int(Isa::Amx);
  return set;
}

// AVX-512 F/BW/VL/DQ + BF16, with the OS saving the AVX-512 state, and (vbmi2) VBMI2 too.
bool detect_avx512_bf16(bool vbmi2) {
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !bit(c, 27)) return false;
  if ((xcr0() & 0xE6) != 0xE6) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512 = bit(b, 16) && bit(b, 17) && bit(b, 30) && bit(b, 31);
  uint32_t a1 = 0, b1, c1, d1;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  return avx512 && (!vbmi2 || bit(c, 6)) && bit(a1, 5);
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : kAllIsas) {
    if (strcasecmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{int(best_isa())};
  return isa;
}

}  // namespace

bool isa_supported(Isa isa) {
  static const unsigned set = detect();
  return (set >> int(isa)) & 1u;
}

bool s24_avx512_supported() {
  static const bool yes = detect_avx512_bf16(/*vbmi2=*/true);
  return yes;
}

bool csr_avx512_bf16_supported() {
  static const bool yes = detect_avx512_bf16(/*vbmi2=*/false);
  return yes;
}

// AMX-BF16 (tdpbf16ps) usable: the amx level (AMX-TILE, the OS's tile state) and the AMX-BF16 bit.
static bool amx_bf16_usable() {
  static const bool yes = [] {
    uint32_t a, b, c, d;
    return isa_supported(Isa::Amx) && __get_cpuid_count(7, 0, &a, &b, &c, &d) && bit(d, 22);
  }();
  return yes;
}

bool s24_amx_supported() { return s24_avx512_supported() && amx_bf16_usable(); }

bool lr_avx512_supported() { return isa_supported(Isa::Avx512Vnni); }

bool lr_avx512_bf16_supported() { return csr_avx512_bf16_supported(); }

bool lr_amx_supported() { return lr_avx512_bf16_supported() && amx_bf16_usable(); }

Isa best_isa() {
  Isa best = Isa::Scalar;
  for (Isa isa : kAllIsas)
    if (isa_supported(isa)) best = isa;  // kAllIsas is ordered from slowest to fastest
  return best;
}

Isa active_isa() { return Isa(active().load(std::memory_order_relaxed)); }

SetIsa set_active_isa(const char* name) {
  Isa wanted;
  if (!parse_isa(name, &wanted)) return SetIsa::Unknown;
  if (!isa_supported(wanted)) return SetIsa::Unsupported;
  active().store(int(wanted), std::memory_order_relaxed);
  return SetIsa::Ok;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Amx: return "amx";
    case Isa::Avx512Vnni: return "avx512_vnni";
    case Isa::AvxVnni: return "avx_vnni";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace torchslim::cpu
