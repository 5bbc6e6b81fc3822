// The helper threads behind run_tasks (task_pool.h): why they exist is said there.
//
// One 32-bit word, `state`, is the whole protocol, so that joining a job is a single
// compare-and-swap that sees the job's generation, whether it is closed and how many helpers are
// in it together:
//   bits 0-7    seats: helpers inside the job's worker now
//   bit 8       closed: the caller has run out of tasks to claim; no helper may join
//   bits 9-31   generation: which job (wraps; a helper compares it only with its last one)
// Helpers and the caller sleep on the same word (futex) after a spin.
#include "cpu/task_pool.h"

#include <ATen/Parallel.h>
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// MKL's per-thread thread count, exported by libtorch_cpu where PyTorch was built with MKL; weak,
// so that a build without MKL still loads (the pointer is then null). This is the C entry point
// that mkl_service.h's mkl_set_num_threads_local names; the lower-case symbol exported beside it
// is the Fortran one, which takes a pointer. It returns the previous setting (0: none).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace protokern::cpu {
namespace {

constexpr uint32_t kSeatMask = 0xFF;
constexpr uint32_t kClosed = 1u << 8;
constexpr uint32_t kGenerationShift = 9;
constexpr int kMostHelpers = static_cast<int>(kSeatMask);

// How long a thread spins on `state` before it sleeps. Helpers spin briefly after a job, so that
// the next job of the same call (a forward's, then its backward's) finds them awake, but not so
// long that they hold a core from the OpenMP threads of the user's next PyTorch op. The caller
// spins for 5 ms, longer than most of its waits, while it waits for a helper's last task:
// asleep, it would be woken wherever the OS finds room, often on the helper's core, and the
// helper would move away again at the next job, its caches cold (quiet cub forward, the helper
// kept off the caller's CPU: 9.4 ms with a 20 us spin here, 7.5 with 5 ms, against 7.8 and 7.3
// with OpenMP's threads in the same processes).
constexpr std::chrono::microseconds kHelperSpin{200};
constexpr std::chrono::microseconds kCallerSpin{5000};

uint32_t generation_of(uint32_t state) { return state >> kGenerationShift; }

void futex_wait(std::atomic<uint32_t>& word, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr,
          nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}

void pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// Returns `word` once it differs from `seen`: spins for `spin`, then sleeps on it.
uint32_t wait_for_change(std::atomic<uint32_t>& word, uint32_t seen,
                         std::chrono::microseconds spin) {
  const auto until = std::chrono::steady_clock::now() + spin;
  for (int round = 0;; ++round) {
    const uint32_t now = word.load(std::memory_order_acquire);
    if (now != seen) return now;
    if ((round & 63) == 63 && std::chrono::steady_clock::now() > until) break;
    pause();
  }
  for (;;) {
    futex_wait(word, seen);
    const uint32_t now = word.load(std::memory_order_acquire);
    if (now != seen) return now;
  }
}

// One OpenMP and one MKL thread for ATen ops inside a task (RowsGemm's BLAS tiles), as inside an
// OpenMP region; the caller's own settings come back when its job ends.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : openmp_(omp_get_max_threads()) {
    omp_set_num_threads(1);
    if (MKL_Set_Num_Threads_Local != nullptr) mkl_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    omp_set_num_threads(openmp_);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_);
  }

 private:
  int openmp_;
  int mkl_ = 0;
};

// Set on helpers for good and on a caller while its job runs: run_tasks from such a thread runs
// its tasks there (a nested job would wait for helpers that are busy with the outer one).
thread_local bool inside_job = false;

struct Pool {
  std::mutex jobs;  // held by the caller of the job in progress
  std::atomic<uint32_t> state{kClosed};
  // The job in progress; a helper reads them only while it holds a seat.
  std::atomic<c10::function_ref<void(TaskCounter&)>*> worker{nullptr};
  std::atomic<TaskCounter*> counter{nullptr};
  std::atomic<uint32_t> seats{0};  // how many helpers the job may have
  std::mutex error_lock;
  std::exception_ptr error;
  // Under `jobs`: the helpers started so far, and the CPU they were last kept away from.
  std::vector<pthread_t> helpers;
  int kept_from = -1;
  cpu_set_t caller_mask{};

  void record(std::exception_ptr thrown) {
    std::lock_guard<std::mutex> guard(error_lock);
    if (!error) error = thrown;
  }

