// Role processes started by `moemesh serve`: this same binary re-executed with a role subcommand
// (so `ps` shows `moemesh expert ...`), with the cluster token in the environment (never on the
// command line). Each child leads its own process group, so a signal to serve's group (Ctrl-C in
// a terminal, `kill -- -PGID`) reaches serve alone: serve drains its requests and then stops the
// children itself. A child receives SIGINT (leave at once) if serve dies.
//
// Threads: one reaper thread waits for children and logs each exit; the rest is called from the
// main thread.
#pragma once

#include <sys/types.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"

namespace moemesh::apps {

class Children {
 public:
  Children();
  ~Children();  // stop_all(5 s)

  // Starts `moemesh ARGS...` with extra environment variables; returns its pid.
  Expected<pid_t> start(const std::vector<std::string>& args,
                        const std::map<std::string, std::string>& env);
  // SIGTERM to every child still running, then SIGKILL to those left after `grace`.
  void stop_all(std::chrono::milliseconds grace);
  int running() const;
  // The first child that exited with a non-zero status or a signal: "pid=... cmd=... status=..".
  std::string first_failure() const;

 private:
  void reap();
  mutable std::mutex mu_;  // guards running_, first_failure_
  std::map<pid_t, std::string> running_;
  std::string first_failure_;
  std::thread reaper_;
  bool stopping_ = false;
};

}  // namespace moemesh::apps
