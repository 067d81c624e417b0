// Schema, validation, plan cache, CPU kernel and host emulation of the fused
// EMA op.  The CUDA kernel lives in ema_update_cuda.cu.
#include "ema_update.h"
#include "work_pool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <list>
#include <mutex>
#include <sstream>
#include <string>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace ema_cuda {

namespace {

const char* py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kComplexHalf: return "torch.complex32";
    default: return c10::toString(t);
  }
}

int8_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return -1;
  }
}

// Per-step checks touch two heap objects per tensor (its TensorImpl, then
// the StorageImpl it points to), and after an update has streamed the
// weights through the caches both are cold: with 10,000 separately
// allocated tensors a plain loop over the pairs waited ~1.3 ms on them per
// call on a 2-core EPYC, a third of the update.  So the loops prefetch the
// TensorImpls kPrefetchImpl pairs ahead and, once those have arrived, their
// StorageImpls kPrefetchStorage pairs ahead: on one thread that took the
// update from 3.69 to 3.23 ms with plain tensors, but did nothing measurable
// with nn.Parameter-wrapped ones, whose StorageImpls each sit in their own
// page (then page walks bound the check); `Plan::matches` also splits the
// long lists of CPU plans across threads, which helped both.
constexpr int64_t kPrefetchImpl = 16;
constexpr int64_t kPrefetchStorage = 8;

inline void prefetch_impl(const at::Tensor& t) {
  const char* p = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  for (size_t b = 0; b < sizeof(c10::TensorImpl); b += 64) __builtin_prefetch(p + b);
}

inline void prefetch_storage(const at::Tensor& t) {
  // Reads the TensorImpl (prefetched earlier); the StorageImpl may be null.
  const void* s = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
  if (s) __builtin_prefetch(s);
}

// Call before looking at row i of a loop that ends at `end`.
inline void prefetch_pairs_ahead(const UpdateLists& l, int64_t i, int64_t end) {
  if (i + kPrefetchImpl < end) {
    prefetch_impl(l.ema_at(i + kPrefetchImpl));
    prefetch_impl(l.model_at(i + kPrefetchImpl));
  }
  if (i + kPrefetchStorage < end) {
    prefetch_storage(l.ema_at(i + kPrefetchStorage));
    prefetch_storage(l.model_at(i + kPrefetchStorage));
  }
}

// The address `t.const_data_ptr()` returns (nullptr for an empty tensor),
// read without its out-of-line `has_storage()` call and dtype check, or 0
// when the tensor has no storage.  For the per-call signature check only:
// the plan was built from tensors whose `data_ptr()` worked, and a 0 where
// the plan holds an address sends the caller to the full validation.
inline uintptr_t raw_data_address(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::StorageImpl* s = impl->unsafe_storage().unsafeGetStorageImpl();
  if (s == nullptr || impl->is_empty()) return 0;
  return reinterpret_cast<uintptr_t>(s->data()) +
         static_cast<uintptr_t>(impl->storage_offset()) * impl->dtype().itemsize();
}

// `averaged`: the tensor must have a floating dtype the kernel averages;
// `device_ref` names the tensor whose device all must share.
void check_one(const char* op, const char* side, size_t i, const at::Tensor& t,
               const at::Device& device, const char* device_ref = "ema[0]",
               bool averaged = true) {
  TORCH_CHECK(t.defined(), op, ": ", side, "[", i, "] is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", side, "[", i,
              "] has layout ", t.layout(), "; only strided tensors are supported");
  TORCH_CHECK(!averaged || dtype_code(t.scalar_type()) >= 0, op, ": ", side, "[", i,
              "] has dtype ", py_dtype(t.scalar_type()),
              "; expected one of torch.float32, torch.float64, torch.bfloat16, "
              "torch.float16");
  TORCH_CHECK(t.device() == device, op, ": ", side, "[", i, "] is on ",
              t.device(), " but ", device_ref, " is on ", device,
              "; all tensors must be on one device");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", side, "[", i,
              "] with shape ", t.sizes(), " and strides ", t.strides(),
              " is not dense or overlaps itself; pass a contiguous tensor");
}

}  // namespace

c10::Device UpdateLists::device() const {
  if (!ema.empty()) return ema[0].device();
  if (!copy_ema.empty()) return copy_ema[0].device();
  return c10::Device(c10::kCPU);
}

