# libFuzzer builds (MOEMESH_FUZZ=ON): every target of the tree is compiled with clang's coverage
# instrumentation for libFuzzer plus AddressSanitizer and UndefinedBehaviorSanitizer, so that the
# fuzz targets of tests/fuzz/ see coverage of the project's parsers and stop on the first memory
# error or undefined behaviour. scripts/fuzz configures and runs such a build; docs/hardening.md
# describes it.
if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang" OR NOT CMAKE_C_COMPILER_ID STREQUAL "Clang")
  message(FATAL_ERROR
    "MOEMESH_FUZZ=ON needs clang with libFuzzer, but this build uses ${CMAKE_CXX_COMPILER_ID} "
    "(${CMAKE_CXX_COMPILER}). Configure a fresh build directory with "
    "-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ (Debian packages clang and "
    "libclang-rt-dev), or run scripts/fuzz, which does that.")
endif()
if(MOEMESH_SANITIZE)
  message(FATAL_ERROR "MOEMESH_FUZZ=ON sets its own sanitizers (address,undefined); configure it "
                      "without MOEMESH_SANITIZE (got \"${MOEMESH_SANITIZE}\")")
endif()
if(MOEMESH_HAVE_CUDA)
  message(FATAL_ERROR "MOEMESH_FUZZ=ON needs -DMOEMESH_CUDA=OFF (nvcc does not take libFuzzer's "
                      "instrumentation)")
endif()

# libFuzzer's runtime ships in Debian's libclang-rt-<version>-dev: check that it links.
include(CheckCXXSourceCompiles)
set(CMAKE_REQUIRED_FLAGS "-fsanitize=fuzzer")
check_cxx_source_compiles([=[
#include <cstddef>
#include <cstdint>
extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }
]=] MOEMESH_HAVE_LIBFUZZER)
unset(CMAKE_REQUIRED_FLAGS)
if(NOT MOEMESH_HAVE_LIBFUZZER)
  message(FATAL_ERROR "MOEMESH_FUZZ=ON: ${CMAKE_CXX_COMPILER} cannot link -fsanitize=fuzzer; install "
                      "libFuzzer's runtime (Debian: libclang-rt-dev)")
endif()

set(MOEMESH_FUZZ_SANITIZERS address,undefined)
add_compile_options(
  $<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=fuzzer-no-link,${MOEMESH_FUZZ_SANITIZERS}>
  $<$<COMPILE_LANGUAGE:C,CXX>:-fno-sanitize-recover=undefined>
  $<$<COMPILE_LANGUAGE:C,CXX>:-fno-omit-frame-pointer>
  $<$<COMPILE_LANGUAGE:C,CXX>:-g>)
add_link_options(-fsanitize=${MOEMESH_FUZZ_SANITIZERS})
message(STATUS "moemesh: libFuzzer targets on (tests/fuzz), sanitizers ${MOEMESH_FUZZ_SANITIZERS}")
