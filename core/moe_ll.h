/* Low-latency mode, host side (internal): the comm's and the handle's
 * low-latency state, and the hooks the comm setup calls. */
#ifndef MOE_LL_H_
#define MOE_LL_H_

#include <stddef.h>

#include "kernels/moe_lowlatency.h"
#include "nccl_moe.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ncclMoeComm;

/* Per comm. */
typedef struct {
  moe_ll_ctx_t ctx;            /* what the kernels get; ctx.l.bytes == 0: no LL buffers */
  int nextSet;                 /* buffer set of the next dispatch */
  unsigned long long gen[MOE_LL_SETS];  /* dispatches that took each set so far */
  struct ncclMoeHandle* pending[MOE_LL_SETS]; /* handle whose receive half on the set is not enqueued */
} moe_ll_comm_t;

typedef enum {
  MOE_LL_IDLE = 0,             /* no low-latency dispatch */
  MOE_LL_DISPATCH_SENT,        /* dispatch send half enqueued, receive half not yet */
  MOE_LL_DISPATCHED,           /* dispatch received: combine may follow */
  MOE_LL_COMBINE_SENT,         /* combine send half enqueued, receive half not yet */
} moe_ll_state_t;

/* Per handle: the dispatch it holds, and a pending combine's outputs. */
typedef struct {
  moe_ll_state_t state;
  int set;
  unsigned long long gen;      /* comm gen[set] when the dispatch took the set */
  int numTokens, hidden, topk;
  int sendFp8, scaleFormat;    /* the dispatch's payload (its receive half reads network slabs of it) */
  int64_t* cumulative;         /* pending dispatch receive */
  const float* weights;        /* pending combine receive */
  void* out;
  int scaleTokenStride;        /* > 0: column-major scales (moe_ll_args_t) */
  int* cumulative32;           /* pending dispatch receive, int32 counters */
} moe_ll_handle_t;

/* Checks config->llMaxTokensPerRank (moe_config_resolve). */
ncclResult_t moe_ll_config_resolve(const ncclMoeConfig_t* config, int nRanks);

/* Places the low-latency regions at `off` (aligned) of the comm buffer when
 * config->llMaxTokensPerRank > 0; returns the end offset. */
size_t moe_ll_layout_compute(const ncclMoeConfig_t* config, int nRanks, size_t off, moe_ll_layout_t* l);

/* Clears the state region of this rank's freshly allocated buffer (before
 * peers can see it). */
ncclResult_t moe_ll_comm_alloc(struct ncclMoeComm* comm);

/* Once comm->ctx is complete: the kernels' context, kernel preload. */
ncclResult_t moe_ll_comm_init(struct ncclMoeComm* comm);

/* A handle goes away: it no longer holds a buffer set's pending receive. */
void moe_ll_handle_destroy(struct ncclMoeHandle* handle);

#ifdef __cplusplus
}
#endif
#endif
