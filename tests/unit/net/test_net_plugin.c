/* SPDX-License-Identifier: Apache-2.0 */
/* The net plugin driven through its exported ncclNetPlugin_v11 struct, the
 * way NCCL's proxy drives it, host memory registered with regMr. Runs once
 * per backend: socket on loopback, and ib over the verbs emulator
 * (NCCL_MOE_NET_BACKEND=ib NCCL_MOE_IBVERBS_LIBRARY=libverbs-emu.so). The
 * plugin is dlopen()ed from the build (MOE_NET_PLUGIN_PATH), so the tests see
 * exactly what NCCL sees. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "net_test_util.h"
#include "test_common.h"

#define TEST_TIMEOUT_S 120

static net_plugin_t plugin;
static ncclNet_v11_t* net;
static void* ctx;

static void setup(void) {
  net_test_env();
  ck_assert_int_eq(net_plugin_load(NULL, &plugin), 0);
  net = plugin.net;
  ncclNetCommConfig_v11_t config = {.trafficClass = NCCL_NET_TRAFFIC_CLASS_UNDEF};
  ck_assert_int_eq(net->init(&ctx, 1, &config, NULL, NULL), ncclSuccess);
  ck_assert_ptr_nonnull(ctx);
}

static void teardown(void) {
  ck_assert_int_eq(net->finalize(ctx), ncclSuccess);
  net_plugin_unload(&plugin);
}

typedef struct {
  void* send;
  void* recv;
  void* listen;
} pair_t;

static pair_t make_pair(void* c) {
  pair_t p;
  ck_assert_int_eq(net_connect_pair(net, c, 0, &p.send, &p.recv, &p.listen), ncclSuccess);
  return p;
}

static void close_pair(pair_t* p) {
  ck_assert_int_eq(net->closeSend(p->send), ncclSuccess);
  ck_assert_int_eq(net->closeRecv(p->recv), ncclSuccess);
  ck_assert_int_eq(net->closeListen(p->listen), ncclSuccess);
}

START_TEST(test_properties) {
  int ndev = 0;
  ck_assert_int_eq(net->devices(&ndev), ncclSuccess);
  ck_assert_int_eq(ndev, 1);
  ncclNetProperties_v11_t props;
  memset(&props, 0xA5, sizeof(props));
  ck_assert_int_eq(net->getProperties(0, &props), ncclSuccess);
  ck_assert_str_eq(net->name, "MoE");
  if (net_test_emulated()) {
    ck_assert_str_eq(props.name, "emu0");
    ck_assert_ptr_null(props.pciPath); /* the emulator has no PCI device */
    /* The emulator registers dma-bufs (VERBS_EMU_DMABUF=1), so GPU memory is offered. */
    const char* dmabuf = getenv("VERBS_EMU_DMABUF");
    int want = NCCL_PTR_HOST | (dmabuf != NULL && atoi(dmabuf) ? NCCL_PTR_CUDA | NCCL_PTR_DMABUF : 0);
    ck_assert_int_eq(props.ptrSupport, want);
    ck_assert_int_eq(props.speed, 200000); /* HDR 4x */
    ck_assert_int_eq(props.port, 1);
  } else if (net_test_ib()) {
    /* A real HCA: whatever it is, the essentials. */
    ck_assert(props.name != NULL && props.name[0] != '\0');
    ck_assert_int_ne(props.ptrSupport & NCCL_PTR_HOST, 0);
    ck_assert_int_ge(props.port, 1);
  } else {
    ck_assert_str_eq(props.name, "lo");
    ck_assert_ptr_null(props.pciPath); /* loopback has no PCI device */
    ck_assert_int_eq(props.ptrSupport, NCCL_PTR_HOST);
  }
  ck_assert_int_gt(props.speed, 0);
  ck_assert_int_eq(props.maxRecvs, 8);
  ck_assert_int_gt(props.maxComms, 0);
  ck_assert_int_eq(props.regIsGlobal, 1);
  ck_assert_int_eq(props.netDeviceType, NCCL_NET_DEVICE_HOST);
  ck_assert_int_eq(props.vProps.ndevs, 1);
  ck_assert_int_eq(props.vProps.devs[0], 0);
  ck_assert_uint_eq(props.maxP2pBytes, 1u << 30);
  ck_assert_int_eq(props.maxMultiRequestSize, 1);
  ck_assert_int_ne(net->getProperties(1, &props), ncclSuccess);
  ck_assert_int_ne(net->getProperties(-1, &props), ncclSuccess);
}
END_TEST