void check_lists(const char* op, at::TensorList ema, at::TensorList model) {
  TORCH_CHECK(ema.size() == model.size(), op, ": got ", ema.size(),
              " ema tensors but ", model.size(), " model tensors");
  TORCH_CHECK(ema.size() < static_cast<size_t>(INT32_MAX), op,
              ": too many tensors (", ema.size(), ")");
  if (ema.empty()) return;
  const at::Device device = ema[0].device();
  const bool grad = c10::GradMode::is_enabled();
  const int64_t n = static_cast<int64_t>(ema.size());
  const UpdateLists lists{ema, model};
  for (int64_t i = 0; i < n; ++i) {
    prefetch_pairs_ahead(lists, i, n);
    const at::Tensor& e = ema[i];
    const at::Tensor& m = model[i];
    check_one(op, "ema", i, e, device);
    check_one(op, "model", i, m, device);
    TORCH_CHECK(e.sizes() == m.sizes(), op, ": ema[", i, "] has shape ",
                e.sizes(), " but model[", i, "] has shape ", m.sizes());
    TORCH_CHECK(same_layout(e, m), op, ": ema[", i, "] has strides ", e.strides(), " but model[",
                i, "] has strides ", m.strides(),
                "; both tensors of a pair must share one memory layout");
    TORCH_CHECK(!(grad && e.requires_grad()), op, ": ema[", i,
                "] requires grad; EMA tensors are updated in place and must "
                "not require grad (or call under torch.no_grad())");
  }
}

void check_copy_lists(const char* op, const UpdateLists& l) {
  TORCH_CHECK(l.copy_ema.size() == l.copy_model.size(), op, ": got ",
              l.copy_ema.size(), " copy_ema tensors but ", l.copy_model.size(),
              " copy_model tensors");
  TORCH_CHECK(l.num_rows() < static_cast<int64_t>(INT32_MAX), op,
              ": too many tensors (", l.num_rows(), ")");
  if (l.copy_ema.empty()) return;
  const at::Device device = l.device();
  const char* ref = l.ema.empty() ? "copy_ema[0]" : "ema[0]";
  const bool grad = c10::GradMode::is_enabled();
  for (size_t j = 0; j < l.copy_ema.size(); ++j) {
    const at::Tensor& e = l.copy_ema[j];
    const at::Tensor& m = l.copy_model[j];
    check_one(op, "copy_ema", j, e, device, ref, /*averaged=*/false);
    check_one(op, "copy_model", j, m, device, ref, /*averaged=*/false);
    TORCH_CHECK(e.scalar_type() == m.scalar_type(), op, ": copy_ema[", j,
                "] has dtype ", py_dtype(e.scalar_type()), " but copy_model[", j,
                "] has dtype ", py_dtype(m.scalar_type()),
                "; a copied pair must share one dtype");
    TORCH_CHECK(e.sizes() == m.sizes(), op, ": copy_ema[", j, "] has shape ",
                e.sizes(), " but copy_model[", j, "] has shape ", m.sizes());
    TORCH_CHECK(same_layout(e, m), op, ": copy_ema[", j, "] has strides ", e.strides(),
                " but copy_model[", j, "] has strides ", m.strides(),
                "; both tensors of a pair must share one memory layout");
    TORCH_CHECK(!(grad && e.requires_grad()), op, ": copy_ema[", j,
                "] requires grad; EMA tensors are updated in place and must "
                "not require grad (or call under torch.no_grad())");
  }
}

void check_decay(const char* op, double decay) {
  TORCH_CHECK(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0, op,
              ": decay must be a finite number in [0, 1], got ", decay);
}

void check_decay_tensor(const char* op, const at::Tensor& decay,
                        at::TensorList ema) {
  TORCH_CHECK(decay.defined(), op, ": decay is an undefined tensor");
  TORCH_CHECK(decay.dim() == 0, op,
              ": a decay tensor must be 0-dim, got shape ", decay.sizes());
  const at::ScalarType t = decay.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, op,
              ": a decay tensor must be torch.float32 or torch.float64, got dtype ",
              py_dtype(t),
              (t == at::kBFloat16 || t == at::kHalf
                   ? "; decays near 1 are not representable in 16 bits (0.9999 "
                     "rounds to 1.0 in bfloat16, which would freeze the EMA)"
                   : ""));
  if (!ema.empty()) {
    TORCH_CHECK(decay.device() == ema[0].device(), op,
                ": the decay tensor is on ", decay.device(),
                " but the tensors are on ", ema[0].device(),
                "; it is read on the tensors' device (no host sync)");
  }
}

