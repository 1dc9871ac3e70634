// fusion_ops.native's shared state (native_common.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "native_common.h"

namespace fusion_ops_native {
namespace {

std::atomic<int64_t> api_forced{kBackendNone};  // set_backend / use_backend
std::mutex runs_mutex;
std::unordered_map<std::string, std::pair<int64_t, int64_t>> last_runs;  // op -> (ns, backend)

int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// FUSION_OPS_BACKEND as fusion_ops.backends._parse_env reads it (blanks stripped, any case):
// unset, "" or "auto": none; a backend's name: its code; anything else: -1 (the Python side
// raises its error)
int64_t env_forced() {
  const char* raw = std::getenv("FUSION_OPS_BACKEND");
  if (raw == nullptr) return kBackendNone;
  const char* end = raw + std::strlen(raw);
  while (raw < end && std::isspace(static_cast<unsigned char>(*raw))) ++raw;
  while (end > raw && std::isspace(static_cast<unsigned char>(end[-1]))) --end;
  std::string env(raw, end);
  for (char& c : env) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (env.empty() || env == "auto") return kBackendNone;
  if (env == "reference") return kBackendReference;
  if (env == "triton") return kBackendTriton;
  return -1;
}

bool allows(int64_t backend) {
  const int64_t api = api_forced.load(std::memory_order_relaxed);
  if (api != kBackendNone) return api == backend;  // the API wins over the variable
  const int64_t env = env_forced();
  return env == kBackendNone || env == backend;
}

void set_forced(int64_t code) { api_forced.store(code); }

std::tuple<int64_t, int64_t> last_native_run(std::string op) {
  std::lock_guard<std::mutex> g(runs_mutex);
  auto it = last_runs.find("fusion_ops::" + op);
  return it == last_runs.end() ? std::make_tuple(int64_t{0}, int64_t{kBackendNone})
                               : std::make_tuple(it->second.first, it->second.second);
}

}  // namespace

bool cpu_fast_path_allowed() { return allows(kBackendReference); }
// FUSION_OPS_CHECK_INDICES=1 (fusion_ops.checks): the Python kernels read the index tensors'
// values (a sync per check), which a replay would skip
bool cuda_fast_path_allowed() {
  const char* checks = std::getenv("FUSION_OPS_CHECK_INDICES");
  return allows(kBackendTriton) && !(checks != nullptr && std::strcmp(checks, "1") == 0);
}

void record_native_run(const std::string& op, int64_t backend) {
  const int64_t now = monotonic_ns();
  std::lock_guard<std::mutex> g(runs_mutex);
  last_runs[op] = {now, backend};
}

}  // namespace fusion_ops_native

TORCH_LIBRARY(fusion_ops_native, m) {
  // code: fusion_ops/native/__init__.py BACKEND_CODES (any other backend: a code of its own)
  m.def("set_forced(int code) -> ()", &fusion_ops_native::set_forced);
  m.def("last_native_run(str op) -> (int, int)", &fusion_ops_native::last_native_run);
}
