// State shared by the C++ kernels of fusion_ops.native: which backend the Python side forces,
// the environment's choice, and when each op last ran natively (for fusion_ops.last_backend).
#pragma once

#include <cstdint>
#include <string>

namespace fusion_ops_native {

// backend codes (fusion_ops/native/__init__.py: BACKEND_CODES)
enum BackendCode : int64_t { kBackendNone = 0, kBackendReference = 1, kBackendTriton = 2 };

// a CPU kernel may run the reference math itself: nothing but `reference` forced
bool cpu_fast_path_allowed();
// a CUDA kernel may replay a Triton launch: nothing but `triton` forced
bool cuda_fast_path_allowed();
// this op ran natively now, as `backend`
void record_native_run(const std::string& op, int64_t backend);

}  // namespace fusion_ops_native
