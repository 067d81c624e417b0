// NOTE [busy CPU]: the CPU kernel's threads.
//
// Training shares the CPU with data-loader workers.  A parallel region that
// gives each thread a fixed share (OpenMP, at::parallel_for) ends only when
// its slowest thread has finished its share, and a thread the OS has not
// scheduled yet has not even started: with one of 2 cores busy, an update on
// 2 threads took longer than on 1.  Here work is claimed one small unit at a
// time from an atomic counter, the calling thread claims too, and the call
// returns as soon as every *claimed* unit is done: a helper that wakes late
// finds nothing left and goes back to sleep, so it can only help, never
// delay.  The worst a descheduled helper can cost is the one unit it holds.
//
// A job object outlives the call that made it (helpers hold it by
// shared_ptr), so a helper that wakes after the call returned only reads a
// counter of a finished job.  The function a unit runs is only called for a
// claimed unit below `n`, and the caller waits for all of those: it is never
// called after the caller's frame is gone.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ema_cuda {

class WorkPool {
 public:
  // Calls fn(i) for every i in [0, n), on the calling thread and on up to
  // `helpers` pool threads, and returns when all are done.  The first
  // exception thrown by fn is rethrown here (units not yet claimed are then
  // skipped).  Safe to call from several threads at once: each call is its
  // own job.
  template <typename F>
  static void run(int64_t n, int helpers, const F& fn) {
    if (n <= 0) return;
    if (helpers <= 0 || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    Job::Fn call = [](const void* f, int64_t i) { (*static_cast<const F*>(f))(i); };
    auto job = std::make_shared<Job>(n, call, &fn);
    instance().publish(job, static_cast<int>(std::min<int64_t>(helpers, n - 1)));
    job->work();
    // Units claimed by helpers that are still running: wait for them only.
    for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 2048) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
    instance().retire(job);
    if (job->failed.load()) std::rethrow_exception(job->error);
  }

 private:
  struct Job {
    using Fn = void (*)(const void*, int64_t);
    Job(int64_t n_, Fn call_, const void* fn_) : n(n_), call(call_), fn(fn_) {}
    const int64_t n;
    const Fn call;
    const void* const fn;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // written once, by whoever sets `failed`

    void work() {
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= n) return;
        if (!failed.load(std::memory_order_relaxed)) {
          try {
            call(fn, i);
          } catch (...) {
            bool expected = false;
            if (failed.compare_exchange_strong(expected, true)) error = std::current_exception();
          }
        }
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  // Leaked on purpose (threads may still wait on it at exit).  A child made
  // by fork() gets a fresh, empty pool: the parent's threads do not exist
  // there and its mutex may have been held at the fork (data-loader workers
  // are forked from a training process).
  static WorkPool& instance() {
    static std::once_flag once;
    std::call_once(once, [] {
      current() = new WorkPool();
      pthread_atfork(nullptr, nullptr, [] { current() = new WorkPool(); });
    });
    return *current();
  }
  static WorkPool*& current() {
    static WorkPool* pool = nullptr;
    return pool;
  }

  void publish(const std::shared_ptr<Job>& job, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (static_cast<int>(threads_) < helpers) {
        std::thread([this] { loop(); }).detach();
        ++threads_;
      }
      job_ = job;
      ++generation_;
    }
    cv_.notify_all();
  }

  void retire(const std::shared_ptr<Job>& job) {
    std::lock_guard<std::mutex> lock(mu_);
    if (job_ == job) job_.reset();
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job) job->work();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  size_t threads_ = 0;
};

}  // namespace ema_cuda