/* One message of `size` bytes, through registered host buffers. */
static void roundtrip(pair_t* p, size_t size, uint64_t seed) {
  char* sbuf = malloc(size + 1);
  char* rbuf = malloc(size + 16);
  net_fill(sbuf, size, seed);
  memset(rbuf, 0xEE, size + 16); /* poison */
  void *smh = NULL, *rmh = NULL;
  ck_assert_int_eq(net->regMr(p->send, sbuf, size, NCCL_PTR_HOST, &smh), ncclSuccess);
  ck_assert_int_eq(net->regMr(p->recv, rbuf, size + 16, NCCL_PTR_HOST, &rmh), ncclSuccess);
  void *sreq = NULL, *rreq = NULL;
  void* data[1] = {rbuf};
  size_t sizes[1] = {size + 16};
  int tags[1] = {7};
  ck_assert_int_eq(net_irecv(net, p->recv, 1, data, sizes, tags, &rmh, &rreq), ncclSuccess);
  ck_assert_int_eq(net_isend(net, p->send, sbuf, size, 7, smh, &sreq), ncclSuccess);
  int ssize = -1, rsize = -1;
  int sdone = 0, rdone = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (!sdone || !rdone) {
    if (!sdone) ck_assert_int_eq(net->test(sreq, &sdone, &ssize), ncclSuccess);
    if (!rdone) ck_assert_int_eq(net->test(rreq, &rdone, &rsize), ncclSuccess);
    ck_assert_msg(net_now_ms() < deadline, "transfer of %zu bytes hung", size);
  }
  ck_assert_int_eq(ssize, (int)size);
  ck_assert_int_eq(rsize, (int)size);
  ck_assert_msg(net_check(rbuf, size, seed), "data of a %zu-byte message corrupted", size);
  for (int i = 0; i < 16; i++) ck_assert_int_eq((unsigned char)rbuf[size + i], 0xEE);
  ck_assert_int_eq(net->deregMr(p->send, smh), ncclSuccess);
  ck_assert_int_eq(net->deregMr(p->recv, rmh), ncclSuccess);
  free(sbuf);
  free(rbuf);
}

START_TEST(test_sizes) {
  pair_t p = make_pair(ctx);
  const size_t sizes[] = {0, 1, 7, 8, 4095, 4096, 65536, 200000, 512 << 10, (512 << 10) + 1, 600000,
                          (1 << 20) + 3, 4 << 20, 64 << 20};
  uint64_t seed = moe_test_seed();
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) roundtrip(&p, sizes[i], seed + i);
  close_pair(&p);
}
END_TEST

