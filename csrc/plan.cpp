// The plan cache (plan.h): the validity rule, building a plan and its table,
// the captured plans.
#include "plan.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <mutex>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include "cpu/ema_update_cpu.h"
#include "cuda/ema_update_cuda.h"
#include "work_pool.h"

namespace ema_cuda {

namespace {
// Below this many pairs a second thread costs more than it saves.  Only CPU
// plans split the check: their kernel runs on all threads anyway, while in a
// GPU training step the CPU threads sit idle between updates, and waking
// them costs more than the whole check (on the 2-core KVM guest of
// benchmarks/RESULTS.md, after 20 ms idle, an update of 10,000 pairs took
// 7.4 ms on 2 threads against 0.9 ms on one; a 1M-element add_ 5.4 ms
// against 0.34 ms).
constexpr int64_t kParallelCheckPairs = 2048;

// The dtype a plan's signature records: the DTypeCode of an averaged
// tensor, the ScalarType of a copied one (any dtype may be copied).
inline int8_t signature_dtype(const at::Tensor& t, bool copy) {
  return copy ? static_cast<int8_t>(t.scalar_type()) : dtype_code(t.scalar_type());
}
}  // namespace

bool Plan::matches(const UpdateLists& l, int64_t chunk) const {
  if (chunk != chunk_size || l.num_averaged() != num_tensors ||
      static_cast<int64_t>(l.copy_ema.size()) != num_copies || l.multi != multi ||
      l.profiles != profiles || l.stride() * l.profiles != l.num_averaged() ||
      l.copy_model.size() != l.copy_ema.size()) {
    return false;
  }
  const int64_t rows = num_tensors + num_copies;
  if (rows > 0 && l.device() != device) return false;
  const bool grad = c10::GradMode::is_enabled();
  auto row_matches = [&](int64_t i, const at::Tensor& e, const at::Tensor& m, bool copy) {
    // Cheapest and most likely to differ first.  The const address: no
    // copy-on-write materialisation on this path.  Equal shapes and the
    // EMA's count imply the model's count.  The address also fixes the
    // device: CUDA allocations and host memory never share an address
    // (unified addressing), and a tensor without data reads as 0.
    return raw_data_address(e) == ema_ptrs[i] && raw_data_address(m) == model_ptrs[i] &&
           e.numel() == numels[i] && signature_dtype(e, copy) == ema_dtypes[i] &&
           signature_dtype(m, copy) == model_dtypes[i] && same_shape_dense_layout(e, m) &&
           !(grad && e.requires_grad());
  };
  // Rows [lo, hi) of a plan with one profile; of a multi-EMA plan, model
  // tensors [lo, hi) with the rows of all their profiles (each model
  // tensor's TensorImpl read once, while it is in cache), then copies.
  const int64_t n = multi ? stride : rows;
  auto range_matches = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (!multi) {
        prefetch_pairs_ahead(l, i, hi);
        if (!row_matches(i, l.ema_at(i), l.model_at(i), l.is_copy(i))) return false;
        continue;
      }
      if (i + kPrefetchImpl < hi) {
        prefetch_impl(l.model[i + kPrefetchImpl]);
        for (int64_t k = 0; k < profiles; ++k) prefetch_impl(l.ema[k * stride + i + kPrefetchImpl]);
      }
      if (i + kPrefetchStorage < hi) {
        prefetch_storage(l.model[i + kPrefetchStorage]);
        for (int64_t k = 0; k < profiles; ++k) prefetch_storage(l.ema[k * stride + i + kPrefetchStorage]);
      }
      for (int64_t k = 0; k < profiles; ++k) {
        const int64_t r = k * stride + i;
        if (!row_matches(r, l.ema[r], l.model[i], false)) return false;
      }
    }
    return true;
  };
  auto copies_match = [&] {
    for (int64_t r = num_tensors; multi && r < rows; ++r) {
      if (!row_matches(r, l.ema_at(r), l.model_at(r), true)) return false;
    }
    return true;
  };
  if (n < kParallelCheckPairs || !device.is_cpu() || at::get_num_threads() == 1) {
    return range_matches(0, n) && copies_match();
  }
  // NOTE [busy CPU]: claimed in pieces, so a late thread never holds it up.
  constexpr int64_t kPiece = kParallelCheckPairs / 2;
  std::atomic<bool> ok{true};
  WorkPool::run((n + kPiece - 1) / kPiece, at::get_num_threads() - 1, [&](int64_t p) {
    if (ok.load(std::memory_order_relaxed) &&
        !range_matches(p * kPiece, std::min(n, (p + 1) * kPiece))) {
      ok = false;
    }
  });
  return ok.load() && copies_match();
}

