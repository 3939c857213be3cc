# The CUDA part of the build. CMakeLists.txt includes this file before find_package(Torch) when
# TORCHSLIM_CUDA is ON or the installed torch is a CUDA build (TORCH_CUDA_VERSION is set), and
# reads back:
#   WITH_CUDA            ON when the CUDA kernels are built
#   CUDA_SOURCES         the .cu files (each with its GPU architectures, see torchslim_cuda_source)
#   TORCHSLIM_CUDA_LIBS  what _C links for them
#
# How: CMake's own CUDA language with nvcc, and torch's CUDA libraries linked by name.
# torch's CMake config (Caffe2/public/cuda.cmake) would otherwise run its legacy FindCUDA
# detection, which wants a full toolkit (nvrtc, cuDNN, cuSPARSE headers) and TORCH_CUDA_ARCH_LIST:
# it fails on a machine with only nvcc + cudart, and without nvcc it fails find_package(Torch)
# altogether. That file returns early when the target torch::cudart exists (its include guard),
# so this file defines torch::cudart itself: CUDA::cudart for a CUDA build, nothing for a CPU-only
# build against a CUDA torch. Then the same code path works with a bare nvcc (this repo's CI) and
# with a full toolkit (the GPU machine). The guard is there in torch 2.14.1 (and is checked below).

set(TORCHSLIM_CUDA_ARCHITECTURES "80;90a" CACHE STRING
    "GPU architectures of the CUDA kernels without their own list (80: A100 and PTX for newer GPUs; 90a: H100/H200)")

set(WITH_CUDA OFF)
set(CUDA_SOURCES "")
set(TORCHSLIM_CUDA_LIBS "")

if(NOT TORCH_CUDA_VERSION)
  # Only reached with TORCHSLIM_CUDA=ON.
  message(FATAL_ERROR
    "TORCHSLIM_CUDA=ON, but the torch this Python imports (${TORCH_VERSION_STRING}) is not a CUDA "
    "build. Install a CUDA build of torch first (the package builds against the installed torch "
    "with pip install --no-build-isolation), or build with TORCHSLIM_CUDA=AUTO or OFF.")
endif()

# torch's CUDA libraries link torch::cudart; defining it here keeps torch's own CUDA detection off.
# Checked, not assumed: should a torch release drop that include guard, say so.
file(READ "${TORCH_CMAKE_PREFIX}/Caffe2/public/cuda.cmake" _torch_cuda_cmake)
string(FIND "${_torch_cuda_cmake}" "if(TARGET torch::cudart)" _guard_at)
if(_guard_at EQUAL -1)
  message(WARNING
    "torchslim: ${TORCH_CMAKE_PREFIX}/Caffe2/public/cuda.cmake has no 'if(TARGET torch::cudart)' "
    "guard any more: torch's own CUDA detection will run in find_package(Torch) and may need "
    "CUDA_TOOLKIT_ROOT_DIR, CUDA_nvrtc_LIBRARY and TORCH_CUDA_ARCH_LIST (see cmake/cuda.cmake).")
elseif(NOT TARGET torch::cudart)
  add_library(torch::cudart INTERFACE IMPORTED)
endif()

if(TORCHSLIM_CUDA STREQUAL "OFF")
  message(STATUS "torchslim: TORCHSLIM_CUDA=OFF: CPU-only build against CUDA torch ${TORCH_VERSION_STRING}")
  return()
endif()

# ---- nvcc: CMAKE_CUDA_COMPILER, $CUDACXX, $CUDA_PATH/$CUDA_HOME/$CUDA_ROOT, PATH, /usr/local/cuda* ----
string(REGEX MATCH "^[0-9]+" _torch_cuda_major "${TORCH_CUDA_VERSION}")
set(_nvcc_hints "")
foreach(_var IN ITEMS CUDA_PATH CUDA_HOME CUDA_ROOT CUDAToolkit_ROOT)
  if(DEFINED ENV{${_var}})
    list(APPEND _nvcc_hints "$ENV{${_var}}/bin")
  endif()
endforeach()
if(CMAKE_CUDA_COMPILER)
  set(TORCHSLIM_NVCC "${CMAKE_CUDA_COMPILER}")
