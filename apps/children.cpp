#include "apps/children.h"

#include <fmt/format.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

extern char** environ;

namespace moemesh::apps {

Children::Children() {
  reaper_ = std::thread([this] { reap(); });
}

Children::~Children() {
  stop_all(std::chrono::seconds(5));
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  reaper_.join();
}

Expected<pid_t> Children::start(const std::vector<std::string>& args,
                                const std::map<std::string, std::string>& env) {
  char exe[4096] = {};
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return Error("cannot find this executable (/proc/self/exe) to start a role process");
  std::vector<std::string> argv_s = {"moemesh"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<std::string> env_s;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    if (!env.count(kv.substr(0, kv.find('=')))) env_s.push_back(kv);
  }
  for (const auto& [k, v] : env) env_s.push_back(k + "=" + v);
  std::vector<char*> argv, envp;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);

  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return Error(fmt::format("cannot start a role process: fork: {}", strerror(errno)));
  if (pid == 0) {
    // The child: its own process group (see children.h), default signal mask, SIGINT when serve
    // dies (nobody is left to drain for), then the role.
    setpgid(0, 0);
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, nullptr);
    prctl(PR_SET_PDEATHSIG, SIGINT);
    if (getppid() != parent) _exit(1);
    execve(exe, argv.data(), envp.data());
    _exit(127);
  }
  // Also here, so that no signal to serve's group can reach the child before its own setpgid()
  // (EACCES once it has exec'd: then it already has its group).
  setpgid(pid, pid);
  std::string line;
  for (const auto& a : argv_s) line += (line.empty() ? "" : " ") + a;
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_[pid] = line;
  }
  spdlog::info("started pid={} cmd=\"{}\"", pid, line);
  return pid;
}

void Children::reap() {
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_ && running_.empty()) return;
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      continue;
    }
    std::string cmd;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = running_.find(pid);
      if (it == running_.end()) continue;
      cmd = it->second;
      running_.erase(it);
    }
    if (WIFSIGNALED(status) || WEXITSTATUS(status) != 0) {
      std::lock_guard<std::mutex> lock(mu_);
      if (first_failure_.empty())
        first_failure_ = fmt::format(
            "\"{}\" {}", cmd,
            WIFSIGNALED(status) ? fmt::format("was killed by signal {}", WTERMSIG(status))
                                : fmt::format("exited with status {}", WEXITSTATUS(status)));
    }
    if (WIFSIGNALED(status))
      spdlog::warn("role process pid={} cmd=\"{}\" killed by signal {}", pid, cmd,
                   WTERMSIG(status));
    else if (WEXITSTATUS(status) != 0)
      spdlog::warn("role process pid={} cmd=\"{}\" exited with status {}", pid, cmd,
                   WEXITSTATUS(status));
    else
      spdlog::info("role process pid={} exited", pid);
  }
}

void Children::stop_all(std::chrono::milliseconds grace) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // SIGINT: leave now. (SIGTERM would make an expert worker drain first, which is for scaling
    // the pool down, not for stopping the whole cluster.)
    for (const auto& [pid, cmd] : running_) kill(pid, SIGINT);
  }
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (running() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [pid, cmd] : running_) {
    spdlog::warn("role process pid={} did not stop in time: SIGKILL", pid);
    kill(pid, SIGKILL);
  }
}

std::string Children::first_failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return first_failure_;
}

int Children::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(running_.size());
}

}  // namespace moemesh::apps
