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
//     library through fusion_ops_native::set_forced).
// Anything else (bad input, a forced backend) goes to the op's Python kernel, registered as the
// hidden op fusion_ops::_python_<name>, which raises the op's usual messages or runs the forced
// backend. Each fast-path run stores its CLOCK_MONOTONIC time so that
// fusion_ops.last_backend() can tell whether the C++ or the Python kernel ran last.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "native_common.h"

namespace {

using fusion_ops_native::cpu_fast_path_allowed;
using fusion_ops_native::record_native_run;

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
  if (!(quick_norm(x, weight, eps) && cpu_fast_path_allowed())) {
    static auto python_kernel = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("fusion_ops::_python_rms_norm", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
    return python_kernel.call(x, weight, eps);
  }
  at::Tensor y = normalize(x.to(at::kFloat), weight, eps, x.scalar_type());
  record_native_run("fusion_ops::rms_norm", fusion_ops_native::kBackendReference);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x,
                                                          const at::Tensor& residual,
                                                          const at::Tensor& weight, double eps) {
  if (!(quick_add_norm(x, residual, weight, eps) && cpu_fast_path_allowed())) {
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
  record_native_run("fusion_ops::fused_add_rms_norm", fusion_ops_native::kBackendReference);
  return {y, residual_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusion_ops, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm_cpu);
}
