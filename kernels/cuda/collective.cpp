// Collectives of a tensor-parallel group: NCCL (loaded at run time) across GPUs, and a group of
// ranks on one GPU that sums through device memory.
#include <dlfcn.h>
#include <nccl.h>

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"

namespace moemesh::kernels::cuda {
namespace {

// ---- NCCL -----------------------------------------------------------------------------------

// The NCCL entry points used here, resolved from libnccl.so.2 once per process.
struct NcclApi {
  ncclResult_t (*comm_init_all)(ncclComm_t*, int, const int*) = nullptr;
  ncclResult_t (*all_reduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                             cudaStream_t) = nullptr;
  ncclResult_t (*comm_destroy)(ncclComm_t) = nullptr;
  ncclResult_t (*comm_abort)(ncclComm_t) = nullptr;
  const char* (*error_string)(ncclResult_t) = nullptr;
  ncclResult_t (*get_version)(int*) = nullptr;
  int version = 0;

  std::string describe(ncclResult_t r) const {
    return std::to_string(static_cast<int>(r)) + " (" + error_string(r) + ")";
  }
};

// The API, or nullptr with *error naming what is missing. Thread-safe.
const NcclApi* nccl_api(std::string* error) {
  static std::mutex mu;
  static NcclApi api;
  static std::string failure;
  static bool tried = false;
  std::lock_guard lock(mu);
  if (!tried) {
    tried = true;
    void* h = nullptr;
    for (const char* name : {"libnccl.so.2", "libnccl.so"})
      if ((h = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!h) {
      failure =
          "NCCL is not installed where this process can load it (libnccl.so.2: " +
          std::string(dlerror()) +
          "): install NCCL (the CUDA toolkit's, or PyTorch's nvidia-nccl wheel) and add its lib "
          "folder to LD_LIBRARY_PATH";
    } else {
      auto sym = [&](auto& fn, const char* name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
        if (!fn && failure.empty())
          failure = std::string("the NCCL library found has no ") + name + ": install NCCL 2.12+";
      };
      sym(api.comm_init_all, "ncclCommInitAll");
      sym(api.all_reduce, "ncclAllReduce");
      sym(api.comm_destroy, "ncclCommDestroy");
      sym(api.comm_abort, "ncclCommAbort");
      sym(api.error_string, "ncclGetErrorString");
      sym(api.get_version, "ncclGetVersion");
      if (failure.empty()) api.get_version(&api.version);
    }
  }
  if (!failure.empty()) {
    if (error) *error = failure;
    return nullptr;
  }
  return &api;
}

// The communicators of one group; destroyed together, from one thread, when the last rank goes.
struct NcclClique {
  const NcclApi* api = nullptr;
  std::vector<ncclComm_t> comms;
  std::mutex mu;
  bool aborted = false;  // guarded by mu
  ~NcclClique() {
    if (aborted) return;  // ncclCommAbort freed them
    for (ncclComm_t c : comms) api->comm_destroy(c);
  }
};

class NcclRank final : public Collective {
 public:
  NcclRank(std::shared_ptr<NcclClique> clique, int rank)
      : clique_(std::move(clique)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(clique_->comms.size()); }
  const char* kind() const override { return "nccl"; }
  std::string all_reduce_sum(float* data, int64_t count, Stream stream) override {
    {
      std::lock_guard lock(clique_->mu);
      if (clique_->aborted) return aborted_message();
    }
    const ncclResult_t r =
        clique_->api->all_reduce(data, data, static_cast<size_t>(count), ncclFloat32, ncclSum,
                                 clique_->comms[rank_], stream);
    if (r != ncclSuccess)
      return "ncclAllReduce on rank " + std::to_string(rank_) + ": NCCL error " +
             clique_->api->describe(r);
    return {};
  }
  void abort() override {
    std::lock_guard lock(clique_->mu);
    if (clique_->aborted) return;
    clique_->aborted = true;
    for (ncclComm_t c : clique_->comms) clique_->api->comm_abort(c);
  }

 private:
  static std::string aborted_message() {
    return "the tensor-parallel group stopped after an error on one of its ranks: restart the "
           "process";
  }
  std::shared_ptr<NcclClique> clique_;
  int rank_;
};

// ---- Ranks on one GPU -------------------------------------------------------------------------

// A reusable barrier that can be broken: arrive() returns false once abort() was called.
class Barrier {
 public:
  explicit Barrier(int size) : size_(size) {}
  bool arrive() {
    std::unique_lock lock(mu_);
    if (aborted_) return false;
    const uint64_t gen = generation_;
    if (++waiting_ == size_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return true;
    }
    cv_.wait(lock, [&] { return generation_ != gen || aborted_; });
    return generation_ != gen;
  }
  void abort() {
    std::lock_guard lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }
  bool aborted() {
    std::lock_guard lock(mu_);
    return aborted_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int size_;
  int waiting_ = 0;          // guarded by mu_
  uint64_t generation_ = 0;  // guarded by mu_
  bool aborted_ = false;     // guarded by mu_
};

struct OneGpuShared {
  explicit OneGpuShared(int size) : barrier(size), slots(static_cast<std::size_t>(size)) {}
  Barrier barrier;
  // Rank r's copy of its array; written by r before the first barrier of a sum, read by all
  // between the two.
  std::vector<const float*> slots;
};

class OneGpuRank final : public Collective {
 public:
  OneGpuRank(std::shared_ptr<OneGpuShared> shared, int rank)
      : shared_(std::move(shared)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(shared_->slots.size()); }
  const char* kind() const override { return "one-gpu"; }
  std::string all_reduce_sum(float* data, int64_t count, Stream stream) override {
    const auto bytes = static_cast<std::size_t>(count) * sizeof(float);
    if (slot_.size() < bytes) {
      std::string e;
      slot_ = DeviceBuffer();
      slot_ = DeviceBuffer::allocate(bytes, &e);
      if (!slot_.data()) return fail(e);
    }
    copy(slot_.data(), data, bytes, stream);
    if (std::string e = synchronize(stream, "all-reduce (one GPU): copy"); !e.empty())
      return fail(e);
    shared_->slots[rank_] = slot_.as<float>();
    if (!shared_->barrier.arrive()) return aborted_message();
    // Every rank adds the slots in rank order: the same bits everywhere.
    copy(data, shared_->slots[0], bytes, stream);
    for (std::size_t r = 1; r < shared_->slots.size(); ++r)
      add(data, shared_->slots[r], count, stream);
    if (std::string e = synchronize(stream, "all-reduce (one GPU): sum"); !e.empty())
      return fail(e);
    if (!shared_->barrier.arrive()) return aborted_message();
    return {};
  }
  void abort() override { shared_->barrier.abort(); }

 private:
  std::string fail(const std::string& e) {
    abort();
    return e;
  }
  static std::string aborted_message() {
    return "the tensor-parallel group stopped after an error on one of its ranks";
  }
  std::shared_ptr<OneGpuShared> shared_;
  int rank_;
  DeviceBuffer slot_;  // this rank's thread only
};

}  // namespace

std::vector<std::unique_ptr<Collective>> nccl_group(const std::vector<int>& devices,
                                                    std::string* error) {
  std::vector<std::unique_ptr<Collective>> ranks;
  const NcclApi* api = nccl_api(error);
  if (!api) return ranks;
  auto clique = std::make_shared<NcclClique>();
  clique->api = api;
  clique->comms.resize(devices.size());
  const ncclResult_t r =
      api->comm_init_all(clique->comms.data(), static_cast<int>(devices.size()), devices.data());
  if (r != ncclSuccess) {
    clique->comms.clear();
    if (error)
      *error = "NCCL (version " + std::to_string(api->version) +
               ") could not make a communicator over " + std::to_string(devices.size()) +
               " GPUs: error " + api->describe(r) + " (one rank per GPU; each device once)";
    return ranks;
  }
  for (std::size_t i = 0; i < devices.size(); ++i)
    ranks.push_back(std::make_unique<NcclRank>(clique, static_cast<int>(i)));
  return ranks;
}

std::vector<std::unique_ptr<Collective>> one_gpu_group(int size) {
  auto shared = std::make_shared<OneGpuShared>(size);
  std::vector<std::unique_ptr<Collective>> ranks;
  for (int i = 0; i < size; ++i) ranks.push_back(std::make_unique<OneGpuRank>(shared, i));
  return ranks;
}

}  // namespace moemesh::kernels::cuda
