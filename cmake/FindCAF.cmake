# CAF 0.17 (Debian libcaf-dev) ships no CMake package: find it by hand and wrap it in the
# imported targets CAF::core and CAF::io. Versions 0.17.5 <= v < 0.18 are accepted.
find_path(CAF_INCLUDE_DIR caf/all.hpp)
find_library(CAF_CORE_LIBRARY caf_core)
find_library(CAF_IO_LIBRARY caf_io)
if(CAF_INCLUDE_DIR AND EXISTS "${CAF_INCLUDE_DIR}/caf/config.hpp")
  file(STRINGS "${CAF_INCLUDE_DIR}/caf/config.hpp" _caf_version_line REGEX "#define CAF_VERSION [0-9]+")
  string(REGEX MATCH "[0-9]+" CAF_VERSION_NUMBER "${_caf_version_line}")
endif()
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(CAF REQUIRED_VARS CAF_INCLUDE_DIR CAF_CORE_LIBRARY CAF_IO_LIBRARY
                                  CAF_VERSION_NUMBER)
if(CAF_FOUND)
  if(CAF_VERSION_NUMBER LESS 1705 OR NOT CAF_VERSION_NUMBER LESS 1800)
    message(FATAL_ERROR "moemesh needs CAF 0.17.5 or later 0.17.x (found CAF_VERSION ${CAF_VERSION_NUMBER}); "
                        "install Debian's libcaf-dev")
  endif()
  if(NOT TARGET CAF::core)
    add_library(CAF::core UNKNOWN IMPORTED)
    set_target_properties(CAF::core PROPERTIES IMPORTED_LOCATION "${CAF_CORE_LIBRARY}"
                          INTERFACE_INCLUDE_DIRECTORIES "${CAF_INCLUDE_DIR}"
                          INTERFACE_LINK_LIBRARIES Threads::Threads)
    add_library(CAF::io UNKNOWN IMPORTED)
    set_target_properties(CAF::io PROPERTIES IMPORTED_LOCATION "${CAF_IO_LIBRARY}"
                          INTERFACE_LINK_LIBRARIES CAF::core)
  endif()
endif()
