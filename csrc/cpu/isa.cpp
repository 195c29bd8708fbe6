// isa.h: the variants build.py compiled in (PF_HAVE_<NAME>), the CPU's support, the choice.
#include "isa.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <stdexcept>

namespace pf_cpu {

#define PF_DECLARE_VARIANT(ns)                                                                       \
    namespace ns {                                                                                   \
    void qrows_dots_isa(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XRow* X, int T,      \
                        int64_t nb, float* out, int64_t os);                                         \
    void hrows_dots_isa(int fmt, const uint8_t* w, int64_t rb, int64_t R, const float* x, int64_t xs, int T,  \
                        int64_t d, float* out, int64_t os);                                          \
    void expand_q8_isa(const PanelBlock* blk, int nblk, int64_t g0, int64_t g1, const int32_t* hw,         \
                       int64_t hws, const float* sh, int64_t shs, int T, float* y, int64_t ys, int64_t valid); \
    }
PF_DECLARE_VARIANT(avx2)
#ifdef PF_HAVE_AMX
PF_DECLARE_VARIANT(amx)
namespace amx {
void qrows_tiles_isa(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XTiles& xt, int64_t G, int T,
                     float* out, int64_t os);
void hrows_tiles_isa(const uint8_t* w, int64_t rb, int64_t R, const uint16_t* xb, int64_t G, int T, int64_t d,
                     float* out, int64_t os);
}
#endif
#ifdef PF_HAVE_AVXVNNI
PF_DECLARE_VARIANT(avxvnni)
#endif
#ifdef PF_HAVE_AVX512VNNI
PF_DECLARE_VARIANT(avx512vnni)
#endif

namespace {

struct Variant {
    const char* name;
    const char* needs;
    QrowsDots fn;
    ExpandQ8 expand;
    HrowsDots hrows;
    bool (*supported)();
    QrowsTiles tiles = nullptr;
    HrowsTiles htiles = nullptr;   // with AMX-BF16 (amx_bf16_usable)
};

#ifdef PF_HAVE_AMX
// The CPU has AMX-INT8 and Linux grants this process the tile state (arch_prctl
// ARCH_REQ_XCOMP_PERM for XTILEDATA; once, process-wide; a kernel before 5.16 refuses).
bool amx_usable() {
    static const bool ok = [] {
        if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") ||
            !__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512bw") ||
            !__builtin_cpu_supports("avx512vl"))
            return false;
        constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
        return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
    }();
    return ok;
}
#endif

const std::vector<Variant>& variants() {
    static const std::vector<Variant> v = [] {
        __builtin_cpu_init();
        std::vector<Variant> out;
#ifdef PF_HAVE_AMX
        out.push_back({"amx", "avx512vnni, amx-tile, amx-int8 (and Linux 5.16+)", &amx::qrows_dots_isa, &amx::expand_q8_isa,
                       &amx::hrows_dots_isa, &amx_usable, &amx::qrows_tiles_isa, &amx::hrows_tiles_isa});
#endif
#ifdef PF_HAVE_AVX512VNNI
        out.push_back({"avx512vnni", "avx512f, avx512bw, avx512vl, avx512vnni", &avx512vnni::qrows_dots_isa, &avx512vnni::expand_q8_isa, &avx512vnni::hrows_dots_isa, [] {
                           return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
                       }});
#endif
#ifdef PF_HAVE_AVXVNNI
        out.push_back({"avxvnni", "avxvnni", &avxvnni::qrows_dots_isa, &avxvnni::expand_q8_isa, &avxvnni::hrows_dots_isa,
                       [] { return static_cast<bool>(__builtin_cpu_supports("avxvnni")); }});
#endif
        // The module is imported only on CPUs with AVX2/FMA/F16C (pf_kernels.cpu_ops checks).
        out.push_back({"avx2", "avx2, fma, f16c", &avx2::qrows_dots_isa, &avx2::expand_q8_isa, &avx2::hrows_dots_isa, [] { return true; }});
        return out;
    }();
    return v;
}

const Variant* best() {
    for (const Variant& v : variants())
        if (v.supported()) return &v;
    return &variants().back();
}

std::atomic<const Variant*> g_current{nullptr};

const Variant* current() {
    const Variant* v = g_current.load(std::memory_order_acquire);
    if (v == nullptr) {
        v = best();
        g_current.store(v, std::memory_order_release);
    }
    return v;
}

}  // namespace

std::vector<IsaInfo> isas() {
    std::vector<IsaInfo> out;
    for (const Variant& v : variants()) out.push_back({v.name, v.needs, v.supported()});
    return out;
}

std::string isa() { return current()->name; }

void set_isa(const std::string& name) {
    std::string names;
    for (const Variant& v : variants()) {
        if (name == v.name) {
            if (!v.supported())
                throw std::invalid_argument("isa '" + name + "' needs " + v.needs + ", which this CPU lacks (it runs " +
                                            best()->name + ")");
            g_current.store(&v, std::memory_order_release);
            return;
        }
        names += (names.empty() ? "" : ", ") + std::string(v.name);
    }
    throw std::invalid_argument("isa '" + name + "': expected one of " + names + " (the variants this build has)");
}

QrowsDots qrows_dots_kernel() { return current()->fn; }
ExpandQ8 expand_q8_kernel() { return current()->expand; }
HrowsDots hrows_dots_kernel() { return current()->hrows; }
QrowsTiles qrows_tiles_kernel() { return current()->tiles; }
HrowsTiles hrows_tiles_kernel() {
    static const bool bf16 = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("amx-bf16") != 0;
    }();
    return bf16 ? current()->htiles : nullptr;
}

}  // namespace pf_cpu
