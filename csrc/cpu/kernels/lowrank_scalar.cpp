// Portable kernel of the low-rank products (lowrank.h), for CPUs without AVX-512 (and the reference
// the tests hold the vector kernels to): one dot product per output, float32 sums.
#include "lowrank.h"
#include "scalar_convert.h"

namespace torchslim::cpu {

void lr_product_scalar(const LrProduct& p, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k)
        acc += load_as_float(p.a, p.dtype, m * p.lda + k) * load_as_float(p.b, p.dtype, n * p.ldb + k);
      store_from_float(p.c, p.c_dtype, m * p.ldc + n, acc + (p.bias ? p.bias[n] : 0.f));
    }
}

}  // namespace torchslim::cpu
