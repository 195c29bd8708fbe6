// What the typed API's binding files share: the LinearPlan Python class (BlockPlan holds four),
// the ShmGroup class (BlockPlan.step may reduce through one)
// and the attention inputs' checks (decode_attention and BlockPlan.step take the same ones).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "attention.h"
#include "check.h"
#include "linear_plan.h"
#include "shm_group.h"

namespace pf_cpu {

// LinearPlan(weight, d_out, bias, parts, blocks, num_experts, fmt, a_cat): the checked Linear plus references
// to every array it points into (binding_linear.cpp).
class LinearPlan {
public:
    LinearPlan(py::object weight, int64_t d_out, py::object bias, py::object parts,
               py::object blocks, int64_t num_experts, int fmt, py::object a_cat, int64_t d_in_q,
               int expert_fmt);
    void run(py::object x, py::object y, py::object gates, int threads, int prologue,
             py::object norm, double eps, py::object residual) const;
    const Linear& core() const { return lin_; }
    void set_half_tiles(bool on) { lin_.half_tiles = on; }
    const py::array& w_aug() const { return w_aug_; }

private:
    void load_a(const Checker& ck, py::object a_cat);
    void load_panels(const Checker& ck);

    Linear lin_;
    py::array w_aug_, bias_, a_cat_;     // w_aug_: the weight (W_aug, or quantized W)
    std::vector<py::array> bT_;
};

// ShmGroup(segment, rank, world, capacity, timeout_s): the checked group plus the segment it
// reduces through (binding_group.cpp).
class PyShmGroup {
public:
    PyShmGroup(py::object segment, int64_t rank, int64_t world, int64_t capacity, double timeout_s);
    void allreduce(py::object x);
    ShmGroup& core() const { return *group_; }

private:
    py::array seg_;
    std::unique_ptr<ShmGroup> group_;
};

// threads in [1, kMaxThreads].
void check_threads(const Checker& ck, int threads);

// Checks cos, sin, the caches, layer, row0, cols, bias for B rows of H query and H_kv kv heads of
// size D, and fills ``call`` (all but qkv, qs, out); ``cols_buf`` holds the columns it points to.
// ``row_slots``: None (rows row0 ..), or each row's slot, kept in ``slots_buf``.
void check_attention(const Checker& ck, int64_t B, int64_t H, int64_t H_kv, int64_t D,
                     const py::array& cos, const py::array& sin, const py::array& k_cache,
                     const py::array& v_cache, int64_t layer, int64_t row0, py::handle cols,
                     py::handle bias, AttentionCall& call, std::vector<int64_t>& cols_buf,
                     py::handle row_slots = py::none(), std::vector<int64_t>* slots_buf = nullptr);

void bind_linear(py::module_& m);
void bind_attention(py::module_& m);
void bind_block(py::module_& m);
void bind_quant(py::module_& m);
void bind_group(py::module_& m);

}  // namespace pf_cpu
