/* SPDX-License-Identifier: Apache-2.0 */
/* The internode network proxy over the transport (socket on loopback, or ib
 * over the verbs emulator, as the run chose), with
 * host memory standing in for the GPU: test threads play each rank's
 * kernels (hand a slab over, fill it and mark its chunks ready in random
 * order; wait for arrival, check, mark it consumed). Covers set-up between
 * several nodes, many operations on every channel with random slab sizes and
 * chunk counts, chunks landing in order while the rest is still being
 * written, flow control (a receiver that has not consumed a slab is never
 * overwritten), corrupt counters, and a peer that disappears. Peers are
 * indexed by node (the normal path), or, in "compact" clusters, by their
 * place among a rank's peers with MOE_NET_MAX_CHANNELS channels (the
 * low-latency path: every rank is a node of its own). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/moe_env.h"
#include "kernels/moe_intranode.h"
#include "core/moe_proxy.h"
#include "net_test_util.h"
#include "test_common.h"

#define MAX_TEST_NODES 4
#define SLAB_BYTES (256 << 10)
#define OPS 24

typedef struct {
  moe_proxy_t* proxy;
  char* sendBuf;
  char* recvBuf;
  moe_net_flags_t flags;
  volatile int error[MOE_ERR_WORDS];
  char handle[MOE_NET_HANDLE_BYTES];
} node_t;

typedef struct {
  node_t node[MAX_TEST_NODES];
  int nNodes;
  int compact;      /* peers by their place among a rank's peers, not by node */
  int nPeers, nCh;  /* peer indices, channels */
  moe_net_geom_t geom;
  const moe_transport_t* t;
} cluster_t;

/* The rank at peer index i of rank `me`, -1 none. */
static int peer_rank(const cluster_t* cl, int me, int i) {
  if (cl->compact) return i < me ? i : i + 1;
  return i == me ? -1 : i;
}

/* The peer index of rank `me` at rank r. */
static int slot_at(const cluster_t* cl, int me, int r) {
  if (cl->compact) return me < r ? me : me - 1;
  return me;
}

static void geom_init(moe_net_geom_t* g, int nPeers, int nCh) {
  size_t off = 0;
  for (int c = 0; c < nCh; c++) {
    g->slab[c] = SLAB_BYTES;
    g->off[c] = off;
    off += SLAB_BYTES * (size_t)nPeers;
  }
  g->total = off;
}

static void cluster_up_as(cluster_t* cl, int nNodes, int compact) {
  net_test_env();
  moe_env_reload();
  memset(cl, 0, sizeof(*cl));
  cl->nNodes = nNodes;
  cl->compact = compact;
  cl->nPeers = compact ? nNodes - 1 : nNodes;
  cl->nCh = compact ? MOE_NET_MAX_CHANNELS : MOE_NET_CHANNELS;
  geom_init(&cl->geom, cl->nPeers, cl->nCh);
  ck_assert_int_eq(moe_transport_select(&cl->t), ncclSuccess);
  char handles[MAX_TEST_NODES * MOE_NET_HANDLE_BYTES];
  for (int n = 0; n < nNodes; n++) {
    node_t* nd = &cl->node[n];
    nd->sendBuf = calloc(1, cl->geom.total);
    nd->recvBuf = calloc(1, cl->geom.total);
    moe_proxy_args_t a = {.transport = cl->t, .dev = 0, .rank = n, .nPeers = cl->nPeers, .nChannels = cl->nCh,
                          .sendBuf = nd->sendBuf, .recvBuf = nd->recvBuf, .bufType = NCCL_PTR_HOST,
                          .geom = cl->geom, .flags = &nd->flags, .error = nd->error, .timeoutMs = NET_TEST_DEADLINE_MS / 2};
    for (int m = 0; m < cl->nPeers; m++) {
      a.peerRank[m] = peer_rank(cl, n, m);
      a.remoteSlot[m] = a.peerRank[m] < 0 ? 0 : slot_at(cl, n, a.peerRank[m]);
    }
    ck_assert_int_eq(moe_proxy_create(&a, nd->handle, &nd->proxy), ncclSuccess);
    memcpy(handles + (size_t)n * MOE_NET_HANDLE_BYTES, nd->handle, MOE_NET_HANDLE_BYTES);
  }
  /* connect() takes the handles by peer index. */
  char byPeer[MAX_TEST_NODES][MAX_TEST_NODES * MOE_NET_HANDLE_BYTES];
  for (int n = 0; n < nNodes; n++)
    for (int m = 0; m < cl->nPeers; m++)
      if (peer_rank(cl, n, m) >= 0)
        memcpy(byPeer[n] + (size_t)m * MOE_NET_HANDLE_BYTES, handles + (size_t)peer_rank(cl, n, m) * MOE_NET_HANDLE_BYTES,
               MOE_NET_HANDLE_BYTES);
  int done[MAX_TEST_NODES] = {0}, all = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (!all) {
    all = 1;
    for (int n = 0; n < nNodes; n++) {
      if (!done[n]) {
        ncclResult_t res = moe_proxy_connect(cl->node[n].proxy, byPeer[n], &done[n]);
        ck_assert_msg(res == ncclSuccess, "rank %d: set-up failed: %s", n, ncclMoeGetLastError());
      }
      all &= done[n];
    }
    ck_assert(net_now_ms() < deadline);
  }
  for (int n = 0; n < nNodes; n++) ck_assert_int_eq(moe_proxy_start(cl->node[n].proxy), ncclSuccess);
}

