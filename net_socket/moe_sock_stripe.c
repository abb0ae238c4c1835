/* SPDX-License-Identifier: Apache-2.0 */
#include "net_socket/moe_sock_stripe.h"

#include <stdio.h>

#include "common/moe_check.h"

void moe_sock_track_reset(moe_sock_track_t* t, int chunks) {
  atomic_store_explicit(&t->error, ncclSuccess, memory_order_relaxed);
  atomic_store_explicit(&t->chunks_pending, chunks, memory_order_release);
}

void moe_sock_track_error(moe_sock_track_t* t, ncclResult_t res, const char* msg) {
  int expected = ncclSuccess;
  if (!atomic_compare_exchange_strong(&t->error, &expected, MOE_SOCK_ERR_WRITING)) return;
  snprintf(t->errmsg, sizeof(t->errmsg), "%s", msg != NULL ? msg : "socket: transfer failed");
  atomic_store_explicit(&t->error, (int)res, memory_order_release);
}

ncclResult_t moe_sock_track_result(moe_sock_track_t* t) {
  int err = atomic_load_explicit(&t->error, memory_order_acquire);
  if (err == ncclSuccess || err == MOE_SOCK_ERR_WRITING) return ncclSuccess;
  moe_set_last_error(t->errmsg); /* the helper thread logged it where it happened */
  return (ncclResult_t)err;
}

moe_sock_rwrite_t* moe_sock_wq_push(moe_sock_wq_t* q, const void* target, int has_imm, uint32_t imm, int chunks) {
  moe_sock_rwrite_t* w = &q->w[(q->head + q->count++) % MOE_SOCK_MAX_RWRITES];
  w->target = target;
  w->has_imm = has_imm;
  w->imm = imm;
  moe_sock_track_reset(&w->track, chunks);
  q->pushed++;
  return w;
}

ncclResult_t moe_sock_wq_retire(moe_sock_wq_t* q, moe_imm_ring_t* imms, int* imm_full_p) {
  *imm_full_p = 0;
  for (uint32_t i = 0; i < q->count; i++)
    MOE_CHECK(moe_sock_track_result(&q->w[(q->head + i) % MOE_SOCK_MAX_RWRITES].track));
  while (q->count > 0) {
    moe_sock_rwrite_t* w = &q->w[q->head];
    if (atomic_load_explicit(&w->track.chunks_pending, memory_order_acquire) > 0) break;
    /* Its last chunk may have failed after the scan above. */
    MOE_CHECK(moe_sock_track_result(&w->track));
    if (w->has_imm) {
      if (moe_imm_ring_full(imms)) {
        *imm_full_p = 1;
        break;
      }
      moe_imm_ring_push(imms, w->imm);
    }
    w->target = NULL;
    q->head = (q->head + 1) % MOE_SOCK_MAX_RWRITES;
    q->count--;
    q->retired++;
  }
  return ncclSuccess;
}

int moe_sock_wq_targets(const moe_sock_wq_t* q, const void* target) {
  for (uint32_t i = 0; i < q->count; i++) {
    const moe_sock_rwrite_t* w = &q->w[(q->head + i) % MOE_SOCK_MAX_RWRITES];
    if (w->target == target && atomic_load_explicit(&w->track.chunks_pending, memory_order_acquire) > 0) return 1;
  }
  return 0;
}