START_TEST(test_32_in_flight) {
  pair_t p = make_pair(ctx);
  enum { N = 32 };
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed());
  size_t size[N];
  char* sbuf[N];
  char* rbuf[N];
  void* sreq[N];
  void* rreq[N];
  void* smh[N];
  void* rmh[N];
  for (int i = 0; i < N; i++) {
    size[i] = i % 4 == 0 ? (size_t)moe_rng_below(&rng, 3 << 20) : (size_t)moe_rng_below(&rng, 5000);
    sbuf[i] = malloc(size[i] + 1);
    rbuf[i] = malloc(size[i] + 1);
    net_fill(sbuf[i], size[i], 1000 + i);
    memset(rbuf[i], 0, size[i] + 1);
    smh[i] = net_reg(net, p.send, sbuf[i], size[i] + 1);
    rmh[i] = net_reg(net, p.recv, rbuf[i], size[i] + 1);
    ck_assert(smh[i] != NULL && rmh[i] != NULL);
  }
  /* Post all receives and all sends before testing any. */
  for (int i = 0; i < N; i++) {
    void* data[1] = {rbuf[i]};
    size_t sz[1] = {size[i]};
    int tag[1] = {i};
    ck_assert_int_eq(net->irecv(p.recv, 1, data, sz, tag, &rmh[i], NULL, &rreq[i]), ncclSuccess);
    ck_assert_ptr_nonnull(rreq[i]);
    /* The receiver's clear-to-send may still be on its way (ib): NULL = retry. */
    uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
    do {
      ck_assert_int_eq(net->isend(p.send, sbuf[i], size[i], i, smh[i], NULL, &sreq[i]), ncclSuccess);
      ck_assert(net_now_ms() < deadline);
    } while (sreq[i] == NULL);
  }
  /* A 33rd request does not fit: NULL means "try again", not an error. */
  void* extra = (void*)1;
  ck_assert_int_eq(net->isend(p.send, sbuf[0], 0, 0, smh[0], NULL, &extra), ncclSuccess);
  ck_assert_ptr_null(extra);
  void* extra_recv = (void*)1;
  {
    void* data[1] = {rbuf[0]};
    size_t sz[1] = {0};
    int tag[1] = {0};
    ck_assert_int_eq(net->irecv(p.recv, 1, data, sz, tag, &rmh[0], NULL, &extra_recv), ncclSuccess);
    ck_assert_ptr_null(extra_recv);
  }
  /* Complete them in reverse order. */
  for (int i = N - 1; i >= 0; i--) {
    int s = -1;
    ck_assert_int_eq(net_wait(net, sreq[i], &s), ncclSuccess);
    ck_assert_int_eq(s, (int)size[i]);
  }
  for (int i = N - 1; i >= 0; i--) {
    int s = -1;
    ck_assert_int_eq(net_wait(net, rreq[i], &s), ncclSuccess);
    ck_assert_int_eq(s, (int)size[i]);
    ck_assert_msg(net_check(rbuf[i], size[i], 1000 + i), "request %d corrupted", i);
    net_dereg(net, p.send, smh[i]);
    net_dereg(net, p.recv, rmh[i]);
    free(sbuf[i]);
    free(rbuf[i]);
  }
  close_pair(&p);
}
END_TEST

START_TEST(test_multi_recv_tags) {
  pair_t p = make_pair(ctx);
  enum { N = 4 };
  int tags[N] = {10, 11, 12, 13};
  size_t cap[N] = {100, 300000, 5000, 2 << 20};
  size_t len[N] = {100, 250000, 0, (2 << 20) - 5};
  char* rbuf[N];
  char* sbuf[N];
  void* rmh[N];
  void* smh[N];
  for (int i = 0; i < N; i++) {
    rbuf[i] = malloc(cap[i]);
    memset(rbuf[i], 0x5A, cap[i]);
    sbuf[i] = malloc(len[i] + 1);
    net_fill(sbuf[i], len[i], 77 + i);
    rmh[i] = net_reg(net, p.recv, rbuf[i], cap[i]);
    smh[i] = net_reg(net, p.send, sbuf[i], len[i] + 1);
    ck_assert(rmh[i] != NULL && smh[i] != NULL);
  }
  void* rreq = NULL;
  ck_assert_int_eq(net_irecv(net, p.recv, N, (void**)rbuf, cap, tags, rmh, &rreq), ncclSuccess);
  /* The sender posts in a different order than the receiver's buffers. */
  const int order[N] = {2, 0, 3, 1};
  void* sreq[N];
  for (int k = 0; k < N; k++) {
    int i = order[k];
    ck_assert_int_eq(net_isend(net, p.send, sbuf[i], len[i], tags[i], smh[i], &sreq[k]), ncclSuccess);
  }
  int sizes[N] = {-1, -1, -1, -1};
  ck_assert_int_eq(net_wait(net, rreq, sizes), ncclSuccess);
  for (int k = 0; k < N; k++) ck_assert_int_eq(net_wait(net, sreq[k], NULL), ncclSuccess);
  for (int i = 0; i < N; i++) {
    ck_assert_int_eq(sizes[i], (int)len[i]);
    ck_assert_msg(net_check(rbuf[i], len[i], 77 + i), "buffer with tag %d got the wrong bytes", tags[i]);
    /* Nothing past what was sent (the poison stays). */
    for (size_t b = len[i]; b < cap[i]; b++) ck_assert_int_eq((unsigned char)rbuf[i][b], 0x5A);
    net_dereg(net, p.recv, rmh[i]);
    net_dereg(net, p.send, smh[i]);
    free(rbuf[i]);
    free(sbuf[i]);
  }
  close_pair(&p);
}
END_TEST

