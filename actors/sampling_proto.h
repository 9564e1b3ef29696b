// Conversions between core's SamplingParams and its wire form in proto/engine.proto.
#pragma once

#include "core/sampling.h"
#include "proto/engine.pb.h"

namespace moemesh {

SamplingParams from_proto(const proto::SamplingParams& p);
proto::SamplingParams to_proto(const SamplingParams& p);

}  // namespace moemesh
