/* SPDX-License-Identifier: Apache-2.0 */
/* The comm's configuration and the layout of its buffers: pure functions of
 * the config and the number of ranks (no CUDA, no comm), so every rank
 * computes the same offsets and the unit tests check them without a GPU. */
#ifndef MOE_CONFIG_H_
#define MOE_CONFIG_H_

#include <stddef.h>

#include "kernels/moe_intranode.h"
#include "kernels/moe_lowlatency.h"
#include "nccl_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Validates `config` for nRanks (every field, low-latency mode included) and
 * fills defaults into *out_p. */
ncclResult_t moe_config_resolve(const ncclMoeConfig_t* config, int nRanks, ncclMoeConfig_t* out_p);

/* The first field in which two resolved configs differ (its name; the two
 * values in *a_p and *b_p), or NULL when they are equal. Field by field:
 * padding bytes never count. */
const char* moe_config_diff(const ncclMoeConfig_t* a, const ncclMoeConfig_t* b, long long* a_p, long long* b_p);

/* The normal-mode regions of a rank's buffer, from offset 0. */
void moe_layout_compute(const ncclMoeConfig_t* config, int nRanks, moe_layout_t* l);

/* Places the low-latency regions at `off` (aligned) of the comm buffer when
 * config->llMaxTokensPerRank > 0 (else l->bytes = 0); returns the end offset. */
size_t moe_ll_layout_compute(const ncclMoeConfig_t* config, int nRanks, size_t off, moe_ll_layout_t* l);

#ifdef __cplusplus
}
#endif
#endif
