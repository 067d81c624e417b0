// Chunk table and per-chunk update body of the fused EMA op.
//
// Everything here is plain C++ that compiles both for the host and, under nvcc,
// for the device.  The CUDA kernel calls `chunk_body` with (threadIdx.x,
// blockDim.x); the host emulation (the test-only op
// `ema_cuda_testing::emulate_cuda_update_`, testing.cpp) calls the very same
// function in a loop over blocks and threads, so the index arithmetic of the
// CUDA path is exercised by the CPU test-suite on machines without a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <c10/macros/Macros.h>

#include "dtypes.h"

namespace ema_cuda {

// One row per (ema, model) pair.  32 bytes.
struct TensorEntry {
  void* ema;
  const void* model;
  int64_t numel;
  int8_t ema_dtype;
  int8_t model_dtype;
  // Number of leading elements to process with scalar code before both
  // pointers are aligned for vectors of `vec_bytes`, or -1 when they never
  // are at the same element (then the whole tensor is scalar).
  int8_t head;
  // Bytes per vector of the narrower side: 16, else 8, else 4, the widest
  // for which the pair can be aligned together (0 when none can).
  int8_t vec_bytes;
  // Multi-EMA plans, on a model tensor's first profile row only: 1 when the
  // rows of all its profiles share the EMA dtype, head and vector size, so
  // that one pass reads each model element once for all of them (NOTE
  // [several EMAs]); 0 otherwise, and then each profile takes its own pass.
  int8_t fused;
  int8_t pad_[3];
};

// One row per chunk of at most `chunk_size` elements.  16 bytes.
struct ChunkEntry {
  int64_t start;   // first element of the chunk inside its tensor (64-bit)
  int32_t tensor;  // row in the tensor table
  int32_t len;     // number of elements, 1 <= len <= chunk_size
};

static_assert(sizeof(TensorEntry) == 32, "TensorEntry layout");
static_assert(sizeof(ChunkEntry) == 16, "ChunkEntry layout");

// Accumulation type: fp32 unless either side is fp64.
template <typename E, typename M>
struct AccType { using type = float; };
template <typename M>
struct AccType<double, M> { using type = double; };
template <typename E>
struct AccType<E, double> { using type = double; };
template <>
struct AccType<double, double> { using type = double; };

// Elements per vector step: one VB-byte load of the narrower side (for VB =
// 16: 8 bf16/fp16, 4 fp32, 2 fp64); the wider side then loads 1, 2 or 4
// times as many bytes.
template <typename E, typename M, int VB = 16>
struct VecWidth {
  static constexpr int value = VB / (sizeof(E) < sizeof(M) ? sizeof(E) : sizeof(M));
};

// Alignment of a vector of N elements of T: its size, at most 16 bytes.
template <typename T, int N>
struct PackAlign {
  static constexpr int value = N * sizeof(T) < 16 ? N * sizeof(T) : 16;
};

template <typename T, int N>
struct alignas(PackAlign<T, N>::value) Pack {
  T v[N];
};

// Host-side: elements to skip so that `ema_addr` and `model_addr` are both
// aligned for vectors of `vec_elems` elements (each side to its vector's
// size, at most 16 bytes); -1 if they never are at the same element.
inline int8_t vector_head(uintptr_t ema_addr, uintptr_t model_addr,
                          int ema_size, int model_size, int vec_elems) {
  const uintptr_t ea = std::min(16, vec_elems * ema_size);
  const uintptr_t ma = std::min(16, vec_elems * model_size);
  for (int h = 0; h < vec_elems; ++h) {
    if ((ema_addr + static_cast<uintptr_t>(h) * ema_size) % ea == 0 &&
        (model_addr + static_cast<uintptr_t>(h) * model_size) % ma == 0) {
      return static_cast<int8_t>(h);
    }
  }
  return -1;
}

inline int vec_width_for(int ema_dtype, int model_dtype, int vec_bytes = 16) {
  int s = std::min(dtype_size(ema_dtype), dtype_size(model_dtype));
  return vec_bytes / s;
}

// Host-side: the vector size a pair at these addresses gets, and its head:
// 16-byte vectors when both sides can be aligned together, else 8-, else
// 4-byte ones (a narrower vector still moves 2-4x the bytes of scalar code),
// else {0, -1}: scalar.  A width is only used when it holds >= 2 elements of
// the narrower side (16 bytes of fp64 always do).
struct VectorChoice {
  int8_t vec_bytes;
  int8_t head;
};
inline VectorChoice choose_vector(uintptr_t ema_addr, uintptr_t model_addr,
                                  int ema_dtype, int model_dtype) {
  const int es = dtype_size(ema_dtype), ms = dtype_size(model_dtype);
  for (int vb : {16, 8, 4}) {
    const int n = vec_width_for(ema_dtype, model_dtype, vb);
    if (n < 2) break;
    const int8_t h = vector_head(ema_addr, model_addr, es, ms, n);
    if (h >= 0) return {static_cast<int8_t>(vb), h};
  }
  return {0, -1};
}

// Host-side: splits every tensor into chunks of at most `chunk_size`
// elements.  Empty tensors contribute no chunk.  All offsets are 64-bit.
inline void append_chunks(int64_t numel, int32_t tensor, int64_t chunk_size,
                          std::vector<ChunkEntry>& out) {
  for (int64_t s = 0; s < numel; s += chunk_size) {
    ChunkEntry c;
    c.start = s;
    c.tensor = tensor;
    c.len = static_cast<int32_t>(std::min(chunk_size, numel - s));
    out.push_back(c);
  }
}

// The element type of kBytes rows: never an averaged dtype, so a pair of
// uint8_t pointers means "copy".
using Byte = uint8_t;
template <typename E, typename M>
constexpr bool kIsCopy = std::is_same<E, Byte>::value && std::is_same<M, Byte>::value;

// NOTE [update arithmetic]: every kernel (CUDA, the CPU kernel, the host
// emulation) computes, in Acc (fp32, or fp64 when either side is fp64),
//     ema' = fma(ema, d, model * w),   d = Acc(decay),  w = Acc(1 - decay)
// with 1 - decay computed in double, the product model * w rounded once and
// the fused multiply-add rounded once, then one rounding to the EMA dtype.
// Written as explicit fused multiply-adds so that no compiler contracts it
// differently: a CUDA result is then bit-identical to the CPU kernel's for
// every dtype pair.  Exact at d == 0 (ema := model) and d == 1; it cannot
// overflow where ema and model are finite (|result| <= max(|ema|, |model|)
// up to rounding), unlike ema + w * (model - ema).
template <typename Acc>
C10_HOST_DEVICE inline Acc ema_fma(Acc e, Acc d, Acc m, Acc w) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<Acc, float>::value) {
    return __fmaf_rn(e, d, __fmul_rn(m, w));
  } else {
    return __fma_rn(e, d, __dmul_rn(m, w));
  }
