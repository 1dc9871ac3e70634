// CPU kernels of fusion_ops::rms_norm and fusion_ops::fused_add_rms_norm in C++.
//
// Why: a Python kernel costs the op call its interpreter time (argument filling, validation,
// backend selection, and ~2 us per ATen call made from Python on a 2-core host). These kernels
// run the reference math (fusion_ops/reference/norm.py) as the same ATen calls in the same
// order, so their bytes are the reference's by construction; only the Python around them is
// gone.
//
// They take the fast path only when it gives what the Python kernel would give:
//   * every check of the op's validation passes (the same one-expression test as the op's
//     Python `quick` check in fusion_ops/library.py);
//   * no backend other than `reference` is forced (FUSION_OPS_BACKEND unset, "", "auto" or
//     "reference", and no set_backend/use_backend override: fusion_ops/backends.py tells this
//     library through fusion_ops_native::set_python_forced).
// Anything else (bad input, a forced backend) goes to the op's Python kernel, registered as the
// hidden op fusion_ops::_python_<name>, which raises the op's usual messages or runs the forced
// backend. Each fast-path run stores its CLOCK_MONOTONIC time so that
// fusion_ops.last_backend() can tell whether the C++ or the Python kernel ran last.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace {

enum NativeOp : int64_t { kRmsNorm = 0, kFusedAddRmsNorm = 1, kNumOps = 2 };

std::atomic<bool> python_forced{false};
std::atomic<int64_t> last_run_ns[kNumOps];

int64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// FUSION_OPS_BACKEND allows the reference backend: unset, blank, "auto" or "reference" (any
// case, surrounding blanks ignored), as fusion_ops.backends._parse_env reads it.
bool env_allows_reference() {
  const char* raw = std::getenv("FUSION_OPS_BACKEND");
  if (raw == nullptr) return true;
  const char* end = raw + std::strlen(raw);
  while (raw < end && std::isspace(static_cast<unsigned char>(*raw))) ++raw;
  while (end > raw && std::isspace(static_cast<unsigned char>(end[-1]))) --end;
  std::string env(raw, end);
  for (char& c : env) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return env.empty() || env == "auto" || env == "reference";
}

bool fast_path_allowed() {
  return !python_forced.load(std::memory_order_relaxed) && env_allows_reference();
}

bool is_float(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat;
}

// fusion_ops.library._quick_norm
bool quick_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return is_float(x.scalar_type()) && is_float(weight.scalar_type()) && weight.dim() == 1 &&
         x.dim() >= 1 && weight.size(0) == x.size(-1) && eps >= 0 &&
         weight.device() == x.device();
}

// fusion_ops.library._quick_add_norm
bool quick_add_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                    double eps) {
  return quick_norm(x, weight, eps) && residual.scalar_type() == x.scalar_type() &&
         residual.sizes() == x.sizes() && residual.device() == x.device();
}

// fusion_ops.reference.norm._normalize (weight_after_rounding=False):
//   (xf * rsqrt(mean(xf^2, -1, keepdim) + eps) * weight.float()).to(dtype)
at::Tensor normalize(const at::Tensor& xf, const at::Tensor& weight, double eps,
                     at::ScalarType dtype) {
  at::Tensor n = xf * at::rsqrt(xf.square().mean({-1}, /*keepdim=*/true) + eps);
  return (n * weight.to(at::kFloat)).to(dtype);
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (!(quick_norm(x, weight, eps) && fast_path_allowed())) {
    static auto python_kernel = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("fusion_ops::_python_rms_norm", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
    return python_kernel.call(x, weight, eps);
  }
  at::Tensor y = normalize(x.to(at::kFloat), weight, eps, x.scalar_type());
  last_run_ns[kRmsNorm].store(monotonic_ns(), std::memory_order_relaxed);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x,
                                                          const at::Tensor& residual,
                                                          const at::Tensor& weight, double eps) {
  if (!(quick_add_norm(x, residual, weight, eps) && fast_path_allowed())) {
    static auto python_kernel =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusion_ops::_python_fused_add_rms_norm", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, double)>();
    return python_kernel.call(x, residual, weight, eps);
  }
  // fusion_ops.reference.norm.fused_add_rms_norm (both flags False)
  at::Tensor total = x.to(at::kFloat) + residual.to(at::kFloat);
  at::Tensor residual_out = total.to(x.scalar_type());
  at::Tensor y = normalize(residual_out.to(at::kFloat), weight, eps, x.scalar_type());
  last_run_ns[kFusedAddRmsNorm].store(monotonic_ns(), std::memory_order_relaxed);
  return {y, residual_out};
}

void set_python_forced(bool forced) { python_forced.store(forced); }

int64_t last_native_run_ns(int64_t op) {
  TORCH_CHECK_INDEX(op >= 0 && op < kNumOps, "fusion_ops_native.last_native_run_ns: op index ",
                    op, " out of range [0, ", static_cast<int64_t>(kNumOps), ")");
  return last_run_ns[op].load(std::memory_order_relaxed);
}

}  // namespace

TORCH_LIBRARY(fusion_ops_native, m) {
  m.def("set_python_forced(bool forced) -> ()", &set_python_forced);
  m.def("last_native_run_ns(int op) -> int", &last_native_run_ns);
}

TORCH_LIBRARY_IMPL(fusion_ops, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
}