/* A message larger than the buffer it matched, or with a tag no buffer has:
 * an error on the receiving side, never silent (the socket backend finds it
 * there; the ib backend finds it at the sender, which fails too and tells
 * the receiver). */
static void expect_undeliverable(pair_t* p, size_t rcap, int rtag, size_t slen, int stag) {
  char sbuf[256], rbuf[256];
  memset(sbuf, 1, sizeof(sbuf));
  memset(rbuf, 0x77, sizeof(rbuf));
  void* smh = net_reg(net, p->send, sbuf, sizeof(sbuf));
  void* rmh = net_reg(net, p->recv, rbuf, sizeof(rbuf));
  ck_assert(smh != NULL && rmh != NULL);
  void *sreq = NULL, *rreq = NULL;
  void* data[1] = {rbuf};
  size_t cap[1] = {rcap};
  int tag[1] = {rtag};
  ck_assert_int_eq(net_irecv(net, p->recv, 1, data, cap, tag, &rmh, &rreq), ncclSuccess);
  ncclResult_t sres = net_isend(net, p->send, sbuf, slen, stag, smh, &sreq);
  ck_assert_msg(sres == ncclSuccess || sres == ncclInvalidUsage, "isend: %d", sres);
  ck_assert_int_eq(net_wait(net, rreq, NULL), ncclInvalidUsage);
  for (size_t b = rcap; b < sizeof(rbuf); b++) ck_assert_int_eq((unsigned char)rbuf[b], 0x77); /* nothing beyond */
  net_dereg(net, p->send, smh);
  net_dereg(net, p->recv, rmh);
}

START_TEST(test_truncation_reported) {
  pair_t p = make_pair(ctx);
  expect_undeliverable(&p, 100, 3, 200, 3);
  close_pair(&p);
  /* Unknown tag: also an error, not a silent misdelivery. */
  pair_t q = make_pair(ctx);
  expect_undeliverable(&q, 100, 4, 10, 5);
  close_pair(&q);
}
END_TEST

/* iflush after a receive (NCCL calls it for GPU buffers with GDR): nothing
 * to do for host-only devices (a NULL request), else a request that
 * completes (the ib backend reads a byte back through the NIC). */
START_TEST(test_iflush) {
  pair_t p = make_pair(ctx);
  enum { SIZE = 70000 };
  char* s = malloc(SIZE);
  char* r = malloc(SIZE);
  net_fill(s, SIZE, 9);
  void* smh = net_reg(net, p.send, s, SIZE);
  void* rmh = net_reg(net, p.recv, r, SIZE);
  void *sreq, *rreq;
  void* data[1] = {r};
  size_t cap[1] = {SIZE};
  int tag[1] = {1};
  ck_assert_int_eq(net_irecv(net, p.recv, 1, data, cap, tag, &rmh, &rreq), ncclSuccess);
  ck_assert_int_eq(net_isend(net, p.send, s, SIZE, 1, smh, &sreq), ncclSuccess);
  ck_assert_int_eq(net_wait(net, sreq, NULL), ncclSuccess);
  ck_assert_int_eq(net_wait(net, rreq, NULL), ncclSuccess);
  ncclNetProperties_v11_t props;
  ck_assert_int_eq(net->getProperties(0, &props), ncclSuccess);
  int fsize[1] = {SIZE};
  void* freq = (void*)1;
  ck_assert_int_eq(net->iflush(p.recv, 1, data, fsize, &rmh, &freq), ncclSuccess);
  if (props.ptrSupport & NCCL_PTR_CUDA) {
    ck_assert_ptr_nonnull(freq);
    ck_assert_int_eq(net_wait(net, freq, NULL), ncclSuccess);
  } else {
    ck_assert_ptr_null(freq);
  }
  ck_assert(net_check(r, SIZE, 9));
  net_dereg(net, p.send, smh);
  net_dereg(net, p.recv, rmh);
  free(s);
  free(r);
  close_pair(&p);
}
END_TEST

