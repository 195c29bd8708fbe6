// decode_attention: the typed binding of attention.h.
//
//   decode_attention(qkv, cos, sin, k_cache, v_cache, layer, row0, cols, bias, out, threads=1)
//     qkv      float32 [B, (H + 2*H_kv)*D], unit last stride, 1 <= B <= MAX_ROWS
//     cos, sin float32 [B, H + H_kv, D] C-contiguous          (D = cos.shape[2], even)
//     k_cache, v_cache float32 [layers, slots, H_kv, max_len, D] C-contiguous: the whole pool
//              (H_kv = k_cache.shape[2]; H = cos.shape[1] - H_kv, a multiple of H_kv)
//     layer    0 <= layer < layers;  row0: slots row0 .. row0 + B - 1, row0 + B <= slots
//     slots    None, or int64 [B], each in [0, slots): row b's slot (row0 unused; rows may share a
//              slot, e.g. the tokens of a prefill chunk, each at its own column)
//     cols     int64 [B], each in [0, L): where row b's new k, v go
//     bias     float32 [B, L] unit last stride, 1 <= L <= max_len (0 or -inf: the mask)
//     out      float32 [B, H*D] C-contiguous, written
//     threads  the pool's threads; each (row, head) sums its columns in order, masked ones
//              skipped, so a row's result does not depend on the other rows or on L
#include "binding.h"
#include "pool.h"

