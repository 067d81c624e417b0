// CPU backend of the fused EMA op: one pass over a plan's chunk table on the
// calling thread and the work pool (NOTE [busy CPU] in work_pool.h).
#pragma once

#include <cstdint>

#include "plan.h"

namespace ema_cuda {

// Chunk size (elements) of CPU plans.
constexpr int64_t kCpuChunk = 1 << 16;

// The update of every pair of `plan` (validated inputs; `decay` checked).
void cpu_update(const Plan& plan, double decay);
// Units [lo, hi) of the concatenation of all chunks of `plan` (a unit is an
// element, or a byte of a copied pair), on the calling thread only.
void cpu_run_range(const Plan& plan, double decay, int64_t lo, int64_t hi);
// The update of every pair of a multi-EMA plan (NOTE [several EMAs]), with
// `plan.profiles` checked decays; a plan of one profile runs cpu_update.
void cpu_multi_update(const Plan& plan, const double* decays);
void cpu_run_range_multi(const Plan& plan, const double* decays, int64_t lo, int64_t hi);

}  // namespace ema_cuda