typedef struct {
  int id;
  int ok;
} thread_arg_t;

static void* comm_thread(void* argp) {
  thread_arg_t* arg = (thread_arg_t*)argp;
  void* my_ctx = NULL;
  ncclNetCommConfig_v11_t config = {.trafficClass = NCCL_NET_TRAFFIC_CLASS_UNDEF};
  if (net->init(&my_ctx, 100 + (uint64_t)arg->id, &config, NULL, NULL) != ncclSuccess) return NULL;
  void *send, *recv, *listen;
  if (net_connect_pair(net, my_ctx, 0, &send, &recv, &listen) != ncclSuccess) return NULL;
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed() + (uint64_t)arg->id);
  int ok = 1;
  for (int m = 0; m < 40 && ok; m++) {
    size_t size = m % 8 == 0 ? moe_rng_below(&rng, 2 << 20) : moe_rng_below(&rng, 9000);
    char* s = malloc(size + 1);
    char* r = malloc(size + 1);
    net_fill(s, size, (uint64_t)arg->id * 1000 + m);
    void* smh = net_reg(net, send, s, size + 1);
    void* rmh = net_reg(net, recv, r, size + 1);
    void *sreq, *rreq;
    void* data[1] = {r};
    size_t cap[1] = {size};
    int tag[1] = {m};
    ok = smh != NULL && rmh != NULL && net_irecv(net, recv, 1, data, cap, tag, &rmh, &rreq) == ncclSuccess &&
         net_isend(net, send, s, size, m, smh, &sreq) == ncclSuccess && net_wait(net, sreq, NULL) == ncclSuccess &&
         net_wait(net, rreq, NULL) == ncclSuccess && net_check(r, size, (uint64_t)arg->id * 1000 + m);
    net_dereg(net, send, smh);
    net_dereg(net, recv, rmh);
    free(s);
    free(r);
  }
  ok = ok && net->closeRecv(recv) == ncclSuccess && net->closeSend(send) == ncclSuccess &&
       net->closeListen(listen) == ncclSuccess && net->finalize(my_ctx) == ncclSuccess;
  arg->ok = ok;
  return NULL;
}

START_TEST(test_threads) {
  enum { T = 4 };
  pthread_t th[T];
  thread_arg_t args[T];
  for (int t = 0; t < T; t++) {
    args[t] = (thread_arg_t){.id = t, .ok = 0};
    ck_assert_int_eq(pthread_create(&th[t], NULL, comm_thread, &args[t]), 0);
  }
  for (int t = 0; t < T; t++) pthread_join(th[t], NULL);
  for (int t = 0; t < T; t++) ck_assert_msg(args[t].ok, "thread %d failed", t);
}
END_TEST