#else
  return std::fma(e, d, m * w);
#endif
}

template <typename E, typename M, typename Acc>
C10_HOST_DEVICE inline void update_one(E* e, const M* m, int64_t i, Acc d, Acc w) {
  if constexpr (kIsCopy<E, M>) {
    e[i] = m[i];
  } else {
    e[i] = static_cast<E>(ema_fma<Acc>(static_cast<Acc>(e[i]), d, static_cast<Acc>(m[i]), w));
  }
}

template <typename E, typename M, int N, typename Acc>
C10_HOST_DEVICE inline void lerp_pack(Pack<E, N>& ev, const Pack<M, N>& mv, Acc d, Acc w) {
  if constexpr (kIsCopy<E, M>) {
    ev = mv;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      ev.v[k] = static_cast<E>(
          ema_fma<Acc>(static_cast<Acc>(ev.v[k]), d, static_cast<Acc>(mv.v[k]), w));
    }
  }
}

// Host emulation only: a vector access of the CUDA path must be aligned to
// its vector's size (a misaligned one faults on the GPU).  The emulation
// turns it into an error instead; the device build compiles it away.
template <typename T, int N>
C10_HOST_DEVICE inline void check_vector_aligned(const T* p) {
#if !defined(__CUDA_ARCH__)
  if (reinterpret_cast<uintptr_t>(p) % PackAlign<T, N>::value != 0) {
    throw std::runtime_error("ema_cuda: misaligned vector access in the CUDA path's chunk body");
  }
#else
  (void)p;
#endif
}

