// CUDA kernels of the Triton-backed norm/quant ops, in C++: each call replays the launch that
// the op's Python kernel made for the same argument signature.
//
// Why: on a GPU the op's Python kernel (argument filling, validation, backend selection,
// output allocation, Triton's specialization key and launcher) costs tens of microseconds of
// host time per call, several times a decode-size kernel.
//
// How: an op's CUDA key runs `replay_kernel` (boxed, one function for every registered op).
// It builds the call's *signature*: every tensor's dtype, device, sizes, strides and 16-byte
// alignment, and the value of every int/bool/string/None argument (floats excepted). The first call of
// a signature runs the op's Python kernel (the hidden op fusion_ops::_python_<name>), which
// validates the input and launches the Triton kernel as always; while it runs, the Python side
// records what it did (fusion_ops/native/__init__.py: record_plan) and offers a *plan*: the
// output tensors' dtypes and sizes, and for each launch the CUfunction, grid, warps, shared
// memory, PDL flag and where every kernel parameter comes from (an input's or an output's data
// pointer, a constant, or a float argument of the call: told apart by dry runs of the Python
// kernel with each float changed). Everything in a plan is a function of
// the signature, so a later call with the same signature is valid input too and gets the same
// launches: this kernel allocates the outputs and launches with cuLaunchKernelEx itself.
// A signature whose Python run did anything else (an aten op other than allocations and views,
// a launch that did not go through the recorder, a parameter whose source is ambiguous) gets no
// plan and always runs the Python kernel.
//
// The fast path is taken only where the Python kernel would run Triton too: no backend other
// than `triton` forced (FUSION_OPS_BACKEND read per call, the API's override forwarded by
// set_forced), no index-value checks asked for (FUSION_OPS_CHECK_INDICES=1: the Python kernel
// runs them) and float arguments at or above the plan's float_min (the registered ops' floats
// are eps values; the plan's Python side sets the value from which its launches hold).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#ifdef FUSION_OPS_HAVE_CUDA_H
#include <cuda.h>
#endif

#include "native_common.h"

