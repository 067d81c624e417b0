// Validation of the op's inputs (checks.h); ema_cuda/_checks.py mirrors it.
#include "checks.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <vector>

#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

namespace ema_cuda {

namespace {

// The averaged dtypes as a message lists them, in table order.
const std::string& dtype_list() {
  static const std::string list = [] {
    std::string s;
#define EMA_CUDA_DTYPE_NAME(code, T, S)   \
  if (!s.empty()) s += ", ";              \
  s += py_dtype(at::ScalarType::S);
    EMA_CUDA_FOR_EACH_DTYPE(EMA_CUDA_DTYPE_NAME)
#undef EMA_CUDA_DTYPE_NAME
    return s;
  }();
  return list;
}

// `averaged`: the tensor must have a floating dtype the kernel averages;
// `device_ref` names the tensor whose device all must share.
void check_one(const char* op, const RowName& name, const at::Tensor& t,
               const at::Device& device, const RowName& device_ref, bool averaged) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name,
              " has layout ", py_layout(t.layout()), "; only strided tensors are supported");
  TORCH_CHECK(!averaged || dtype_code(t.scalar_type()) >= 0, op, ": ", name,
              " has dtype ", py_dtype(t.scalar_type()), "; expected one of ", dtype_list());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ",
              t.device(), " but ", device_ref, " is on ", device,
              "; all tensors must be on one device");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", name,
              " with shape ", t.sizes(), " and strides ", t.strides(),
              " is not dense or overlaps itself; pass a contiguous tensor");
}

// Every check of table row `row` (an averaged or a copied pair).  The model
// tensor of a multi-EMA op is checked with each profile's row: same
// verdict, and the first profile's row reports it.
void check_row(const char* op, const UpdateLists& l, int64_t row, const at::Device& device,
               const RowName& device_ref, bool grad) {
  const bool copy = l.is_copy(row);
  const at::Tensor& e = l.ema_at(row);
  const at::Tensor& m = l.model_at(row);
  const RowName en{&l, true, row}, mn{&l, false, row};
  check_one(op, en, e, device, device_ref, !copy);
  check_one(op, mn, m, device, device_ref, !copy);
  TORCH_CHECK(!copy || e.scalar_type() == m.scalar_type(), op, ": ", en,
              " has dtype ", py_dtype(e.scalar_type()), " but ", mn,
              " has dtype ", py_dtype(m.scalar_type()),
              "; a copied pair must share one dtype");
  TORCH_CHECK(e.sizes() == m.sizes(), op, ": ", en, " has shape ",
              e.sizes(), " but ", mn, " has shape ", m.sizes());
  TORCH_CHECK(same_layout(e, m), op, ": ", en, " has strides ", e.strides(), " but ",
              mn, " has strides ", m.strides(),
              "; both tensors of a pair must share one memory layout");
  TORCH_CHECK(!(grad && e.requires_grad()), op, ": ", en,
              " requires grad; EMA tensors are updated in place and must "
              "not require grad (or call under torch.no_grad())");
}

}  // namespace

std::ostream& operator<<(std::ostream& out, const RowName& r) {
  const UpdateLists& l = *r.lists;
  if (l.is_copy(r.row)) {
    return out << (r.ema_side ? "copy_ema[" : "copy_model[") << r.row - l.num_averaged() << "]";
  }
  if (!l.multi) return out << (r.ema_side ? "ema[" : "model[") << r.row << "]";
  // NOTE [several EMAs]: row k * n + i is profile k's EMA of model[i].
  const int64_t n = l.stride();
  if (!r.ema_side) return out << "model[" << (n ? r.row % n : r.row) << "]";
  return out << "ema[" << (n ? r.row / n : 0) << "][" << (n ? r.row % n : r.row) << "]";
}

std::string py_dtype(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

std::string py_layout(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    case at::kJagged: return "torch.jagged";
    default: {
      std::ostringstream out;
      out << layout;
      return out.str();
    }
  }
}

