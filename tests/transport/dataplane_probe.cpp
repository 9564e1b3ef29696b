// dataplane_probe: sends one dispatch to a running expert worker's data plane, from a process
// outside the cluster, and prints what came back. The e2e security test uses it to check that a
// peer without the cluster token is refused by a real worker.
//
//   dataplane_probe --address HEX [--token T] [--hidden N] [--layer L] [--transports TLS]
//
// HEX is the framed data-plane address the expert worker logs at --log-level debug
// (event=data_plane_listening). The dispatch carries one token whose every slot names no expert
// of the worker (-1), so a worker that accepts it computes nothing.
// Prints one line and exits 0 "served", 3 "error: MESSAGE" (the worker answered with an error),
// 4 "no reply", 2 for bad arguments or a failed connect.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "transport/data_plane.h"

namespace {

using moemesh::transport::DataPlaneOptions;
using moemesh::transport::DispatchClient;
using moemesh::transport::Reply;

int usage(const std::string& why) {
  std::fprintf(stderr,
               "dataplane_probe: %s\nusage: dataplane_probe --address HEX [--token T] "
               "[--hidden N] [--layer L] [--transports TLS]\n",
               why.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string address_hex;
  DataPlaneOptions options;
  long hidden = 64, layer = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage(arg + " needs a value");
    const std::string value = argv[++i];
    if (arg == "--address")
      address_hex = value;
    else if (arg == "--token")
      options.token = value;
    else if (arg == "--transports")
      options.transports = value;
    else if (arg == "--hidden")
      hidden = std::strtol(value.c_str(), nullptr, 10);
    else if (arg == "--layer")
      layer = std::strtol(value.c_str(), nullptr, 10);
    else
      return usage("unknown option " + arg);
  }
  const std::optional<std::string> address = moemesh::transport::address_from_hex(address_hex);
  if (address_hex.empty() || !address)
    return usage("--address must be the worker's address in hex");
  if (hidden <= 0) return usage("--hidden must be positive");

  auto client = DispatchClient::create(options);
  if (!client) return usage("cannot create a data-plane client: " + client.error().message());
  auto peer = (*client)->connect(*address);
  if (!peer) return usage("cannot connect: " + peer.error().message());

  constexpr int32_t kSlots = 2;
  const std::vector<float> x(static_cast<size_t>(hidden), 0.5f);
  const std::vector<int32_t> tokens = {0};
  const std::vector<int32_t> experts(kSlots, -1);
  const std::vector<float> weights(kSlots, 0.5f);
  if (auto st = (*client)->send(*peer, /*epoch=*/0, /*step=*/1, static_cast<int32_t>(layer),
                                /*micro_batch=*/0, /*step_tokens=*/1, x.data(), hidden, tokens,
                                experts.data(), weights.data(), kSlots);
      !st.ok())
    return usage("send failed: " + st.error().message());
  std::string outcome = "no reply";
  int code = 4;
  (*client)->wait(std::chrono::steady_clock::now() + std::chrono::seconds(10), [&](const Reply& r) {
    if (r.error.empty()) {
      outcome = "served";
      code = 0;
    } else {
      outcome = "error: " + std::string(r.error);
      code = 3;
    }
  });
  std::printf("%s\n", outcome.c_str());
  return code;
}
