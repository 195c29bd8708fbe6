// The thread pool of pool.h.  How a job runs:
//
//   caller (holds job_mu_)                       worker i < threads - 1
//   fn_, ctx_, done_ = 0                           spins on its own gen word, then futex-sleeps
//   claim_ = gen | n | next=0   (release)
//   worker[i].gen = gen; wake it if asleep  --->   sees gen: work(gen)
//   work(gen)                                      work(gen)
//   wait until done_ == n (spin, then futex)  <--- the thread finishing chunk n - 1 wakes it
//
// work(gen) claims chunk after chunk with a CAS on claim_ = [gen:32 | n:16 | next:16], which
// fails once the job is over (next == n) or another job has started (gen differs): a late
// worker can never take a chunk of a job it was not posted, nor run one twice.  fn_ / ctx_ are
// read only after a successful claim, while the job is still live, so the caller cannot be
// writing them then.  Sleeping uses the Dekker pattern on seq_cst atomics (store my flag, then
// read the other side's word), so a wake-up is never lost; the caller's sleep has a 1 ms
// timeout anyway.  While the machine looks shared (Contention below) jobs run inline.
#include "pool.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pf_cpu {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<int64_t> g_spin_ns{50000};
thread_local bool t_in_job = false;      // this thread is running a chunk or a job: nest inline

// Contention.  On a machine shared with busy processes, threads wait for a core: a worker that
// was descheduled holding a chunk stalls the caller for a time slice, and a spinning thread burns
// its session's share of the cores (the kernel's autogroups give each session one share) and,
// being runnable, draws the session's weight onto its core, away from the thread doing the work.
// Measured here (2-core VM, beside two busy sessions), one thread decoded faster than two.  So
// while the machine looks shared, jobs run inline on the caller and nobody spins.  Signs:
//   * a worker starts more than kLateNs after its job was posted;
//   * the caller waits more than kLateNs for chunks other threads claimed.
// Two signs within kPairNs make the machine "shared" for a window of kWindowNs; a window that
// starts within kAgainNs of the last one's end (the pool, tried again, soon failed) is twice as
// long as that one, up to kMaxWindowNs: under lasting contention the pool is tried once every
// few seconds, each try costing a few tokens' worth of stalls.  Quiet, a
// late-by-1-ms sign came 0-4 times per 40 tokens (1.2 s) and never in pairs; beside busy
// processes 100-200 times.
constexpr int64_t kLateNs = 1000000;
constexpr int64_t kPairNs = 50000000;
constexpr int64_t kWindowNs = 200000000;
constexpr int64_t kAgainNs = 1000000000;
constexpr int64_t kMaxWindowNs = 3200000000;

class Contention {
public:
    bool shared(int64_t now) const { return now < until_.load(std::memory_order_relaxed); }
    void set_enabled(bool on) {
        std::lock_guard<std::mutex> lock(mu_);
        enabled_ = on;
        until_.store(0, std::memory_order_relaxed);
    }

    void sign(int64_t now) {
        std::lock_guard<std::mutex> lock(mu_);
        signs_.fetch_add(1, std::memory_order_relaxed);
        if (!enabled_) return;
        const int64_t until = until_.load(std::memory_order_relaxed);
        if (now < until || now - last_ >= kPairNs) {
            last_ = now;
            return;
        }
        window_ = now - until < kAgainNs ? std::min(2 * window_, kMaxWindowNs) : kWindowNs;
        until_.store(now + window_, std::memory_order_relaxed);
        windows_.fetch_add(1, std::memory_order_relaxed);
        last_ = now;
    }

    int64_t signs() const { return signs_.load(); }
    int64_t windows() const { return windows_.load(); }

private:
    std::mutex mu_;
    std::atomic<int64_t> until_{0};
    int64_t last_ = -kPairNs;         // the last sign, under mu_
    int64_t window_ = kWindowNs;      // the last window's length, under mu_
    bool enabled_ = true;             // under mu_
    std::atomic<int64_t> signs_{0}, windows_{0};
};

Contention g_contention;

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// How long to spin now: spin_us(), or 0 while the machine looks shared.
int64_t spin_budget_ns() {
    return g_contention.shared(now_ns()) ? 0 : g_spin_ns.load(std::memory_order_relaxed);
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, const timespec* timeout) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, timeout,
            nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* word, int count) {
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, count, nullptr,
            nullptr, 0);
}

// Spins until ready() or spin_budget_ns() has passed; returns ready().
template <class Ready>
bool spin_until(Ready ready) {
    if (ready()) return true;
    const int64_t budget = spin_budget_ns();
    if (budget <= 0) return false;
    const auto t0 = Clock::now();
    for (;;) {
        for (int i = 0; i < 16; ++i) {
            _mm_pause();
            if (ready()) return true;
        }
        if (std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count() >= budget)
            return ready();
    }
}

struct alignas(64) Worker {
    std::atomic<uint32_t> gen{0};        // the last job posted to this worker
    std::atomic<uint32_t> sleeping{0};   // it sleeps (or is about to) on gen
};

class Pool {
public:
    void run(int64_t n, int threads, ChunkFn fn, void* ctx) {
        std::unique_lock<std::mutex> lock(job_mu_, std::try_to_lock);
        if (!lock.owns_lock()) return inline_run(n, fn, ctx);     // another caller's job runs
        const int helpers = start_workers(static_cast<int>(std::min<int64_t>(threads - 1, n - 1)));
        if (helpers == 0) return inline_run(n, fn, ctx);
        if (++gen_ == 0) gen_ = 1;                                   // 0: a worker's initial gen
        fn_ = fn;
        ctx_ = ctx;
        done_.store(0, std::memory_order_relaxed);
        posted_ns_.store(now_ns(), std::memory_order_relaxed);
        claim_.store(static_cast<uint64_t>(gen_) << 32 | static_cast<uint64_t>(n) << 16,
                     std::memory_order_release);
        for (int i = 0; i < helpers; ++i) {
            Worker& w = *workers_[i];
            w.gen.store(gen_, std::memory_order_seq_cst);
            if (w.sleeping.load(std::memory_order_seq_cst)) futex_wake(&w.gen, 1);
        }
        t_in_job = true;
        work(gen_);
        t_in_job = false;
        wait_done(static_cast<uint32_t>(n));
    }