elseif(DEFINED ENV{CUDACXX} AND NOT "$ENV{CUDACXX}" STREQUAL "")
  set(TORCHSLIM_NVCC "$ENV{CUDACXX}")
else()
  find_program(TORCHSLIM_NVCC nvcc
    HINTS ${_nvcc_hints}
    PATHS /usr/local/cuda-${TORCH_CUDA_VERSION}/bin /usr/local/cuda/bin /usr/local/cuda-${_torch_cuda_major}/bin
    DOC "nvcc used for the CUDA kernels")
endif()

# Turns the CUDA build off (AUTO) or stops with the reason (ON).
macro(_torchslim_no_cuda)
  string(CONCAT _reason ${ARGN})
  if(TORCHSLIM_CUDA STREQUAL "ON")
    message(FATAL_ERROR "TORCHSLIM_CUDA=ON: ${_reason}")
  endif()
  message(WARNING "torchslim: ${_reason}\nBuilding the CPU kernels only (TORCHSLIM_CUDA=AUTO); "
                  "torchslim._C.cuda will be False and CUDA calls of the C++ ops will raise.")
  return()
endmacro()

if(TORCHSLIM_NVCC AND NOT EXISTS "${TORCHSLIM_NVCC}")
  _torchslim_no_cuda("nvcc '${TORCHSLIM_NVCC}' (from CMAKE_CUDA_COMPILER or CUDACXX) does not exist.")
elseif(NOT TORCHSLIM_NVCC)
  _torchslim_no_cuda(
    "torch ${TORCH_VERSION_STRING} is a CUDA ${TORCH_CUDA_VERSION} build, but no nvcc was found. "
    "Set CUDACXX=/path/to/nvcc or CUDA_PATH=/path/to/cuda, or put nvcc on PATH.")
endif()

execute_process(COMMAND "${TORCHSLIM_NVCC}" --version OUTPUT_VARIABLE _nvcc_out RESULT_VARIABLE _nvcc_rc)
string(REGEX MATCH "release ([0-9]+)\\.([0-9]+)" _nvcc_release "${_nvcc_out}")
set(_nvcc_version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
if(NOT _nvcc_rc EQUAL 0 OR NOT _nvcc_release)
  _torchslim_no_cuda("${TORCHSLIM_NVCC} --version failed or printed no release number")
endif()
# The kernels link the CUDA runtime of torch's major version (libcudart.so.<major>).
if(NOT CMAKE_MATCH_1 STREQUAL _torch_cuda_major)
  _torchslim_no_cuda(
    "nvcc ${TORCHSLIM_NVCC} is CUDA ${_nvcc_version}, but torch ${TORCH_VERSION_STRING} was built "
    "with CUDA ${TORCH_CUDA_VERSION}: use an nvcc of CUDA ${_torch_cuda_major}.x (CUDACXX=...).")
endif()
message(STATUS "torchslim: CUDA kernels with ${TORCHSLIM_NVCC} (CUDA ${_nvcc_version}) for "
               "torch ${TORCH_VERSION_STRING}, architectures ${TORCHSLIM_CUDA_ARCHITECTURES}")

# ---- the CUDA language ----
set(CMAKE_CUDA_COMPILER "${TORCHSLIM_NVCC}")
if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER)
  set(CMAKE_CUDA_HOST_COMPILER "${CMAKE_CXX_COMPILER}")
endif()
# Architectures are per source file (torchslim_cuda_source), as -gencode options.
set(CMAKE_CUDA_ARCHITECTURES OFF)
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
# The shared runtime, the one torch loads: one CUDA runtime state in the process.
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# torch's usual flags for CUDA sources (c10::Half / c10::BFloat16 next to cuda_fp16.h), compressed
# device code, and one nvcc thread per architecture.
string(APPEND CMAKE_CUDA_FLAGS
  " --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__"
  " -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Xfatbin=-compress-all --threads=2")

