# Steps of the package tests (cmake -P). MODE: install | find_package | add_subdirectory.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

if(MODE STREQUAL "install")
  # Install, then move the tree: a relocatable package must still be found from the new place.
  file(REMOVE_RECURSE ${WORK}/prefix-staged ${WORK}/prefix)
  run(${CMAKE_COMMAND} --install ${MOQE_BUILD} --prefix ${WORK}/prefix-staged)
  file(RENAME ${WORK}/prefix-staged ${WORK}/prefix)
elseif(MODE STREQUAL "find_package")
  file(REMOVE_RECURSE ${WORK}/consumer-find)
  run(${CMAKE_COMMAND} -S ${CONSUMER} -B ${WORK}/consumer-find -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_PREFIX_PATH=${WORK}/prefix -DCMAKE_BUILD_TYPE=Release)
  run(${CMAKE_COMMAND} --build ${WORK}/consumer-find)
  run(${WORK}/consumer-find/consumer)
  if(EXISTS ${WORK}/consumer-find/consumer_mpi)  # one process: MPI's singleton start
    set(ENV{OMPI_ALLOW_RUN_AS_ROOT} 1)
    set(ENV{OMPI_ALLOW_RUN_AS_ROOT_CONFIRM} 1)
    run(${WORK}/consumer-find/consumer_mpi)
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  file(REMOVE_RECURSE ${WORK}/consumer-subdir)
  run(${CMAKE_COMMAND} -S ${CONSUMER} -B ${WORK}/consumer-subdir -G ${GENERATOR}
      -DCMAKE_CXX_COMPILER=${CXX} -DMOQE_SOURCE_DIR=${MOQE_SOURCE} -DMOQE_WITH_CUDA=OFF
      -DCMAKE_BUILD_TYPE=Release)
  run(${CMAKE_COMMAND} --build ${WORK}/consumer-subdir)
  run(${WORK}/consumer-subdir/consumer)
  if(EXISTS ${WORK}/consumer-subdir/consumer_mpi)
    set(ENV{OMPI_ALLOW_RUN_AS_ROOT} 1)
    set(ENV{OMPI_ALLOW_RUN_AS_ROOT_CONFIRM} 1)
    run(${WORK}/consumer-subdir/consumer_mpi)
  endif()
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()