static void cluster_up(cluster_t* cl, int nNodes) { cluster_up_as(cl, nNodes, 0); }

static void cluster_down(cluster_t* cl) {
  for (int n = 0; n < cl->nNodes; n++) {
    moe_proxy_destroy(cl->node[n].proxy);
    free(cl->node[n].sendBuf);
    free(cl->node[n].recvBuf);
  }
}

static unsigned long long load(const volatile unsigned long long* v) {
  return __atomic_load_n((const unsigned long long*)v, __ATOMIC_ACQUIRE);
}
static void store(volatile unsigned long long* v, unsigned long long x) {
  __atomic_store_n((unsigned long long*)v, x, __ATOMIC_RELEASE);
}

/* Waits until *v >= want; 0 on timeout. */
static int wait_ge(const volatile unsigned long long* v, unsigned long long want, int ms) {
  uint64_t deadline = net_now_ms() + ms;
  while (load(v) < want)
    if (net_now_ms() > deadline) return 0;
  return 1;
}

/* Chunk geometry of a slab cut into about `want` chunks: no chunk empty. */
static void chunk_geom(size_t bytes, int want, int* n_p, unsigned long long* chunkBytes_p) {
  if (want <= 1 || bytes <= MOE_SLAB_HEADER + (size_t)want) {
    *n_p = 1;
    *chunkBytes_p = bytes;
    return;
  }
  const unsigned long long records = bytes - MOE_SLAB_HEADER, cb = (records + want - 1) / want;
  *chunkBytes_p = cb;
  *n_p = (int)((records + cb - 1) / cb);
}

/* What a kernel does when it starts slab k: size and chunk geometry, then
 * ready (chunks follow with mark_chunk). Returns the number of chunks. */
static int begin_slab(node_t* nd, int c, int m, unsigned long long k, size_t bytes, int want) {
  int n;
  unsigned long long chunkBytes;
  chunk_geom(bytes, want, &n, &chunkBytes);
  nd->flags.bytes[c][m] = bytes;
  nd->flags.nchunks[c][m] = (unsigned long long)n;
  nd->flags.chunkBytes[c][m] = chunkBytes;
  store(&nd->flags.ready[c][m], k);
  return n;
}

static void mark_chunk(node_t* nd, int c, int m, int i, unsigned long long k) {
  store(&nd->flags.chunkReady[c][m][i], k);
}

/* A whole slab in one chunk, already written. */
static void hand_over(node_t* nd, int c, int m, unsigned long long k, size_t bytes) {
  begin_slab(nd, c, m, k, bytes, 1);
  mark_chunk(nd, c, m, 0, k);
}

static size_t slab_size(uint64_t seed, int k, int src, int dst, int c) {
  moe_rng_t r;
  moe_rng_init(&r, seed ^ ((uint64_t)k << 32) ^ ((uint64_t)src << 16) ^ ((uint64_t)dst << 8) ^ (uint64_t)c);
  /* Sometimes empty, sometimes tiny, sometimes the whole slab. */
  switch (moe_rng_below(&r, 4)) {
    case 0: return 0;
    case 1: return 1 + moe_rng_below(&r, 64);
    case 2: return SLAB_BYTES;
    default: return moe_rng_below(&r, SLAB_BYTES);
  }
}

