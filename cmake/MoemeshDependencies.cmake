# Third-party libraries, all from Debian packages (scripts/setup installs them).
find_package(Threads REQUIRED)
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 REQUIRED)
if(MOEMESH_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
