/* SPDX-License-Identifier: Apache-2.0 */
/* The transport's own throughput, measured the way the internode proxy uses
 * it: `pairs` connections at once (one per sending rank and peer node), each
 * with one write of `bytes` with an immediate in flight, the receiver
 * polling immediates. Loopback through the backend NCCL_MOE_NET_BACKEND
 * picks (socket here). */
#include "bench_net.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/moe_env.h"
#include "nccl_moe.h"
#include "transport/moe_transport.h"

#define BENCH_NET_MAX_PAIRS 64

typedef struct {
  const moe_transport_t* t;
  moe_net_comm_t *send, *recv, *listen;
  char *src, *dst;
  void *smr, *rmr;
  moe_net_rkey_t key;
  size_t bytes;
  uint64_t deadlineNs;
  unsigned long long moved;
  int failed;
} bench_pair_t;

static int pair_connect(bench_pair_t* p) {
  char handle[MOE_NET_HANDLE_BYTES] = {0};
  if (p->t->listen(0, handle, &p->listen) != ncclSuccess) return -1;
  moe_net_conn_config_t cfg = {.traffic_class = NCCL_NET_TRAFFIC_CLASS_UNDEF};
  uint64_t deadline = moe_net_now_ns() + 20ull * 1000000000ull;
  while (p->send == NULL || p->recv == NULL) {
    if (p->send == NULL && p->t->connect(0, &cfg, handle, &p->send) != ncclSuccess) return -1;
    if (p->recv == NULL && p->t->accept(p->listen, &p->recv) != ncclSuccess) return -1;
    if (moe_net_now_ns() > deadline) return -1;
  }
  p->src = malloc(p->bytes);
  p->dst = malloc(p->bytes);
  if (p->src == NULL || p->dst == NULL) return -1;
  memset(p->src, 1, p->bytes);
  if (p->t->reg_mr(p->send, p->src, p->bytes, NCCL_PTR_HOST, -1, 0, &p->smr) != ncclSuccess) return -1;
  if (p->t->reg_mr(p->recv, p->dst, p->bytes, NCCL_PTR_HOST, -1, 0, &p->rmr) != ncclSuccess) return -1;
  return p->t->mr_key(p->rmr, &p->key) == ncclSuccess ? 0 : -1;
}

static void* pair_run(void* arg) {
  bench_pair_t* p = arg;
  uint32_t seq = 0;
  while (moe_net_now_ns() < p->deadlineNs) {
    moe_net_request_t* req = NULL;
    while (req == NULL)
      if (p->t->write(p->send, p->src, p->bytes, p->smr, &p->key, 0, 1, ++seq & 0xffffff, &req) != ncclSuccess) goto fail;
    int sent = 0, got = 0;
    while (!sent || !got) {
      if (!sent && p->t->test(req, &sent, NULL) != ncclSuccess) goto fail;
      uint32_t imm;
      int one = 0;
      if (!got && p->t->poll_imm(p->recv, &imm, &one) != ncclSuccess) goto fail;
      got |= one;
    }
    p->moved += p->bytes;
  }
  return NULL;
fail:
  p->failed = 1;
  return NULL;
}

double bench_transport_gbps(int pairs, size_t bytes, double seconds) {
  const moe_transport_t* t = NULL;
  if (pairs < 1 || pairs > BENCH_NET_MAX_PAIRS || moe_transport_select(&t) != ncclSuccess) return -1.0;
  bench_pair_t p[BENCH_NET_MAX_PAIRS];
  pthread_t th[BENCH_NET_MAX_PAIRS];
  memset(p, 0, sizeof(p));
  double gbps = -1.0;
  int ok = 1;
  for (int i = 0; i < pairs && ok; i++) {
    p[i].t = t;
    p[i].bytes = bytes;
    ok = pair_connect(&p[i]) == 0;
  }
  if (ok) {
    const uint64_t start = moe_net_now_ns();
    for (int i = 0; i < pairs; i++) {
      p[i].deadlineNs = start + (uint64_t)(seconds * 1e9);
      pthread_create(&th[i], NULL, pair_run, &p[i]);
    }
    unsigned long long moved = 0;
    for (int i = 0; i < pairs; i++) {
      pthread_join(th[i], NULL);
      moved += p[i].moved;
      ok &= !p[i].failed;
    }
    const double elapsed = (double)(moe_net_now_ns() - start) * 1e-9;
    if (ok) gbps = (double)moved / elapsed * 1e-9;
  }
  if (!ok) fprintf(stderr, "transport benchmark failed: %s\n", ncclMoeGetLastError());
  for (int i = 0; i < pairs; i++) {
    if (p[i].smr) t->dereg_mr(p[i].send, p[i].smr);
    if (p[i].rmr) t->dereg_mr(p[i].recv, p[i].rmr);
    if (p[i].send) t->close(p[i].send);
    if (p[i].recv) t->close(p[i].recv);
    if (p[i].listen) t->close(p[i].listen);
    free(p[i].src);
    free(p[i].dst);
  }
  return gbps;
}
