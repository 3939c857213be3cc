// Portable CSR kernel (any x86-64): for blocks of 8 rows of x, each stored entry multiplies 8
// activations.
#include "csr.h"
#include "scalar_convert.h"

namespace torchslim::cpu {

bool csr_rows_scalar(const CsrArgs& a, int64_t n0, int64_t n1) {
  constexpr int64_t kMB = 8;
  const auto* col16 = static_cast<const int16_t*>(a.col);
  const auto* col32 = static_cast<const int32_t*>(a.col);
  const float* x = static_cast<const float*>(a.x);
  bool ok = true;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t s = a.crow[n], e = a.crow[n + 1];
    // Columns first: a row with a bad one is skipped (the call raises), so no index is used unchecked.
    int64_t prev = -1;
    bool row_ok = true;
    for (int64_t j = s; j < e && row_ok; ++j) {
      const int64_t c = a.col16 ? col16[j] : col32[j];
      row_ok = c > prev && c < a.K;
      prev = c;
    }
    if (!row_ok) {
      ok = false;
      continue;
    }
    const float b = a.bias ? a.bias[n] : 0.f;
    for (int64_t m0 = 0; m0 < a.M; m0 += kMB) {
      const int64_t mb = a.M - m0 < kMB ? a.M - m0 : kMB;
      float acc[kMB] = {};
      for (int64_t j = s; j < e; ++j) {
        const int64_t c = a.col16 ? col16[j] : col32[j];
        const float v = load_as_float(a.values, a.w_dtype, j);
        for (int64_t i = 0; i < mb; ++i) acc[i] += v * x[(m0 + i) * a.K + c];
      }
      for (int64_t i = 0; i < mb; ++i) store_from_float(a.out, a.out_dtype, (m0 + i) * a.ldo + n, acc[i] + b);
    }
  }
  return ok;
}

}  // namespace torchslim::cpu