// Vector steps per thread and loop iteration in `chunk_body`: up to 4, and
// at most 64 bytes of the wider side, which keeps the registers of the
// fp64/fp16 paths (one kernel holds all 16 dtype pairs) from lowering the
// occupancy of the common fp32 and bf16 ones.
template <typename E, typename M, int VB = 16>
struct Unroll {
  static constexpr int bytes = VecWidth<E, M, VB>::value * (sizeof(E) > sizeof(M) ? sizeof(E) : sizeof(M));
  static constexpr int value = bytes >= 64 ? 1 : (64 / bytes > 4 ? 4 : 64 / bytes);
};

// Processes elements [start, start + len) of tensor `t` as thread `tid` of
// `nthreads`: a scalar head up to the first position where both pointers are
// aligned for VB-byte vectors, vector steps, then a scalar tail.  With
// t.head < 0 all of it is scalar.
template <typename E, typename M, int VB>
C10_HOST_DEVICE inline void chunk_body_v(const TensorEntry& t, int64_t start,
                                         int64_t len, int64_t tid,
                                         int64_t nthreads,
                                         typename AccType<E, M>::type d,
                                         typename AccType<E, M>::type w) {
  using Acc = typename AccType<E, M>::type;
  E* e = static_cast<E*>(t.ema);
  const M* m = static_cast<const M*>(t.model);
  const int64_t end = start + len;
  constexpr int N = VecWidth<E, M, VB>::value;
  constexpr int kUnroll = Unroll<E, M, VB>::value;

  int64_t vbeg = end;
  int64_t vend = end;
  if (t.head >= 0) {
    const int64_t h = t.head;
    const int64_t s = start < h ? h : start;
    vbeg = h + ((s - h + N - 1) / N) * N;  // first aligned index >= s
    if (vbeg > end) vbeg = end;
    vend = vbeg + ((end - vbeg) / N) * N;
  }

  for (int64_t i = start + tid; i < vbeg; i += nthreads) {
    update_one<E, M, Acc>(e, m, i, d, w);
  }
  const int64_t nvec = (vend - vbeg) / N;
  // kUnroll vector steps per iteration, all loads issued before any store
  // (a copied row loads only the model side):
  // more bytes in flight per thread (the compiler cannot reorder loads past
  // the stores itself, as far as it knows the EMA may alias the model).
  int64_t v = tid;
  for (; v + (kUnroll - 1) * nthreads < nvec; v += kUnroll * nthreads) {
    Pack<E, N> ev[kUnroll];
    Pack<M, N> mv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = vbeg + (v + u * nthreads) * N;
      check_vector_aligned<E, N>(e + i);
      check_vector_aligned<M, N>(m + i);
      if constexpr (!kIsCopy<E, M>) ev[u] = *reinterpret_cast<const Pack<E, N>*>(e + i);
      mv[u] = *reinterpret_cast<const Pack<M, N>*>(m + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = vbeg + (v + u * nthreads) * N;
      lerp_pack<E, M, N, Acc>(ev[u], mv[u], d, w);
      *reinterpret_cast<Pack<E, N>*>(e + i) = ev[u];
    }
  }
  for (; v < nvec; v += nthreads) {
    const int64_t i = vbeg + v * N;
    check_vector_aligned<E, N>(e + i);
    check_vector_aligned<M, N>(m + i);
    Pack<E, N> ev;
    if constexpr (!kIsCopy<E, M>) ev = *reinterpret_cast<const Pack<E, N>*>(e + i);
    const Pack<M, N> mv = *reinterpret_cast<const Pack<M, N>*>(m + i);
    lerp_pack<E, M, N, Acc>(ev, mv, d, w);
    *reinterpret_cast<Pack<E, N>*>(e + i) = ev;
  }
  for (int64_t i = vend + tid; i < end; i += nthreads) {
    update_one<E, M, Acc>(e, m, i, d, w);
  }
}

// The vector size is per tensor (TensorEntry::vec_bytes); a size that holds
// fewer than 2 elements of the narrower side is never chosen.
template <typename E, typename M>
C10_HOST_DEVICE inline void chunk_body(const TensorEntry& t, int64_t start,
                                       int64_t len, int64_t tid,
                                       int64_t nthreads,
                                       typename AccType<E, M>::type d,
                                       typename AccType<E, M>::type w) {
  constexpr int kMin = sizeof(E) < sizeof(M) ? sizeof(E) : sizeof(M);
  if constexpr (kMin <= 4) {
    if (t.vec_bytes == 8) {
      chunk_body_v<E, M, 8>(t, start, len, tid, nthreads, d, w);
      return;
    }
  }
  if constexpr (kMin <= 2) {
    if (t.vec_bytes == 4) {
      chunk_body_v<E, M, 4>(t, start, len, tid, nthreads, d, w);
      return;
    }
  }
  // 16-byte vectors; or vec_bytes 0, which comes with head -1
  // (choose_vector): the body then runs every element as scalar code.
  chunk_body_v<E, M, 16>(t, start, len, tid, nthreads, d, w);
}

