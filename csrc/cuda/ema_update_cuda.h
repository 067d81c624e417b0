// CUDA backend of the fused EMA op: one launch over a plan's device-side
// chunk table.  Declared for every build: a CPU-only build compiles
// cuda/no_cuda.cpp instead of ema_update_cuda.cu, whose functions say that
// this build has no CUDA kernel.
#pragma once

#include <cstddef>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "plan.h"

namespace ema_cuda {

// Chunk size (elements) of CUDA plans: each chunk goes to one block.
constexpr int64_t kCudaChunk = 1 << 16;
constexpr int kCudaThreads = 512;
// Resident blocks per SM the kernel is compiled for (__launch_bounds__): 64
// registers per thread, no spills (sm_90, nvcc 13.0), and the grid is sized
// so that every block is resident at once.  The host emulation sizes its
// grid the same way.
constexpr int kCudaBlocksPerSM = 2;

// The kernel's decay argument: `value`, or a pointer to `decay_tensor` (a
// checked 0-dim fp32/fp64 tensor on the tensors' device) when given.  Built
// here for the launch and the host emulation alike.
inline DecayArg make_decay_arg(double value, const at::Tensor* decay_tensor) {
  if (decay_tensor == nullptr) return {value, nullptr, kF32};
  return {0.0, decay_tensor->const_data_ptr(),
          decay_tensor->scalar_type() == at::kDouble ? kF64 : kF32};
}

// True when this build contains the CUDA kernel.
bool cuda_compiled();
// True while the current stream of `device` (a CUDA device) is capturing.
bool cuda_capturing(const c10::Device& device);
// Fills plan.tensor_rows / chunk_rows on plan.device (a CUDA device) from
// these host rows: NOTE [table upload] in ema_update_cuda.cu.
void upload_tables(Plan& plan, const void* tensor_rows, size_t tensor_bytes,
                   const void* chunk_rows, size_t chunk_bytes);
// Launches the update of every pair of `plan` on the current stream;
// `decay_tensor`, when given, replaces `decay` and is read on the device.
void cuda_launch(const PlanPtr& plan, const at::Tensor* decay_tensor, double decay);

}  // namespace ema_cuda
