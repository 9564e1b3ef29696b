# Third-party libraries, all from Debian packages (scripts/setup installs them).
find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 REQUIRED)
find_package(Boost 1.74 REQUIRED)  # Beast and Asio, header-only
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(UTF8PROC REQUIRED IMPORTED_TARGET libutf8proc)
find_package(CAF REQUIRED)
find_package(Protobuf REQUIRED)
if(MOEMESH_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
# UCX (libucx-dev) for the data plane of transport/.
pkg_check_modules(UCX REQUIRED IMPORTED_TARGET ucx)