// Most EMA profiles one multi-EMA call updates: their decays travel in the
// launch's arguments (a few bytes each) or in a K-element tensor.
constexpr int kMaxProfiles = 16;

// The decays of one launch, either values baked into it or a pointer to a
// fp32/fp64 tensor on the tensors' device (0-dim for the single op, K
// elements `stride` apart for the multi op), read by every thread (no host
// sync; capturable in a CUDA graph).
struct DecayArg {
  double values[kMaxProfiles];
  const void* ptr;
  int64_t stride;  // of the decay tensor, in elements
  int8_t dtype;    // kF32 or kF64 when ptr is set
};

C10_HOST_DEVICE inline double read_decay(const DecayArg& d, int k = 0) {
  if (d.ptr == nullptr) return d.values[k];
  if (d.dtype == kF64) return static_cast<const double*>(d.ptr)[k * d.stride];
  return static_cast<double>(static_cast<const float*>(d.ptr)[k * d.stride]);
}

// NOTE [several EMAs]: the multi-EMA op keeps K EMAs (profiles) of one
// model.  Its table holds K rows per model tensor, profile-major (row
// k * stride + i is profile k's EMA of model tensor i, `stride` the number of
// model tensors), and one set of chunk rows per model tensor.  A chunk reads
// each model element once and updates the K EMAs from it, each with the very
// expression of the single op (NOTE [update arithmetic]) and its own decay,
// so the result is bit-identical to K single-op calls.  fp32 EMAs of an fp32
// model move 4 + 8K bytes per element instead of 12K.  When the K rows of a
// tensor cannot share one pass (different EMA dtypes, or addresses that
// align at different elements: TensorEntry::fused is 0), the table holds
// chunk rows of each profile's row instead, run like the single op's with
// that profile's decay.  The CPU kernel runs small model tensors' chunks
// (its groups) one profile after the other, reading the model's chunk from
// cache after the first (cpu/ema_update_cpu.cpp).
template <typename E, typename M, int VB>
C10_HOST_DEVICE inline void multi_chunk_body_v(const TensorEntry* rows, int64_t stride,
                                               int profiles, int64_t start, int64_t len,
                                               int64_t tid, int64_t nthreads,
                                               const double* decays) {
  using Acc = typename AccType<E, M>::type;
  const TensorEntry& t = rows[0];
  const M* m = static_cast<const M*>(t.model);
  const int64_t end = start + len;
  constexpr int N = VecWidth<E, M, VB>::value;
  // Half the single op's unroll: the model's packs stay live across the
  // profiles' loads, and every profile adds loads in flight anyway.
  constexpr int kUnroll = Unroll<E, M, VB>::value > 1 ? Unroll<E, M, VB>::value / 2 : 1;

  int64_t vbeg = end;
  int64_t vend = end;
  if (t.head >= 0) {
    const int64_t h = t.head;
    const int64_t s = start < h ? h : start;
    vbeg = h + ((s - h + N - 1) / N) * N;
    if (vbeg > end) vbeg = end;
    vend = vbeg + ((end - vbeg) / N) * N;
  }

  for (int64_t i = start + tid; i < vbeg; i += nthreads) {
    for (int k = 0; k < profiles; ++k) {
      const double dk = decays[k];
      update_one<E, M, Acc>(static_cast<E*>(rows[k * stride].ema), m, i,
                            static_cast<Acc>(dk), static_cast<Acc>(1.0 - dk));
    }
  }
  const int64_t nvec = (vend - vbeg) / N;
  int64_t v = tid;
  for (; v + (kUnroll - 1) * nthreads < nvec; v += kUnroll * nthreads) {
    Pack<M, N> mv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = vbeg + (v + u * nthreads) * N;
      check_vector_aligned<M, N>(m + i);
      mv[u] = *reinterpret_cast<const Pack<M, N>*>(m + i);
    }
    for (int k = 0; k < profiles; ++k) {
      E* e = static_cast<E*>(rows[k * stride].ema);
      const double dk = decays[k];
      const Acc d = static_cast<Acc>(dk);
      const Acc w = static_cast<Acc>(1.0 - dk);
      Pack<E, N> ev[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = vbeg + (v + u * nthreads) * N;
        check_vector_aligned<E, N>(e + i);
        ev[u] = *reinterpret_cast<const Pack<E, N>*>(e + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = vbeg + (v + u * nthreads) * N;
        lerp_pack<E, M, N, Acc>(ev[u], mv[u], d, w);
        *reinterpret_cast<Pack<E, N>*>(e + i) = ev[u];
      }
    }
  }
  for (; v < nvec; v += nthreads) {
    const int64_t i = vbeg + v * N;
    check_vector_aligned<M, N>(m + i);
    const Pack<M, N> mv = *reinterpret_cast<const Pack<M, N>*>(m + i);
    for (int k = 0; k < profiles; ++k) {
      E* e = static_cast<E*>(rows[k * stride].ema);
      const double dk = decays[k];
      check_vector_aligned<E, N>(e + i);
      Pack<E, N> ev = *reinterpret_cast<const Pack<E, N>*>(e + i);
      lerp_pack<E, M, N, Acc>(ev, mv, static_cast<Acc>(dk), static_cast<Acc>(1.0 - dk));
      *reinterpret_cast<Pack<E, N>*>(e + i) = ev;
    }
  }
  for (int64_t i = vend + tid; i < end; i += nthreads) {
    for (int k = 0; k < profiles; ++k) {
      const double dk = decays[k];
      update_one<E, M, Acc>(static_cast<E*>(rows[k * stride].ema), m, i,
                            static_cast<Acc>(dk), static_cast<Acc>(1.0 - dk));
    }
  }
}

