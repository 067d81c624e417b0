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
// The multi-EMA kernel (NOTE [several EMAs]) holds a model tensor's packs
// while it loads each profile's: within 64 registers it spilled (sm_90, nvcc
// 13.0), so it is compiled for one resident block per SM (128 registers)
// and its grid sized to match.
constexpr int kCudaMultiBlocksPerSM = 1;

// The kernel's decay argument: `value`, or a pointer to `decay_tensor` (a
// checked 0-dim fp32/fp64 tensor on the tensors' device) when given.  Built
// here for the launch and the host emulation alike.
inline DecayArg make_decay_arg(double value, const at::Tensor* decay_tensor) {
  DecayArg arg{};
  arg.values[0] = value;
  arg.dtype = kF32;
  if (decay_tensor != nullptr) {
    arg.ptr = decay_tensor->const_data_ptr();
    arg.dtype = decay_tensor->scalar_type() == at::kDouble ? kF64 : kF32;
  }
  return arg;
}

// The multi-EMA op's decays: `values` (checked, at most kMaxProfiles), or
// the checked 1-dim `decays_tensor`, read on the device `stride` apart.
inline DecayArg make_decays_arg(c10::ArrayRef<double> values, const at::Tensor* decays_tensor) {
  DecayArg arg{};
  for (size_t k = 0; k < values.size() && k < static_cast<size_t>(kMaxProfiles); ++k) {
    arg.values[k] = values[k];
  }
  arg.dtype = kF32;
  if (decays_tensor != nullptr) {
    arg.ptr = decays_tensor->const_data_ptr();
    arg.stride = decays_tensor->stride(0);
    arg.dtype = decays_tensor->scalar_type() == at::kDouble ? kF64 : kF32;
  }
  return arg;
}

// True when this build contains the CUDA kernel.
bool cuda_compiled();
// True while the current stream of `device` (a CUDA device) is capturing.
bool cuda_capturing(const c10::Device& device);
// Fills plan.tensor_rows / chunk_rows on plan.device (a CUDA device) from
// these host rows: NOTE [table upload] in ema_update_cuda.cu.
void upload_tables(Plan& plan, const void* tensor_rows, size_t tensor_bytes,
                   const void* chunk_rows, size_t chunk_bytes);
// Launches the update of every pair of `plan` on the current stream, with
// the decay(s) of `decays` (make_decay_arg, or make_decays_arg for a
// multi-EMA plan: one launch for all its profiles).
void cuda_launch(const PlanPtr& plan, const DecayArg& decays);

}  // namespace ema_cuda
