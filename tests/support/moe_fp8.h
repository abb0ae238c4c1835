/* SPDX-License-Identifier: Apache-2.0 */
/* FP8 e4m3 (fn) codec, host reference.
 *
 * Format: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; the
 * only NaN codes are 0x7F / 0xFF; largest finite 448, smallest subnormal 2^-9.
 * A row is quantized in blocks of NCCL_MOE_FP8_BLOCK (128) channels, each with
 * one fp32 scale:
 *   amax  = max |x| over the block's finite values (NaN and Inf ignored)
 *   scale = amax / 448, or for power-of-two scales that value rounded up to
 *           the next power of two
 *   code  = e4m3(x * (1 / scale)), rounded to nearest even, saturating
 *           (|value| > 448 -> 448, Inf -> 448 with its sign, NaN -> 0x7F)
 *   value = decode(code) * scale
 * A block whose amax is so small that amax / 448 is not a normal fp32 number
 * (amax < 448 * 2^-126, all-zero blocks included) gets scale 1, so all its
 * codes are zeros (signed) and decode to 0.
 * The GPU codec (kernels/moe_fp8.cuh) produces the same bits. */
#ifndef MOE_FP8_H_
#define MOE_FP8_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_FP8_NAN 0x7Fu

uint8_t moe_fp8_e4m3_encode(float v);
float moe_fp8_e4m3_decode(uint8_t code);

/* The block scale of `amax` (pow2 != 0: power-of-two scale). */
float moe_fp8_block_scale(float amax, int pow2);

/* BF16 <-> fp32 (bf16 is the top half of an fp32; rounding to nearest even,
 * NaN kept NaN). */
float moe_bf16_to_float(uint16_t h);
uint16_t moe_float_to_bf16(float f);

/* Quantizes BF16 [rows, hidden] (hidden a multiple of 128) into FP8 codes
 * [rows, hidden] and scales [rows, hidden / 128]. */
void moe_fp8_quantize_ref(const uint16_t* x, int rows, int hidden, int pow2, uint8_t* codes,
                          float* scales);

#ifdef __cplusplus
}
#endif
#endif
