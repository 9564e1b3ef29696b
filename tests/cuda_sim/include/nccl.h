// NCCL's types for the CUDA simulator (tests/cuda_sim): kernels/cuda loads NCCL at run time, and
// the simulator has none to give it, so only the declarations are here.
#pragma once

#include "cuda_runtime.h"

enum ncclResult_t { ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2 };
enum ncclDataType_t { ncclFloat32 = 7, ncclFloat = 7 };
enum ncclRedOp_t { ncclSum = 0 };
struct ncclComm;
using ncclComm_t = ncclComm*;
