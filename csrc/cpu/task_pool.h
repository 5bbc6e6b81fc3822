// protokern's own threads for the CPU kernels' task loops (parallel_tasks in cpu_utils.h).
//
// Why not at::parallel_for (OpenMP): an OpenMP region ends at a barrier that waits for every
// thread of the team to arrive, including one that has not even started because the OS had not
// yet run it. With another process competing for the cores, a woken thread waited about 2 ms
// before it ran (benchmarks/NOTES.md), so a short call (cub's forward, about 3 ms) paid that wait
// whether or not the late thread had any work left to do. Here the caller works from the start,
// a helper joins only while tasks are still open, and the caller waits only for helpers that
// hold a task: a helper that wakes after the last task was claimed finds the job closed and goes
// back to sleep without anyone waiting for it. While it waits the caller sleeps (after a short
// spin), which frees its core for a helper that the OS had queued behind the competitor.
//
// One job at a time: a call from another thread while a job runs, a call from inside a task and
// a call inside an OpenMP region run their tasks on the calling thread (as at::parallel_for runs
// nested regions). Helpers run with one OpenMP and one MKL thread, so ATen ops inside a task
// (the BLAS tiles of RowsGemm) stay on the helper, as they did inside an OpenMP region.
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
// TaskCounter of `count` tasks; returns when every task has run, rethrowing the first exception
// a worker threw.
void run_tasks(int64_t count, int threads, c10::function_ref<void(TaskCounter&)> worker);

}  // namespace protokern::cpu
