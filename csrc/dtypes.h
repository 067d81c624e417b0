// The dtype table: the floating dtypes the op averages, one line each.
//
// Everything that depends on the set of dtypes is generated from this list:
// the codes stored in the chunk table, element sizes, the kernels' dtype
// dispatch (CUDA, CPU, host emulation), the dtype check and its message.  A
// new floating dtype is one line here (and one in SUPPORTED_DTYPES of
// ema_cuda/_checks.py; tests/test_check_parity.py holds the two lists to
// each other).  Columns: the code stored in the table, the C++ element type,
// the at::ScalarType.  Math runs in fp32 unless either side is fp64
// (AccType in multi_tensor.h).
//
// Plain C++ with no ATen: included by the device code too.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define EMA_CUDA_FOR_EACH_DTYPE(_)   \
  _(kF32, float, Float)              \
  _(kF64, double, Double)            \
  _(kBF16, c10::BFloat16, BFloat16)  \
  _(kF16, c10::Half, Half)

namespace ema_cuda {

// Codes stored in the table (one byte each): the averaged dtypes in table
// order, then kBytes, which marks a pair copied verbatim (ema := model, both
// of one dtype, e.g. an integer buffer), whose `numel` then counts bytes.
enum DTypeCode : int8_t {
#define EMA_CUDA_DTYPE_CODE(code, T, S) code,
  EMA_CUDA_FOR_EACH_DTYPE(EMA_CUDA_DTYPE_CODE)
#undef EMA_CUDA_DTYPE_CODE
  kBytes
};
constexpr int kNumDTypes = kBytes;

// The element type of a code: DType<kF32> is float.  kBytes rows are
// handled apart (multi_tensor.h: Byte).
template <int Code>
struct DTypeOf;
#define EMA_CUDA_DTYPE_OF(code, T, S) \
  template <>                         \
  struct DTypeOf<code> {              \
    using type = T;                   \
  };
EMA_CUDA_FOR_EACH_DTYPE(EMA_CUDA_DTYPE_OF)
#undef EMA_CUDA_DTYPE_OF
template <int Code>
using DType = typename DTypeOf<Code>::type;

inline int dtype_size(int code) {
  switch (code) {
#define EMA_CUDA_DTYPE_SIZE(code, T, S) \
  case code:                            \
    return static_cast<int>(sizeof(T));
    EMA_CUDA_FOR_EACH_DTYPE(EMA_CUDA_DTYPE_SIZE)
#undef EMA_CUDA_DTYPE_SIZE
    default:
      return 1;  // kBytes
  }
}

}  // namespace ema_cuda
