/* SPDX-License-Identifier: Apache-2.0 */
/* Striped one-sided writes of the TCP backend: what keeps their completions
 * and immediates in posting order although their chunks travel on several
 * data streams at once.
 *
 * A write of at least NCCL_MOE_SOCKET_STRIPE_KB sends its header (flag
 * STRIPED) on the control socket and its payload as chunks over the data
 * streams, each chunk behind a moe_sock_chunk_t header. Chunks of different
 * writes land in any order, so
 *  - the receiver files every write that still has chunks on the wire, and
 *    every immediate that arrived behind one, in a bounded FIFO
 *    (moe_sock_wq_t) in control-stream order, and releases immediates from
 *    its head only: a write's immediate comes after its own chunks and every
 *    earlier write's landed;
 *  - the sender reports a write complete only once it and every earlier
 *    write left (moe_sock.c: test()).
 * Bytes of a later small write may land before those of an earlier striped
 * one (as RDMA gives no placement order either); only the signals are
 * ordered. */
#ifndef MOE_SOCK_STRIPE_H_
#define MOE_SOCK_STRIPE_H_

#include <stdatomic.h>
#include <stdint.h>

#include "net_socket/moe_sock_wire.h"
#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A request's or a write's error message (set by a helper thread). */
#define MOE_SOCK_ERR_MAX 256
/* track.error while the thread that set it still writes the message. */
#define MOE_SOCK_ERR_WRITING (-1)

/* Chunks of one transfer still queued or moving, and the first error a
 * helper thread met on one of them. A helper thread records the error before
 * it counts the chunk done, so once chunks_pending is 0 (acquire) the error
 * is final. */
typedef struct {
  _Atomic int chunks_pending;
  _Atomic int error; /* ncclResult_t, or MOE_SOCK_ERR_WRITING */
  char errmsg[MOE_SOCK_ERR_MAX];
} moe_sock_track_t;

void moe_sock_track_reset(moe_sock_track_t* t, int chunks);
/* Records the first error only. */
void moe_sock_track_error(moe_sock_track_t* t, ncclResult_t res, const char* msg);
/* ncclSuccess, or the recorded error, its message made this thread's last
 * error (the helper thread logged it already). */
ncclResult_t moe_sock_track_result(moe_sock_track_t* t);

/* Writes a peer announced that have not been signalled yet, at most: more
 * holds the control stream back until the head's chunks landed. */
#define MOE_SOCK_MAX_RWRITES 64

typedef struct {
  const void* target; /* the region written (identity only: deregistration waits for it) */
  int has_imm;
  uint32_t imm;
  moe_sock_track_t track; /* its chunks on the data streams (0 for an inline write) */
} moe_sock_rwrite_t;

/* The receiver's FIFO. Owned by the comm thread (comm lock); helper threads
 * touch only the entries' track. */
typedef struct {
  moe_sock_rwrite_t w[MOE_SOCK_MAX_RWRITES];
  uint32_t head, count;
  uint64_t pushed;  /* entries ever filed */
  uint64_t retired; /* entries ever released (their immediate delivered) */
} moe_sock_wq_t;

static inline int moe_sock_wq_full(const moe_sock_wq_t* q) { return q->count == MOE_SOCK_MAX_RWRITES; }
static inline int moe_sock_wq_empty(const moe_sock_wq_t* q) { return q->count == 0; }

/* Files a write at the tail (the caller checked that there is room). */
moe_sock_rwrite_t* moe_sock_wq_push(moe_sock_wq_t* q, const void* target, int has_imm, uint32_t imm, int chunks);

/* Releases, from the head, every write whose chunks all landed, delivering
 * its immediate into `imms`; stops at the first write still moving, or when
 * `imms` is full (*imm_full_p = 1). A chunk that failed anywhere in the FIFO
 * is returned as the error. */
ncclResult_t moe_sock_wq_retire(moe_sock_wq_t* q, moe_imm_ring_t* imms, int* imm_full_p);

/* 1 while chunks of a filed write into `target` may still land (a write
 * whose chunks all landed and that only waits to signal does not count). */
int moe_sock_wq_targets(const moe_sock_wq_t* q, const void* target);

#ifdef __cplusplus
}
#endif
#endif
