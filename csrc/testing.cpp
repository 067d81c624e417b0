// Test-only ops, in their own library: `torch.ops.ema_cuda_testing`.  They
// reach inside the op (the CUDA path run on the CPU, the CPU kernel on part
// of a plan, the chunk table and vector choice of sizes and addresses no
// test machine can allocate, the plan cache's counters) so that the tests
// can check what a user never calls.  Loaded with the library, but never
// called by ema_cuda itself.
#include <optional>
#include <string>
#include <stdexcept>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/ema_update_cpu.h"
#include "cuda/ema_update_cuda.h"
#include "multi_tensor.h"
#include "plan.h"

namespace ema_cuda {
namespace {

// Units [lo, hi) of the CPU plan of these lists, on this thread: the CPU
// kernel on the last chunks of a tensor above 2^31 elements whose pages are
// never touched elsewhere.
void cpu_update_range(at::TensorList ema, at::TensorList model, double decay,
                      int64_t lo, int64_t hi) {
  const char* op = "ema_cuda_testing::cpu_update_range_";
  check_decay(op, decay);
  PlanPtr plan = get_plan(op, {ema, model}, kCpuChunk);
  TORCH_CHECK(0 <= lo && lo <= hi && hi <= plan->num_units, op, ": range [", lo, ", ", hi,
              ") is outside [0, ", plan->num_units, ")");
  cpu_run_range(*plan, decay, lo, hi);
}

// Runs the CUDA launch on the CPU: the plan's table, the grid the launch
// would use on a GPU with `sm_count` SMs, and for every block and thread the
// kernel's own body (`kernel_block`: decay read, grid-stride loop, chunk
// body), with every 16-byte vector access checked for alignment.  The decay
// is read through a pointer like the kernel's when `decay_tensor` is given.
// Rows [first_chunk, end_chunk) of the table only when given (a test of a
// tensor above 2^31 elements runs its last rows, whose pages alone are
// touched).  The copied pairs are those a ListUpdater would put in the same
// table.
void emulate_cuda_update(at::TensorList ema, at::TensorList model,
                         at::TensorList copy_ema, at::TensorList copy_model,
                         double decay, int64_t chunk_size, int64_t threads,
                         int64_t sm_count, const std::optional<at::Tensor>& decay_tensor,
                         int64_t first_chunk, int64_t end_chunk) {
  const char* op = "ema_cuda_testing::emulate_cuda_update_";
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

// The multi-EMA launch (NOTE [several EMAs]) run on the CPU like
// `emulate_cuda_update_`: the plan's table, the grid, and for every block
// and thread the kernel's body, reading the decays through a pointer like
// the kernel when `decays_tensor` is given (which then replaces `decays`).
void emulate_cuda_multi_update(at::TensorList ema, at::TensorList model,
                               at::ArrayRef<double> decays, int64_t chunk_size,
                               int64_t threads, int64_t sm_count,
                               const std::optional<at::Tensor>& decays_tensor) {
  const char* op = "ema_cuda_testing::emulate_cuda_multi_update_";
  std::vector<double> values(decays.begin(), decays.end());
  if (decays_tensor.has_value()) {
    check_decays_tensor(op, *decays_tensor, ema);
    values = read_decays(op, *decays_tensor);
  } else {
    check_decays(op, decays);
  }
  TORCH_CHECK(chunk_size > 0 && chunk_size <= INT32_MAX, op,
              ": chunk_size must be in [1, 2^31), got ", chunk_size);
  TORCH_CHECK(threads > 0 && sm_count > 0, op,
              ": threads and sm_count must be positive, got ", threads, " and ", sm_count);
  const auto k = static_cast<int64_t>(values.size());
  PlanPtr plan = get_plan(op, multi_lists(ema, model, k), chunk_size);
  const DecayArg arg = make_decays_arg(
      decays_tensor ? c10::ArrayRef<double>() : c10::ArrayRef<double>(values),
      decays_tensor ? &*decays_tensor : nullptr);
  const int64_t grid =
      grid_blocks(plan->num_chunks, sm_count, k > 1 ? kCudaMultiBlocksPerSM : kCudaBlocksPerSM);
  try {
    for (int64_t block = 0; block < grid; ++block) {
      // The launch's choice of kernel (cuda_launch), and the multi kernel's
      // prologue: the block's copy of the decays.
      double shared[kMaxProfiles];
      for (int64_t tid = 0; tid < threads; ++tid) {
        load_decays(arg, static_cast<int>(k), tid, threads, shared);
      }
      for (int64_t tid = 0; tid < threads; ++tid) {
        if (k > 1) {
          multi_kernel_block(plan->tensors(), plan->chunks(), plan->num_chunks, block, grid, tid,
                             threads, shared, plan->stride, static_cast<int>(k));
        } else {
          kernel_block(plan->tensors(), plan->chunks(), plan->num_chunks, block, grid, tid,
                       threads, arg);
        }
      }
    }
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
}

// The chunk rows a plan would hold for tensors of these sizes, as an int64
// tensor [num_chunks, 3] of (tensor, start, len): lets tests check the
// 64-bit index arithmetic for sizes no test machine can allocate.
at::Tensor plan_chunks(at::IntArrayRef numels, int64_t chunk_size) {
  TORCH_CHECK(chunk_size > 0 && chunk_size <= INT32_MAX,
              "ema_cuda_testing::plan_chunks: chunk_size must be in [1, 2^31), got ",
              chunk_size);
  std::vector<ChunkEntry> chunks;
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, "ema_cuda_testing::plan_chunks: numels[", i,
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
  TORCH_CHECK(ec >= 0 && mc >= 0, "ema_cuda_testing::vector_head: unsupported dtype");
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
  TORCH_CHECK(ec >= 0 && mc >= 0, "ema_cuda_testing::vector_choice: unsupported dtype");
  const VectorChoice v = choose_vector(static_cast<uintptr_t>(ema_addr),
                                       static_cast<uintptr_t>(model_addr), ec, mc);
  return {v.vec_bytes, v.head};
}

std::vector<int64_t> plan_cache_stats_op() { return plan_cache_stats(); }
void clear_plan_cache_op() { clear_plan_cache(); }
bool cuda_compiled_op() { return cuda_compiled(); }
std::string no_kernel_image_message_op(int64_t device, int64_t major, int64_t minor) {
  return no_kernel_image_message(kOpName, static_cast<int>(device), static_cast<int>(major),
                                 static_cast<int>(minor));
}

}  // namespace

TORCH_LIBRARY(ema_cuda_testing, m) {
  m.def(
      "emulate_cuda_update_(Tensor(a!)[] ema, Tensor[] model, "
      "Tensor(b!)[] copy_ema, Tensor[] copy_model, float decay, "
      "int chunk_size=65536, int threads=512, int sm_count=132, "
      "Tensor? decay_tensor=None, int first_chunk=0, int end_chunk=-1) -> ()");
  m.def(
      "emulate_cuda_multi_update_(Tensor(a!)[] ema, Tensor[] model, float[] decays, "
      "int chunk_size=65536, int threads=512, int sm_count=132, "
      "Tensor? decays_tensor=None) -> ()");
  m.def("cpu_update_range_(Tensor(a!)[] ema, Tensor[] model, float decay, int lo, int hi) -> ()");
  m.def("plan_chunks(int[] numels, int chunk_size) -> Tensor", &plan_chunks);
  m.def("vector_head(int ema_addr, int model_addr, ScalarType ema_dtype, "
        "ScalarType model_dtype) -> int[]",
        &vector_head_op);
  m.def("vector_choice(int ema_addr, int model_addr, ScalarType ema_dtype, "
        "ScalarType model_dtype) -> int[]",
        &vector_choice_op);
  m.def("plan_cache_stats() -> int[]", &plan_cache_stats_op);
  m.def("clear_plan_cache() -> ()", &clear_plan_cache_op);
  m.def("cuda_compiled() -> bool", &cuda_compiled_op);
  m.def("no_kernel_image_message(int device, int major, int minor) -> str",
        &no_kernel_image_message_op);
}

TORCH_LIBRARY_IMPL(ema_cuda_testing, CPU, m) {
  m.impl("emulate_cuda_update_", &emulate_cuda_update);
  m.impl("emulate_cuda_multi_update_", &emulate_cuda_multi_update);
  m.impl("cpu_update_range_", &cpu_update_range);
}

// Like the public op: the EMA tensors never take part in autograd.
TORCH_LIBRARY_IMPL(ema_cuda_testing, Autograd, m) {
  m.impl("emulate_cuda_update_", torch::CppFunction::makeFallthrough());
  m.impl("emulate_cuda_multi_update_", torch::CppFunction::makeFallthrough());
  m.impl("cpu_update_range_", torch::CppFunction::makeFallthrough());
}

}  // namespace ema_cuda
