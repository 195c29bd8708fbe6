// check.h's helpers.
#include "check.h"

#include <Python.h>

#include <algorithm>
#include <cstdint>

namespace pf_cpu {
namespace {

const char* dtype_name(Dtype d) {
    return d == Dtype::F32 ? "float32" : d == Dtype::I64 ? "int64" : "uint8";
}

bool has_dtype(py::handle obj, Dtype d) {
    switch (d) {
        case Dtype::F32: return py::isinstance<py::array_t<float>>(obj);
        case Dtype::I64: return py::isinstance<py::array_t<int64_t>>(obj);
        default: return py::isinstance<py::array_t<uint8_t>>(obj);
    }
}

// [lo, hi) of the bytes a view spans (empty: lo == hi).
std::pair<uintptr_t, uintptr_t> extent(const py::array& a) {
    const auto base = reinterpret_cast<uintptr_t>(a.data());
    intptr_t lo = 0, hi = 0;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        if (a.shape(i) == 0) return {base, base};
        const intptr_t span = static_cast<intptr_t>(a.shape(i) - 1) * a.strides(i);
        (span < 0 ? lo : hi) += span;
    }
    return {base + lo, base + hi + a.itemsize()};
}

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

}  // namespace

std::string shape_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

std::string strides_str(const py::array& a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.strides(i));
    return s + (a.ndim() == 1 ? ",)" : ")");
}

bool same_view(const py::array& a, const py::array& b) {
    if (a.data() != b.data() || a.ndim() != b.ndim()) return false;
    for (py::ssize_t i = 0; i < a.ndim(); ++i)
        if (a.shape(i) != b.shape(i) || (a.shape(i) > 1 && a.strides(i) != b.strides(i))) return false;
    return true;
}

void Checker::fail(const std::string& msg) const { throw py::value_error(cat(where_, ": ", msg)); }
void Checker::fail_type(const std::string& msg) const { throw py::type_error(cat(where_, ": ", msg)); }

py::array Checker::array(const std::string& name, py::handle obj, Dtype dtype) const {
    if (!py::isinstance<py::array>(obj))
        fail_type(cat(name, " is ", type_name(obj), ", expected a numpy ", dtype_name(dtype),
                      " array (a torch tensor: pass tensor.numpy())"));
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!has_dtype(obj, dtype))
        fail_type(cat(name, " has dtype ", std::string(py::str(a.dtype())), ", expected ", dtype_name(dtype)));
    if (reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() != 0)
        fail(cat(name, " is not aligned to its ", a.itemsize(), "-byte elements"));
    return a;
}

std::optional<py::array> Checker::optional(const std::string& name, py::handle obj, Dtype dtype) const {
    if (obj.is_none()) return std::nullopt;
    return array(name, obj, dtype);
}

void Checker::ndim(const std::string& name, const py::array& a, int want, const char* labels) const {
    if (a.ndim() != want)
        fail(cat(name, " has ", a.ndim(), " dims (shape ", shape_str(a), "), expected ", want, " (",
                 labels, ")"));
}

void Checker::shape(const std::string& name, const py::array& a, const std::vector<int64_t>& want,
                    const char* labels) const {
    ndim(name, a, static_cast<int>(want.size()), labels);
    bool ok = true;
    std::string w = "(";
    for (size_t i = 0; i < want.size(); ++i) {
        ok = ok && (want[i] < 0 || a.shape(static_cast<py::ssize_t>(i)) == want[i]);
        w += (i ? ", " : "") + (want[i] < 0 ? std::string("*") : std::to_string(want[i]));
    }
    w += want.size() == 1 ? ",)" : ")";
    if (!ok) fail(cat(name, " has shape ", shape_str(a), ", expected ", w, " (", labels, ")"));
}

void Checker::c_contiguous(const std::string& name, const py::array& a) const {
    if (!(a.flags() & py::array::c_style))
        fail(cat(name, " is not C-contiguous (shape ", shape_str(a), ", strides ", strides_str(a),
                 " bytes), expected row-major contiguous"));
}

void Checker::unit_last_stride(const std::string& name, const py::array& a, bool distinct_rows) const {
    const py::ssize_t n = a.ndim(), item = a.itemsize();
    if (n >= 1 && a.shape(n - 1) > 1 && a.strides(n - 1) != item)
        fail(cat(name, " has strides ", strides_str(a), " bytes, expected a unit last stride (",
                 item, " bytes)"));
    if (n == 2 && a.shape(0) > 1) {
        if (a.strides(0) % item != 0)
            fail(cat(name, " has a row stride of ", a.strides(0), " bytes, expected a multiple of ", item));
        if (distinct_rows && std::abs(a.strides(0)) < a.shape(1) * item)
            fail(cat(name, " has overlapping rows (row stride ", a.strides(0), " bytes, rows of ",
                     a.shape(1) * item, "), expected distinct rows"));
    }
}

void Checker::writable(const std::string& name, const py::array& a) const {
    if (!a.writeable()) fail(cat(name, " is read-only, expected a writable array"));
}

void Checker::disjoint(const std::string& name_a, const py::array& a, const std::string& name_b,
                       const py::array& b) const {
    const auto ea = extent(a), eb = extent(b);
    if (ea.first < ea.second && eb.first < eb.second && ea.first < eb.second && eb.first < ea.second)
        fail(cat(name_a, " shares memory with ", name_b, ", expected separate arrays"));
}

void Checker::in_range(const std::string& name, int64_t v, int64_t lo, int64_t hi, const char* why) const {
    if (v < lo || v > hi)
        fail(cat(name, " is ", v, ", expected a value in [", lo, ", ", hi, "]",
                 why ? cat(" (", why, ")") : std::string()));
}

void Checker::equal(const std::string& name, int64_t got, int64_t want, const char* why) const {
    if (got != want) fail(cat(name, " is ", got, ", expected ", want, " (", why, ")"));
}

int64_t Checker::index(const std::string& name, py::handle obj) const {
    PyObject* i = PyNumber_Index(obj.ptr());
    if (i == nullptr) {
        PyErr_Clear();
        fail_type(cat(name, " is ", type_name(obj), ", expected an integer"));
    }
    const long long v = PyLong_AsLongLong(i);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        fail(cat(name, " does not fit in 64 bits"));
    }
    return v;
}

double Checker::number(const std::string& name, py::handle obj) const {
    const double v = PyFloat_AsDouble(obj.ptr());
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        fail_type(cat(name, " is ", type_name(obj), ", expected a number"));
    }
    return v;
}

}  // namespace pf_cpu