const TensorEntry* Plan::tensors() const {
  return reinterpret_cast<const TensorEntry*>(tensor_rows.data_ptr());
}
const ChunkEntry* Plan::chunks() const {
  return reinterpret_cast<const ChunkEntry*>(chunk_rows.data_ptr());
}

namespace {

// Plans of distinct lists kept for the op called with lists.  A training
// step may update several EMAs or parameter groups, each its own lists: 64
// keeps a steady loop of up to 64 of them from ever rebuilding (a rebuild is
// an O(tensors) validation and, on CUDA, a table upload).  A lookup stops at
// the first pair that differs, usually the first, so a longer list costs
// little.
constexpr size_t kMaxCachedPlans = 64;

struct PlanCache {
  std::mutex mu;
  std::list<PlanPtr> plans;  // most recently used first
  std::vector<PlanPtr> captured;  // NOTE [captured plans]
  int64_t builds = 0;
  int64_t hits = 0;
};

// Leaked on purpose: device tables must not be freed during interpreter
// shutdown, after the CUDA context may already be gone.
PlanCache& cache() {
  static PlanCache* c = new PlanCache();
  return *c;
}

}  // namespace

PlanPtr find_plan(const UpdateLists& lists, int64_t chunk) {
  PlanCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto it = c.plans.begin(); it != c.plans.end(); ++it) {
    if ((*it)->matches(lists, chunk)) {
      PlanPtr p = *it;
      c.plans.erase(it);
      c.plans.push_front(p);
      ++c.hits;
      return p;
    }
  }
  return nullptr;
}

