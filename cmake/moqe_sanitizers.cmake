# Sanitizer and fuzzing builds. MOQE_SANITIZE (e.g. "address,undefined" or "thread") instruments
# every target of the tree, moqe's and its tests alike, since a sanitizer needs the whole program.
# MOQE_BUILD_FUZZERS (Clang only) adds libFuzzer's coverage instrumentation to the library and
# builds the targets in fuzz/; it implies address,undefined when MOQE_SANITIZE is empty.
if(MOQE_BUILD_FUZZERS)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "MOQE_BUILD_FUZZERS needs Clang (libFuzzer), not "
                        "${CMAKE_CXX_COMPILER_ID}: configure with -DCMAKE_CXX_COMPILER=clang++")
  endif()
  if(MOQE_SANITIZE STREQUAL "")
    set(MOQE_SANITIZE "address,undefined")
  endif()
endif()

if(NOT MOQE_SANITIZE STREQUAL "")
  # A UBSan report must fail the test or the fuzz run, not scroll past.
  set(_moqe_san -fsanitize=${MOQE_SANITIZE} -fno-omit-frame-pointer)
  if(MOQE_SANITIZE MATCHES "undefined")
    list(APPEND _moqe_san -fno-sanitize-recover=undefined)
  endif()
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:${_moqe_san}>")
  add_link_options(-fsanitize=${MOQE_SANITIZE})
  message(STATUS "moqe: sanitizers ${MOQE_SANITIZE}")
endif()
if(MOQE_BUILD_FUZZERS)
  # Coverage feedback for libFuzzer; only the fuzz targets link its runtime (-fsanitize=fuzzer).
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:-fsanitize=fuzzer-no-link>")
endif()
