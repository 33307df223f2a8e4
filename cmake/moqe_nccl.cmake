# NCCL (shipped with the CUDA toolkit here, or installed beside it): NcclCommunicator is compiled
# into moqe::cuda when nccl.h and libnccl are found. CMake has no FindNCCL module; this looks in
# the toolkit's directories and in CMAKE_PREFIX_PATH / NCCL_ROOT.
set(MOQE_WITH_NCCL AUTO CACHE STRING "NcclCommunicator in moqe::cuda: AUTO (when NCCL is found), ON, OFF")
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
  target_sources(moqe_cuda PRIVATE ${PROJECT_SOURCE_DIR}/cuda/nccl_communicator.cu)
  target_include_directories(moqe_cuda PRIVATE ${MOQE_NCCL_INCLUDE_DIR})
  target_link_libraries(moqe_cuda PUBLIC ${MOQE_NCCL_LIBRARY})
  target_compile_definitions(moqe_cuda PUBLIC MOQE_HAVE_NCCL)
endif()