static uint64_t pattern_seed(uint64_t seed, int k, int src, int dst, int c) {
  return seed * 31 + (uint64_t)k * 1000003 + (uint64_t)src * 101 + (uint64_t)dst * 7 + (uint64_t)c;
}

typedef struct {
  cluster_t* cl;
  int me;
  uint64_t seed;
  int ok;
  char why[160];
} rank_arg_t;

#define RANK_FAIL(a, ...)                                   \
  do {                                                      \
    snprintf((a)->why, sizeof((a)->why), __VA_ARGS__);      \
    return NULL;                                            \
  } while (0)

/* Chunks of a slab: asks for 1 to 8 (chunk_geom decides). */
static int slab_chunks(uint64_t seed, int k, int src, int dst, int c, size_t bytes) {
  moe_rng_t r;
  moe_rng_init(&r, seed ^ 0x5eedull ^ ((uint64_t)k << 40) ^ ((uint64_t)src << 24) ^ ((uint64_t)dst << 12) ^ (uint64_t)c);
  int n;
  unsigned long long unused;
  chunk_geom(bytes, 1 + (int)moe_rng_below(&r, 8), &n, &unused);
  return n;
}

/* One rank's "GPU": every op sends a slab to each peer on each channel (its
 * chunks marked ready in random order, each once written), then reads the
 * slab of each peer and returns it. */
static void* rank_main(void* p) {
  rank_arg_t* a = p;
  node_t* nd = &a->cl->node[a->me];
  const moe_net_geom_t* g = &a->cl->geom;
  a->ok = 0;
  for (int k = 1; k <= OPS; k++) {
    for (int c = 0; c < a->cl->nCh; c++) {
      for (int m = 0; m < a->cl->nPeers; m++) {
        const int peer = peer_rank(a->cl, a->me, m);
        if (peer < 0) continue;
        if (!wait_ge(&nd->flags.sent[c][m], k - 1, NET_TEST_DEADLINE_MS))
          RANK_FAIL(a, "op %d channel %d: slab %d to node %d never sent", k, c, k - 1, m);
        const size_t bytes = slab_size(a->seed, k, a->me, peer, c);
        const int nChunks = begin_slab(nd, c, m, k, bytes, slab_chunks(a->seed, k, a->me, peer, c, bytes));
        net_fill(nd->sendBuf + moe_net_slab_offset(g, c, m), bytes, pattern_seed(a->seed, k, a->me, peer, c));
        int order[8];
        for (int i = 0; i < nChunks; i++) order[i] = i;
        moe_rng_t r;
        moe_rng_init(&r, pattern_seed(a->seed, k, a->me, peer, c));
        for (int i = nChunks - 1; i > 0; i--) {
          const int j = (int)moe_rng_below(&r, (uint64_t)i + 1), t = order[i];
          order[i] = order[j];
          order[j] = t;
        }
        for (int i = 0; i < nChunks; i++) mark_chunk(nd, c, m, order[i], k);
      }
    }
    for (int c = 0; c < a->cl->nCh; c++) {
      for (int m = 0; m < a->cl->nPeers; m++) {
        const int peer = peer_rank(a->cl, a->me, m);
        if (peer < 0) continue;
        if (!wait_ge(&nd->flags.arrived[c][m], k, NET_TEST_DEADLINE_MS))
          RANK_FAIL(a, "op %d channel %d: slab from node %d never arrived", k, c, m);
        if (load(&nd->flags.arrived[c][m]) != (unsigned long long)k)
          RANK_FAIL(a, "op %d channel %d: slab from node %d ahead of its credit", k, c, m);
        size_t bytes = slab_size(a->seed, k, peer, a->me, c);
        const int nChunks = slab_chunks(a->seed, k, peer, a->me, c, bytes);
        if (load(&nd->flags.progress[c][m]) != moe_net_progress(k, 1, nChunks))
          RANK_FAIL(a, "op %d channel %d: progress of node %d's slab is %llx, want %llx", k, c, m,
                    load(&nd->flags.progress[c][m]), moe_net_progress(k, 1, nChunks));
        const char* got = nd->recvBuf + moe_net_slab_offset(g, c, m);
        if (!net_check(got, bytes, pattern_seed(a->seed, k, peer, a->me, c))) {
          char* ref = malloc(bytes + 1);
          net_fill(ref, bytes, pattern_seed(a->seed, k, peer, a->me, c));
          size_t firstBad = 0;
          while (firstBad < bytes && ref[firstBad] == got[firstBad]) firstBad++;
          free(ref);
          RANK_FAIL(a, "op %d channel %d: slab from rank %d corrupt (%zu bytes, first bad byte %zu)", k, c, peer, bytes,
                    firstBad);
        }
        store(&nd->flags.consumed[c][m], k);
      }
    }
  }
  a->ok = 1;
  return NULL;
}