# ATen/cuda/CUDAContext.h includes cusparse.h and cublas_v2.h. A bare toolkit (cudart + CCCL) lacks
# them; torch's nvidia-* wheels ship them in site-packages/nvidia/cu<major>/include. Search that
# directory after the toolkit's own (-idirafter), so the toolkit's cuda_runtime.h still wins.
find_path(_torchslim_cusparse_h cusparse.h PATHS ${CUDAToolkit_INCLUDE_DIRS} NO_DEFAULT_PATH NO_CACHE)
if(NOT _torchslim_cusparse_h)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['purelib'], 'nvidia', 'cu${_torch_cuda_major}', 'include'))"
    OUTPUT_VARIABLE _wheel_cuda_include OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(EXISTS "${_wheel_cuda_include}/cusparse.h")
    message(STATUS "torchslim: cuSPARSE/cuBLAS headers from ${_wheel_cuda_include} (after the toolkit's)")
    string(APPEND CMAKE_CUDA_FLAGS " -Xcompiler=-idirafter,${_wheel_cuda_include}")
  endif()
endif()

if(TARGET torch::cudart)
  set_property(TARGET torch::cudart PROPERTY INTERFACE_LINK_LIBRARIES CUDA::cudart)
endif()

# torchslim_cuda_source(<file> [ARCHS <arch>...]): adds <file> to CUDA_SOURCES, compiled for the
# given architectures (default TORCHSLIM_CUDA_ARCHITECTURES). "80" gives sm_80 code plus compute_80
# PTX (which the driver compiles for later GPUs); an arch-specific "90a" gives sm_90a code only.
function(torchslim_cuda_source file)
  cmake_parse_arguments(ARG "" "" "ARCHS;OPTIONS" ${ARGN})
  if(NOT ARG_ARCHS)
    set(ARG_ARCHS ${TORCHSLIM_CUDA_ARCHITECTURES})
  endif()
  set(_opts "")
  foreach(_a IN LISTS ARG_ARCHS)
    if(NOT _a MATCHES "^[0-9]+[af]?$")
      message(FATAL_ERROR "torchslim: bad CUDA architecture '${_a}' for ${file} (expected e.g. 80 or 90a)")
    endif()
    list(APPEND _opts "-gencode=arch=compute_${_a},code=sm_${_a}")
    if(NOT _a MATCHES "[af]$")
      list(APPEND _opts "-gencode=arch=compute_${_a},code=compute_${_a}")
    endif()
  endforeach()
  set_property(SOURCE ${file} APPEND PROPERTY COMPILE_OPTIONS ${_opts} ${ARG_OPTIONS})
  # USE_CUDA: the stable C shim then declares its CUDA functions (the current stream).
  set_property(SOURCE ${file} APPEND PROPERTY COMPILE_DEFINITIONS USE_CUDA)
  set(CUDA_SOURCES ${CUDA_SOURCES} ${file} PARENT_SCOPE)
endfunction()

# ---- the kernels ----
# Bit-exact with the CPU kernel: IEEE division and denormals, whatever flags come before.
torchslim_cuda_source(csrc/cuda/quantize_per_token.cu OPTIONS -ftz=false -prec-div=true)
# Quantizes x with the same device functions (quantize_row.cuh): the same bit-exact flags.
torchslim_cuda_source(csrc/cuda/int8_decode.cu OPTIONS -ftz=false -prec-div=true)
# Float32 sums of products (fmaf); no bit-exact contract, default flags.
torchslim_cuda_source(csrc/cuda/csr_linear.cu)

# ---- CUTLASS (header-only) kernels for Hopper: the sm_90a int8 GEMM ----
# Headers from the PyPI package nvidia-cutlass (pip install nvidia-cutlass; its Python module
# cutlass_library ships them under source/include), or a CUTLASS include directory of your own
# (-DTORCHSLIM_CUTLASS_INCLUDE_DIR=<dir holding cutlass/ and cute/>). AUTO builds them where the
# headers are found, the architecture list holds 90a and nvcc is CUDA >= 12.0; ON stops with the
# reason where not; OFF never builds them. Built: the target gets TORCHSLIM_WITH_CUTLASS=1.
set(TORCHSLIM_CUTLASS "AUTO" CACHE STRING "Build the CUTLASS sm_90a kernels: AUTO, ON or OFF")
set_property(CACHE TORCHSLIM_CUTLASS PROPERTY STRINGS AUTO ON OFF)
set(TORCHSLIM_CUTLASS_INCLUDE_DIR "" CACHE PATH
    "CUTLASS include directory (holding cutlass/ and cute/); empty: the nvidia-cutlass Python package's")
