// mos's shim over libtorch's c10d: see shim.h and docs/distributed.md.
// It only creates stores and process groups and calls c10d::Backend's virtual
// collectives; it never touches a gloo object (see gloo_decl/gloo/README.md).
#include "shim.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

// When a peer dies, c10d's TCPStore client logs a warning on every surviving rank
// with the socket error's C++ stack trace (a dozen frames), before mos reports the
// lost rank in its one Error: line. So, once per process: c10 errors carry no C++
// stack trace (unless TORCH_SHOW_CPP_STACKTRACES=1), and libtorch's C++ log shows
// errors only (unless TORCH_CPP_LOG_LEVEL is set).
void quiet_cpp_diagnostics() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* show = std::getenv("TORCH_SHOW_CPP_STACKTRACES");
    if (show == nullptr || std::strcmp(show, "1") != 0) {
      c10::SetStackTraceFetcher([]() -> std::string { return std::string(); });
    }
    if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) {
      FLAGS_caffe2_log_level = std::max(FLAGS_caffe2_log_level, 2);
    }
  });
}

using BackendPtr = c10::intrusive_ptr<c10d::Backend>;
using StorePtr = c10::intrusive_ptr<c10d::Store>;

void set_error(char** err, const std::string& msg) {
  if (err != nullptr) {
    *err = strdup(msg.c_str());
  }
}

template <typename F>
int guarded(char** err, F f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, e.what());
  } catch (...) {
    set_error(err, "unknown C++ exception in c10d");
  }
  return -1;
}

void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait()) {
    auto e = work->exception();
    if (e) {
      std::rethrow_exception(e);
    }
    throw std::runtime_error("c10d work did not complete");
  }
}

} // namespace

extern "C" {

void mos_dist_free_string(char* s) {
  free(s);
}

void* mos_store_new(const char* host, int port, int is_server, int num_workers,
                    int64_t timeout_ms, char** err) {
  StorePtr* out = nullptr;
  guarded(err, [&] {
    quiet_cpp_diagnostics();
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    if (num_workers > 0) {
      opts.numWorkers = static_cast<std::size_t>(num_workers);
      opts.waitWorkers = true;
    } else {
      opts.waitWorkers = false;
    }
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    StorePtr store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    out = new StorePtr(std::move(store));
  });
  return out;
}

int64_t mos_store_add(void* store, const char* key, int64_t delta, char** err) {
  int64_t value = -1;
  if (guarded(err, [&] { value = (*static_cast<StorePtr*>(store))->add(key, delta); }) != 0) {
    return -1;
  }
  return value;
}

int mos_store_set(void* store, const char* key, const uint8_t* data, int64_t len, char** err) {
  return guarded(err, [&] {
    std::vector<uint8_t> value(data, data + len);
    (*static_cast<StorePtr*>(store))->set(key, value);
  });
}

int64_t mos_store_get(void* store, const char* key, uint8_t** out, char** err) {
  int64_t len = -1;
  *out = nullptr;
  int rc = guarded(err, [&] {
    std::vector<uint8_t> value = (*static_cast<StorePtr*>(store))->get(key);
    // malloc(0) may return NULL: one byte more.
    auto* buf = static_cast<uint8_t*>(malloc(value.size() + 1));
    if (buf == nullptr) {
      throw std::bad_alloc();
    }
    if (!value.empty()) {
      memcpy(buf, value.data(), value.size());
    }
    *out = buf;
    len = static_cast<int64_t>(value.size());
  });
  return rc == 0 ? len : -1;
}

int mos_store_delete(void* store, const char* key, char** err) {
  return guarded(err, [&] { (*static_cast<StorePtr*>(store))->deleteKey(key); });
}

void mos_store_free(void* store) {
  try {
    delete static_cast<StorePtr*>(store);
  } catch (...) {
  }
}

void* mos_pg_new_gloo(void* store, int rank, int size, int64_t timeout_ms, char** err) {
  BackendPtr* out = nullptr;
  guarded(err, [&] {
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    // As torch.distributed: GLOO_SOCKET_IFNAME names the interface(s), else the
    // address the host name resolves to (loopback as a fallback).
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && ifname[0] != '\0') {
      std::string names(ifname);
      size_t start = 0;
      while (start <= names.size()) {
        size_t end = names.find(',', start);
        if (end == std::string::npos) {
          end = names.size();
        }
        if (end > start) {
          opts->devices.push_back(
              c10d::ProcessGroupGloo::createDeviceForInterface(names.substr(start, end - start)));
        }
        start = end + 1;
      }
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    BackendPtr pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        *static_cast<StorePtr*>(store), rank, size, opts);
    out = new BackendPtr(std::move(pg));
  });
  return out;
}

int mos_pg_allreduce_sum(void* pg, void* tensor, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    wait((*static_cast<BackendPtr*>(pg))->allreduce(tensors, opts));
  });
}

int mos_pg_broadcast(void* pg, void* tensor, int root, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait((*static_cast<BackendPtr*>(pg))->broadcast(tensors, opts));
  });
}

int mos_pg_barrier(void* pg, char** err) {
  return guarded(err, [&] { wait((*static_cast<BackendPtr*>(pg))->barrier()); });
}

void mos_pg_free(void* pg) {
  try {
    delete static_cast<BackendPtr*>(pg);
  } catch (...) {
  }
}

#ifndef MOS_WITH_NCCL
void* mos_pg_new_nccl(void*, int, int, int, int64_t, char** err) {
  set_error(err, "this mos was built without NCCL (build.rs found no nccl.h and CUDA headers)");
  return nullptr;
}
#endif

} // extern "C"