PlanPtr build_plan(const char* op, const UpdateLists& lists, int64_t chunk) {
  check_no_overlap(op, lists);
  auto plan = std::make_shared<Plan>();
  const int64_t n = lists.num_rows();
  plan->device = lists.device();
  plan->chunk_size = chunk;
  plan->num_tensors = lists.num_averaged();
  plan->num_copies = n - plan->num_tensors;
  plan->multi = lists.multi;
  plan->profiles = lists.profiles;
  plan->stride = lists.stride();
  std::vector<TensorEntry> rows(n);
  std::vector<ChunkEntry> chunks;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& e = lists.ema_at(i);
    const at::Tensor& m = lists.model_at(i);
    const bool copy = lists.is_copy(i);
    TensorEntry& r = rows[i];
    r = TensorEntry{};
    r.ema = e.data_ptr();
    r.model = m.data_ptr();
    // A copied pair is a row of bytes.
    r.numel = copy ? static_cast<int64_t>(e.nbytes()) : e.numel();
    r.ema_dtype = copy ? kBytes : dtype_code(e.scalar_type());
    r.model_dtype = copy ? kBytes : dtype_code(m.scalar_type());
    const VectorChoice v = choose_vector(reinterpret_cast<uintptr_t>(r.ema),
                                         reinterpret_cast<uintptr_t>(r.model),
                                         r.ema_dtype, r.model_dtype);
    r.head = v.head;
    r.vec_bytes = v.vec_bytes;
    r.fused = 1;
    plan->ema_ptrs.push_back(raw_data_address(e));
    plan->model_ptrs.push_back(raw_data_address(m));
    plan->numels.push_back(e.numel());
    plan->ema_dtypes.push_back(signature_dtype(e, copy));
    plan->model_dtypes.push_back(signature_dtype(m, copy));
    plan->num_elements += e.numel();
  }
  // A model tensor's profiles share one pass when their rows agree on what
  // the pass relies on: the EMA dtype and the aligned vectors.  Its chunk
  // rows then name row i (< stride); otherwise they name each profile's row.
  for (int64_t k = 1; lists.multi && k < lists.profiles; ++k) {
    for (int64_t i = 0; i < plan->stride; ++i) {
      const TensorEntry& a = rows[i];
      const TensorEntry& b = rows[k * plan->stride + i];
      if (a.ema_dtype != b.ema_dtype || a.head != b.head || a.vec_bytes != b.vec_bytes) {
        rows[i].fused = 0;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (lists.multi && !lists.is_copy(i) && rows[i % plan->stride].fused && i >= plan->stride) {
      continue;  // run by row i % stride's chunks
    }
    append_chunks(rows[i].numel, static_cast<int32_t>(i), chunk, chunks);
    plan->num_units += rows[i].numel;
  }
  plan->num_chunks = static_cast<int64_t>(chunks.size());
  if (plan->device.is_cpu()) {
    plan->chunk_ends.reserve(chunks.size());
    int64_t run = 0;
    for (const ChunkEntry& c : chunks) plan->chunk_ends.push_back(run += c.len);
  }
  if (plan->device.is_cuda()) {
    upload_tables(*plan, rows.data(), rows.size() * sizeof(TensorEntry), chunks.data(),
                  chunks.size() * sizeof(ChunkEntry));
  } else {
    TORCH_CHECK(plan->device.is_cpu(), op, ": tensors on ", plan->device,
                " are not supported (CPU and CUDA only)");
    auto bytes = [](const void* data, size_t nbytes) {
      at::Tensor t = at::empty({static_cast<int64_t>(nbytes)}, at::kByte);
      if (nbytes) std::memcpy(t.data_ptr(), data, nbytes);
      return t;
    };
    plan->tensor_rows = bytes(rows.data(), rows.size() * sizeof(TensorEntry));
    plan->chunk_rows = bytes(chunks.data(), chunks.size() * sizeof(ChunkEntry));
  }

  PlanCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  ++c.builds;
  c.plans.push_front(plan);
  // Evict the least recently used plan; a captured one stays alive through
  // `captured` (NOTE [captured plans]).
  while (c.plans.size() > kMaxCachedPlans) c.plans.pop_back();
  return plan;
}

void pin_captured_plan(const char* op, const PlanPtr& plan) {
  if (plan->pinned.load()) return;
  PlanCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (plan->pinned.load()) return;
  TORCH_CHECK(c.captured.size() < kMaxCapturedPlans, op, ": ", c.captured.size(),
              " plans are already held for captured CUDA graphs (the limit); "
              "destroy graphs that are no longer replayed and call "
              "ema_cuda.ops.release_captured_plans(), or capture fewer "
              "distinct tensor lists");
  c.captured.push_back(plan);
  plan->pinned.store(true);
}

int64_t release_captured_plans() {
  PlanCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const int64_t n = static_cast<int64_t>(c.captured.size());
  for (const PlanPtr& p : c.captured) p->pinned.store(false);
  c.captured.clear();
  return n;
}

PlanPtr get_plan(const char* op, const UpdateLists& lists, int64_t chunk) {
  PlanPtr p = find_plan(lists, chunk);
  if (p) return p;
  check_lists(op, lists);
  check_copy_lists(op, lists);
  // Building a plan copies the table host-to-device, which a CUDA stream
  // capture cannot record.
  const c10::Device device = lists.device();
  TORCH_CHECK(!device.is_cuda() || !cuda_capturing(device),
              op, ": no cached plan for these tensors while a CUDA graph is "
              "being captured; run the update once before capture (during "
              "warm-up) so that its plan is built");
  return build_plan(op, lists, chunk);
}

int64_t chunk_size_for(const c10::Device& device) {
  return device.is_cuda() ? kCudaChunk : kCpuChunk;
}

std::vector<int64_t> plan_cache_stats() {
  PlanCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {c.builds, c.hits, static_cast<int64_t>(c.plans.size()),
          static_cast<int64_t>(c.captured.size())};
}

void clear_plan_cache() {
  PlanCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.plans.clear();  // captured plans stay owned by `captured`
  c.builds = 0;
  c.hits = 0;
}

}  // namespace ema_cuda