// ---------------------------------------------------------------- plan cache

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
      static_cast<int64_t>(l.copy_ema.size()) != num_copies ||
      l.model.size() != l.ema.size() || l.copy_model.size() != l.copy_ema.size()) {
    return false;
  }
  const int64_t rows = num_tensors + num_copies;
  if (rows > 0 && l.device() != device) return false;
  const bool grad = c10::GradMode::is_enabled();
  auto range_matches = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      prefetch_pairs_ahead(l, i, hi);
      const at::Tensor& e = l.ema_at(i);
      const at::Tensor& m = l.model_at(i);
      const bool copy = l.is_copy(i);
      // Cheapest and most likely to differ first.  The const address: no
      // copy-on-write materialisation on this path.  Equal shapes and the
      // EMA's count imply the model's count.  The address also fixes the
      // device: CUDA allocations and host memory never share an address
      // (unified addressing), and a tensor without data reads as 0.
      if (raw_data_address(e) != ema_ptrs[i] || raw_data_address(m) != model_ptrs[i] ||
          e.numel() != numels[i] ||
          signature_dtype(e, copy) != ema_dtypes[i] ||
          signature_dtype(m, copy) != model_dtypes[i] ||
          !same_shape_dense_layout(e, m) || (grad && e.requires_grad())) {
        return false;
      }
    }
    return true;
  };
  if (rows < kParallelCheckPairs || !device.is_cpu() || at::get_num_threads() == 1) {
    return range_matches(0, rows);
  }
  // NOTE [busy CPU]: claimed in pieces, so a late thread never holds it up.
  constexpr int64_t kPiece = kParallelCheckPairs / 2;
  std::atomic<bool> ok{true};
  WorkPool::run((rows + kPiece - 1) / kPiece, at::get_num_threads() - 1, [&](int64_t p) {
    if (ok.load(std::memory_order_relaxed) &&
        !range_matches(p * kPiece, std::min(rows, (p + 1) * kPiece))) {
      ok = false;
    }
  });
  return ok.load();
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

// "ema[3]" or "copy_ema[0]": how errors name row `row` of the table.
std::string row_name(const UpdateLists& l, bool ema_side, int64_t row) {
  std::ostringstream out;
  if (l.is_copy(row)) {
    out << (ema_side ? "copy_ema[" : "copy_model[") << row - l.num_averaged() << "]";
  } else {
    out << (ema_side ? "ema[" : "model[") << row << "]";
  }
  return out.str();
}

