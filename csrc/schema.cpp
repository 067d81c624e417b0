// The schema of the public library, `torch.ops.ema_cuda`: every op
// production code calls.  The backends register their kernels in
// cpu/ema_update_cpu.cpp and cuda/ema_update_cuda.cu; the Python fallback
// (ema_cuda/_fallback.py) defines the same schema when this library is not
// loaded, and ema_cuda/ops.py registers the fake (meta) kernels.  Test-only
// ops live apart, in `torch.ops.ema_cuda_testing` (testing.cpp).
#include <torch/library.h>

#include "plan.h"

namespace ema_cuda {

TORCH_LIBRARY(ema_cuda, m) {
  // The Tensor overload first: `torch.ops.ema_cuda.ema_update_(E, M, d)`
  // tries the overloads in this order, and a 0-dim tensor would also convert
  // to the float overload's `float`, skipping the decay tensor's checks (and
  // syncing the host on CUDA).
  m.def("ema_update_.Tensor(Tensor(a!)[] ema, Tensor[] model, Tensor decay) -> ()");
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] model, float decay) -> ()");
  // K EMAs of one model in one pass (NOTE [several EMAs]): `ema` holds
  // K x len(model) tensors, profile-major (ema[k * n + i] is profile k's EMA
  // of model[i]), K = the number of decays (1 to 16).  Tensor overload
  // first, as above: a 1-dim fp32/fp64 tensor of K decays on the device.
  m.def("multi_ema_update_.Tensor(Tensor(a!)[] ema, Tensor[] model, Tensor decays) -> ()");
  m.def("multi_ema_update_(Tensor(a!)[] ema, Tensor[] model, float[] decays) -> ()");
  // NOTE [captured plans]: ema_cuda.ops.release_captured_plans().
  m.def("_release_captured_plans() -> int", &release_captured_plans);
}

// The op mutates tensors that never take part in autograd (the kernels
// reject EMA tensors that require grad): autograd has nothing to record.
TORCH_LIBRARY_IMPL(ema_cuda, Autograd, m) {
  m.impl("ema_update_", torch::CppFunction::makeFallthrough());
  m.impl("ema_update_.Tensor", torch::CppFunction::makeFallthrough());
  m.impl("multi_ema_update_", torch::CppFunction::makeFallthrough());
  m.impl("multi_ema_update_.Tensor", torch::CppFunction::makeFallthrough());
}

}  // namespace ema_cuda
