// CUDA backend of the fused EMA op: the kernel (every tensor of both lists
// in one launch, driven by the cached device-side chunk table; its body is
// multi_tensor.h's, shared with the host emulation), the table upload and
// the registration.
#include "cuda/ema_update_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace ema_cuda {

namespace {

__global__ void __launch_bounds__(kCudaThreads, kCudaBlocksPerSM)
    ema_update_kernel(const TensorEntry* __restrict__ tensors,
                      const ChunkEntry* __restrict__ chunks, int64_t num_chunks,
                      DecayArg decay_arg) {
  kernel_block(tensors, chunks, num_chunks, blockIdx.x, gridDim.x, threadIdx.x,
               blockDim.x, decay_arg);
}

// A multi-EMA plan of `profiles` > 1 (NOTE [several EMAs]).
__global__ void __launch_bounds__(kCudaThreads, kCudaMultiBlocksPerSM)
    multi_ema_update_kernel(const TensorEntry* __restrict__ tensors,
                            const ChunkEntry* __restrict__ chunks, int64_t num_chunks,
                            DecayArg decay_arg, int64_t stride, int profiles) {
  __shared__ double decays[kMaxProfiles];
  load_decays(decay_arg, profiles, threadIdx.x, blockDim.x, decays);
  __syncthreads();
  multi_kernel_block(tensors, chunks, num_chunks, blockIdx.x, gridDim.x, threadIdx.x,
                     blockDim.x, decays, stride, profiles);
}

// Cached per device; atomics, since several threads may launch at once
// (a racing first query only asks the driver twice).
int sm_count(int device) {
  static std::atomic<int> counts[64];
  int n = (device >= 0 && device < 64) ? counts[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < 64) counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// A build without code for this GPU fails every launch with "no kernel
// image": say which GPU, what the build holds and how to rebuild.
void check_launch(const char* op, int device) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    TORCH_CHECK(false, no_kernel_image_message(op, device, major, minor));
  }
  C10_CUDA_CHECK(err);
}

void ema_update_cuda(at::TensorList ema, at::TensorList model, double decay) {
  check_decay(kOpName, decay);
  if (ema.empty() && model.empty()) return;
  const c10::cuda::CUDAGuard guard((ema.empty() ? model : ema)[0].device());
  cuda_launch(get_plan(kOpName, {ema, model}, kCudaChunk), make_decay_arg(decay, nullptr));
}

void ema_update_tensor_cuda(at::TensorList ema, at::TensorList model,
                            const at::Tensor& decay) {
  check_decay_tensor(kOpName, decay, ema);
  if (ema.empty() && model.empty()) return;
  const c10::cuda::CUDAGuard guard((ema.empty() ? model : ema)[0].device());
  cuda_launch(get_plan(kOpName, {ema, model}, kCudaChunk), make_decay_arg(0.0, &decay));
}

void multi_ema_update_cuda(at::TensorList ema, at::TensorList model, at::ArrayRef<double> decays) {
  check_decays(kMultiOpName, decays);
  if (ema.empty() && model.empty()) return;
  const c10::cuda::CUDAGuard guard((ema.empty() ? model : ema)[0].device());
  const auto k = static_cast<int64_t>(decays.size());
  cuda_launch(get_plan(kMultiOpName, multi_lists(ema, model, k), kCudaChunk),
              make_decays_arg(decays, nullptr));
}

void multi_ema_update_tensor_cuda(at::TensorList ema, at::TensorList model,
                                  const at::Tensor& decays) {
  check_decays_tensor(kMultiOpName, decays, ema);
  if (ema.empty() && model.empty()) return;
  const c10::cuda::CUDAGuard guard((ema.empty() ? model : ema)[0].device());
  cuda_launch(get_plan(kMultiOpName, multi_lists(ema, model, decays.numel()), kCudaChunk),
              make_decays_arg({}, &decays));
}

}  // namespace

bool cuda_compiled() { return true; }

// NOTE [table upload]: a plan's tables are copied to the device from pinned
// memory with non_blocking, on the stream current at the build, so building
// a plan never stalls the host behind queued GPU work (a pageable copy
// would).  The event recorded after the copy orders the first launch on any
// other stream after it.  A graph capture needs no wait: torch.cuda.graph
// synchronizes the device before capture begins, and no plan is built during
// a capture (`get_plan` refuses).
void upload_tables(Plan& plan, const void* tensor_rows, size_t tensor_bytes,
                   const void* chunk_rows, size_t chunk_bytes) {
  const c10::cuda::CUDAGuard guard(plan.device);
  auto upload = [&](const void* data, size_t nbytes) {
    const auto n = static_cast<int64_t>(nbytes);
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    if (nbytes) std::memcpy(host.data_ptr(), data, nbytes);
    at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(plan.device));
    // The pinned block is recorded on the stream by the copy: it is not
    // reused before the copy has run.
    dev.copy_(host, /*non_blocking=*/true);
    return dev;
  };
  plan.tensor_rows = upload(tensor_rows, tensor_bytes);
  plan.chunk_rows = upload(chunk_rows, chunk_bytes);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(plan.device.index());
  cudaEvent_t event = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  plan.upload_event = std::shared_ptr<void>(
      event, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
  C10_CUDA_CHECK(cudaEventRecord(event, stream.stream()));
  // Allocated and filled on this stream: no wait and no record_stream here.
  plan.streams_used.push_back(static_cast<int64_t>(stream.id()));
}

bool cuda_capturing(const c10::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(
      c10::cuda::getCurrentCUDAStream().stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

void cuda_launch(const PlanPtr& plan_ptr, const DecayArg& arg) {
  const Plan& plan = *plan_ptr;
  if (plan.num_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(plan.device);
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = current.stream();
  if (cuda_capturing(plan.device)) {
    // A captured graph keeps the table's address for every replay.
    pin_captured_plan(kOpName, plan_ptr);
  } else {
    std::lock_guard<std::mutex> lock(plan.streams_mu);
    const int64_t id = static_cast<int64_t>(current.id());
    auto& used = plan.streams_used;
    if (std::find(used.begin(), used.end(), id) == used.end()) {
      if (plan.upload_event) {
        C10_CUDA_CHECK(cudaStreamWaitEvent(stream, static_cast<cudaEvent_t>(plan.upload_event.get()), 0));
      }
      plan.tensor_rows.record_stream(current.unwrap());
      plan.chunk_rows.record_stream(current.unwrap());
      used.push_back(id);
    }
  }

  const bool multi = plan.multi && plan.profiles > 1;
  const int64_t blocks = grid_blocks(plan.num_chunks, sm_count(plan.device.index()),
                                     multi ? kCudaMultiBlocksPerSM : kCudaBlocksPerSM);
  const auto grid = static_cast<unsigned>(blocks);
  if (multi) {
    multi_ema_update_kernel<<<grid, kCudaThreads, 0, stream>>>(
        plan.tensors(), plan.chunks(), plan.num_chunks, arg, plan.stride,
        static_cast<int>(plan.profiles));
  } else {
    ema_update_kernel<<<grid, kCudaThreads, 0, stream>>>(plan.tensors(), plan.chunks(),
                                                          plan.num_chunks, arg);
  }
  check_launch(plan.multi ? kMultiOpName : kOpName, plan.device.index());
}

TORCH_LIBRARY_IMPL(ema_cuda, CUDA, m) {
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("ema_update_.Tensor", &ema_update_tensor_cuda);
  m.impl("multi_ema_update_", &multi_ema_update_cuda);
  m.impl("multi_ema_update_.Tensor", &multi_ema_update_tensor_cuda);
}

}  // namespace ema_cuda