template <typename E, typename M>
C10_HOST_DEVICE inline void multi_chunk_body(const TensorEntry* rows, int64_t stride,
                                             int profiles, int64_t start, int64_t len,
                                             int64_t tid, int64_t nthreads,
                                             const double* decays) {
  constexpr int kMin = sizeof(E) < sizeof(M) ? sizeof(E) : sizeof(M);
  if constexpr (kMin <= 4) {
    if (rows[0].vec_bytes == 8) {
      multi_chunk_body_v<E, M, 8>(rows, stride, profiles, start, len, tid, nthreads, decays);
      return;
    }
  }
  if constexpr (kMin <= 2) {
    if (rows[0].vec_bytes == 4) {
      multi_chunk_body_v<E, M, 4>(rows, stride, profiles, start, len, tid, nthreads, decays);
      return;
    }
  }
  multi_chunk_body_v<E, M, 16>(rows, stride, profiles, start, len, tid, nthreads, decays);
}

// Maps a dtype code to its C++ type and calls f(E{}, M{}) -- shared by the
// CUDA kernel and the host emulation so both dispatch identically.  A kBytes
// row (both codes kBytes) calls f(Byte{}, Byte{}).  The cases come from the
// dtype table (dtypes.h).
template <typename E, typename F>
C10_HOST_DEVICE inline void dispatch_model(int model_dtype, F& f) {
  switch (model_dtype) {
#define EMA_CUDA_MODEL_CASE(code, T, S) \
  case code:                            \
    f(E{}, T{});                        \
    break;
    EMA_CUDA_FOR_EACH_DTYPE(EMA_CUDA_MODEL_CASE)
#undef EMA_CUDA_MODEL_CASE
  }
}

template <typename F>
C10_HOST_DEVICE inline void dispatch_pair(int ema_dtype, int model_dtype, F&& f) {
  switch (ema_dtype) {
#define EMA_CUDA_EMA_CASE(code, T, S)   \
  case code:                            \
    dispatch_model<T>(model_dtype, f);  \
    break;
    EMA_CUDA_FOR_EACH_DTYPE(EMA_CUDA_EMA_CASE)
#undef EMA_CUDA_EMA_CASE
    default:  // kBytes
      f(Byte{}, Byte{});
      break;
  }
}