void check_no_overlap(const char* op, const UpdateLists& l) {
  struct Span {
    uintptr_t lo, hi;
    int64_t row;
  };
  const int64_t rows = l.num_rows();
  std::vector<Span> spans;
  spans.reserve(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const at::Tensor& e = l.ema_at(i);
    if (e.numel() == 0) continue;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(e.data_ptr());
    spans.push_back({lo, lo + e.nbytes(), i});
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK(spans[k].lo >= spans[k - 1].hi, op, ": ",
                row_name(l, true, spans[k - 1].row), " and ",
                row_name(l, true, spans[k].row),
                " overlap in memory (tied or aliased tensors); pass each "
                "storage once");
  }
  // A model tensor may be read by its own pair in place (same range), but
  // must not overlap any other EMA tensor: that would be a write/read race.
  for (int64_t j = 0; j < rows; ++j) {
    const at::Tensor& m = l.model_at(j);
    if (m.numel() == 0) continue;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(m.data_ptr());
    const uintptr_t hi = lo + m.nbytes();
    auto it = std::upper_bound(
        spans.begin(), spans.end(), hi,
        [](uintptr_t v, const Span& s) { return v <= s.lo; });
    // Spans before `it` start below `hi`; walk back while they may overlap.
    while (it != spans.begin()) {
      --it;
      if (it->hi <= lo) break;
      const bool same_pair = it->row == j && it->lo == lo && it->hi == hi;
      TORCH_CHECK(same_pair, op, ": ", row_name(l, false, j), " overlaps ",
                  row_name(l, true, it->row),
                  " in memory; the EMA must not alias the model");
    }
  }
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
    append_chunks(r.numel, static_cast<int32_t>(i), chunk, chunks);
    plan->ema_ptrs.push_back(raw_data_address(e));
    plan->model_ptrs.push_back(raw_data_address(m));
    plan->numels.push_back(e.numel());
    plan->ema_dtypes.push_back(signature_dtype(e, copy));
    plan->model_dtypes.push_back(signature_dtype(m, copy));
    plan->num_elements += e.numel();
    plan->num_units += r.numel;
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
  check_lists(op, lists.ema, lists.model);
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

void run_update(const PlanPtr& plan, const at::Tensor* decay_tensor, double decay) {
  if (plan->device.is_cuda()) {
    cuda_launch(plan, decay_tensor, decay);
  } else {
    cpu_update(*plan, decay);
  }
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

// ---------------------------------------------------------------- CPU kernel

namespace {

using FVec = at::vec::Vectorized<float>;
constexpr int64_t kF = FVec::size();

// Two float vectors (2 * kF elements) from/to any of the fp32 / bf16 / fp16.
template <typename T>
inline void load2(const T* p, FVec& a, FVec& b) {
  static_assert(at::vec::Vectorized<T>::size() == 2 * kF, "vector widths");
  std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
}
template <>
inline void load2<float>(const float* p, FVec& a, FVec& b) {
  a = FVec::loadu(p);
  b = FVec::loadu(p + kF);
}
template <typename T>
inline void store2(T* p, const FVec& a, const FVec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}
template <>
inline void store2<float>(float* p, const FVec& a, const FVec& b) {
  a.store(p);
  b.store(p + kF);
}

// at::vec's fmadd is a real fused multiply-add only in the AVX2 build; the
// generic one may round the product first.  Elsewhere the scalar loop with
// std::fma runs instead, so every build computes NOTE [update arithmetic].
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kVectorFma = true;
#else
constexpr bool kVectorFma = false;
#endif

// One vector step (2 * kF elements) of the fp32-math update.
template <typename E, typename M>
inline void lerp_step(E* e, const M* m, const FVec& vd, const FVec& vw) {
  FVec e0, e1, m0, m1;
  load2<E>(e, e0, e1);
  load2<M>(m, m0, m1);
  store2<E>(e, at::vec::fmadd(e0, vd, m0 * vw), at::vec::fmadd(e1, vd, m1 * vw));
}

template <typename E, typename M>
void cpu_chunk(const TensorEntry& t, int64_t start, int64_t len, double decay) {
  using Acc = typename AccType<E, M>::type;
  E* e = static_cast<E*>(t.ema) + start;
  const M* m = static_cast<const M*>(t.model) + start;
  const Acc d = static_cast<Acc>(decay);
  const Acc w = static_cast<Acc>(1.0 - decay);
  int64_t i = 0;
  if constexpr (kVectorFma && std::is_same_v<Acc, float>) {
    const FVec vd(d), vw(w);
    for (; i + 2 * kF <= len; i += 2 * kF) lerp_step<E, M>(e + i, m + i, vd, vw);
  }
  // fp64 pairs and the tail: scalar (the compiler vectorizes the former).
  // The same expression as the vector steps and the CUDA kernel (NOTE
  // [update arithmetic]).
  for (; i < len; ++i) {
    e[i] = static_cast<E>(ema_fma<Acc>(static_cast<Acc>(e[i]), d, static_cast<Acc>(m[i]), w));
  }
}

// W chunks of small tensors side by side, element for element the same
// arithmetic as one after the other: the streams of W separately allocated
// tensors then start, and wait for their pages, together.  `rows` points at
// W consecutive chunk rows, each processed whole.
template <typename E, typename M, int W>
void cpu_chunk_group(const TensorEntry* tensors, const ChunkEntry* rows,
                     double decay) {
  int64_t i = 0;
  if constexpr (kVectorFma && std::is_same_v<typename AccType<E, M>::type, float>) {
    E* e[W];
    const M* m[W];
    int64_t n = rows[0].len;
    for (int j = 0; j < W; ++j) {
      const TensorEntry& t = tensors[rows[j].tensor];
      e[j] = static_cast<E*>(t.ema) + rows[j].start;
      m[j] = static_cast<const M*>(t.model) + rows[j].start;
      n = std::min<int64_t>(n, rows[j].len);
    }
    const FVec vd(static_cast<float>(decay)), vw(static_cast<float>(1.0 - decay));
    for (; i + 2 * kF <= n; i += 2 * kF) {
      for (int j = 0; j < W; ++j) lerp_step<E, M>(e[j] + i, m[j] + i, vd, vw);
    }
  }
  for (int j = 0; j < W; ++j) {
    const ChunkEntry& c = rows[j];
    cpu_chunk<E, M>(tensors[c.tensor], c.start + i, c.len - i, decay);
  }
}

// Up to kGroup chunks of at most kGroupMaxLen elements are grouped (8, else
// 4, else 2); longer ones are streams long enough for the hardware
// prefetcher.  Kernel time over the flat-buffer limit's on 10k x 1k, two
// runs each: groups of 4 1.31x / 1.30x, of 8 1.22x / 1.16x, of 16 1.55x.
constexpr int kGroup = 8;
constexpr int64_t kGroupMaxLen = 1 << 14;

// Each separately allocated tensor starts a new stream in new pages, and the
// first touch of each page waits for its translation and its first lines.
// Prefetching the first and last byte of the chunk kTouchAhead rows ahead
// (both ends: a small tensor usually spans two pages) starts that work early.
// Measured on a 2-core EPYC, 10,000 separately allocated 1,000-element
// tensors, kernel only, 2 threads: 2.83 ms without, 2.64 / 2.54 / 2.43 /
// 2.43 / 2.45 ms 2 / 4 / 8 / 16 / 32 rows ahead.  In another (slower) run:
// 3.26 ms with neither this nor groups, 2.93 with this, 2.86 with this and
// groups of 2, 2.64 with this and groups of 4.  Prefetching inside the loop
// (512 B to 4 KiB ahead, or the next tensor line by line) was slower than
// nothing.
constexpr int64_t kTouchAhead = 8;

inline void touch_chunk(const TensorEntry* tensors, const ChunkEntry* chunks,
                        int64_t k, int64_t num_chunks) {
  if (k >= num_chunks) return;
  const ChunkEntry& c = chunks[k];
  const TensorEntry& t = tensors[c.tensor];
  const int64_t es = dtype_size(t.ema_dtype), ms = dtype_size(t.model_dtype);
  const char* e = static_cast<const char*>(t.ema) + c.start * es;
  const char* m = static_cast<const char*>(t.model) + c.start * ms;
  __builtin_prefetch(e, 1);
  __builtin_prefetch(e + (c.len - 1) * es, 1);
  __builtin_prefetch(m, 0);
  __builtin_prefetch(m + (c.len - 1) * ms, 0);
}

using ChunkFn = void (*)(const TensorEntry&, int64_t, int64_t, double);
using GroupFn = void (*)(const TensorEntry*, const ChunkEntry*, double);

template <typename E>
constexpr std::array<ChunkFn, kNumDTypes> row_for() {
  return {&cpu_chunk<E, float>, &cpu_chunk<E, double>,
          &cpu_chunk<E, c10::BFloat16>, &cpu_chunk<E, c10::Half>};
}
template <typename E, int W>
constexpr std::array<GroupFn, kNumDTypes> group_row_for() {
  return {&cpu_chunk_group<E, float, W>, &cpu_chunk_group<E, double, W>,
          &cpu_chunk_group<E, c10::BFloat16, W>, &cpu_chunk_group<E, c10::Half, W>};
}
template <int W>
constexpr std::array<std::array<GroupFn, kNumDTypes>, kNumDTypes> group_table() {
  return {group_row_for<float, W>(), group_row_for<double, W>(),
          group_row_for<c10::BFloat16, W>(), group_row_for<c10::Half, W>()};
}
// Indexed by [ema dtype code][model dtype code].
constexpr std::array<std::array<ChunkFn, kNumDTypes>, kNumDTypes> kCpuChunkFns = {
    row_for<float>(), row_for<double>(), row_for<c10::BFloat16>(),
    row_for<c10::Half>()};
constexpr auto kCpuGroup2Fns = group_table<2>();
constexpr auto kCpuGroup4Fns = group_table<4>();
constexpr auto kCpuGroup8Fns = group_table<kGroup>();

// Units [lo, hi) of the concatenation of all chunks of `plan` (a unit is an
// element, or a byte of a copied pair), on the calling thread.
void cpu_run_range(const Plan& plan, double decay, int64_t lo, int64_t hi) {
  const TensorEntry* tensors = plan.tensors();
  const ChunkEntry* chunks = plan.chunks();
  const int64_t* ends = plan.chunk_ends.data();
  int64_t k = std::upper_bound(ends, ends + plan.num_chunks, lo) - ends;
  for (; k < plan.num_chunks; ++k) {
    const int64_t begin = ends[k] - chunks[k].len;
    if (begin >= hi) break;
    touch_chunk(tensors, chunks, k + kTouchAhead, plan.num_chunks);
    const ChunkEntry& c = chunks[k];
    const TensorEntry& t = tensors[c.tensor];
    const int64_t s = std::max(lo, begin) - begin;
    const int64_t n = std::min(hi, ends[k]) - begin - s;
    if (t.ema_dtype == kBytes) {
      // memmove: a pair may copy a tensor onto itself (the same bytes).
      std::memmove(static_cast<char*>(t.ema) + c.start + s,
                   static_cast<const char*>(t.model) + c.start + s, n);
      continue;
    }
    // How many rows from k on are small, whole in [lo, hi), of t's dtypes.
    int g = 0;
    if (begin >= lo) {
      while (g < kGroup && k + g < plan.num_chunks && ends[k + g] <= hi &&
             chunks[k + g].len <= kGroupMaxLen) {
        const TensorEntry& u = tensors[chunks[k + g].tensor];
        if (u.ema_dtype != t.ema_dtype || u.model_dtype != t.model_dtype) break;
        ++g;
      }
    }
    if (g >= 2) {
      const int w = g == kGroup ? kGroup : (g >= 4 ? 4 : 2);
      for (int j = 1; j < w; ++j) {
        touch_chunk(tensors, chunks, k + j + kTouchAhead, plan.num_chunks);
      }
      const auto& fns = w == kGroup ? kCpuGroup8Fns : (w == 4 ? kCpuGroup4Fns : kCpuGroup2Fns);
      fns[t.ema_dtype][t.model_dtype](tensors, chunks + k, decay);
      k += w - 1;
      continue;
    }
    kCpuChunkFns[t.ema_dtype][t.model_dtype](t, c.start + s, n, decay);
  }
}

}  // namespace

// Work units of the CPU kernel: 64K elements (256 KiB of an fp32 EMA), small
// enough that a helper descheduled in the middle of one delays the call by
// little, large enough that claiming one (an atomic add) costs nothing.
constexpr int64_t kCpuWorkUnit = 1 << 16;

void cpu_update(const Plan& plan, double decay) {
  const int64_t total = plan.num_units;
  if (total == 0) return;
  // Split by element count (a copied pair counts its bytes), not by chunk:
  // many small tensors would unbalance the threads otherwise.
  const int64_t units = (total + kCpuWorkUnit - 1) / kCpuWorkUnit;
  WorkPool::run(units, at::get_num_threads() - 1, [&](int64_t u) {
    cpu_run_range(plan, decay, u * kCpuWorkUnit, std::min(total, (u + 1) * kCpuWorkUnit));
  });
}

// Test-only: units [lo, hi) of the plan of these lists, on this thread.
// Lets a test run the CPU kernel on the last chunks of a tensor above 2^31
// elements whose pages are never touched elsewhere.
void cpu_update_range(at::TensorList ema, at::TensorList model, double decay,
                      int64_t lo, int64_t hi) {
  const char* op = "ema_cuda::_cpu_update_range_";
  check_decay(op, decay);
  PlanPtr plan = get_plan(op, {ema, model}, kCpuChunk);
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= plan->num_units, op, ": range [", lo, ", ", hi,
              ") is outside [0, ", plan->num_units, ")");
  cpu_run_range(*plan, decay, lo, hi);
}

// ------------------------------------------------------------- op kernels

namespace {

double read_cpu_decay(const at::Tensor& decay) {
  const double d = decay.item<double>();
  check_decay(kOpName, d);
  return d;
}

// The lists are checked by `get_plan` unless a valid plan is cached for them
// (NOTE [plan validity]); nothing is written before every check has passed.
void ema_update_cpu(at::TensorList ema, at::TensorList model, double decay) {
  check_decay(kOpName, decay);
  cpu_update(*get_plan(kOpName, {ema, model}, kCpuChunk), decay);
}

void ema_update_tensor_cpu(at::TensorList ema, at::TensorList model,
                           const at::Tensor& decay) {
  check_decay_tensor(kOpName, decay, ema);
  // On the CPU the value is read on the host anyway: check its range too.
  const double d = read_cpu_decay(decay);
  cpu_update(*get_plan(kOpName, {ema, model}, kCpuChunk), d);
}

// Runs the CUDA launch on the CPU: the plan's table, the grid the launch
// would use on a GPU with `sm_count` SMs, and for every block and thread the
// kernel's own body (`kernel_block`: decay read, grid-stride loop, chunk
// body), with every 16-byte vector access checked for alignment.  The decay
// is read through a pointer like the kernel's when `decay_tensor` is given.
// Rows [first_chunk, end_chunk) of the table only when given (a test of a
// tensor above 2^31 elements runs its last rows, whose pages alone are
// touched).  The copied pairs are those a ListUpdater would put in the same
// table.  Test-only.
void emulate_cuda_update(at::TensorList ema, at::TensorList model,
                         at::TensorList copy_ema, at::TensorList copy_model,
                         double decay, int64_t chunk_size, int64_t threads,
                         int64_t sm_count, const std::optional<at::Tensor>& decay_tensor,
                         int64_t first_chunk, int64_t end_chunk) {
  const char* op = "ema_cuda::_emulate_cuda_update_";
  const UpdateLists lists{ema, model, copy_ema, copy_model};
  check_decay(op, decay);
  if (decay_tensor.has_value()) {
    check_decay_tensor(op, *decay_tensor, ema.empty() ? copy_ema : ema);
    check_decay(op, decay_tensor->item<double>());
  }
  const DecayArg arg = make_decay_arg(decay, decay_tensor ? &*decay_tensor : nullptr);
  TORCH_CHECK(chunk_size > 0 && chunk_size <= INT32_MAX, op,
              ": chunk_size must be in [1, 2^31), got ", chunk_size);
  TORCH_CHECK(threads > 0 && sm_count > 0, op,
              ": threads and sm_count must be positive, got ", threads, " and ",
              sm_count);
  PlanPtr plan = get_plan(op, lists, chunk_size);
  if (end_chunk < 0) end_chunk = plan->num_chunks;
  TORCH_CHECK(0 <= first_chunk && first_chunk <= end_chunk && end_chunk <= plan->num_chunks,
              op, ": chunk rows [", first_chunk, ", ", end_chunk, ") are outside [0, ",
              plan->num_chunks, ")");
  const int64_t rows = end_chunk - first_chunk;
  const int64_t grid = grid_blocks(rows, sm_count, kCudaBlocksPerSM);
  const ChunkEntry* chunks = plan->chunks() + first_chunk;
  try {
    for (int64_t block = 0; block < grid; ++block) {
      for (int64_t tid = 0; tid < threads; ++tid) {
        kernel_block(plan->tensors(), chunks, rows, block, grid, tid, threads, arg);
      }
    }
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// The chunk rows a plan would hold for tensors of these sizes, as an int64
// tensor [num_chunks, 3] of (tensor, start, len).  Test-only: lets tests check
// the 64-bit index arithmetic for sizes no test machine can allocate.
at::Tensor plan_chunks(at::IntArrayRef numels, int64_t chunk_size) {
  TORCH_CHECK(chunk_size > 0 && chunk_size <= INT32_MAX,
              "ema_cuda::_plan_chunks: chunk_size must be in [1, 2^31), got ",
              chunk_size);
  std::vector<ChunkEntry> chunks;
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, "ema_cuda::_plan_chunks: numels[", i,
                "] is negative (", numels[i], ")");
    append_chunks(numels[i], static_cast<int32_t>(i), chunk_size, chunks);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(chunks.size()), 3}, at::kLong);
  auto a = out.accessor<int64_t, 2>();
  for (size_t k = 0; k < chunks.size(); ++k) {
    a[k][0] = chunks[k].tensor;
    a[k][1] = chunks[k].start;
    a[k][2] = chunks[k].len;
  }
  return out;
}

// (head, vector width) the CUDA table stores for a pair at these addresses.
std::vector<int64_t> vector_head_op(int64_t ema_addr, int64_t model_addr,
                                    at::ScalarType ema_dtype,
                                    at::ScalarType model_dtype) {
  const int8_t ec = dtype_code(ema_dtype), mc = dtype_code(model_dtype);
  TORCH_CHECK(ec >= 0 && mc >= 0, "ema_cuda::_vector_head: unsupported dtype");
  const int n = vec_width_for(ec, mc);
  return {vector_head(static_cast<uintptr_t>(ema_addr),
                      static_cast<uintptr_t>(model_addr), dtype_size(ec),
                      dtype_size(mc), n),
          n};
}

// (vector bytes, head) the CUDA table stores for a pair at these addresses.
std::vector<int64_t> vector_choice_op(int64_t ema_addr, int64_t model_addr,
                                      at::ScalarType ema_dtype,
                                      at::ScalarType model_dtype) {
  const int8_t ec = dtype_code(ema_dtype), mc = dtype_code(model_dtype);
  TORCH_CHECK(ec >= 0 && mc >= 0, "ema_cuda::_vector_choice: unsupported dtype");
  const VectorChoice v = choose_vector(static_cast<uintptr_t>(ema_addr),
                                       static_cast<uintptr_t>(model_addr), ec, mc);
  return {v.vec_bytes, v.head};
}

std::vector<int64_t> plan_cache_stats_op() { return plan_cache_stats(); }
void clear_plan_cache_op() { clear_plan_cache(); }
bool cuda_compiled_op() { return cuda_compiled(); }

}  // namespace

