// Internal: the operations console. One page (gateway/console/console.html, compiled into the
// binary) polls /admin/cluster and /admin/experts and draws the topology, the expert-load heatmap,
// balancedness per layer, throughput and latency, and offers the admin actions. Chart.js comes
// from the Debian package libjs-chart.js and is served by the gateway: nothing is fetched from the
// network at run time.
#pragma once

#include <string>
#include <string_view>

#include "core/error.h"

namespace moemesh::gateway {

std::string_view console_html();

// Reads `file` from `dir` (the console's assets); the error says which package provides it.
Expected<std::string> console_asset(const std::string& dir, const std::string& file);

}  // namespace moemesh::gateway
