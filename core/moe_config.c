/* SPDX-License-Identifier: Apache-2.0 */
#include "core/moe_config.h"

#include <limits.h>
#include <stddef.h>
#include <string.h>

#include "common/moe_check.h"
#include "common/moe_env.h"

#define MOE_REGION_ALIGN 256
#define MOE_DEFAULT_TOPK 8
#define MOE_MAX_TOKENS_PER_RANK (1 << 20)
#define MOE_MAX_HIDDEN 65536
#define MOE_LL_MSG_ALIGN_INTS 4 /* count messages padded to 16 bytes */
/* sizeof(ncclMoeConfig_t) in version 0.1 (before llMaxTokensPerRank). */
#define MOE_CONFIG_SIZE_0_1 offsetof(ncclMoeConfig_t, llMaxTokensPerRank)

_Static_assert(NCCL_MOE_MAX_SMS == MOE_ENV_MAX_SMS, "config.numSMs and NCCL_MOE_NUM_SMS share one bound");
_Static_assert(sizeof(ncclMoeConfig_t) - (offsetof(ncclMoeConfig_t, llMaxTokensPerRank) + sizeof(int)) < sizeof(size_t),
               "llMaxTokensPerRank is the last config field: a new one must be compared in moe_config_diff");

static size_t moe_align_up(size_t v) { return (v + MOE_REGION_ALIGN - 1) / MOE_REGION_ALIGN * MOE_REGION_ALIGN; }

ncclResult_t moe_config_resolve(const ncclMoeConfig_t* config, int nRanks, ncclMoeConfig_t* out_p) {
  MOE_ARG_CHECK(config != NULL, "config is NULL (use NCCL_MOE_CONFIG_INITIALIZER)");
  /* A caller built against an older header passes a shorter struct: the
   * fields it does not know take their defaults (0). */
  MOE_ARG_CHECK(config->magic == NCCL_MOE_CONFIG_MAGIC && config->size >= MOE_CONFIG_SIZE_0_1 &&
                    config->size <= sizeof(ncclMoeConfig_t),
                "config was not initialized with NCCL_MOE_CONFIG_INITIALIZER (magic 0x%x, size %zu)",
                config->magic, config->size);
  MOE_ARG_CHECK(nRanks >= 1 && nRanks <= NCCL_MOE_MAX_RANKS, "%d ranks: at most %d are supported",
                nRanks, NCCL_MOE_MAX_RANKS);
  ncclMoeConfig_t c;
  memset(&c, 0, sizeof(c));
  memcpy(&c, config, config->size);
  c.size = sizeof(c);
  MOE_ARG_CHECK(c.maxTokensPerRank >= 1 && c.maxTokensPerRank <= MOE_MAX_TOKENS_PER_RANK,
                "config.maxTokensPerRank = %d: must be in [1, %d]", c.maxTokensPerRank, MOE_MAX_TOKENS_PER_RANK);
  MOE_ARG_CHECK(c.hidden >= 8 && c.hidden <= MOE_MAX_HIDDEN && c.hidden % 8 == 0,
                "config.hidden = %d: must be a multiple of 8 in [8, %d]", c.hidden, MOE_MAX_HIDDEN);
  MOE_ARG_CHECK(c.numExperts >= nRanks && c.numExperts <= NCCL_MOE_MAX_EXPERTS && c.numExperts % nRanks == 0,
                "config.numExperts = %d: must be a multiple of the %d ranks, at most %d", c.numExperts,
                nRanks, NCCL_MOE_MAX_EXPERTS);
  if (c.maxTopk == 0) c.maxTopk = MOE_DEFAULT_TOPK;
  MOE_ARG_CHECK(c.maxTopk >= 1 && c.maxTopk <= NCCL_MOE_MAX_TOPK, "config.maxTopk = %d: must be in [1, %d]",
                c.maxTopk, NCCL_MOE_MAX_TOPK);
  long long allRecv = (long long)nRanks * c.maxTokensPerRank;
  if (c.maxRecvTokens == 0) c.maxRecvTokens = allRecv > INT_MAX ? INT_MAX : (int)allRecv;
  MOE_ARG_CHECK(c.maxRecvTokens >= 1, "config.maxRecvTokens = %d: must be >= 1 (0 = default)", c.maxRecvTokens);
  MOE_ARG_CHECK(c.numSMs >= 0 && c.numSMs <= NCCL_MOE_MAX_SMS,
                "config.numSMs = %d: must be in [0, %d] (0 = automatic)", c.numSMs, NCCL_MOE_MAX_SMS);
  MOE_ARG_CHECK(c.timeoutMs >= 0, "config.timeoutMs = %d: must be >= 0 (0 = NCCL_MOE_TIMEOUT_MS)", c.timeoutMs);
  if (c.timeoutMs == 0) c.timeoutMs = moe_env()->timeout_ms;
  MOE_ARG_CHECK(c.llMaxTokensPerRank >= 0 && c.llMaxTokensPerRank <= NCCL_MOE_LL_MAX_TOKENS,
                "config.llMaxTokensPerRank = %d: must be in [0, %d] (0 = no low-latency mode)",
                c.llMaxTokensPerRank, NCCL_MOE_LL_MAX_TOKENS);
  *out_p = c;
  return ncclSuccess;
}

