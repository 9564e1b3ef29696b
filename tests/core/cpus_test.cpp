#include <gtest/gtest.h>

#include <numeric>

#include "core/cpus.h"

namespace moemesh {
namespace {

CpuList range(int first, int last) {
  CpuList out(last - first + 1);
  std::iota(out.begin(), out.end(), first);
  return out;
}

TEST(CpuList, ParsesNumbersAndRangesAsTasksetWritesThem) {
  const CpuList all = range(0, 15);
  Expected<CpuList> l = parse_cpu_list("0-3,8,10-11", all);
  ASSERT_TRUE(l) << l.error().message();
  EXPECT_EQ(*l, (CpuList{0, 1, 2, 3, 8, 10, 11}));
  l = parse_cpu_list(" 3, 1,1-2 ", all);  // unsorted, repeated, spaced
  ASSERT_TRUE(l) << l.error().message();
  EXPECT_EQ(*l, (CpuList{1, 2, 3}));
  EXPECT_EQ(format_cpu_list({0, 1, 2, 3, 8, 10, 11}), "0-3,8,10-11");
  EXPECT_EQ(format_cpu_list({5}), "5");
  EXPECT_EQ(format_cpu_list({}), "");
}

TEST(CpuList, RefusesMalformedListsAndCpusOutsideTheAllowedOnes) {
  const CpuList allowed = {0, 1, 2, 3};
  for (const char* bad : {"", "a", "3-1", "-1", "1-", "1,,2", "0x1", "1.5"}) {
    Expected<CpuList> l = parse_cpu_list(bad, allowed, "--cpus");
    ASSERT_FALSE(l) << "'" << bad << "' was accepted";
    EXPECT_NE(l.error().message().find("--cpus"), std::string::npos) << l.error().message();
  }
  Expected<CpuList> l = parse_cpu_list("2-5", allowed);
  ASSERT_FALSE(l);
  EXPECT_NE(l.error().message().find("CPU 4 is not one this process may use (0-3)"),
            std::string::npos)
      << l.error().message();
}

TEST(RoleCpus, AutoGivesEveryRoleItsOwnBlockTheRemainderToTheAttentionWorkersFirst) {
  Expected<std::vector<CpuList>> p = plan_role_cpus("auto", range(0, 15), 1, 2);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(*p, (std::vector<CpuList>{range(0, 5), range(6, 10), range(11, 15)}));

  p = plan_role_cpus("auto", range(0, 9), 2, 2);  // 10 CPUs, 4 roles: 3, 3, 2, 2
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(*p, (std::vector<CpuList>{range(0, 2), range(3, 5), range(6, 7), range(8, 9)}));

  p = plan_role_cpus("auto", {0, 2, 4, 6}, 1, 2);  // the allowed CPUs, whatever their numbers
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(*p, (std::vector<CpuList>{{0, 2}, {4}, {6}}));
}

TEST(RoleCpus, AutoWithFewerCpusThanRolesBindsNothing) {
  Expected<std::vector<CpuList>> p = plan_role_cpus("auto", {0, 1}, 1, 2);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_TRUE(p->empty());
  p = plan_role_cpus("auto", {0, 1, 2}, 1, 2);  // as many CPUs as roles: one each
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(*p, (std::vector<CpuList>{{0}, {1}, {2}}));
}

TEST(RoleCpus, NobindBindsNothing) {
  Expected<std::vector<CpuList>> p = plan_role_cpus("nobind", range(0, 3), 1, 2);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_TRUE(p->empty());
}

TEST(RoleCpus, ExplicitListsOnePerRoleAttentionWorkersFirst) {
  Expected<std::vector<CpuList>> p = plan_role_cpus("0-7|8-11|12-15", range(0, 15), 1, 2);
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(*p, (std::vector<CpuList>{range(0, 7), range(8, 11), range(12, 15)}));

  p = plan_role_cpus("0-7|8-15", range(0, 15), 1, 2);
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().message().find("2 CPU lists for 3 role processes"), std::string::npos)
      << p.error().message();
  p = plan_role_cpus("0|1|16", range(0, 15), 1, 2);
  ASSERT_FALSE(p);
  EXPECT_NE(p.error().message().find("CPU 16"), std::string::npos) << p.error().message();
  p = plan_role_cpus("0|1|", range(0, 15), 1, 2);
  ASSERT_FALSE(p);
}

}  // namespace
}  // namespace moemesh