// Python's repr of a float: the shortest digits that read back as `x`,
// positional for exponents in [-4, 16) (with ".0" when integral), else
// "1e+16" / "1.5e-05".
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[40];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*e", digits - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  // buf is "[-]d[.ddd]e<sign><exp>".
  const std::string s(buf);
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  const bool negative = s[0] == '-';
  std::string digits;
  for (size_t k = negative ? 1 : 0; k < e; ++k) {
    if (s[k] != '.') digits += s[k];
  }
  std::string out = negative ? "-" : "";
  if (-4 <= exp && exp < 16) {
    if (exp < 0) {
      out += "0." + std::string(-exp - 1, '0') + digits;
    } else {
      const size_t whole = static_cast<size_t>(exp) + 1;
      if (digits.size() <= whole) {
        out += digits + std::string(whole - digits.size(), '0') + ".0";
      } else {
        out += digits.substr(0, whole) + "." + digits.substr(whole);
      }
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char tail[8];
    std::snprintf(tail, sizeof(tail), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += tail;
  }
  return out;
}

c10::Device UpdateLists::device() const {
  if (!ema.empty()) return ema[0].device();
  if (!copy_ema.empty()) return copy_ema[0].device();
  return c10::Device(c10::kCPU);
}

void check_lists(const char* op, const UpdateLists& l) {
  if (l.multi) {
    TORCH_CHECK(static_cast<int64_t>(l.ema.size()) == l.profiles * l.stride(), op, ": got ",
                l.ema.size(), " ema tensors for ", l.profiles, " decays and ", l.model.size(),
                " model tensors; expected ", l.profiles, " x ", l.model.size(), " = ",
                l.profiles * l.stride(), " (profile-major: ema[k * ", l.model.size(),
                " + i] is profile k's EMA of model[i])");
  } else {
    TORCH_CHECK(l.ema.size() == l.model.size(), op, ": got ", l.ema.size(),
                " ema tensors but ", l.model.size(), " model tensors");
  }
  TORCH_CHECK(l.ema.size() < static_cast<size_t>(INT32_MAX), op,
              ": too many tensors (", l.ema.size(), ")");
  if (l.ema.empty()) return;
  const at::Device device = l.ema[0].device();
  const bool grad = c10::GradMode::is_enabled();
  const int64_t n = l.num_averaged();
  const RowName ref{&l, true, 0};
  for (int64_t i = 0; i < n; ++i) {
    prefetch_pairs_ahead(l, i, n);
    check_row(op, l, i, device, ref, grad);
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
  const RowName ref{&l, true, l.ema.empty() ? l.num_averaged() : 0};
  const bool grad = c10::GradMode::is_enabled();
  for (int64_t row = l.num_averaged(); row < l.num_rows(); ++row) {
    check_row(op, l, row, device, ref, grad);
  }
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
  // Ordered by (start, end, row): which pair an error names does not depend
  // on the sort (the Python side sorts the same tuples).
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.lo != b.lo ? a.lo < b.lo : (a.hi != b.hi ? a.hi < b.hi : a.row < b.row);
  });
  for (size_t k = 1; k < spans.size(); ++k) {
    TORCH_CHECK(spans[k].lo >= spans[k - 1].hi, op, ": ",
                RowName{&l, true, spans[k - 1].row}, " and ",
                RowName{&l, true, spans[k].row},
                " overlap in memory (tied or aliased tensors); pass each "
                "storage once");
  }
  // A model tensor may be read by its own pair in place (same range), but
  // must not overlap any other EMA tensor: that would be a write/read race.
  // With several profiles it would overlap every EMA but one: refused.  A
  // multi-EMA model tensor is looked at once, as row i (profile 0).
  const int64_t models = l.multi ? l.stride() : l.num_averaged();
  for (int64_t j = 0; j < rows; ++j) {
    if (j >= models && !l.is_copy(j)) continue;
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
      const bool same_pair = it->row == j && it->lo == lo && it->hi == hi && l.profiles == 1;
      TORCH_CHECK(same_pair, op, ": ", RowName{&l, false, j}, " overlaps ",
                  RowName{&l, true, it->row},
                  " in memory; the EMA must not alias the model");
    }
  }
}

void check_decay(const char* op, double decay) {
  TORCH_CHECK(std::isfinite(decay) && decay >= 0.0 && decay <= 1.0, op,
              ": decay must be a finite number in [0, 1], got ", py_float(decay));
}

