"""Benchmarks of the fused EMA update against the naive loop and common alternatives.

Run ``python -m benchmarks.bench_ema --help`` (or ``make bench``).  The parts:

=============  ===============================================================
bench_ema      the command line: runs everything below, prints, saves
workloads      the parameter sets (real models' shapes, many small, huge)
methods        the ways of updating an EMA that are compared, and the limits
timing         blocks of updates (CPU timer, CUDA events), launches per update
runner         the protocol: check every method, time them in interleaved rounds
busy           the same updates beside a spinning process
end_to_end     the EMA's share of a small CNN's training step
goals          the targets, met or not, from a run's figures
report         the printed and the markdown tables
plot           the bar plot
=============  ===============================================================
"""
