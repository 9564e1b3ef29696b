# The CUDA backend switch. AUTO turns it on when a CUDA compiler is found (the toolkit lives in
# /usr/local/cuda on the project's machines); ON insists on it; OFF skips it. CUDA code must compile
# on machines without a GPU: tests that need one skip at run time.
set(MOEMESH_HAVE_CUDA OFF)
if(NOT MOEMESH_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 80 90a)
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)  # CUDA::cudart_static, CUDA::cublas, for every folder
    set(MOEMESH_HAVE_CUDA ON)
  elseif(MOEMESH_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOEMESH_CUDA=ON but no CUDA compiler was found; install the CUDA toolkit "
                        "or configure with -DMOEMESH_CUDA=OFF")
  endif()
endif()
message(STATUS "moemesh: CUDA backend ${MOEMESH_HAVE_CUDA} (MOEMESH_CUDA=${MOEMESH_CUDA})")