namespace pf_cpu {

void check_attention(const Checker& ck, int64_t B, int64_t H, int64_t H_kv, int64_t D,
                     const py::array& cos, const py::array& sin, const py::array& k_cache,
                     const py::array& v_cache, int64_t layer, int64_t row0, py::handle cols,
                     py::handle bias, AttentionCall& call, std::vector<int64_t>& cols_buf,
                     py::handle row_slots, std::vector<int64_t>* slots_buf) {
    for (const auto& [name, a] : {std::pair<const char*, const py::array&>{"cos", cos}, {"sin", sin}}) {
        ck.shape(name, a, {B, H + H_kv, D}, "B, H + H_kv, D");
        ck.c_contiguous(name, a);
    }
    const char* cache_dims = "layers, slots, H_kv, max_len, D";
    ck.shape("k_cache", k_cache, {-1, -1, H_kv, -1, D}, cache_dims);
    const int64_t layers = k_cache.shape(0), slots = k_cache.shape(1), max_len = k_cache.shape(3);
    ck.shape("v_cache", v_cache, {layers, slots, H_kv, max_len, D}, "k_cache's shape");
    for (const auto& [name, a] : {std::pair<const char*, const py::array&>{"k_cache", k_cache},
                                  {"v_cache", v_cache}}) {
        ck.c_contiguous(name, a);
        ck.writable(name, a);
    }
    ck.disjoint("k_cache", k_cache, "v_cache", v_cache);
    ck.in_range("layer", layer, 0, layers - 1, "layers - 1 = k_cache.shape[0] - 1");
    if (row_slots.is_none()) {
        ck.in_range("B", B, 1, slots, "slots = k_cache.shape[1]");
        ck.in_range("row0", row0, 0, slots - B, "slots - B: rows row0 .. row0 + B - 1 of k_cache.shape[1]");
    } else {
        py::array sa = ck.array("slots", row_slots, Dtype::I64);
        ck.shape("slots", sa, {B}, "B");
        slots_buf->resize(static_cast<size_t>(B));
        const char* sp = static_cast<const char*>(sa.data());
        for (int64_t b = 0; b < B; ++b) {
            (*slots_buf)[b] = *reinterpret_cast<const int64_t*>(sp + b * sa.strides(0));
            ck.in_range(cat("slots[", b, "]"), (*slots_buf)[b], 0, slots - 1, "slots - 1 = k_cache.shape[1] - 1");
        }
        call.slots = slots_buf->data();
    }

    py::array ba = ck.array("bias", bias, Dtype::F32);
    ck.ndim("bias", ba, 2, "B, L");
    const int64_t L = ba.shape(1);
    ck.shape("bias", ba, {B, L}, "B, L");
    ck.in_range("L = bias.shape[1]", L, 1, max_len, "max_len = k_cache.shape[3]");
    ck.unit_last_stride("bias", ba);
    py::array ca = ck.array("cols", cols, Dtype::I64);
    ck.shape("cols", ca, {B}, "B");
    cols_buf.resize(static_cast<size_t>(B));
    const char* cp = static_cast<const char*>(ca.data());
    for (int64_t b = 0; b < B; ++b) {
        cols_buf[b] = *reinterpret_cast<const int64_t*>(cp + b * ca.strides(0));
        ck.in_range(cat("cols[", b, "]"), cols_buf[b], 0, L - 1, "L - 1 = bias.shape[1] - 1");
    }
    for (const auto& [name, a] : {std::pair<const char*, const py::array&>{"cos", cos}, {"sin", sin},
                                  {"bias", ba}}) {
        ck.disjoint(name, a, "k_cache", k_cache);
        ck.disjoint(name, a, "v_cache", v_cache);
    }

    const int64_t per_layer = slots * H_kv * max_len * D;
    call.B = B;
    call.H = H;
    call.H_kv = H_kv;
    call.D = D;
    call.cos = data_of<const float>(cos);
    call.sin = data_of<const float>(sin);
    call.k = data_of<float>(k_cache) + layer * per_layer;
    call.v = data_of<float>(v_cache) + layer * per_layer;
    call.max_len = max_len;
    call.row0 = row0;
    call.cols = cols_buf.data();
    call.L = L;
    call.bias = data_of<const float>(ba);
    call.bs = row_stride(ba);
}

namespace {

void decode_attention(py::object qkv, py::object cos, py::object sin, py::object k_cache,
                      py::object v_cache, int64_t layer, int64_t row0, py::object cols,
                      py::object bias, py::object out, int threads, py::object slots) {
    const Checker ck("decode_attention");
    check_threads(ck, threads);
    py::array q = ck.array("qkv", qkv, Dtype::F32);
    const char* qkv_dims = "B, (H + 2*H_kv)*D";
    ck.ndim("qkv", q, 2, qkv_dims);
    const int64_t B = q.shape(0);
    ck.in_range("B = qkv.shape[0]", B, 1, MAX_ROWS, "MAX_ROWS");
    py::array c = ck.array("cos", cos, Dtype::F32), s = ck.array("sin", sin, Dtype::F32);
    ck.ndim("cos", c, 3, "B, H + H_kv, D");
    py::array k = ck.array("k_cache", k_cache, Dtype::F32), v = ck.array("v_cache", v_cache, Dtype::F32);
    ck.ndim("k_cache", k, 5, "layers, slots, H_kv, max_len, D");
    const int64_t H_kv = k.shape(2), D = c.shape(2), H = c.shape(1) - H_kv;
    PF_CHECK(ck, H_kv >= 1, "k_cache has shape ", shape_str(k), ", expected H_kv = k_cache.shape[2] >= 1");
    PF_CHECK(ck, H >= 1 && H % H_kv == 0, "cos has shape ", shape_str(c), ": H = cos.shape[1] - H_kv = ", H,
             ", expected a positive multiple of H_kv = ", H_kv, " (k_cache.shape[2])");
    PF_CHECK(ck, D >= 2 && D % 2 == 0, "cos has shape ", shape_str(c), ", expected an even head size D = cos.shape[2] >= 2");
    ck.shape("qkv", q, {B, (H + 2 * H_kv) * D}, qkv_dims);
    ck.unit_last_stride("qkv", q);
    AttentionCall call;
    std::vector<int64_t> cols_buf, slots_buf;
    check_attention(ck, B, H, H_kv, D, c, s, k, v, layer, row0, cols, bias, call, cols_buf, slots,
                    &slots_buf);
    py::array o = ck.array("out", out, Dtype::F32);
    ck.shape("out", o, {B, H * D}, "B, H*D");
    ck.c_contiguous("out", o);
    ck.writable("out", o);
    ck.disjoint("qkv", q, "k_cache", k);
    ck.disjoint("qkv", q, "v_cache", v);
    for (const auto& [name, a] : {std::pair<const char*, const py::array&>{"qkv", q}, {"cos", c}, {"sin", s},
                                  {"k_cache", k}, {"v_cache", v}}) {
        ck.disjoint("out", o, name, a);
    }
    ck.disjoint("out", o, "bias", ck.array("bias", bias, Dtype::F32));
    call.qkv = data_of<const float>(q);
    call.qs = row_stride(q);
    call.out = data_of<float>(o);
    py::gil_scoped_release nogil;
    attention_run(call, threads);
}

}  // namespace

void bind_attention(py::module_& m) {
    m.def("decode_attention", &decode_attention, py::arg("qkv"), py::arg("cos"), py::arg("sin"),
          py::arg("k_cache"), py::arg("v_cache"), py::arg("layer"), py::arg("row0"), py::arg("cols"),
          py::arg("bias"), py::arg("out"), py::arg("threads") = 1, py::arg("slots") = py::none(),
          "Typed: RoPE + KV write at cols + GQA attention for one layer of the slot cache "
          "(see csrc/cpu/binding_attention.cpp); GIL released");
}

}  // namespace pf_cpu
