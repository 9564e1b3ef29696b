#include "actors/node.h"

#include <gtest/gtest.h>
#include <stdlib.h>

namespace moemesh::actors {
namespace {

TEST(ParseHostPort, AcceptsHostsAndBracketedIpv6) {
  auto a = parse_host_port("127.0.0.1:7100", "--join");
  ASSERT_TRUE(a) << a.error().message();
  EXPECT_EQ(a->first, "127.0.0.1");
  EXPECT_EQ(a->second, 7100);
  auto b = parse_host_port("node-3.example:65535", "--join");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->first, "node-3.example");
  auto c = parse_host_port("[::1]:80", "--join");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->first, "::1");
  EXPECT_EQ(c->second, 80);
}

TEST(ParseHostPort, RejectsWhatIsNotHostColonPortNamingTheFlag) {
  for (const char* bad :
       {"", "7100", ":7100", "host:", "host:0", "host:65536", "host:12x", "host:-1"}) {
    auto r = parse_host_port(bad, "--join");
    ASSERT_FALSE(r) << bad;
    EXPECT_NE(r.error().message().find("--join"), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find("HOST:PORT"), std::string::npos);
  }
}

TEST(ClusterToken, FlagFirstThenEnvironment) {
  setenv("MOEMESH_CLUSTER_TOKEN", "from-env", 1);
  EXPECT_EQ(cluster_token_from("from-flag"), "from-flag");
  EXPECT_EQ(cluster_token_from(""), "from-env");
  unsetenv("MOEMESH_CLUSTER_TOKEN");
  EXPECT_EQ(cluster_token_from(""), "");
}

}  // namespace
}  // namespace moemesh::actors