string(TOUPPER "${TORCHSLIM_CUTLASS}" _cutlass_mode)
if(NOT _cutlass_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "TORCHSLIM_CUTLASS must be AUTO, ON or OFF, got '${TORCHSLIM_CUTLASS}'")
endif()
set(_cutlass_why "")
set(_torchslim_cutlass_lib "")
set(_cutlass_inc "${TORCHSLIM_CUTLASS_INCLUDE_DIR}")
if(_cutlass_mode STREQUAL "OFF")
  set(_cutlass_why "TORCHSLIM_CUTLASS=OFF")
elseif(NOT "90a" IN_LIST TORCHSLIM_CUDA_ARCHITECTURES)
  set(_cutlass_why "the architectures '${TORCHSLIM_CUDA_ARCHITECTURES}' (TORCHSLIM_CUDA_ARCHITECTURES) do not include 90a")
elseif(_nvcc_version VERSION_LESS 12.0)
  set(_cutlass_why "nvcc is CUDA ${_nvcc_version}; CUTLASS's sm_90a kernels need CUDA >= 12.0")
else()
  if(NOT _cutlass_inc)
    # Located without importing the module (find_spec reads only the file system).
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
        "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source', 'include') if s else '')"
      OUTPUT_VARIABLE _cutlass_inc OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _cutlass_rc)
  endif()
  if(NOT _cutlass_inc)
    set(_cutlass_why "no CUTLASS headers: the Python package nvidia-cutlass (module cutlass_library) is not installed for ${Python_EXECUTABLE} (pip install nvidia-cutlass==4.2.0.0, or set TORCHSLIM_CUTLASS_INCLUDE_DIR)")
  elseif(NOT EXISTS "${_cutlass_inc}/cutlass/version.h" OR NOT EXISTS "${_cutlass_inc}/cute/tensor.hpp")
    set(_cutlass_why "${_cutlass_inc} holds no CUTLASS headers (cutlass/version.h, cute/tensor.hpp)")
  else()
    file(STRINGS "${_cutlass_inc}/cutlass/version.h" _cutlass_ver REGEX "#define CUTLASS_(MAJOR|MINOR) ")
    string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*CUTLASS_MINOR ([0-9]+).*" "\\1.\\2" _cutlass_ver "${_cutlass_ver}")
    if(_cutlass_ver VERSION_LESS 4.2)
      set(_cutlass_why "CUTLASS ${_cutlass_ver} in ${_cutlass_inc} is older than 4.2, the version the kernels are written for")
    endif()
  endif()
endif()
if(_cutlass_why)
  if(_cutlass_mode STREQUAL "ON")
    message(FATAL_ERROR "TORCHSLIM_CUTLASS=ON, but ${_cutlass_why}.")
  endif()
  message(STATUS "torchslim: no CUTLASS kernels (${_cutlass_why}); int8_linear uses its Triton GEMM on Hopper too")
else()
  message(STATUS "torchslim: CUTLASS ${_cutlass_ver} kernels for sm_90a, headers from ${_cutlass_inc}")
  # wgmma + TMA need the arch-specific target: 90a only. The headers only for this file.
  torchslim_cuda_source(csrc/cuda/int8_gemm_sm90.cu ARCHS 90a OPTIONS "--system-include=${_cutlass_inc}")
  # CMakeLists.txt links TORCHSLIM_CUDA_LIBS into _C: this interface target carries the definition
  # (the bindings report it), so no second variable is needed there.
  add_library(torchslim_cutlass INTERFACE)
  target_compile_definitions(torchslim_cutlass INTERFACE TORCHSLIM_WITH_CUTLASS=1)
  set(_torchslim_cutlass_lib torchslim_cutlass)
endif()

# torch_cuda holds the stable C shim's CUDA functions; nothing of c10_cuda is used.
set(TORCHSLIM_CUDA_LIBS torch_cuda CUDA::cudart ${_torchslim_cutlass_lib})
set(WITH_CUDA ON)
