// Validation of the op's inputs, shared by every entry: the op on each
// backend, FusedUpdater's ListUpdater (python_module.cpp) and the test-only
// ops.  Errors name the op, the tensor's index and the values; every check
// runs before anything is written.
//
// ema_cuda/_checks.py is the same checks in Python (the fallback backend and
// the fake kernels): same order, same messages.  tests/test_check_parity.py
// feeds both the same bad inputs and expects the same error.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include "dtypes.h"
#include "multi_tensor.h"

namespace ema_cuda {

// How errors name the caller.
constexpr const char* kOpName = "ema_cuda::ema_update_";
constexpr const char* kUpdaterName = "ema_cuda.FusedUpdater";
constexpr const char* kMultiOpName = "ema_cuda::multi_ema_update_";
constexpr const char* kMultiUpdaterName = "ema_cuda.MultiFusedUpdater";

// The tensors of one update: pairs averaged (ema[i] from model[i]) and pairs
// copied verbatim (copy_ema[j] := copy_model[j], e.g. integer buffers), all
// in one launch.  The table holds the averaged pairs first, then the copies.
// A multi-EMA update (`multi`, NOTE [several EMAs] in multi_tensor.h) holds
// `profiles` EMAs of each model tensor, profile-major: row k * n + i is
// ema[k * n + i] from model[i], n = model.size().
struct UpdateLists {
  at::TensorList ema, model;
  at::TensorList copy_ema = {}, copy_model = {};
  int64_t profiles = 1;
  bool multi = false;

  int64_t num_averaged() const { return static_cast<int64_t>(ema.size()); }
  int64_t num_rows() const { return static_cast<int64_t>(ema.size() + copy_ema.size()); }
  // Rows per profile: the model tensors.
  int64_t stride() const { return static_cast<int64_t>(model.size()); }
  bool is_copy(int64_t row) const { return row >= num_averaged(); }
  const at::Tensor& ema_at(int64_t row) const {
    return row < num_averaged() ? ema[row] : copy_ema[row - num_averaged()];
  }
  const at::Tensor& model_at(int64_t row) const {
    if (row >= num_averaged()) return copy_model[row - num_averaged()];
    return model[profiles == 1 ? row : row % stride()];
  }
  // The device of the first tensor (CPU when there is none).
  c10::Device device() const;
};

// The lists of a multi-EMA update of `profiles` profiles.
inline UpdateLists multi_lists(at::TensorList ema, at::TensorList model, int64_t profiles) {
  return UpdateLists{ema, model, {}, {}, profiles, /*multi=*/true};
}

// How an error names one side of table row `row`: "ema[3]", "model[3]",
// "copy_ema[0]", or for a multi-EMA update "ema[1][3]" (profile 1's EMA of
// model[3]).  Written by operator<< only when a check fails.
struct RowName {
  const UpdateLists* lists;
  bool ema_side;
  int64_t row;
};
std::ostream& operator<<(std::ostream& out, const RowName& name);

// The table code of an averaged dtype (dtypes.h), or -1.
inline int8_t dtype_code(at::ScalarType t) {
  switch (t) {
#define EMA_CUDA_CODE_OF(code, T, S) \
  case at::ScalarType::S:            \
    return code;
    EMA_CUDA_FOR_EACH_DTYPE(EMA_CUDA_CODE_OF)
#undef EMA_CUDA_CODE_OF
    default:
      return -1;
  }
}

// Python's spelling of a dtype, a layout, a float: "torch.float32",
// "torch.sparse_coo", "2.0", so that messages read as the Python side's do.
std::string py_dtype(at::ScalarType t);
std::string py_layout(at::Layout layout);
std::string py_float(double x);

// Checks that can change from call to call: list lengths, dtypes, devices,
// shapes, layouts, autograd.  O(number of tensors); never touches data.
// A multi-EMA update's lengths: ema holds profiles x model tensors.
void check_lists(const char* op, const UpdateLists& lists);
// The same for the copied pairs: any dtype, one dtype per pair, on
// `lists.device()`.
void check_copy_lists(const char* op, const UpdateLists& lists);
// No EMA tensor overlaps another EMA tensor or another pair's model tensor.
// O(n log n) in the number of pairs; run when a plan is built.
void check_no_overlap(const char* op, const UpdateLists& lists);
void check_decay(const char* op, double decay);
void check_decay_tensor(const char* op, const at::Tensor& decay, at::TensorList ema);
// The multi-EMA op's decays: 1 to kMaxProfiles of them (`expected` of them
// unless negative), each a finite number in [0, 1]; or a 1-dim fp32/fp64
// tensor of as many on the tensors' device (its values are not read here).
void check_decays(const char* op, c10::ArrayRef<double> decays, int64_t expected = -1);
void check_decays_tensor(const char* op, const at::Tensor& decays, at::TensorList ema,
                         int64_t expected = -1);
// A host copy of a decays tensor's values, checked as `check_decays` does
// (the CPU kernels read them on the host anyway).
std::vector<double> read_decays(const char* op, const at::Tensor& decays);

// The error for a launch that found no kernel image for the GPU (compute
// capability major.minor of cuda:device): what the build holds and the
// command that rebuilds it for this GPU.  Host code, so that the message is
// tested without a GPU (ema_cuda_testing::no_kernel_image_message).
std::string no_kernel_image_message(const char* op, int device, int major, int minor);

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

// ------------------------------------------- walking the pairs of long lists

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

}  // namespace ema_cuda