namespace fusion_ops_native {
namespace {

// parameter sources (fusion_ops/native/__init__.py: PARAM_* use the same numbers)
enum ParamKind : int64_t {
  kInputPtr = 0,   // a: stack index of a tensor argument
  kOutputPtr = 1,  // a: output index
  kI32 = 2,        // a: the value
  kI64 = 3,        // a: the value
  kF32Const = 4,   // a: index into the plan's float constants
  kF32Arg = 5,     // a: stack index of a float argument
};

struct Launch {
  uint64_t function = 0;
  int64_t grid[3] = {1, 1, 1};
  int64_t num_warps = 4;
  int64_t shared = 0;
  bool pdl = false;
  std::vector<std::pair<int64_t, int64_t>> params;  // (kind, a)
};

struct Plan {
  bool replayable = false;  // false: this signature always runs the Python kernel
  std::vector<std::pair<at::ScalarType, std::vector<int64_t>>> outputs;
  std::vector<Launch> launches;
  std::vector<double> float_consts;
  std::vector<int64_t> checked_float_args;  // stack indices of floats that must be >= float_min
  double float_min = 0.0;
};

using Signature = std::vector<int64_t>;

struct SignatureHash {
  size_t operator()(const Signature& s) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : s) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

constexpr size_t kMaxPlansPerOp = 4096;

struct OpState {
  c10::OperatorHandle python_kernel;
  std::unordered_map<Signature, std::shared_ptr<const Plan>, SignatureHash> plans;
  std::mutex mutex;
  explicit OpState(c10::OperatorHandle h) : python_kernel(std::move(h)) {}
};

std::mutex registry_mutex;
std::unordered_map<std::string, std::unique_ptr<OpState>>& registry() {
  static std::unordered_map<std::string, std::unique_ptr<OpState>> r;
  return r;
}
std::vector<std::unique_ptr<torch::Library>>& libraries() {
  static std::vector<std::unique_ptr<torch::Library>> libs;
  return libs;
}

// the plan the Python kernel offers while it runs for the signature this thread asked about
thread_local bool plan_wanted = false;
thread_local std::shared_ptr<const Plan> offered_plan;

// false when the argument kinds cannot be part of a signature (lists, strings, ...)
bool signature_of(const torch::jit::Stack& stack, size_t first, size_t n, Signature& sig) {
  sig.reserve(8 * n);
  for (size_t i = first; i < first + n; ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor()) {
      const at::Tensor& t = v.toTensor();
      if (!t.defined()) {
        sig.push_back(-2);
        continue;
      }
      sig.push_back(-1);
      sig.push_back(static_cast<int64_t>(t.scalar_type()));
      sig.push_back(static_cast<int64_t>(t.device().type()) * 1024 + t.device().index());
      sig.push_back(t.dim());
      for (int64_t s : t.sizes()) sig.push_back(s);
      for (int64_t s : t.strides()) sig.push_back(s);
      sig.push_back((reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0);
    } else if (v.isNone()) {
      sig.push_back(-3);
    } else if (v.isInt()) {
      sig.push_back(-4);
      sig.push_back(v.toInt());
    } else if (v.isBool()) {
      sig.push_back(-5);
      sig.push_back(v.toBool());
    } else if (v.isDouble()) {
      sig.push_back(-6);  // the value is not part of the signature
    } else if (v.isString()) {
      const std::string& str = v.toStringRef();
      sig.push_back(-7);
      sig.push_back(static_cast<int64_t>(str.size()));
      for (char c : str) sig.push_back(c);
    } else {
      return false;
    }
  }
  return true;
}

#ifdef FUSION_OPS_HAVE_CUDA_H
typedef CUresult (*LaunchKernelEx)(const CUlaunchConfig*, CUfunction, void**, void**);

LaunchKernelEx launch_kernel_ex() {
  static LaunchKernelEx fn = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    TORCH_CHECK(lib != nullptr, "fusion_ops native launch: cannot open libcuda.so.1");
    auto f = reinterpret_cast<LaunchKernelEx>(dlsym(lib, "cuLaunchKernelEx"));
    TORCH_CHECK(f != nullptr, "fusion_ops native launch: no cuLaunchKernelEx in libcuda.so.1");
    return f;
  }();
  return fn;
}

void run_launch(const Launch& l, const Plan& plan, const torch::jit::Stack& stack, size_t first,
                const std::vector<at::Tensor>& outputs, void* stream) {
  // every parameter in an 8-byte slot; the kernel reads the width its type has
  std::vector<uint64_t> storage(l.params.size() + 2, 0);  // + global and profile scratch: null
  std::vector<void*> params(l.params.size() + 2);
  for (size_t p = 0; p < l.params.size(); ++p) {
    const auto [kind, a] = l.params[p];
    uint64_t& slot = storage[p];
    switch (kind) {
      case kInputPtr:
        slot = reinterpret_cast<uintptr_t>(stack[first + a].toTensor().data_ptr());
        break;
      case kOutputPtr:
        slot = reinterpret_cast<uintptr_t>(outputs[a].data_ptr());
        break;
      case kI32: {
        int32_t v = static_cast<int32_t>(a);
        std::memcpy(&slot, &v, sizeof v);
        break;
      }
      case kI64:
        std::memcpy(&slot, &a, sizeof a);
        break;
      case kF32Const: {
        float v = static_cast<float>(plan.float_consts[a]);
        std::memcpy(&slot, &v, sizeof v);
        break;
      }
      case kF32Arg: {
        float v = static_cast<float>(stack[first + a].toDouble());
        std::memcpy(&slot, &v, sizeof v);
        break;
      }
      default:
        TORCH_CHECK(false, "fusion_ops native launch: unknown parameter kind ", kind);
    }
  }
  for (size_t p = 0; p < storage.size(); ++p) params[p] = &storage[p];
  CUlaunchAttribute attrs[1];
  CUlaunchConfig config;
  std::memset(&config, 0, sizeof config);
  config.gridDimX = static_cast<unsigned>(l.grid[0]);
  config.gridDimY = static_cast<unsigned>(l.grid[1]);
  config.gridDimZ = static_cast<unsigned>(l.grid[2]);
  config.blockDimX = static_cast<unsigned>(32 * l.num_warps);
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = static_cast<unsigned>(l.shared);
  config.hStream = static_cast<CUstream>(stream);
  config.attrs = attrs;
  config.numAttrs = 0;
  if (l.pdl) {
    attrs[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[0].value.programmaticStreamSerializationAllowed = 1;
    config.numAttrs = 1;
  }
  CUresult r = launch_kernel_ex()(&config, reinterpret_cast<CUfunction>(l.function),
                                  params.data(), nullptr);
  TORCH_CHECK(r == CUDA_SUCCESS, "fusion_ops native launch: cuLaunchKernelEx failed with ", r);
}
#endif

bool floats_pass(const Plan& plan, const torch::jit::Stack& stack, size_t first) {
  for (int64_t i : plan.checked_float_args) {
    if (!(stack[first + i].toDouble() >= plan.float_min)) return false;  // NaN fails too
  }
  return true;
}

void replay_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t n_args = schema.arguments().size();
  const size_t first = stack->size() - n_args;
  OpState* state;
  {
    std::lock_guard<std::mutex> g(registry_mutex);
    state = registry().at(schema.name()).get();
  }
  Signature sig;
  const bool fast = cuda_fast_path_allowed() && signature_of(*stack, first, n_args, sig);
  std::shared_ptr<const Plan> plan;
  bool known = false;
  if (fast) {
    std::lock_guard<std::mutex> g(state->mutex);
    auto it = state->plans.find(sig);
    if (it != state->plans.end()) {
      plan = it->second;
      known = true;
    }
  }
#ifdef FUSION_OPS_HAVE_CUDA_H
  if (plan && plan->replayable && floats_pass(*plan, *stack, first)) {
    const at::Tensor* device_tensor = nullptr;
    for (size_t i = first; i < first + n_args && device_tensor == nullptr; ++i) {
      if ((*stack)[i].isTensor()) device_tensor = &(*stack)[i].toTensor();
    }
    const c10::Device device = device_tensor->device();
    c10::DeviceGuard guard(device);
    std::vector<at::Tensor> outputs;
    outputs.reserve(plan->outputs.size());
    for (const auto& [dtype, sizes] : plan->outputs) {
      outputs.push_back(at::empty(sizes, at::TensorOptions().dtype(dtype).device(device)));
    }
    if (!plan->launches.empty()) {
      void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)
                         ->getStream(device)
                         .native_handle();
      for (const Launch& l : plan->launches) run_launch(l, *plan, *stack, first, outputs, stream);
    }
    record_native_run(schema.name(), kBackendTriton);
    torch::jit::drop(*stack, n_args);
    for (auto& t : outputs) stack->emplace_back(std::move(t));
    return;
  }
#endif
  // the Python kernel: validates, raises the op's messages, runs the selected backend; on the
  // first call of a signature it also offers the plan of what it did
  plan_wanted = fast && !known;
  offered_plan.reset();
  try {
    state->python_kernel.callBoxed(stack);
  } catch (...) {
    plan_wanted = false;
    offered_plan.reset();
    throw;
  }
  if (plan_wanted) {
    plan_wanted = false;
    std::shared_ptr<const Plan> offered = std::move(offered_plan);
    if (!offered) offered = std::make_shared<const Plan>();  // nothing offered: never replay
    std::lock_guard<std::mutex> g(state->mutex);
    if (state->plans.size() < kMaxPlansPerOp) state->plans.emplace(std::move(sig), offered);
  }
}