    int workers() {
        std::lock_guard<std::mutex> lock(job_mu_);
        return static_cast<int>(workers_.size());
    }

    static void inline_run(int64_t n, ChunkFn fn, void* ctx) {
        const bool outer = t_in_job;
        t_in_job = true;
        for (int64_t c = 0; c < n; ++c) fn(ctx, c);
        t_in_job = outer;
    }

private:
    // Claims and runs chunks of job ``gen`` until none is left (or another job is posted).
    void work(uint32_t gen) {
        uint64_t cur = claim_.load(std::memory_order_acquire);
        for (;;) {
            if (static_cast<uint32_t>(cur >> 32) != gen) return;
            const uint32_t n = (cur >> 16) & 0xffff, next = cur & 0xffff;
            if (next >= n) return;
            if (!claim_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel,
                                              std::memory_order_acquire))
                continue;
            fn_(ctx_, next);
            if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == n &&
                caller_sleeping_.load(std::memory_order_seq_cst))
                futex_wake(&done_, 1);
            cur = claim_.load(std::memory_order_acquire);
        }
    }

    void wait_done(uint32_t n) {
        if (spin_until([&] { return done_.load(std::memory_order_acquire) == n; })) return;
        const int64_t t0 = now_ns();
        caller_sleeping_.store(1, std::memory_order_seq_cst);
        const timespec timeout{0, 1000000};
        for (uint32_t v; (v = done_.load(std::memory_order_seq_cst)) != n;) futex_wait(&done_, v, &timeout);
        caller_sleeping_.store(0, std::memory_order_relaxed);
        const int64_t t1 = now_ns();
        if (t1 - t0 > kLateNs) g_contention.sign(t1);
    }

    // Makes sure ``want`` workers exist (under job_mu_); returns how many do (fewer if a thread
    // could not be started).
    int start_workers(int want) {
        want = std::min(want, kMaxThreads - 1);
        while (static_cast<int>(workers_.size()) < want) {
            auto w = std::make_unique<Worker>();
            try {
                std::thread(&Pool::worker_main, this, w.get()).detach();
            } catch (const std::exception&) {
                break;
            }
            workers_.push_back(std::move(w));
        }
        return std::max(0, std::min(want, static_cast<int>(workers_.size())));
    }

    void worker_main(Worker* w) {
        pthread_setname_np(pthread_self(), "pf_cpu_pool");
        t_in_job = true;                     // a chunk that calls parallel_for runs it inline
        uint32_t seen = 0;
        for (;;) {
            if (!spin_until([&] { return w->gen.load(std::memory_order_acquire) != seen; })) {
                w->sleeping.store(1, std::memory_order_seq_cst);
                while (w->gen.load(std::memory_order_seq_cst) == seen) futex_wait(&w->gen, seen, nullptr);
                w->sleeping.store(0, std::memory_order_relaxed);
            }
            seen = w->gen.load(std::memory_order_acquire);
            const int64_t now = now_ns();                  // spinning or woken: was it late?
            if (now - posted_ns_.load(std::memory_order_relaxed) > kLateNs) g_contention.sign(now);
            work(seen);
        }
    }

    std::mutex job_mu_;                                  // one job at a time
    std::vector<std::unique_ptr<Worker>> workers_;       // under job_mu_ (workers never exit)
    uint32_t gen_ = 0;                                   // the current job's number, under job_mu_
    ChunkFn fn_ = nullptr;                               // the current job, written before claim_
    void* ctx_ = nullptr;
    // One cache line: a worker's "chunk done" and its next claim are one line transfer.
    alignas(64) std::atomic<uint64_t> claim_{0};        // [gen:32 | n:16 | next:16]
    std::atomic<uint32_t> done_{0};                     // chunks finished
    std::atomic<uint32_t> caller_sleeping_{0};
    std::atomic<int64_t> posted_ns_{0};                  // when the current job was posted
};

// Never destroyed: detached workers may still be spinning at exit.  A forked child gets a new
// one (the parent's workers do not exist there, and its job_mu_ may be held).
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
    static const bool once = [] {
        g_pool.store(new Pool);
        pthread_atfork(nullptr, nullptr, [] { g_pool.store(new Pool); });
        return true;
    }();
    (void)once;
    return *g_pool.load(std::memory_order_acquire);
}

}  // namespace

void parallel_for(int64_t n, int threads, ChunkFn fn, void* ctx) {
    if (n <= 0) return;
    if (threads <= 1 || n == 1 || t_in_job || n > kMaxChunks || g_contention.shared(now_ns()))
        return Pool::inline_run(n, fn, ctx);
    pool().run(n, threads, fn, ctx);
}

void set_spin_us(int64_t us) { g_spin_ns.store(std::max<int64_t>(0, us) * 1000); }
int64_t spin_us() { return g_spin_ns.load() / 1000; }
int pool_workers() { return pool().workers(); }
int64_t contended_signs() { return g_contention.signs(); }
int64_t contended_windows() { return g_contention.windows(); }
void set_contention_detection(bool on) { g_contention.set_enabled(on); }

}  // namespace pf_cpu
