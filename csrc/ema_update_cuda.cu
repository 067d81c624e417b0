// CUDA kernel of the fused EMA op: every tensor of both lists in one launch,
// driven by the cached device-side chunk table (see multi_tensor.h).
#include "ema_update.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace ema_cuda {

namespace {

// The decay, either a value baked into the launch or a pointer to a 0-dim
// device tensor read by every thread (no host sync, capturable in a graph).
struct DecayArg {
  double value;
  const void* ptr;
  int8_t dtype;
};

__device__ __forceinline__ double read_decay(const DecayArg& d) {
  if (d.ptr == nullptr) return d.value;
  switch (d.dtype) {
    case kF32: return static_cast<double>(*static_cast<const float*>(d.ptr));
    case kF64: return *static_cast<const double*>(d.ptr);
    case kBF16:
      return static_cast<double>(
          static_cast<float>(*static_cast<const c10::BFloat16*>(d.ptr)));
    default:
      return static_cast<double>(
          static_cast<float>(*static_cast<const c10::Half*>(d.ptr)));
  }
}

__global__ void __launch_bounds__(kCudaThreads, kCudaBlocksPerSM)
    ema_update_kernel(const TensorEntry* __restrict__ tensors,
                      const ChunkEntry* __restrict__ chunks, int64_t num_chunks,
                      DecayArg decay_arg) {
  const double decay = read_decay(decay_arg);
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const ChunkEntry chunk = chunks[c];
    run_chunk(tensors, chunk, threadIdx.x, blockDim.x, decay);
  }
}

int sm_count(int device) {
  static int counts[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device] = n;
  }
  return counts[device];
}

int8_t decay_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    default: return kF16;
  }
}

void ema_update_cuda(at::TensorList ema, at::TensorList model, double decay) {
  check_lists(kOpName, ema, model);
  check_decay(kOpName, decay);
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  cuda_launch(*get_plan(kOpName, {ema, model}, kCudaChunk), nullptr, decay);
}

void ema_update_tensor_cuda(at::TensorList ema, at::TensorList model,
                            const at::Tensor& decay) {
  check_lists(kOpName, ema, model);
  check_decay_tensor(kOpName, decay, ema);
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  cuda_launch(*get_plan(kOpName, {ema, model}, kCudaChunk), &decay, 0.0);
}

}  // namespace

bool cuda_compiled() { return true; }

bool cuda_capturing(const c10::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(
      c10::cuda::getCurrentCUDAStream().stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

void cuda_launch(const Plan& plan, const at::Tensor* decay_tensor,
                 double decay) {
  if (plan.num_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(plan.device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = current.stream();
  if (cuda_capturing(plan.device)) {
    // A captured graph keeps the table's address: never evict that plan.
    plan.pinned = true;
  } else {
    std::lock_guard<std::mutex> lock(plan.streams_mu);
    const int64_t id = static_cast<int64_t>(current.id());
    auto& used = plan.streams_used;
    if (std::find(used.begin(), used.end(), id) == used.end()) {
      plan.tensor_rows.record_stream(current.unwrap());
      plan.chunk_rows.record_stream(current.unwrap());
      used.push_back(id);
    }
  }

  DecayArg arg{decay, nullptr, kF32};
  if (decay_tensor != nullptr) {
    arg.ptr = decay_tensor->data_ptr();
    arg.dtype = decay_code(decay_tensor->scalar_type());
  }
  const int64_t max_blocks =
      static_cast<int64_t>(sm_count(plan.device.index())) * kCudaBlocksPerSM;
  const int64_t blocks = std::min<int64_t>(plan.num_chunks, max_blocks);
  ema_update_kernel<<<static_cast<unsigned>(blocks), kCudaThreads, 0, stream>>>(
      plan.tensors(), plan.chunks(), plan.num_chunks, arg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(ema_cuda, CUDA, m) {
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("ema_update_.Tensor", &ema_update_tensor_cuda);
}

}  // namespace ema_cuda
