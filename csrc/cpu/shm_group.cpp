// ShmGroup (shm_group.h): rounds of a shared-memory all-reduce.
#include "shm_group.h"

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace pf_cpu {
namespace {
constexpr int64_t kLine = 64;
constexpr double kSpinUs = 50.0;       // spin this long before yielding the core in a wait
static_assert(std::atomic<uint64_t>::is_always_lock_free, "seq counters must be lock-free");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "the abort flag must be lock-free");

int64_t slot_bytes(int64_t cap) { return (cap * 4 + kLine - 1) / kLine * kLine; }
}  // namespace

int64_t ShmGroup::layout_bytes(int world, int64_t cap) {
    return kLine * (1 + world) + 2 * world * slot_bytes(cap);
}

ShmGroup::ShmGroup(uint8_t* base, int rank, int world, int64_t cap, double timeout_s)
    : base_(base), rank_(rank), world_(world), cap_(cap), timeout_s_(timeout_s) {}

std::atomic<uint32_t>* ShmGroup::flag() const { return reinterpret_cast<std::atomic<uint32_t>*>(base_); }

std::atomic<uint64_t>* ShmGroup::seq(int r) const {
    return reinterpret_cast<std::atomic<uint64_t>*>(base_ + kLine * (1 + r));
}

float* ShmGroup::slot(int r, uint64_t s) const {
    return reinterpret_cast<float*>(base_ + kLine * (1 + world_) + (2 * r + (s & 1)) * slot_bytes(cap_));
}

void ShmGroup::abort() const { flag()->store(1, std::memory_order_release); }

bool ShmGroup::aborted() const { return flag()->load(std::memory_order_acquire) != 0; }

void ShmGroup::allreduce(float* x, int64_t n) {
    for (int64_t off = 0; off < n; off += cap_) round(x + off, std::min(cap_, n - off));
}

void ShmGroup::round(float* x, int64_t n) {
    if (aborted()) throw std::runtime_error("tensor-parallel all-reduce aborted: a rank left the group");
    const uint64_t s = ++seq_;
    std::memcpy(slot(rank_, s), x, static_cast<size_t>(n) * 4);
    seq(rank_)->store(s, std::memory_order_release);
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    for (int q = 0; q < world_; ++q) {
        uint64_t spins = 0;
        bool yielding = false;
        while (seq(q)->load(std::memory_order_acquire) < s) {
            if (aborted()) throw std::runtime_error("tensor-parallel all-reduce aborted: a rank left the group");
            if ((++spins & 255) == 0) {
                const double us = std::chrono::duration<double, std::micro>(clock::now() - t0).count();
                if (us > timeout_s_ * 1e6) {
                    abort();
                    std::ostringstream msg;
                    msg << "tensor-parallel all-reduce timed out after " << timeout_s_ << " s waiting for rank " << q;
                    throw std::runtime_error(msg.str());
                }
                yielding = us > kSpinUs;
            }
            if (yielding) sched_yield(); else _mm_pause();
        }
    }
    wait_s_ += std::chrono::duration<double>(clock::now() - t0).count();
    const float* s0 = slot(0, s);
    for (int64_t i = 0; i < n; ++i) x[i] = s0[i];
    for (int q = 1; q < world_; ++q) {
        const float* sq = slot(q, s);
        for (int64_t i = 0; i < n; ++i) x[i] += sq[i];
    }
}

}  // namespace pf_cpu
