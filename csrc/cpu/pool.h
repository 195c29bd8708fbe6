// A process-wide thread pool for the kernels' parallel regions.
//
//   parallel_for(n, threads, fn)   runs fn(c) once for every chunk c in [0, n), on at most
//                                  ``threads`` threads counting the caller; returns when all ran.
//
// Built for a machine shared with other processes, where a thread may be descheduled at any time:
//  * Chunks are claimed one at a time through one atomic word, by the pool's workers AND by the
//    caller.  The caller never waits for a worker to start: a worker that wakes late (or never)
//    finds nothing left, and the caller waits only for chunks other threads have already claimed.
//    So split work into many small chunks (several per thread), not one per thread.
//  * Waiting is bounded: an idle worker spins (``_mm_pause``) for spin_us() microseconds waiting
//    for the next job, then sleeps on a futex until one is posted to it; the caller, once nothing
//    is left to claim, spins for at most spin_us() on the claimed chunks, then sleeps on a futex
//    that the thread finishing the last chunk wakes.  Nothing spins longer than spin_us().
//  * On a shared machine the caller works alone: two signs within 50 ms that threads wait for a
//    core (a worker started > 1 ms after its job was posted; the caller waited > 1 ms for
//    claimed chunks) make every job run inline and nobody spin for 200 ms (doubled, up to
//    3.2 s, while the signs come back within a second of the pool being tried again).  There a spinning
//    thread burns its session's share of the cores, and a descheduled worker holding a chunk
//    stalls the caller for a time slice: beside busy processes one thread decoded faster than
//    two.  ``threads`` is thus an upper bound.
//  * Jobs are serialised: one job runs on the pool at a time.  A second caller (another Python
//    thread with the GIL released) that finds the pool busy does NOT wait for it: it runs its own
//    job inline on its thread, all chunks in order.  A chunk that calls parallel_for itself (any
//    pool thread) runs it inline too.  threads <= 1 or n <= 1 run inline, touching no pool state.
//  * Workers start lazily (threads - 1 of them, the first time a job asks for that many) and live
//    until the process exits (detached; a forked child starts a fresh pool).
//
// The chunk function must not throw.  At most kMaxChunks chunks per job.
#pragma once
#include <cstdint>
#include <type_traits>

namespace pf_cpu {

constexpr int64_t kMaxChunks = 65535;   // the claim word keeps 16 bits for the count
constexpr int kMaxThreads = 256;        // threads per call, the caller included

using ChunkFn = void (*)(void* ctx, int64_t chunk);

// fn(ctx, c) for c in [0, n) (n <= kMaxChunks) on up to ``threads`` threads; see above.
void parallel_for(int64_t n, int threads, ChunkFn fn, void* ctx);

template <class F>
void parallel_for(int64_t n, int threads, F&& f) {
    using Fn = std::remove_reference_t<F>;
    parallel_for(n, threads, [](void* ctx, int64_t c) { (*static_cast<Fn*>(ctx))(c); },
                 const_cast<void*>(static_cast<const void*>(&f)));
}

// How long a waiting thread spins before it sleeps, in microseconds (default 50).
void set_spin_us(int64_t us);
int64_t spin_us();

// Workers the pool has started so far (tests, benchmarks).
int pool_workers();
// Signs of a shared machine seen (a late worker, a long wait) and windows in which jobs ran
// inline because of them (benchmarks: how often the machine looked shared).
int64_t contended_signs();
int64_t contended_windows();
// Turns the shared-machine detection off (tests that must run on the pool) or on (default).
void set_contention_detection(bool on);

}  // namespace pf_cpu
