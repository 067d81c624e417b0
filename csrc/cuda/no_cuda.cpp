// Compiled instead of ema_update_cuda.cu when the build has no CUDA kernel
// (EMA_CUDA_CPU_ONLY=1, a CPU-only torch, or no toolkit; see setup.py): the
// shared code calls these whatever the build, and only CUDA tensors reach
// the ones that fail.
#include "cuda/ema_update_cuda.h"

#include <c10/util/Exception.h>

namespace ema_cuda {

bool cuda_compiled() { return false; }

bool cuda_capturing(const c10::Device&) { return false; }

void upload_tables(Plan&, const void*, size_t, const void*, size_t) {
  TORCH_CHECK(false, kOpName, ": this build of ema_cuda has no CUDA kernel");
}

void cuda_launch(const PlanPtr&, const DecayArg&) {
  TORCH_CHECK(false, kOpName, ": this build of ema_cuda has no CUDA kernel");
}

}  // namespace ema_cuda
