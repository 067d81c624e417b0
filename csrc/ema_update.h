// Host-side pieces of the fused EMA op shared by the CPU kernel, the CUDA
// kernel and the Python bindings: validation, the cached plan, the kernels.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include "multi_tensor.h"

namespace ema_cuda {

constexpr const char* kOpName = "ema_cuda::ema_update_";

// Chunk sizes (elements).  The CPU splits work across threads by chunk; the
// GPU gives each chunk to one block.
constexpr int64_t kCpuChunk = 1 << 16;
constexpr int64_t kCudaChunk = 1 << 16;
constexpr int kCudaThreads = 512;
// Resident blocks per SM the kernel is compiled for (__launch_bounds__): 64
// registers per thread, no spills (sm_90, nvcc 13.0), and the grid is sized
// so that every block is resident at once.
constexpr int kCudaBlocksPerSM = 2;

// The tensors of one update: pairs averaged (ema[i] from model[i]) and pairs
// copied verbatim (copy_ema[j] := copy_model[j], e.g. integer buffers), all
// in one launch.  The table holds the averaged pairs first, then the copies.
struct UpdateLists {
  at::TensorList ema, model;
  at::TensorList copy_ema = {}, copy_model = {};

  int64_t num_averaged() const { return static_cast<int64_t>(ema.size()); }
  int64_t num_rows() const { return static_cast<int64_t>(ema.size() + copy_ema.size()); }
  bool is_copy(int64_t row) const { return row >= num_averaged(); }
  const at::Tensor& ema_at(int64_t row) const {
    return row < num_averaged() ? ema[row] : copy_ema[row - num_averaged()];
  }
  const at::Tensor& model_at(int64_t row) const {
    return row < num_averaged() ? model[row] : copy_model[row - num_averaged()];
  }
  // The device of the first tensor (CPU when there is none).
  c10::Device device() const;
};

// Checks that can change from call to call: list lengths, dtypes, devices,
// shapes, layouts, autograd.  O(number of tensors); never touches data.
void check_lists(const char* op, at::TensorList ema, at::TensorList model);
// The same for the copied pairs: any dtype, one dtype per pair, on
// `lists.device()`.
void check_copy_lists(const char* op, const UpdateLists& lists);
// The layout rule of one pair: same strides, or both contiguous (strides of
// size-1 dimensions do not matter then).
inline bool same_layout(const at::Tensor& e, const at::Tensor& m) {
  // Contiguity first: two flag reads, where comparing strides is a call.
  return (e.is_contiguous() && m.is_contiguous()) || e.strides() == m.strides();
}
// What `check_lists` requires of a pair's shape and layout, as the per-call
// plan check tests it (NOTE [plan validity]): one shape, one dense layout.
// Flag reads and two short array compares; no allocation.
inline bool same_shape_dense_layout(const at::Tensor& e, const at::Tensor& m) {
  if (e.sizes() != m.sizes()) return false;
  if (e.is_contiguous() && m.is_contiguous()) return true;
  return e.strides() == m.strides() && e.is_non_overlapping_and_dense() &&
         m.is_non_overlapping_and_dense();
}
void check_decay(const char* op, double decay);
// The kernel's decay argument: `value`, or a pointer to `decay_tensor` (a
// checked 0-dim fp32/fp64 tensor on the tensors' device) when given.
inline DecayArg make_decay_arg(double value, const at::Tensor* decay_tensor) {
  if (decay_tensor == nullptr) return {value, nullptr, kF32};
  return {0.0, decay_tensor->const_data_ptr(),
          decay_tensor->scalar_type() == at::kDouble ? kF64 : kF32};
}
void check_decay_tensor(const char* op, const at::Tensor& decay,
                        at::TensorList ema);

// The chunk table of one (ema, model) list pair, kept on the lists' device.
struct Plan {
  c10::Device device = c10::Device(c10::kCPU);
  int64_t chunk_size = 0;
  int64_t num_tensors = 0;  // averaged pairs
  int64_t num_copies = 0;   // copied pairs, rows num_tensors.. of the table
  int64_t num_chunks = 0;
  int64_t num_elements = 0;  // of all pairs
  int64_t num_units = 0;     // sum of the chunks' lengths (a copy counts bytes)
  // Signature: what the rows below were built from.  A plan is reused only
  // when every live tensor still matches, so its raw pointers are never stale.
  // Dtypes: the DTypeCode of an averaged pair, the ScalarType of a copied one.
  std::vector<uintptr_t> ema_ptrs, model_ptrs;
  std::vector<int64_t> numels;
  std::vector<int8_t> ema_dtypes, model_dtypes;
  at::Tensor tensor_rows;  // TensorEntry[num_tensors], uint8 on `device`
  at::Tensor chunk_rows;   // ChunkEntry[num_chunks], uint8 on `device`
  // CPU plans: running element count at the end of each chunk, so that the
  // CPU kernel can hand every thread the same number of elements.
  std::vector<int64_t> chunk_ends;
  // Set once the plan's device table has been baked into a captured CUDA
  // graph: the cache then owns the plan for good (NOTE [captured plans]).
  mutable std::atomic<bool> pinned{false};
  // CUDA streams the tables have been used on, each recorded with the caching
  // allocator once, so that evicting the plan while a kernel on a side
  // stream still reads its table cannot hand the memory to another tensor.
  mutable std::mutex streams_mu;
  mutable std::vector<int64_t> streams_used;
  // CUDA plans: the tables are uploaded from pinned memory without blocking
  // the host, ordered on the stream current at the build; this event marks
  // the end of that upload, and the first launch on any other stream waits
  // for it (NOTE [table upload]).
  std::shared_ptr<void> upload_event;