static void run_ops_as(int nNodes, int compact) {
  cluster_t cl;
  cluster_up_as(&cl, nNodes, compact);
  uint64_t seed = moe_test_seed();
  pthread_t th[MAX_TEST_NODES];
  rank_arg_t args[MAX_TEST_NODES];
  for (int n = 0; n < nNodes; n++) {
    args[n] = (rank_arg_t){.cl = &cl, .me = n, .seed = seed};
    ck_assert_int_eq(pthread_create(&th[n], NULL, rank_main, &args[n]), 0);
  }
  for (int n = 0; n < nNodes; n++) pthread_join(th[n], NULL);
  for (int n = 0; n < nNodes; n++)
    for (int c = 0; c < cl.nCh && !args[n].ok; c++)
      for (int m = 0; m < cl.nPeers; m++)
        fprintf(stderr, "node %d ch %d peer %d: ready %llu sent %llu arrived %llu consumed %llu\n", n, c, m,
                load(&cl.node[n].flags.ready[c][m]), load(&cl.node[n].flags.sent[c][m]),
                load(&cl.node[n].flags.arrived[c][m]), load(&cl.node[n].flags.consumed[c][m]));
  for (int n = 0; n < nNodes; n++)
    if (!args[n].ok) fprintf(stderr, "rank %d: %s\n", n, args[n].why);
  for (int n = 0; n < nNodes; n++) {
    ck_assert_msg(args[n].ok, "rank %d: %s (proxy error: %s)", n, args[n].why, moe_proxy_error(cl.node[n].proxy));
    ck_assert_int_eq(cl.node[n].error[MOE_ERR_HOST], MOE_KERR_NONE);
  }
  cluster_down(&cl);
}

static void run_ops(int nNodes) { run_ops_as(nNodes, 0); }

START_TEST(test_two_nodes) { run_ops(2); }
END_TEST

START_TEST(test_four_nodes) { run_ops(4); }
END_TEST

/* The low-latency layout: four ranks, each with three peers by place. */
START_TEST(test_four_ranks_compact_peers) { run_ops_as(4, 1); }
END_TEST

/* Node 1 does not consume slab 1: node 0's slab 2 must wait at node 0. */
START_TEST(test_credit_holds_back_second_slab) {
  cluster_t cl;
  cluster_up(&cl, 2);
  node_t *s = &cl.node[0], *r = &cl.node[1];
  const int c = MOE_CH_DISPATCH;
  const size_t soff = moe_net_slab_offset(&cl.geom, c, 1), roff = moe_net_slab_offset(&cl.geom, c, 0);
  net_fill(s->sendBuf + soff, 4096, 1);
  hand_over(s, c, 1, 1, 4096);
  ck_assert(wait_ge(&r->flags.arrived[c][0], 1, NET_TEST_DEADLINE_MS));
  ck_assert(wait_ge(&s->flags.sent[c][1], 1, NET_TEST_DEADLINE_MS));
  net_fill(s->sendBuf + soff, 4096, 2);
  hand_over(s, c, 1, 2, 4096);
  struct timespec pause = {0, 300 * 1000 * 1000};
  nanosleep(&pause, NULL);
  ck_assert_uint_eq(load(&r->flags.arrived[c][0]), 1);
  ck_assert(net_check(r->recvBuf + roff, 4096, 1)); /* untouched */
  store(&r->flags.consumed[c][0], 1);
  ck_assert(wait_ge(&r->flags.arrived[c][0], 2, NET_TEST_DEADLINE_MS));
  ck_assert(net_check(r->recvBuf + roff, 4096, 2));
  cluster_down(&cl);
}
END_TEST

/* A peer whose proxy goes away: the survivor records MOE_KERR_NET. The
 * socket backend sees the connection close; the ib backend, which only
 * waits here, finds out with its keepalive probe (a zero-length write whose
 * retries run out: about 1 s of quiet plus NCCL_IB_TIMEOUT's budget). */
