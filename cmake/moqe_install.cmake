# Install rules and the relocatable CMake package (find_package(moqe CONFIG [COMPONENTS cuda nccl mpi])).
include(CMakePackageConfigHelpers)
set(MOQE_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/moqe)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/moqe DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS moqe EXPORT moqeTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(EXPORT moqeTargets NAMESPACE moqe:: DESTINATION ${MOQE_CMAKE_DIR})
if(TARGET moqe_cuda)
  install(TARGETS moqe_cuda EXPORT moqeCudaTargets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
  install(EXPORT moqeCudaTargets NAMESPACE moqe:: DESTINATION ${MOQE_CMAKE_DIR})
endif()
if(TARGET moqe_nccl)
  install(TARGETS moqe_nccl EXPORT moqeNcclTargets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
  install(EXPORT moqeNcclTargets NAMESPACE moqe:: DESTINATION ${MOQE_CMAKE_DIR})
endif()
if(TARGET moqe_mpi)
  install(TARGETS moqe_mpi EXPORT moqeMpiTargets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
  install(EXPORT moqeMpiTargets NAMESPACE moqe:: DESTINATION ${MOQE_CMAKE_DIR})
endif()
if(TARGET moqe_cli)
  install(TARGETS moqe_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/moqeConfig.cmake.in
  ${PROJECT_BINARY_DIR}/moqeConfig.cmake INSTALL_DESTINATION ${MOQE_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/moqeConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/moqeConfig.cmake ${PROJECT_BINARY_DIR}/moqeConfigVersion.cmake
  DESTINATION ${MOQE_CMAKE_DIR})