// Runs one chunk row with the CUDA path's body (decay already read).
C10_HOST_DEVICE inline void run_chunk(const TensorEntry* tensors,
                                      const ChunkEntry& c, int64_t tid,
                                      int64_t nthreads, double decay) {
  const TensorEntry& t = tensors[c.tensor];
  dispatch_pair(t.ema_dtype, t.model_dtype, [&](auto e_tag, auto m_tag) {
    using E = decltype(e_tag);
    using M = decltype(m_tag);
    using Acc = typename AccType<E, M>::type;
    const Acc d = static_cast<Acc>(decay);
    const Acc w = static_cast<Acc>(1.0 - decay);
    chunk_body<E, M>(t, c.start, c.len, tid, nthreads, d, w);
  });
}

}  // namespace ema_cuda

namespace ema_cuda {

// One chunk row of a multi-EMA plan whose model tensor is fused (NOTE
// [several EMAs]): its K profiles in one pass.
C10_HOST_DEVICE inline void run_multi_chunk(const TensorEntry* tensors, int64_t stride,
                                            int profiles, const ChunkEntry& c, int64_t tid,
                                            int64_t nthreads, const double* decays) {
  const TensorEntry* rows = tensors + c.tensor;
  dispatch_pair(rows[0].ema_dtype, rows[0].model_dtype, [&](auto e_tag, auto m_tag) {
    using E = decltype(e_tag);
    using M = decltype(m_tag);
    if constexpr (!kIsCopy<E, M>) {
      multi_chunk_body<E, M>(rows, stride, profiles, c.start, c.len, tid, nthreads, decays);
    }
  });
}

// The profile whose decay a multi-EMA plan's chunk row uses when it runs
// one table row (an unfused profile's row, or a copy, which uses none).
C10_HOST_DEVICE inline int row_profile(int64_t row, int64_t stride, int profiles) {
  const int64_t k = row / stride;
  return static_cast<int>(k < profiles ? k : profiles - 1);
}

// The whole of one block's work in the CUDA kernel: read the decay, then a
// grid-stride loop over the chunk rows.  The kernel calls it with
// (blockIdx.x, gridDim.x, threadIdx.x, blockDim.x); the host emulation calls
// it for every block and thread of the grid the launch would use.
C10_HOST_DEVICE inline void kernel_block(const TensorEntry* tensors,
                                         const ChunkEntry* chunks,
                                         int64_t num_chunks, int64_t block,
                                         int64_t grid, int64_t tid,
                                         int64_t nthreads,
                                         const DecayArg& decay_arg) {
  const double decay = read_decay(decay_arg);
  for (int64_t c = block; c < num_chunks; c += grid) {
    const ChunkEntry chunk = chunks[c];
    run_chunk(tensors, chunk, tid, nthreads, decay);
  }
}

// The multi-EMA kernel's prologue: the block's copy of the K decays
// (`profiles` of them), read from the launch's arguments or the decays
// tensor by threads 0..K-1 (shared memory on the GPU, then a barrier), so
// that the loops index an array instead of the arguments.
C10_HOST_DEVICE inline void load_decays(const DecayArg& arg, int profiles, int64_t tid,
                                        int64_t nthreads, double* out) {
  for (int64_t k = tid; k < profiles; k += nthreads) out[k] = read_decay(arg, static_cast<int>(k));
}

// kernel_block of a multi-EMA plan (NOTE [several EMAs]), after
// load_decays: chunk rows of a fused model tensor (< stride) update its
// `profiles` EMAs; the others run one table row with its profile's decay.
C10_HOST_DEVICE inline void multi_kernel_block(const TensorEntry* tensors,
                                               const ChunkEntry* chunks, int64_t num_chunks,
                                               int64_t block, int64_t grid, int64_t tid,
                                               int64_t nthreads, const double* decays,
                                               int64_t stride, int profiles) {
  for (int64_t c = block; c < num_chunks; c += grid) {
    const ChunkEntry chunk = chunks[c];
    if (chunk.tensor < stride && tensors[chunk.tensor].fused) {
      run_multi_chunk(tensors, stride, profiles, chunk, tid, nthreads, decays);
    } else {
      run_chunk(tensors, chunk, tid, nthreads, decays[row_profile(chunk.tensor, stride, profiles)]);
    }
  }
}

// Blocks of a launch over `num_chunks` rows on a GPU with `sm_count` SMs:
// every block resident at once, none without a chunk.
inline int64_t grid_blocks(int64_t num_chunks, int64_t sm_count, int blocks_per_sm) {
  return std::max<int64_t>(1, std::min<int64_t>(num_chunks, sm_count * blocks_per_sm));
}

}  // namespace ema_cuda