namespace {
// What a decay tensor of either op must be: its dtype and device (`what`
// names it: "decay tensor" or "decays tensor").
void check_decay_tensor_kind(const char* op, const char* what, const at::Tensor& decay,
                             at::TensorList ema) {
  const at::ScalarType t = decay.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, op,
              ": a ", what, " must be torch.float32 or torch.float64, got dtype ",
              py_dtype(t),
              (t == at::kBFloat16 || t == at::kHalf
                   ? "; decays near 1 are not representable in 16 bits (0.9999 "
                     "rounds to 1.0 in bfloat16, which would freeze the EMA)"
                   : ""));
  if (!ema.empty()) {
    TORCH_CHECK(decay.device() == ema[0].device(), op,
                ": the ", what, " is on ", decay.device(),
                " but the tensors are on ", ema[0].device(),
                "; it is read on the tensors' device (no host sync)");
  }
}

void check_profile_count(const char* op, int64_t k, int64_t expected) {
  TORCH_CHECK(k >= 1 && k <= kMaxProfiles, op, ": got ", k,
              " decays; one multi-EMA update takes 1 to ", kMaxProfiles, " profiles");
  TORCH_CHECK(expected < 0 || k == expected, op, ": got ", k, " decays for ", expected,
              " EMA profiles");
}
}  // namespace

void check_decay_tensor(const char* op, const at::Tensor& decay,
                        at::TensorList ema) {
  TORCH_CHECK(decay.defined(), op, ": decay is an undefined tensor");
  TORCH_CHECK(decay.dim() == 0, op,
              ": a decay tensor must be 0-dim, got shape ", decay.sizes());
  check_decay_tensor_kind(op, "decay tensor", decay, ema);
}

void check_decays(const char* op, c10::ArrayRef<double> decays, int64_t expected) {
  check_profile_count(op, static_cast<int64_t>(decays.size()), expected);
  for (size_t k = 0; k < decays.size(); ++k) {
    TORCH_CHECK(std::isfinite(decays[k]) && decays[k] >= 0.0 && decays[k] <= 1.0, op,
                ": decays[", k, "] must be a finite number in [0, 1], got ",
                py_float(decays[k]));
  }
}

void check_decays_tensor(const char* op, const at::Tensor& decays, at::TensorList ema,
                         int64_t expected) {
  TORCH_CHECK(decays.defined(), op, ": decays is an undefined tensor");
  TORCH_CHECK(decays.dim() == 1, op,
              ": a decays tensor must be 1-dim (one decay per profile), got shape ",
              decays.sizes());
  check_profile_count(op, decays.numel(), expected);
  check_decay_tensor_kind(op, "decays tensor", decays, ema);
}

std::vector<double> read_decays(const char* op, const at::Tensor& decays) {
  const at::Tensor host = decays.to(at::kCPU, at::kDouble).contiguous();
  const double* p = host.const_data_ptr<double>();
  std::vector<double> out(p, p + host.numel());
  check_decays(op, out);
  return out;
}

// setup.py passes TORCH_CUDA_ARCH_LIST as tokens ("8.0;9.0+PTX" becomes
// 8.0,9.0+PTX); the preprocessor makes the string.  A build without CUDA
// records none: it never launches a kernel.
#define EMA_CUDA_STR2(...) #__VA_ARGS__
#define EMA_CUDA_STR(...) EMA_CUDA_STR2(__VA_ARGS__)
#ifdef EMA_CUDA_ARCH_LIST_RAW
#define EMA_CUDA_ARCH_LIST "TORCH_CUDA_ARCH_LIST=" EMA_CUDA_STR(EMA_CUDA_ARCH_LIST_RAW)
#else
#define EMA_CUDA_ARCH_LIST "an unrecorded TORCH_CUDA_ARCH_LIST"
#endif

std::string no_kernel_image_message(const char* op, int device, int major, int minor) {
  return c10::str(op, ": this build of ema_cuda has no kernel for cuda:", device,
                  " (compute capability ", major, ".", minor, "); it was compiled for ",
                  EMA_CUDA_ARCH_LIST, ". Rebuild for this GPU: TORCH_CUDA_ARCH_LIST=\"", major,
                  ".", minor,
                  "\" pip install --no-build-isolation --force-reinstall --no-deps ema_cuda "
                  "(from its source directory: pip install --no-build-isolation .)");
}

}  // namespace ema_cuda
