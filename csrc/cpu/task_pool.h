// protokern's own threads for the CPU kernels' task loops (parallel_tasks in cpu_utils.h).
//
// Why not at::parallel_for (OpenMP): with another process competing for two cores, a call's
// threads lost twice (benchmarks/NOTES.md, "The CPU kernels on threads of their own").
// - An OpenMP region ends at a barrier that waits for every thread of the team, including one the
//   OS has not yet run after waking it (about 2 ms on average), even when no task was left for
//   it. Here the caller works from the start, a helper joins only while the job is open, and the
//   caller closes the job when it runs out of tasks to claim and then waits only for the helpers
//   that joined before (each takes a task at once unless none is left): a helper that wakes
//   later finds the job closed and goes back to sleep without anyone waiting for it.
// - With three runnable threads on two cores, Linux keeps two on one core and leaves whichever
//   pair it is together; when the pair was the call's own, the call got one core. Here helpers
//   run anywhere the caller may run except on the caller's current CPU.
// Measured at cub's forward under one competitor: slowdown 2.21 with OpenMP's threads, 1.50 here.
//
// One job at a time: a call from another thread while a job runs, a call from inside a task and
// a call inside an OpenMP region run their tasks on the calling thread (as at::parallel_for runs
// nested regions). Helpers, and the caller during its job, run with one OpenMP and one MKL
// thread, so ATen ops inside a task (the BLAS tiles of RowsGemm) stay on that thread as they did
// inside an OpenMP region (a BLAS other than MKL that keeps threads of its own is not limited).
#pragma once

#include <c10/util/FunctionRef.h>

#include <atomic>
#include <cstdint>

namespace protokern::cpu {

// take(task) hands out tasks 0 .. count - 1, each once, to whichever thread asks; false when
// none is left.
class TaskCounter {
 public:
  explicit TaskCounter(int64_t count) : count_(count) {}
  bool operator()(int64_t& task) {
    task = next_.fetch_add(1, std::memory_order_relaxed);
    return task < count_;
  }
  // Whether every task has been handed out (a helper that joins late then skips its worker and
  // the per-thread scratch the worker would set up).
  bool exhausted() const { return next_.load(std::memory_order_relaxed) >= count_; }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t count_;
};

// Runs worker(take) on the calling thread and on up to threads - 1 helpers, sharing one
// TaskCounter of `count` tasks; returns when every worker has returned, then rethrows the first
// exception a worker threw (the tasks after it may not have run).
void run_tasks(int64_t count, int threads, c10::function_ref<void(TaskCounter&)> worker);

}  // namespace protokern::cpu
