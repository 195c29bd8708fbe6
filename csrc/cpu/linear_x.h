// The activations a LinearPlan call's dots read, made once per call by linear_run
// (linear_plan.cpp) before its parallel region:
//
//   x'   = prologue(x)                     rmsnorm or silu-mul, or x itself   [T, d_in]
//   xq   = x' quantized per block of 32    the block formats' dots (quant.h), T XRows
//   xt   = xq packed for AMX-INT8 tiles    amx.h (quant_format.h's XTiles)
//   xb   = x' rounded to bf16, packed      a bf16 W's AMX-BF16 tiles (amx_bf16.h)
//
// and the token counts from which a call takes the tiles.
#pragma once
#include <cstdint>
#include <vector>

#include "linear_plan.h"
#include "quant_format.h"

namespace pf_cpu {

// x' for the call's prologue, in buf (or x itself); sets xs to x''s row stride.
const float* prologue(const Linear& lin, const LinearCall& c, std::vector<float>& buf, int64_t& xs);

// x' [T rows at stride xs] quantized per block into buf (pairs: the Q4 order); T XRows.
const XRow* quantize_rows(const float* x, int64_t xs, int64_t T, int64_t nb, bool pairs, std::vector<float>& buf,
                          std::vector<XRow>& rows);

// x' quantized (T XRows, pair order if ``pairs``) packed for tiles into q, d, s (XTiles).
XTiles pack_tiles(const XRow* X, int64_t T, int64_t nb, bool pairs, std::vector<int32_t>& q, std::vector<float>& d,
                  std::vector<float>& s);

// x' [T, d] rounded to bf16 and packed for a bf16 W's tiles into out (quant_format.h's layout).
const uint16_t* pack_htiles(const float* x, int64_t xs, int64_t T, int64_t d, std::vector<uint16_t>& out);

// Tokens from which the tiles pay (amx.h; any count gives the same bits): a tile's 16 token
// columns cost the same however many are real.  Measured (1536 x 576, 2 threads, Xeon with
// AMX): q8_0 from 4 tokens (40 vs 52 us), the unpacked nibble formats from 6 (63 vs 66 us; at 4,
// 57 vs 44).
inline int64_t tile_min_tokens(int fmt) { return fmt == FMT_Q8_0 ? 4 : 6; }

// Tokens from which a bf16 W takes its tiles (amx_bf16.h; not the same bits as half.h's dots, so
// the choice is per call: all of a call's groups one way).  Measured (1536 x 576, 2 threads, Xeon
// with AMX), tiles against half.h: 0.85x the throughput at 4 tokens, 1.27x at 6, 1.3x at 8.
constexpr int64_t HALF_TILE_MIN = 6;

}  // namespace pf_cpu
