// The typed API's boundary checks, in one place.  Every failure is one line naming where, the
// argument, what it got and what was expected:
//
//   LinearPlan: bias has shape (12,), expected (16,) (d_out)
//   LinearPlan.run: x has dtype float64, expected float32                           (TypeError)
//   decode_attention: cols[1] is 70, expected a value in [0, 63] (L - 1 = bias.shape[1] - 1)
//
// ValueError for values, shapes, layouts and ranges; TypeError for a wrong dtype or a
// non-array.  Callers check everything before they write anything.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace pf_cpu {

namespace py = pybind11;

template <class... A>
std::string cat(const A&... a) {
    std::ostringstream s;
    (s << ... << a);
    return s.str();
}

enum class Dtype { F32, I64, U8 };

class Checker {
public:
    explicit Checker(const char* where) : where_(where) {}

    [[noreturn]] void fail(const std::string& msg) const;        // ValueError "<where>: <msg>"
    [[noreturn]] void fail_type(const std::string& msg) const;   // TypeError

    // obj as a numpy array of ``dtype`` (TypeError otherwise).  Arrays only: a copy made here
    // would hide writes, so a torch tensor must come as tensor.numpy().
    py::array array(const std::string& name, py::handle obj, Dtype dtype) const;
    // The same, or nothing for None.
    std::optional<py::array> optional(const std::string& name, py::handle obj, Dtype dtype) const;

    // a.ndim == want.size() and a.shape[i] == want[i] where want[i] >= 0 (labels: the dims'
    // names, e.g. "T, d_in").
    void shape(const std::string& name, const py::array& a, const std::vector<int64_t>& want,
               const char* labels) const;
    void ndim(const std::string& name, const py::array& a, int want, const char* labels) const;
    void c_contiguous(const std::string& name, const py::array& a) const;
    // Unit last stride, rows at a whole number of elements; ``distinct_rows``: rows that do not
    // overlap each other (outputs).
    void unit_last_stride(const std::string& name, const py::array& a, bool distinct_rows = false) const;
    void writable(const std::string& name, const py::array& a) const;
    // a and b share no byte (numpy's may_share_memory: their extents are disjoint).
    void disjoint(const std::string& name_a, const py::array& a, const std::string& name_b, const py::array& b) const;
    // lo <= v <= hi;  "<name> is <v>, expected a value in [<lo>, <hi>] (<why>)".
    void in_range(const std::string& name, int64_t v, int64_t lo, int64_t hi, const char* why = nullptr) const;
    // got == want;  "<name> is <got>, expected <want> (<why>)".
    void equal(const std::string& name, int64_t got, int64_t want, const char* why) const;

    // obj as an integer (anything with __index__) / a float, TypeError otherwise.
    int64_t index(const std::string& name, py::handle obj) const;
    double number(const std::string& name, py::handle obj) const;

    const char* where() const { return where_; }

private:
    const char* where_;
};

std::string shape_str(const py::array& a);
std::string strides_str(const py::array& a);
// Row stride in elements of a 2-D (or more) array with a unit last stride.
inline int64_t row_stride(const py::array& a) {
    return static_cast<int64_t>(a.strides(0)) / static_cast<int64_t>(a.itemsize());
}
template <class T>
T* data_of(const py::array& a) { return static_cast<T*>(const_cast<void*>(a.data())); }
// Same data pointer, shape and strides.
bool same_view(const py::array& a, const py::array& b);

}  // namespace pf_cpu

// cond or ValueError "<where>: <message parts...>".
#define PF_CHECK(ck, cond, ...) \
    do { if (!(cond)) (ck).fail(::pf_cpu::cat(__VA_ARGS__)); } while (0)