START_TEST(test_dead_peer_is_an_error) {
  cluster_t cl;
  cluster_up(&cl, 2);
  moe_proxy_destroy(cl.node[1].proxy);
  cl.node[1].proxy = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (cl.node[0].error[MOE_ERR_HOST] == MOE_KERR_NONE) ck_assert(net_now_ms() < deadline);
  ck_assert_int_eq(cl.node[0].error[MOE_ERR_HOST], MOE_KERR_NET);
  ck_assert(strlen(moe_proxy_error(cl.node[0].proxy)) > 0);
  cluster_down(&cl);
}
END_TEST

/* A rank whose last slab is marked ready just before its comm is destroyed:
 * the proxy sends it before it stops, so the peer still gets it. */
START_TEST(test_destroy_sends_the_last_slab) {
  cluster_t cl;
  cluster_up(&cl, 2);
  node_t *s = &cl.node[0], *r = &cl.node[1];
  const int c = MOE_CH_COMBINE;
  net_fill(s->sendBuf + moe_net_slab_offset(&cl.geom, c, 1), SLAB_BYTES, 7);
  hand_over(s, c, 1, 1, SLAB_BYTES);
  moe_proxy_destroy(s->proxy);
  s->proxy = NULL;
  ck_assert(wait_ge(&r->flags.arrived[c][0], 1, NET_TEST_DEADLINE_MS));
  ck_assert(net_check(r->recvBuf + moe_net_slab_offset(&cl.geom, c, 0), SLAB_BYTES, 7));
  cluster_down(&cl);
}
END_TEST

/* ncclMoeCommAbort's stop: a slab the peer will never give credit for (it
 * does not consume the previous one) keeps a draining destroy waiting up to
 * the timeout; an abort stops the thread at once. */
START_TEST(test_abort_does_not_drain) {
  cluster_t cl;
  cluster_up(&cl, 2);
  node_t *s = &cl.node[0], *r = &cl.node[1];
  const int c = MOE_CH_DISPATCH;
  hand_over(s, c, 1, 1, 4096);
  ck_assert(wait_ge(&r->flags.arrived[c][0], 1, NET_TEST_DEADLINE_MS));
  /* The sender learns of its write's completion on its own time (a striped
   * write completes after its chunks left, maybe after the peer has it). */
  ck_assert(wait_ge(&s->flags.sent[c][1], 1, NET_TEST_DEADLINE_MS));
  hand_over(s, c, 1, 2, 4096); /* held back: slab 1 is never consumed */
  const uint64_t start = net_now_ms();
  moe_proxy_abort(s->proxy);
  const uint64_t took = net_now_ms() - start;
  ck_assert_msg(took < NET_TEST_DEADLINE_MS / 8, "abort took %llu ms (a drain waits %d)", (unsigned long long)took,
                NET_TEST_DEADLINE_MS / 2);
  ck_assert_uint_eq(load(&s->flags.sent[c][1]), 1); /* slab 2 never went */
  moe_proxy_abort(s->proxy);                        /* twice: a no-op */
  moe_proxy_destroy(s->proxy);                      /* closes at once: the thread is gone */
  s->proxy = NULL;
  ck_assert_uint_lt(net_now_ms() - start, NET_TEST_DEADLINE_MS / 8);
  moe_proxy_abort(NULL);
  cluster_down(&cl);
}
END_TEST

/* A slab size beyond the slab (a corrupt counter) stops the proxy with an
 * error instead of writing past the peer's slab. */
START_TEST(test_oversized_slab_is_an_error) {
  cluster_t cl;
  cluster_up(&cl, 2);
  node_t* s = &cl.node[0];
  hand_over(s, MOE_CH_COMBINE, 1, 1, SLAB_BYTES + 1);
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (s->error[MOE_ERR_HOST] == MOE_KERR_NONE) ck_assert(net_now_ms() < deadline);
  ck_assert_uint_eq(load(&cl.node[1].flags.arrived[MOE_CH_COMBINE][0]), 0);
  cluster_down(&cl);
}
END_TEST

/* Chunks go out as they are marked, in order: chunk 0 lands alone while
 * chunk 1 is not ready, the slab counts as sent only once all landed. */