// fusion_ops_native::register_cuda_replay(name): the CUDA kernel of fusion_ops::<name> becomes
// replay_kernel; its Python kernel must be registered as fusion_ops::_python_<name> (CUDA).
void register_cuda_replay(std::string name) {
  std::lock_guard<std::mutex> g(registry_mutex);
  if (registry().count("fusion_ops::" + name)) return;
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(
      ("fusion_ops::_python_" + name).c_str(), "");
  registry().emplace("fusion_ops::" + name, std::make_unique<OpState>(handle));
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "fusion_ops",
                                              c10::DispatchKey::CUDA, __FILE__, __LINE__);
  lib->impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&replay_kernel>());
  libraries().push_back(std::move(lib));
}

bool wants_plan() { return plan_wanted; }

// The Python kernel's record of one call (encoding: fusion_ops/native/__init__.py, offer_plan)
void offer_plan(std::vector<int64_t> launch_ints, std::vector<double> float_consts,
                std::vector<at::Tensor> outputs, std::vector<int64_t> checked_float_args,
                double float_min) {
  if (!plan_wanted) return;
  auto plan = std::make_shared<Plan>();
  size_t i = 0;
  auto next = [&](const std::vector<int64_t>& v, size_t& j) {
    TORCH_CHECK(j < v.size(), "fusion_ops_native.offer_plan: truncated encoding");
    return v[j++];
  };
  const int64_t n_launches = next(launch_ints, i);
  for (int64_t l = 0; l < n_launches; ++l) {
    Launch launch;
    launch.function = static_cast<uint64_t>(next(launch_ints, i));
    for (int64_t& g : launch.grid) g = next(launch_ints, i);
    launch.num_warps = next(launch_ints, i);
    launch.shared = next(launch_ints, i);
    launch.pdl = next(launch_ints, i) != 0;
    const int64_t n_params = next(launch_ints, i);
    for (int64_t p = 0; p < n_params; ++p) {
      const int64_t kind = next(launch_ints, i);
      launch.params.emplace_back(kind, next(launch_ints, i));
    }
    plan->launches.push_back(std::move(launch));
  }
  for (const at::Tensor& t : outputs) {  // the run's outputs: dtypes and sizes
    plan->outputs.emplace_back(t.scalar_type(), t.sizes().vec());
  }
  plan->float_consts = std::move(float_consts);
  plan->checked_float_args = std::move(checked_float_args);
  plan->float_min = float_min;
#ifdef FUSION_OPS_HAVE_CUDA_H
  plan->replayable = true;
#endif
  offered_plan = std::move(plan);
}

