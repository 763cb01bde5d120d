// The NCCL half of mos's c10d shim (compiled only when build.rs finds nccl.h, the CUDA
// headers and libtorch_cuda.so): a ProcessGroupNCCL on one device per process.
#include "shim.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

extern "C" void* mos_pg_new_nccl(void* store, int rank, int size, int device,
                                 int64_t timeout_ms, char** err) {
  try {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Backend> pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        *static_cast<c10::intrusive_ptr<c10d::Store>*>(store), rank, size, opts);
    return new c10::intrusive_ptr<c10d::Backend>(std::move(pg));
  } catch (const c10::Error& e) {
    *err = strdup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = strdup(e.what());
  } catch (...) {
    *err = strdup("unknown C++ exception in ProcessGroupNCCL");
  }
  return nullptr;
}
