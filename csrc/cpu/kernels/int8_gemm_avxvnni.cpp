// The AVX-VNNI build of the 256-bit kernel (see int8_gemm_avx2.cpp): same source, vpdpbusd.
#define TORCHSLIM_AVX_VNNI 1
#include "int8_gemm_avx2.cpp"
