# Decides MOQE_ENABLE_CUDA from MOQE_WITH_CUDA (AUTO | ON | OFF).
# Architectures default to 80;90 unless the caller set CMAKE_CUDA_ARCHITECTURES; never "native",
# so that a build on a GPU-less machine (CI) produces code for the GPUs users have.
set(MOQE_ENABLE_CUDA OFF)
if(NOT MOQE_WITH_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
      set(CMAKE_CUDA_ARCHITECTURES 80 90 CACHE STRING "CUDA architectures" FORCE)
    endif()
    enable_language(CUDA)
    # CMake 3.25 does not know nvcc's C++20 dialect (nvcc >= 12 has -std=c++20): teach it, so that
    # the cxx_std_20 requirement of moqe::moqe carries over to CUDA sources.
    if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
      list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
      set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
    endif()
    find_package(CUDAToolkit REQUIRED)
    set(MOQE_ENABLE_CUDA ON)
    message(STATUS "moqe: CUDA component enabled (architectures: ${CMAKE_CUDA_ARCHITECTURES})")
  elseif(MOQE_WITH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "moqe: MOQE_WITH_CUDA=ON but no CUDA compiler (nvcc) was found")
  else()
    message(STATUS "moqe: no CUDA compiler found; building the CPU library only")
  endif()
endif()