#ifndef EMA_CUDA_WITH_CUDA
bool cuda_compiled() { return false; }
bool cuda_capturing(const c10::Device&) { return false; }
void cuda_launch(const PlanPtr&, const at::Tensor*, double) {
  TORCH_CHECK(false, kOpName, ": this build of ema_cuda has no CUDA kernel");
}
void upload_tables(Plan&, const void*, size_t, const void*, size_t) {
  TORCH_CHECK(false, kOpName, ": this build of ema_cuda has no CUDA kernel");
}
#endif

TORCH_LIBRARY(ema_cuda, m) {
  // The Tensor overload first: `torch.ops.ema_cuda.ema_update_(E, M, d)`
  // tries the overloads in this order, and a 0-dim tensor would also convert
  // to the float overload's `float`, skipping the decay tensor's checks (and
  // syncing the host on CUDA).
  m.def(
      "ema_update_.Tensor(Tensor(a!)[] ema, Tensor[] model, Tensor decay) -> ()");
  m.def("ema_update_(Tensor(a!)[] ema, Tensor[] model, float decay) -> ()");
  m.def(
      "_emulate_cuda_update_(Tensor(a!)[] ema, Tensor[] model, "
      "Tensor(b!)[] copy_ema, Tensor[] copy_model, float decay, "
      "int chunk_size=65536, int threads=512, int sm_count=132, "
      "Tensor? decay_tensor=None, int first_chunk=0, int end_chunk=-1) -> ()");
  m.def(
      "_cpu_update_range_(Tensor(a!)[] ema, Tensor[] model, float decay, "
      "int lo, int hi) -> ()");
  m.def("_release_captured_plans() -> int", &release_captured_plans);
  m.def("_plan_chunks(int[] numels, int chunk_size) -> Tensor",
        &plan_chunks);
  m.def("_vector_head(int ema_addr, int model_addr, ScalarType ema_dtype, "
        "ScalarType model_dtype) -> int[]",
        &vector_head_op);
  m.def("_vector_choice(int ema_addr, int model_addr, ScalarType ema_dtype, "
        "ScalarType model_dtype) -> int[]",
        &vector_choice_op);
  m.def("_plan_cache_stats() -> int[]", &plan_cache_stats_op);
  m.def("_clear_plan_cache() -> ()", &clear_plan_cache_op);
  m.def("_cuda_compiled() -> bool", &cuda_compiled_op);
}

TORCH_LIBRARY_IMPL(ema_cuda, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
  m.impl("ema_update_.Tensor", &ema_update_tensor_cpu);
  m.impl("_emulate_cuda_update_", &emulate_cuda_update);
  m.impl("_cpu_update_range_", &cpu_update_range);
}

// The op mutates tensors that never take part in autograd (the kernels
// reject EMA tensors that require grad): autograd has nothing to record.
TORCH_LIBRARY_IMPL(ema_cuda, Autograd, m) {
  m.impl("ema_update_", torch::CppFunction::makeFallthrough());
  m.impl("ema_update_.Tensor", torch::CppFunction::makeFallthrough());
  m.impl("_emulate_cuda_update_", torch::CppFunction::makeFallthrough());
  m.impl("_cpu_update_range_", torch::CppFunction::makeFallthrough());
}

}  // namespace ema_cuda