const char* moe_config_diff(const ncclMoeConfig_t* a, const ncclMoeConfig_t* b, long long* a_p, long long* b_p) {
#define MOE_DIFF(field)                               \
  do {                                                \
    if (a->field != b->field) {                       \
      *a_p = (long long)a->field;                     \
      *b_p = (long long)b->field;                     \
      return #field;                                  \
    }                                                 \
  } while (0)
  MOE_DIFF(size);
  MOE_DIFF(magic);
  MOE_DIFF(version);
  MOE_DIFF(maxTokensPerRank);
  MOE_DIFF(hidden);
  MOE_DIFF(numExperts);
  MOE_DIFF(maxTopk);
  MOE_DIFF(maxRecvTokens);
  MOE_DIFF(numSMs);
  MOE_DIFF(timeoutMs);
  MOE_DIFF(llMaxTokensPerRank);
#undef MOE_DIFF
  return NULL;
}

void moe_layout_compute(const ncclMoeConfig_t* c, int nRanks, moe_layout_t* l) {
  size_t rows = (size_t)c->maxRecvTokens, off = 0;
  int L = c->numExperts / nRanks;
  l->notifyInts = MOE_NOTIFY_EXPERTS(nRanks) + L;
#define MOE_REGION(field, bytes) do { l->field = off; off = moe_align_up(off + (bytes)); } while (0)
  MOE_REGION(signals, sizeof(unsigned long long) * NCCL_MOE_MAX_RANKS);
  MOE_REGION(notify, sizeof(int) * (size_t)nRanks * l->notifyInts);
  MOE_REGION(recvX, rows * c->hidden * 2);
  MOE_REGION(recvScales, rows * ((c->hidden + NCCL_MOE_FP8_BLOCK - 1) / NCCL_MOE_FP8_BLOCK) * sizeof(float));
  MOE_REGION(recvTopkIdx, rows * c->maxTopk * sizeof(int64_t));
  MOE_REGION(recvTopkWeights, rows * c->maxTopk * sizeof(float));
  MOE_REGION(combineX, rows * c->hidden * 2);
  MOE_REGION(combineWeights, rows * c->maxTopk * sizeof(float));
#undef MOE_REGION
  l->total = off;
}

size_t moe_ll_layout_compute(const ncclMoeConfig_t* c, int nRanks, size_t off, moe_ll_layout_t* l) {
  memset(l, 0, sizeof(*l));
  if (c->llMaxTokensPerRank == 0) return off;
  const size_t N = (size_t)nRanks, E = (size_t)c->numExperts, M = (size_t)c->llMaxTokensPerRank;
  const size_t K = (size_t)c->maxTopk, H = (size_t)c->hidden, rows = E * M; /* L * N * M */
  const size_t nS = (H + NCCL_MOE_FP8_BLOCK - 1) / NCCL_MOE_FP8_BLOCK;
  const size_t flag = sizeof(unsigned long long);
  const size_t F = (H + MOE_LL_FLAG_CHANNELS - 1) / MOE_LL_FLAG_CHANNELS;
  const size_t start = off = moe_align_up(off);
  l->msgInts = (int)((E + MOE_LL_MSG_EXTRA + MOE_LL_MSG_ALIGN_INTS - 1) / MOE_LL_MSG_ALIGN_INTS * MOE_LL_MSG_ALIGN_INTS);
  l->flagChunks = (int)F;
#define MOE_LL_REGION(field, bytes) do { l->field = off; off = moe_align_up(off + (bytes)); } while (0)
  /* The zero-initialized state: one contiguous region. */
  l->state = off;
  MOE_LL_REGION(seq, flag * MOE_LL_SETS * MOE_LL_OPS);
  MOE_LL_REGION(done, sizeof(unsigned int) * MOE_LL_SETS * MOE_LL_OPS);
  MOE_LL_REGION(cntFlag, flag * MOE_LL_SETS * N);
  MOE_LL_REGION(netDone, sizeof(unsigned int) * MOE_LL_NET_CHANNELS * N);
  MOE_LL_REGION(recvDone, sizeof(unsigned int) * MOE_LL_SETS * MOE_LL_OPS);
  for (int b = 0; b < MOE_LL_SETS; b++) {
    MOE_LL_REGION(rowFlag[b], flag * rows * F);
    MOE_LL_REGION(combFlag[b], flag * MOE_LL_COMB_HALVES * M * K * F);
  }
  l->stateBytes = off - l->state;
  for (int b = 0; b < MOE_LL_SETS; b++) {
    MOE_LL_REGION(counts[b], sizeof(int) * N * (size_t)l->msgInts);
    MOE_LL_REGION(recvX[b], rows * H * 2);
    /* Either layout: row-major needs rows * nS, column-major pads each
     * expert's columns to S = moe_scale_token_stride(N * M) >= N * M rows. */
    MOE_LL_REGION(recvScales[b], (E / N) * (size_t)moe_scale_token_stride((int)(N * M)) * nS * sizeof(float));
    MOE_LL_REGION(recvSrc[b], rows * sizeof(int));
    MOE_LL_REGION(recvK[b], rows * sizeof(int));
    MOE_LL_REGION(recvPos[b], rows * sizeof(int));
    MOE_LL_REGION(combX[b], MOE_LL_COMB_HALVES * M * K * H * 2);
    MOE_LL_REGION(route[b], M * K * sizeof(int));
    MOE_LL_REGION(routePeer[b], M * K * sizeof(int));
    MOE_LL_REGION(localCount[b], sizeof(int) * (E / N));
    MOE_LL_REGION(netRows[b], sizeof(int) * N);
    MOE_LL_REGION(recvCount[b], sizeof(int) * (E / N));
  }
#undef MOE_LL_REGION
  l->bytes = off - start;
  return off;
}