int64_t plan_count(std::string name) {
  OpState* state;
  {
    std::lock_guard<std::mutex> g(registry_mutex);
    auto it = registry().find("fusion_ops::" + name);
    if (it == registry().end()) return -1;
    state = it->second.get();
  }
  std::lock_guard<std::mutex> g(state->mutex);
  int64_t n = 0;
  for (const auto& [sig, plan] : state->plans) n += plan->replayable;
  return n;
}

// the stream replayed launches go to (tests compare it with torch's current stream)
int64_t launch_stream(int64_t device_index) {
  const c10::Device device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device_index));
  return reinterpret_cast<int64_t>(
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle());
}

}  // namespace
}  // namespace fusion_ops_native

TORCH_LIBRARY_FRAGMENT(fusion_ops_native, m) {
  using namespace fusion_ops_native;
  m.def("register_cuda_replay(str name) -> ()", &register_cuda_replay);
  m.def("wants_plan() -> bool", &wants_plan);
  m.def(
      "offer_plan(int[] launch_ints, float[] float_consts, Tensor[] outputs, "
      "int[] checked_float_args, float float_min) -> ()",
      &offer_plan);
  m.def("plan_count(str name) -> int", &plan_count);
  m.def("launch_stream(int device_index) -> int", &launch_stream);
}
