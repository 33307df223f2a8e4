# NCCL (shipped with the CUDA toolkit here, or installed beside it): NcclCommunicator is the
# component moqe::nccl (on top of moqe::cuda) when nccl.h and libnccl are found, so that programs
# of moqe::cuda alone never load libnccl (~200 MB). CMake has no FindNCCL module; this looks in the
# toolkit's directories and in CMAKE_PREFIX_PATH / NCCL_ROOT.
set(MOQE_WITH_NCCL AUTO CACHE STRING "moqe::nccl (NcclCommunicator): AUTO (when NCCL is found), ON, OFF")
set_property(CACHE MOQE_WITH_NCCL PROPERTY STRINGS AUTO ON OFF)
set(MOQE_ENABLE_NCCL OFF)
if(NOT MOQE_WITH_NCCL STREQUAL "OFF")
  find_path(MOQE_NCCL_INCLUDE_DIR nccl.h
    HINTS ${NCCL_ROOT} ENV NCCL_ROOT ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
  find_library(MOQE_NCCL_LIBRARY nccl
    HINTS ${NCCL_ROOT} ENV NCCL_ROOT ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}
    PATH_SUFFIXES lib lib64)
  if(MOQE_NCCL_INCLUDE_DIR AND MOQE_NCCL_LIBRARY)
    set(MOQE_ENABLE_NCCL ON)
  elseif(MOQE_WITH_NCCL STREQUAL "ON")
    message(FATAL_ERROR "MOQE_WITH_NCCL=ON but nccl.h or libnccl was not found (set NCCL_ROOT)")
  endif()
endif()
message(STATUS "moqe: NCCL communicator: ${MOQE_ENABLE_NCCL} ${MOQE_NCCL_LIBRARY}")
if(MOQE_ENABLE_NCCL)
  add_library(moqe_nccl ${PROJECT_SOURCE_DIR}/cuda/nccl_communicator.cu)
  add_library(moqe::nccl ALIAS moqe_nccl)
  set_target_properties(moqe_nccl PROPERTIES EXPORT_NAME nccl OUTPUT_NAME moqe_nccl)
  target_include_directories(moqe_nccl PRIVATE ${MOQE_NCCL_INCLUDE_DIR})
  target_link_libraries(moqe_nccl PUBLIC moqe::cuda ${MOQE_NCCL_LIBRARY})
  target_compile_options(moqe_nccl PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>)
  target_compile_definitions(moqe_nccl PUBLIC MOQE_HAVE_NCCL)
  moqe_set_warnings(moqe_nccl)
endif()