  // NOTE [plan validity]: the one rule for reusing a plan, wherever it is
  // cached (the op's cache, a ListUpdater, hence FusedUpdater and ModelEMA).
  // A plan holds raw pointers and element counts, so it is used only while
  // `lists` are exactly what it was built from: same counts, chunk size and
  // device, and for every pair, on both sides, the same address (which also
  // fixes the device), element count and dtype, one shape, and a dense layout
  // shared by the pair
  // (everything `check_lists`/`check_copy_lists` accepted and the overlap
  // check relied on), and no EMA tensor that requires grad under grad mode.
  // `resize_` keeps the address but not the count; `as_strided_` keeps both
  // but not the layout; `p.data = p.data[:k]` keeps the address: each is a
  // mismatch, and the caller then validates the lists from scratch, so it
  // either builds a new plan or raises an error naming the tensor.  O(pairs)
  // compares, no allocation, no tensor data read.
  bool matches(const UpdateLists& lists, int64_t chunk) const;
  const TensorEntry* tensors() const;
  const ChunkEntry* chunks() const;
};

using PlanPtr = std::shared_ptr<const Plan>;

// Cached plan valid for these lists (NOTE [plan validity]), or nullptr.
PlanPtr find_plan(const UpdateLists& lists, int64_t chunk);
// Builds (after the overlap check, which only a new signature needs), caches
// and returns a plan.  `check_lists` (and `check_copy_lists`) must have passed.
PlanPtr build_plan(const char* op, const UpdateLists& lists, int64_t chunk);
// A valid cached plan, else every check of the lists (an error names the
// offending tensor) and a new plan.  The one entry of every op.
PlanPtr get_plan(const char* op, const UpdateLists& lists, int64_t chunk);

// Kernels.  All assume validated inputs.  `decay_tensor`, when given,
// replaces `decay` (on the CPU its value must already be checked).
void cpu_update(const Plan& plan, double decay);
void cuda_launch(const PlanPtr& plan, const at::Tensor* decay_tensor, double decay);
void run_update(const PlanPtr& plan, const at::Tensor* decay_tensor, double decay);
// Fills plan.tensor_rows / chunk_rows on plan.device (a CUDA device) from
// these host rows: NOTE [table upload] in ema_update_cuda.cu.
void upload_tables(Plan& plan, const void* tensor_rows, size_t tensor_bytes,
                   const void* chunk_rows, size_t chunk_bytes);
// NOTE [captured plans]: a CUDA graph that captured a launch keeps the
// addresses of its plan's device table for every replay, and nothing tells
// us when the graph is destroyed.  So the process-wide cache takes shared
// ownership of such a plan when the capture happens (whoever held it before,
// a ListUpdater or the LRU, may drop it), and keeps it until
// `release_captured_plans()` or the end of the process.  At most
// kMaxCapturedPlans are kept: one more raises an error instead of growing.
constexpr size_t kMaxCapturedPlans = 1024;
void pin_captured_plan(const char* op, const PlanPtr& plan);
// Drops the cache's ownership of captured plans (call after the graphs that
// captured them are destroyed); returns how many were released.
int64_t release_captured_plans();
bool cuda_compiled();
// True while the current stream of `device` (a CUDA device) is capturing.
bool cuda_capturing(const c10::Device& device);
// Chunk size used for tensors on `device`.
int64_t chunk_size_for(const c10::Device& device);

// Plan cache counters for tests: {builds, hits, cached, captured}.
std::vector<int64_t> plan_cache_stats();
void clear_plan_cache();

}  // namespace ema_cuda