START_TEST(test_close_any_order) {
  /* Every order of closing listen/send/recv, with traffic before. */
  const int orders[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
  for (int o = 0; o < 6; o++) {
    pair_t p = make_pair(ctx);
    roundtrip(&p, 300000, o);
    for (int k = 0; k < 3; k++) {
      int which = orders[o][k];
      ncclResult_t res = which == 0 ? net->closeListen(p.listen)
                         : which == 1 ? net->closeSend(p.send)
                                      : net->closeRecv(p.recv);
      ck_assert_int_eq(res, ncclSuccess);
    }
  }
  /* Closing with a receive still posted, and a listen comm that never accepted. */
  pair_t p = make_pair(ctx);
  char buf[64];
  void* data[1] = {buf};
  size_t cap[1] = {sizeof(buf)};
  int tag[1] = {0};
  void* rreq = NULL;
  void* rmh = net_reg(net, p.recv, buf, sizeof(buf));
  ck_assert_int_eq(net_irecv(net, p.recv, 1, data, cap, tag, &rmh, &rreq), ncclSuccess);
  net_dereg(net, p.recv, rmh);
  close_pair(&p);
  char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void* listen = NULL;
  ck_assert_int_eq(net->listen(ctx, 0, handle, &listen), ncclSuccess);
  ck_assert_int_eq(net->closeListen(listen), ncclSuccess);
}
END_TEST

START_TEST(test_dead_peer_is_error) {
  pair_t p = make_pair(ctx);
  ck_assert_int_eq(net->closeSend(p.send), ncclSuccess);
  char buf[64];
  void* data[1] = {buf};
  size_t cap[1] = {sizeof(buf)};
  int tag[1] = {0};
  void* rreq = NULL;
  void* rmh = net_reg(net, p.recv, buf, sizeof(buf));
  /* The EOF may surface in irecv itself (it starts progress) or in test; on
   * ib the clear-to-send write to the vanished QP exceeds its retries. */
  ncclResult_t res = net_irecv(net, p.recv, 1, data, cap, tag, &rmh, &rreq);
  if (res == ncclSuccess) res = net_wait(net, rreq, NULL);
  ck_assert_int_eq(res, ncclRemoteError);
  /* The comm stays broken: later calls fail fast instead of hanging. */
  ck_assert_int_eq(net->irecv(p.recv, 1, data, cap, tag, &rmh, NULL, &rreq), ncclRemoteError);
  net_dereg(net, p.recv, rmh);
  ck_assert_int_eq(net->closeRecv(p.recv), ncclSuccess);
  ck_assert_int_eq(net->closeListen(p.listen), ncclSuccess);
}
END_TEST

START_TEST(test_malformed_handles) {
  char good[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void* listen = NULL;
  ck_assert_int_eq(net->listen(ctx, 0, good, &listen), ncclSuccess);
  /* Every single-byte corruption of the part that travels is rejected. */
  for (int i = 0; i < NCCL_NET_HANDLE_MAXSIZE; i++) {
    char bad[NCCL_NET_HANDLE_MAXSIZE];
    memcpy(bad, good, sizeof(bad));
    bad[i] ^= 0x40;
    void* send = (void*)1;
    ncclResult_t res = net->connect(ctx, 0, bad, &send, NULL);
    ck_assert_msg(res != ncclSuccess, "handle with byte %d flipped accepted", i);
    ck_assert_ptr_null(send);
  }
  /* Zeros and random bytes. */
  char junk[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void* send = NULL;
  ck_assert_int_ne(net->connect(ctx, 0, junk, &send, NULL), ncclSuccess);
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed());
  for (int t = 0; t < 200; t++) {
    for (int i = 0; i < NCCL_NET_HANDLE_MAXSIZE; i++) junk[i] = (char)moe_rng_next(&rng);
    ck_assert_int_ne(net->connect(ctx, 0, junk, &send, NULL), ncclSuccess);
  }
  /* Null pointers and foreign objects are errors too. */
  ck_assert_int_ne(net->connect(ctx, 0, NULL, &send, NULL), ncclSuccess);
  ck_assert_int_ne(net->closeSend(junk), ncclSuccess);
  int done = 0;
  ck_assert_int_ne(net->test(junk, &done, NULL), ncclSuccess);
  ck_assert_int_ne(net->isend(listen, junk, 1, 0, NULL, NULL, &send), ncclSuccess);
  /* The good handle still works afterwards. */
  void *s = NULL, *r = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (s == NULL || r == NULL) {
    if (s == NULL) ck_assert_int_eq(net->connect(ctx, 0, good, &s, NULL), ncclSuccess);
    if (r == NULL) ck_assert_int_eq(net->accept(listen, &r, NULL), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  pair_t p = {.send = s, .recv = r, .listen = listen};
  roundtrip(&p, 1000, 5);
  close_pair(&p);
}
END_TEST

Suite* net_plugin_suite(void) {
  Suite* s = suite_create("net_plugin");
  TCase* tc = tcase_create(net_test_ib() ? "ib_emulated" : "socket_loopback");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, TEST_TIMEOUT_S);
  tcase_add_test(tc, test_properties);
  tcase_add_test(tc, test_sizes);
  tcase_add_test(tc, test_32_in_flight);
  tcase_add_test(tc, test_multi_recv_tags);
  tcase_add_test(tc, test_truncation_reported);
  tcase_add_test(tc, test_iflush);
  tcase_add_test(tc, test_threads);
  tcase_add_test(tc, test_close_any_order);
  tcase_add_test(tc, test_dead_peer_is_error);
  tcase_add_test(tc, test_malformed_handles);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  moe_test_seed();
  net_test_env();
  return moe_test_run(net_plugin_suite());
}