  void helper_main(uint32_t index) {
    inside_job = true;
    // ATen's per-thread set-up first: its lazy thread-count initialisation would later undo ours.
    (void)at::get_num_threads();
    const SingleThreadedBlas blas;
    uint32_t last_generation = ~0u;
    uint32_t seen = state.load(std::memory_order_acquire);
    for (;;) {
      // Only the first `seats` helpers take part: after torch.set_num_threads went down, the
      // others sleep through each job instead of spinning beside the ones that work.
      const uint32_t job_seats = seats.load(std::memory_order_relaxed);
      const bool wanted = index < job_seats;
      const bool open = !(seen & kClosed) && generation_of(seen) != last_generation &&
                        (seen & kSeatMask) < job_seats;
      if (!wanted || !open) {
        seen = wait_for_change(state, seen, wanted ? kHelperSpin : std::chrono::microseconds{0});
        continue;
      }
      if (!state.compare_exchange_weak(seen, seen + 1, std::memory_order_acquire,
                                       std::memory_order_acquire))
        continue;  // `seen` now holds the word as it is
      last_generation = generation_of(seen);
      try {
        TaskCounter& take = *counter.load(std::memory_order_relaxed);
        if (!take.exhausted()) (*worker.load(std::memory_order_relaxed))(take);
      } catch (...) {
        record(std::current_exception());
      }
      const uint32_t before = state.fetch_sub(1, std::memory_order_acq_rel);
      if ((before & kClosed) && (before & kSeatMask) == 1) futex_wake_all(state);
      seen = state.load(std::memory_order_acquire);
    }
  }

  // Helpers run anywhere the caller may run except on the caller's current CPU (task_pool.h
  // says why). A caller pinned to one CPU (OMP_PROC_BIND, taskset on the thread) gives its
  // helpers the other online CPUs (the kernel keeps them inside the process's cpuset), as OpenMP
  // binds its own threads to other places. The masks change only when the caller's CPU or mask
  // has.
  void keep_helpers_off_caller() {
    const int cpu = sched_getcpu();
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof(allowed), &allowed) != 0)
      return;
    if (cpu == kept_from && CPU_EQUAL(&allowed, &caller_mask)) return;
    caller_mask = allowed;
    kept_from = cpu;
    if (CPU_COUNT(&allowed) <= 1) {
      const long online = sysconf(_SC_NPROCESSORS_ONLN);
      for (long c = 0; c < std::min<long>(online, CPU_SETSIZE); ++c) CPU_SET(c, &allowed);
    }
    CPU_CLR(cpu, &allowed);
    if (CPU_COUNT(&allowed) == 0) return;  // one CPU in all: nowhere else to go
    for (pthread_t helper : helpers) pthread_setaffinity_np(helper, sizeof(allowed), &allowed);
  }

  // Starts helpers up to `wanted`; returns how many there are (fewer if the OS refused a thread,
  // where OpenMP would run with fewer threads too).
  int start_helpers(int wanted) {
    helpers.reserve(static_cast<size_t>(wanted));
    while (static_cast<int>(helpers.size()) < wanted) {
      const auto index = static_cast<uint32_t>(helpers.size());
      try {
        std::thread helper([this, index] { helper_main(index); });
        helpers.push_back(helper.native_handle());
        helper.detach();
      } catch (const std::system_error&) {
        break;
      }
      kept_from = -1;  // the new helper may run anywhere yet
    }
    return static_cast<int>(helpers.size());
  }

  void run(int64_t count, int threads, c10::function_ref<void(TaskCounter&)>& job) {
    TaskCounter take(count);
    const int available = start_helpers(threads - 1);
    keep_helpers_off_caller();
    worker.store(&job, std::memory_order_relaxed);
    counter.store(&take, std::memory_order_relaxed);
    seats.store(static_cast<uint32_t>(available), std::memory_order_relaxed);
    error = nullptr;
    // The previous job left the word closed with no seats taken: open the next generation.
    const uint32_t previous = state.load(std::memory_order_relaxed);
    state.store((generation_of(previous) + 1) << kGenerationShift, std::memory_order_release);
    futex_wake_all(state);

    inside_job = true;
    {
      const SingleThreadedBlas blas;
      try {
        job(take);
      } catch (...) {
        record(std::current_exception());
      }
    }
    inside_job = false;
    uint32_t now = state.fetch_or(kClosed, std::memory_order_acq_rel) | kClosed;
    while (now & kSeatMask) now = wait_for_change(state, now, kCallerSpin);
    if (error) std::rethrow_exception(std::exchange(error, nullptr));
  }
};

// Leaked on purpose: helpers are detached and may still be asleep on it at exit. A forked child
// has none of its parent's threads, so it starts a pool of its own.
std::atomic<Pool*> the_pool{nullptr};

Pool& pool() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, [] { the_pool.store(nullptr); });
    return true;
  }();
  (void)registered;
  Pool* current = the_pool.load(std::memory_order_acquire);
  if (current == nullptr) {
    Pool* fresh = new Pool();
    if (the_pool.compare_exchange_strong(current, fresh, std::memory_order_acq_rel))
      current = fresh;
    else
      delete fresh;
  }
  return *current;
}

void run_here(int64_t count, c10::function_ref<void(TaskCounter&)> worker) {
  TaskCounter take(count);
  worker(take);
}

}  // namespace

void run_tasks(int64_t count, int threads, c10::function_ref<void(TaskCounter&)> worker) {
  threads = static_cast<int>(std::min<int64_t>({threads, count, kMostHelpers + 1}));
  if (threads <= 1 || inside_job || at::in_parallel_region()) return run_here(count, worker);
  Pool& shared = pool();
  std::unique_lock<std::mutex> lock(shared.jobs, std::try_to_lock);
  if (!lock.owns_lock()) return run_here(count, worker);  // another thread's job is running
  shared.run(count, threads, worker);
}

}  // namespace protokern::cpu
