// The plan of one update: the chunk table of both lists, kept on their
// device and cached, and the one rule for reusing it (NOTE [plan validity]).
// Shared by the CPU and CUDA backends and by FusedUpdater's ListUpdater.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "checks.h"
#include "multi_tensor.h"

namespace ema_cuda {

// The chunk table of one (ema, model) list pair, kept on the lists' device.
struct Plan {
  c10::Device device = c10::Device(c10::kCPU);
  int64_t chunk_size = 0;
  int64_t num_tensors = 0;  // averaged pairs (profiles x stride of a multi-EMA plan)
  // NOTE [several EMAs] (multi_tensor.h): a multi-EMA plan holds `profiles`
  // rows per model tensor, profile-major, `stride` (the number of model
  // tensors) apart; its chunk rows cover the model tensors and the copies.
  bool multi = false;
  int64_t profiles = 1;
  int64_t stride = 0;
  int64_t num_copies = 0;   // copied pairs, rows num_tensors.. of the table
  int64_t num_chunks = 0;
  int64_t num_elements = 0;  // of all pairs
  int64_t num_units = 0;     // sum of the chunks' lengths (a copy counts bytes)
                             // (a multi-EMA chunk counts each model element once)
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
  // for it (NOTE [table upload] in cuda/ema_update_cuda.cu).
  std::shared_ptr<void> upload_event;

  // NOTE [plan validity]: the one rule for reusing a plan, wherever it is
  // cached (the op's cache, a ListUpdater, hence FusedUpdater and ModelEMA).
  // A plan holds raw pointers and element counts, so it is used only while
  // `lists` are exactly what it was built from: same counts, chunk size and
  // device, and for every pair, on both sides, the same address (which also
  // fixes the device), element count and dtype, one shape, and a dense layout
  // shared by the pair
  // (everything `check_lists`/`check_copy_lists` accepted and the overlap
  // check relied on), and no EMA tensor that requires grad under grad mode;
  // for a multi-EMA plan also the same number of profiles.
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
// Chunk size used for tensors on `device`.
int64_t chunk_size_for(const c10::Device& device);

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

// Plan cache counters for tests: {builds, hits, cached, captured}.
std::vector<int64_t> plan_cache_stats();
void clear_plan_cache();

}  // namespace ema_cuda
