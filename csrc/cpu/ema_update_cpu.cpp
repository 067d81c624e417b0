// CPU backend of the fused EMA op: the kernel (one pass over the plan's
// chunk table, claimed in work units by the calling thread and the pool) and
// its registration.
#include "cpu/ema_update_cpu.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "work_pool.h"

namespace ema_cuda {

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

// Pairs the vector steps take: fp32 math on element types that load2/store2
// convert (any other dtype of the table runs the scalar loop).
template <typename T>
constexpr bool kFloatVectors = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> ||
                               std::is_same_v<T, c10::Half>;
template <typename E, typename M>
constexpr bool kVectorPath = kVectorFma && kFloatVectors<E> && kFloatVectors<M>;

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
  if constexpr (kVectorPath<E, M>) {
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
  if constexpr (kVectorPath<E, M>) {
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

// The decays of a multi-EMA update as each kernel uses them: d and 1 - d
// (the latter computed in double), in the accumulation type.
template <typename Acc>
struct Weights {
  Acc d[kMaxProfiles], w[kMaxProfiles];
  Weights(const double* decays, int profiles) {
    for (int k = 0; k < profiles; ++k) {
      d[k] = static_cast<Acc>(decays[k]);
      w[k] = static_cast<Acc>(1.0 - decays[k]);
    }
  }
};

// Elements [start, start + len) of a model tensor into its `profiles` EMAs
// (rows[k * stride]), each model element read once (NOTE [several EMAs]):
// per profile the arithmetic of cpu_chunk.
template <typename E, typename M>
void cpu_multi_chunk(const TensorEntry* rows, int64_t stride, int profiles, int64_t start,
                     int64_t len, const double* decays) {
  using Acc = typename AccType<E, M>::type;
  const M* m = static_cast<const M*>(rows[0].model) + start;
  E* e[kMaxProfiles];
  for (int k = 0; k < profiles; ++k) e[k] = static_cast<E*>(rows[k * stride].ema) + start;
  const Weights<Acc> wt(decays, profiles);
  int64_t i = 0;
  if constexpr (kVectorPath<E, M>) {
    FVec vd[kMaxProfiles], vw[kMaxProfiles];
    for (int k = 0; k < profiles; ++k) {
      vd[k] = FVec(wt.d[k]);
      vw[k] = FVec(wt.w[k]);
    }
    for (; i + 2 * kF <= len; i += 2 * kF) {
      FVec m0, m1;
      load2<M>(m + i, m0, m1);
      for (int k = 0; k < profiles; ++k) {
        FVec e0, e1;
        load2<E>(e[k] + i, e0, e1);
        store2<E>(e[k] + i, at::vec::fmadd(e0, vd[k], m0 * vw[k]),
                  at::vec::fmadd(e1, vd[k], m1 * vw[k]));
      }
    }
  }
  for (; i < len; ++i) {
    const Acc mi = static_cast<Acc>(m[i]);
    for (int k = 0; k < profiles; ++k) {
      e[k][i] = static_cast<E>(ema_fma<Acc>(static_cast<Acc>(e[k][i]), wt.d[k], mi, wt.w[k]));
    }
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

// A multi-EMA chunk row (`profiles` > 1) touches every profile's EMA too.
inline void touch_chunk(const TensorEntry* tensors, const ChunkEntry* chunks,
                        int64_t k, int64_t num_chunks, int64_t stride = 0, int profiles = 1) {
  if (k >= num_chunks) return;
  const ChunkEntry& c = chunks[k];
  const TensorEntry& t = tensors[c.tensor];
  const int64_t es = dtype_size(t.ema_dtype), ms = dtype_size(t.model_dtype);
  const char* m = static_cast<const char*>(t.model) + c.start * ms;
  __builtin_prefetch(m, 0);
  __builtin_prefetch(m + (c.len - 1) * ms, 0);
  if (c.tensor >= stride || !t.fused) profiles = 1;
  for (int p = 0; p < profiles; ++p) {
    const char* e = static_cast<const char*>(tensors[c.tensor + p * stride].ema) + c.start * es;
    __builtin_prefetch(e, 1);
    __builtin_prefetch(e + (c.len - 1) * es, 1);
  }
}

using ChunkFn = void (*)(const TensorEntry&, int64_t, int64_t, double);
using GroupFn = void (*)(const TensorEntry*, const ChunkEntry*, double);

// Kernel tables indexed by [ema dtype code][model dtype code], one entry per
// pair of dtypes of the table (dtypes.h).  `Maker::fn<E, M>` is the entry.
template <typename Maker, typename E, size_t... M>
constexpr std::array<typename Maker::Fn, kNumDTypes> pair_row(std::index_sequence<M...>) {
  return {Maker::template fn<E, DType<M>>...};
}
template <typename Maker, size_t... E>
constexpr std::array<std::array<typename Maker::Fn, kNumDTypes>, kNumDTypes> pair_table(
    std::index_sequence<E...>) {
  return {pair_row<Maker, DType<E>>(std::make_index_sequence<kNumDTypes>{})...};
}
template <typename Maker>
constexpr auto pair_table() {
  return pair_table<Maker>(std::make_index_sequence<kNumDTypes>{});
}

struct ChunkFns {
  using Fn = ChunkFn;
  template <typename E, typename M>
  static constexpr Fn fn = &cpu_chunk<E, M>;
};
template <int W>
struct GroupFns {
  using Fn = GroupFn;
  template <typename E, typename M>
  static constexpr Fn fn = &cpu_chunk_group<E, M, W>;
};
using MultiChunkFn = void (*)(const TensorEntry*, int64_t, int, int64_t, int64_t, const double*);
struct MultiChunkFns {
  using Fn = MultiChunkFn;
  template <typename E, typename M>
  static constexpr Fn fn = &cpu_multi_chunk<E, M>;
};
constexpr auto kCpuChunkFns = pair_table<ChunkFns>();
constexpr auto kCpuMultiChunkFns = pair_table<MultiChunkFns>();

constexpr auto kCpuGroup2Fns = pair_table<GroupFns<2>>();
constexpr auto kCpuGroup4Fns = pair_table<GroupFns<4>>();
constexpr auto kCpuGroup8Fns = pair_table<GroupFns<kGroup>>();

}  // namespace

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

// cpu_run_range for a multi-EMA plan (NOTE [several EMAs]): the same walk,
// each chunk row of a model tensor updating all its profiles.
void cpu_run_range_multi(const Plan& plan, const double* decays, int64_t lo, int64_t hi) {
  const TensorEntry* tensors = plan.tensors();
  const ChunkEntry* chunks = plan.chunks();
  const int64_t* ends = plan.chunk_ends.data();
  const int64_t stride = plan.stride;
  const int profiles = static_cast<int>(plan.profiles);
  int64_t k = std::upper_bound(ends, ends + plan.num_chunks, lo) - ends;
  for (; k < plan.num_chunks; ++k) {
    const int64_t begin = ends[k] - chunks[k].len;
    if (begin >= hi) break;
    touch_chunk(tensors, chunks, k + kTouchAhead, plan.num_chunks, stride, profiles);
    const ChunkEntry& c = chunks[k];
    const TensorEntry& t = tensors[c.tensor];
    const int64_t s = std::max(lo, begin) - begin;
    const int64_t n = std::min(hi, ends[k]) - begin - s;
    if (t.ema_dtype == kBytes) {  // a copied pair
      std::memmove(static_cast<char*>(t.ema) + c.start + s,
                   static_cast<const char*>(t.model) + c.start + s, n);
      continue;
    }
    if (c.tensor >= stride || !t.fused) {  // one profile's row
      kCpuChunkFns[t.ema_dtype][t.model_dtype](
          t, c.start + s, n, decays[row_profile(c.tensor, stride, profiles)]);
      continue;
    }
    // Small model tensors: the single op's groups, one profile after the
    // other.  The group's model chunks (at most 8 x 64 KiB) are then read
    // from cache by every profile but the first: the memory traffic of one
    // pass, with the single op's tuned streams (a fused pass over groups of
    // 1 + K streams per tensor measured slower on 10k x 1k).
    int g = 0;
    if (begin >= lo) {
      while (g < kGroup && k + g < plan.num_chunks && ends[k + g] <= hi &&
             chunks[k + g].len <= kGroupMaxLen && chunks[k + g].tensor < stride) {
        // Only fused model tensors' rows, all of t's dtypes.
        const TensorEntry& u = tensors[chunks[k + g].tensor];
        if (!u.fused || u.ema_dtype != t.ema_dtype || u.model_dtype != t.model_dtype) break;
        ++g;
      }
    }
    if (g >= 2) {
      const int w = g == kGroup ? kGroup : (g >= 4 ? 4 : 2);
      for (int j = 1; j < w; ++j) {
        touch_chunk(tensors, chunks, k + j + kTouchAhead, plan.num_chunks, stride, profiles);
      }
      const auto& fns = w == kGroup ? kCpuGroup8Fns : (w == 4 ? kCpuGroup4Fns : kCpuGroup2Fns);
      ChunkEntry rows[kGroup];
      for (int p = 0; p < profiles; ++p) {
        for (int j = 0; j < w; ++j) {
          rows[j] = chunks[k + j];
          rows[j].tensor += static_cast<int32_t>(p * stride);
        }
        fns[t.ema_dtype][t.model_dtype](tensors, rows, decays[p]);
      }
      k += w - 1;
      continue;
    }
    kCpuMultiChunkFns[t.ema_dtype][t.model_dtype](tensors + c.tensor, stride, profiles,
                                                   c.start + s, n, decays);
  }
}

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

void cpu_multi_update(const Plan& plan, const double* decays) {
  if (!plan.multi || plan.profiles == 1) {
    cpu_update(plan, decays[0]);  // the single op's kernel: the same bits
    return;
  }
  const int64_t total = plan.num_units;
  if (total == 0) return;
  const int64_t units = (total + kCpuWorkUnit - 1) / kCpuWorkUnit;
  WorkPool::run(units, at::get_num_threads() - 1, [&](int64_t u) {
    cpu_run_range_multi(plan, decays, u * kCpuWorkUnit, std::min(total, (u + 1) * kCpuWorkUnit));
  });
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

void multi_ema_update_cpu(at::TensorList ema, at::TensorList model, at::ArrayRef<double> decays) {
  check_decays(kMultiOpName, decays);
  const auto k = static_cast<int64_t>(decays.size());
  cpu_multi_update(*get_plan(kMultiOpName, multi_lists(ema, model, k), kCpuChunk), decays.data());
}

void multi_ema_update_tensor_cpu(at::TensorList ema, at::TensorList model,
                                 const at::Tensor& decays) {
  check_decays_tensor(kMultiOpName, decays, ema);
  const std::vector<double> d = read_decays(kMultiOpName, decays);
  const auto k = static_cast<int64_t>(d.size());
  cpu_multi_update(*get_plan(kMultiOpName, multi_lists(ema, model, k), kCpuChunk), d.data());
}

}  // namespace

TORCH_LIBRARY_IMPL(ema_cuda, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
  m.impl("ema_update_.Tensor", &ema_update_tensor_cpu);
  m.impl("multi_ema_update_", &multi_ema_update_cpu);
  m.impl("multi_ema_update_.Tensor", &multi_ema_update_tensor_cpu);
}

}  // namespace ema_cuda
