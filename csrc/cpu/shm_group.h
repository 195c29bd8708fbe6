// ShmGroup: an all-reduce (sum) of fp32 vectors between the N processes of one machine, through
// a shared memory segment they have all mapped (the tensor-parallel ranks of pf_engine.parallel).
//
// Segment layout (layout_bytes(N, cap)), 64-byte aligned:
//   line 0            abort flag (uint32): any rank (or a watchdog) sets it; every wait sees it
//   lines 1 .. N      seq[r] (uint64): the last all-reduce rank r has published
//   slots             slot[r][p] (cap floats each, p = seq & 1): rank r's input to round seq
//
// One round of a vector x of n <= cap floats, on every rank r, seq the round number (each rank
// counts its own rounds; all make the same calls):
//   copy x into slot[r][seq & 1]; store seq[r] = seq (release)
//   wait until seq[q] >= seq for every q (acquire), or abort, or the timeout
//   x[i] = slot[0][p][i] + slot[1][p][i] + ... + slot[N-1][p][i]     (this order on every rank:
//                                                                      the sums are bit-identical)
// Two slots per rank make one round's reads safe from the next round's writes: a rank writes
// slot[r][p] again in round seq + 2, after every rank has published seq + 1, which each did only
// after reading round seq.  Longer vectors go round by round, cap floats at a time.
//
// A wait spins (pause), then yields the core after spin_us, checks the abort flag every
// iteration and the clock every 256; on abort or timeout it throws std::runtime_error and the
// group is unusable.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace pf_cpu {

class ShmGroup {
public:
    static constexpr int kMaxWorld = 64;
    static int64_t layout_bytes(int world, int64_t cap);

    // base: the mapped segment (layout_bytes(world, cap) bytes, zeroed before any rank uses it).
    ShmGroup(uint8_t* base, int rank, int world, int64_t cap, double timeout_s);

    void allreduce(float* x, int64_t n);      // throws std::runtime_error on abort / timeout
    void abort() const;
    bool aborted() const;
    int rank() const { return rank_; }
    int world() const { return world_; }
    int64_t capacity() const { return cap_; }
    uint64_t rounds() const { return seq_; }
    double wait_s() const { return wait_s_; }      // seconds spent waiting for the other ranks

private:
    std::atomic<uint32_t>* flag() const;
    std::atomic<uint64_t>* seq(int r) const;
    float* slot(int r, uint64_t s) const;
    void round(float* x, int64_t n);

    uint8_t* base_;
    int rank_, world_;
    int64_t cap_;
    double timeout_s_;
    uint64_t seq_ = 0;
    double wait_s_ = 0.0;
};

}  // namespace pf_cpu