START_TEST(test_chunks_land_in_order_as_marked) {
  cluster_t cl;
  cluster_up(&cl, 2);
  node_t *s = &cl.node[0], *r = &cl.node[1];
  const int c = MOE_CH_DISPATCH;
  const size_t bytes = SLAB_BYTES, soff = moe_net_slab_offset(&cl.geom, c, 1), roff = moe_net_slab_offset(&cl.geom, c, 0);
  net_fill(s->sendBuf + soff, bytes, 3);
  ck_assert_int_eq(begin_slab(s, c, 1, 1, bytes, 4), 4);
  mark_chunk(s, c, 1, 2, 1); /* out of order: waits for 0 and 1 */
  mark_chunk(s, c, 1, 0, 1);
  ck_assert(wait_ge(&r->flags.progress[c][0], moe_net_progress(1, 0, 1), NET_TEST_DEADLINE_MS));
  struct timespec pause = {0, 100 * 1000 * 1000};
  nanosleep(&pause, NULL);
  ck_assert_uint_eq(load(&r->flags.progress[c][0]), moe_net_progress(1, 0, 1));
  ck_assert_uint_eq(load(&r->flags.arrived[c][0]), 0);
  ck_assert_uint_eq(load(&s->flags.sent[c][1]), 0);
  unsigned long long b, e;
  moe_net_chunk_range(bytes, s->flags.chunkBytes[c][1], 0, &b, &e);
  ck_assert(net_check(r->recvBuf + roff, e / 8 * 8, 3)); /* chunk 0 (a prefix of the pattern) landed */
  mark_chunk(s, c, 1, 1, 1);
  ck_assert(wait_ge(&r->flags.progress[c][0], moe_net_progress(1, 0, 3), NET_TEST_DEADLINE_MS));
  mark_chunk(s, c, 1, 3, 1);
  ck_assert(wait_ge(&r->flags.arrived[c][0], 1, NET_TEST_DEADLINE_MS));
  ck_assert_uint_eq(load(&r->flags.progress[c][0]), moe_net_progress(1, 1, 4));
  ck_assert(wait_ge(&s->flags.sent[c][1], 1, NET_TEST_DEADLINE_MS));
  ck_assert(net_check(r->recvBuf + roff, bytes, 3));
  cluster_down(&cl);
}
END_TEST

/* Chunk geometry that does not cover the slab, or too many chunks: an error,
 * nothing written. */
START_TEST(test_bad_chunk_geometry_is_an_error) {
  for (int bad = 0; bad < 2; bad++) {
    cluster_t cl;
    cluster_up(&cl, 2);
    node_t* s = &cl.node[0];
    const int c = MOE_CH_NOTIFY;
    s->flags.bytes[c][1] = 4096;
    s->flags.nchunks[c][1] = bad == 0 ? 2 : MOE_NET_MAX_CHUNKS + 1;
    s->flags.chunkBytes[c][1] = bad == 0 ? 1000 : 64; /* 2 x 1000 after the header < 4096 */
    store(&s->flags.ready[c][1], 1);
    uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
    while (s->error[MOE_ERR_HOST] == MOE_KERR_NONE) ck_assert(net_now_ms() < deadline);
    ck_assert_ptr_nonnull(strstr(moe_proxy_error(s->proxy), "chunks"));
    ck_assert_uint_eq(load(&cl.node[1].flags.arrived[c][0]), 0);
    cluster_down(&cl);
  }
}
END_TEST

static void add_case(Suite* s, const char* name, const TTest* test) {
  TCase* tc = tcase_create(name);
  tcase_set_timeout(tc, 120);
  _tcase_add_test(tc, test, 0, 0, 0, 1);
  suite_add_tcase(s, tc);
}

int main(void) {
  Suite* s = suite_create("proxy");
  add_case(s, "two_nodes", test_two_nodes);
  add_case(s, "four_nodes", test_four_nodes);
  add_case(s, "compact_peers", test_four_ranks_compact_peers);
  add_case(s, "credit", test_credit_holds_back_second_slab);
  add_case(s, "dead_peer", test_dead_peer_is_an_error);
  add_case(s, "oversized_slab", test_oversized_slab_is_an_error);
  add_case(s, "destroy_drains", test_destroy_sends_the_last_slab);
  add_case(s, "abort", test_abort_does_not_drain);
  add_case(s, "chunks_in_order", test_chunks_land_in_order_as_marked);
  add_case(s, "bad_chunk_geometry", test_bad_chunk_geometry_is_an_error);
  return moe_test_run(s);
}
