/* SPDX-License-Identifier: Apache-2.0 */
/* Striped one-sided writes of the socket backend (issue 20, item 4) against
 * a raw peer that speaks the wire format directly:
 *  - what the backend sends: a STRIPED control header, then one chunk per
 *    data stream, each behind a chunk header naming the write, its place and
 *    its size; a data stream reset under a write is an error at the sender;
 *  - what the backend accepts: chunks in any stream order, an immediate held
 *    back until its write's chunks and every earlier write's landed, a later
 *    message completing only after them; a garbled, misplaced, truncated or
 *    missing chunk ends in an error within the timeout, without an immediate
 *    and without a byte outside what the good part of the chunk carried.
 * Guard bytes around every region catch a stray write. */
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net_raw_peer.h"
#include "net_test_util.h"
#include "test_common.h"

#define POISON 0xA5
#define NSTREAMS 4
#define TIMEOUT_MS 1000

static const moe_transport_t* t;

static void setup(void) {
  setenv("NCCL_MOE_SOCKET_STRIPE_KB", "256", 1); /* striping is off by default */
  setenv("NCCL_MOE_TIMEOUT_MS", "1000", 1);
  setenv("NCCL_SOCKET_NTHREADS", "2", 1);
  setenv("NCCL_NSOCKS_PERTHREAD", "2", 1); /* NSTREAMS data streams */
  t = raw_transport();
}

static void teardown(void) { t->fini(); }

static void pause_ms(int ms) { poll(NULL, 0, ms); }

/* ---------------------------------------------------------------- receiver */

/* A backend receive comm facing a raw peer with NSTREAMS data streams, and a
 * guarded region registered on it. */
typedef struct {
  moe_net_comm_t *listen, *recv;
  raw_conn_t rc;
  char* region;
  size_t size;
  void* mr;
  moe_net_rkey_t key;
} rx_t;

static void rx_open(rx_t* x, size_t size) {
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, &x->listen), ncclSuccess);
  ck_assert_int_eq(raw_dial(handle, NSTREAMS, 0x5717e, &x->rc), 0);
  x->recv = raw_accept_comm(t, x->listen);
  x->size = size;
  x->region = net_guarded_alloc(size, POISON);
  ck_assert_int_eq(t->reg_mr(x->recv, x->region, size, NCCL_PTR_HOST, -1, 0, &x->mr), ncclSuccess);
  ck_assert_int_eq(t->mr_key(x->mr, &x->key), ncclSuccess);
}

static void rx_close(rx_t* x) {
  t->dereg_mr(x->recv, x->mr); /* may report the failed comm: the region is still ours */
  ck_assert_msg(net_guarded_free(x->region, x->size), "a guard around the region was overwritten");
  ck_assert_int_eq(t->close(x->recv), ncclSuccess);
  ck_assert_int_eq(t->close(x->listen), ncclSuccess);
  raw_close(&x->rc);
}

static void send_striped_hdr(rx_t* x, uint64_t offset, size_t size, uint32_t imm) {
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .flags = MOE_SOCK_HDR_FLAG_IMM | MOE_SOCK_HDR_FLAG_STRIPED,
                      .size = size, .offset = offset, .key = x->key.key, .imm = imm};
  ck_assert_int_eq(raw_send_hdr(x->rc.ctrl, &h), 0);
}

/* The chunk header the backend expects for chunk c of write `wid`. */
static moe_sock_chunk_t expected_chunk(const rx_t* x, uint64_t wid, uint64_t offset, size_t size, int c) {
  int n = 0;
  size_t chunk = 0;
  moe_sock_stripe_split(size, NSTREAMS, &n, &chunk);
  ck_assert_int_lt(c, n);
  size_t len = size - (size_t)c * chunk < chunk ? size - (size_t)c * chunk : chunk;
  return (moe_sock_chunk_t){.wid = wid, .key = x->key.key, .offset = offset + (size_t)c * chunk,
                            .size = (uint32_t)len, .index = (uint32_t)c};
}

/* Chunks the raw peer sends from a thread of its own (blocking sends of
 * large chunks would wait for a backend that only reads while the test polls
 * it). A send the backend refuses (it failed the comm and closed) is fine. */
typedef enum { AFTER_NONE, AFTER_SHUT_WR, AFTER_RESET } after_t;
typedef struct {
  int fd;
  uint8_t hdr[MOE_SOCK_CHUNK_BYTES];
  int has_hdr;
  const char* payload;
  size_t len;
  after_t after;
} job_t;

#define MAX_JOBS 16
typedef struct {
  job_t jobs[MAX_JOBS];
  int n;
  pthread_t th;
  atomic_int finished;
} peer_t;

static void add_chunk(peer_t* p, int fd, const moe_sock_chunk_t* c, const char* payload, size_t len, after_t after) {
  ck_assert_int_lt(p->n, MAX_JOBS);
  job_t* j = &p->jobs[p->n++];
  *j = (job_t){.fd = fd, .has_hdr = c != NULL, .payload = payload, .len = len, .after = after};
  if (c != NULL) moe_sock_chunk_encode(c, j->hdr);
}

static void* peer_main(void* arg) {
  peer_t* p = arg;
  for (int i = 0; i < p->n; i++) {
    job_t* j = &p->jobs[i];
    if (j->has_hdr && raw_send_all(j->fd, j->hdr, sizeof(j->hdr)) != 0) continue;
    if (j->len > 0 && raw_send_all(j->fd, j->payload, j->len) != 0) continue;
    if (j->after == AFTER_SHUT_WR) shutdown(j->fd, SHUT_WR);
    if (j->after == AFTER_RESET) {
      pause_ms(50);
      raw_reset(j->fd);
    }
  }
  atomic_store(&p->finished, 1);
  return NULL;
}

/* The peer's jobs after a pause (a sender that is slow, not dead). */
static void* late_main(void* arg) {
  pause_ms(200);
  return peer_main(arg);
}

static void peer_start(peer_t* p) {
  atomic_store(&p->finished, 0);
  ck_assert_int_eq(pthread_create(&p->th, NULL, peer_main, p), 0);
}

static void peer_join(peer_t* p) {
  pthread_join(p->th, NULL);
  p->n = 0;
}

/* Sends the chunks while the backend is polled; asserts nothing is
 * signalled or fails meanwhile, nor for `ms` after. */
static void peer_run_quiet(peer_t* p, moe_net_comm_t* recv, int ms);

static void expect_quiet(moe_net_comm_t* recv, int ms);

static void peer_run_quiet(peer_t* p, moe_net_comm_t* recv, int ms) {
  peer_start(p);
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (!atomic_load(&p->finished)) {
    expect_quiet(recv, 5);
    ck_assert_msg(net_now_ms() < deadline, "the raw peer could not send its chunks");
  }
  peer_join(p);
  expect_quiet(recv, ms);
}

/* poll_imm for `ms`: asserts nothing arrives and nothing fails. */
static void expect_quiet(moe_net_comm_t* recv, int ms) {
  uint64_t end = net_now_ms() + (uint64_t)ms;
  while (net_now_ms() < end) {
    uint32_t imm;
    int got = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    ck_assert_msg(!got, "immediate %u arrived before its write's chunks", imm);
    pause_ms(2);
  }
}

static uint32_t next_imm(moe_net_comm_t* recv) {
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  for (;;) {
    uint32_t imm;
    int got = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    if (got) return imm;
    ck_assert_msg(net_now_ms() < deadline, "no immediate arrived");
  }
}

/* poll_imm until it fails; no immediate may come first. Returns how long it took. */
static uint64_t poll_until_error(moe_net_comm_t* recv) {
  uint64_t t0 = net_now_ms(), deadline = t0 + NET_TEST_DEADLINE_MS;
  for (;;) {
    uint32_t imm;
    int got = 0;
    ncclResult_t res = t->poll_imm(recv, &imm, &got);
    ck_assert_msg(!got, "immediate %u of a broken write was delivered", imm);
    if (res != ncclSuccess) return net_now_ms() - t0;
    ck_assert_msg(net_now_ms() < deadline, "the broken write was never reported");
    pause_ms(1);
  }
}

/* Two striped writes (chunks on every stream) and an inline one; streams
 * fed last to first and stream 0 held back: no immediate until it delivers,
 * then all three in order with their bytes; a message sent after them
 * completes after them. */
START_TEST(test_receiver_orders_striped_writes) {
  rx_t x;
  const size_t size = (size_t)4 << 20;
  rx_open(&x, size);
  char* payload = malloc(size);
  net_fill(payload, size, 77);
  const uint64_t off0 = 8192, off1 = (size_t)2 << 20;
  const size_t len0 = (1 << 20) + 12345, len1 = 600000;
  send_striped_hdr(&x, off0, len0, 100);
  send_striped_hdr(&x, off1, len1, 101);
  moe_sock_hdr_t small = {.op = MOE_SOCK_OP_WRITE, .flags = MOE_SOCK_HDR_FLAG_IMM, .size = 16, .offset = 0,
                          .key = x.key.key, .imm = 102};
  ck_assert_int_eq(raw_send_hdr(x.rc.ctrl, &small), 0);
  ck_assert_int_eq(raw_send_all(x.rc.ctrl, payload, 16), 0);
  /* A message after the writes; its receive posted now. */
  char msg[32] = "after the writes", got[32] = {0};
  moe_sock_hdr_t mh = {.op = MOE_SOCK_OP_MSG, .tag = 3, .size = sizeof(msg)};
  ck_assert_int_eq(raw_send_hdr(x.rc.ctrl, &mh), 0);
  ck_assert_int_eq(raw_send_all(x.rc.ctrl, msg, sizeof(msg)), 0);
  void* data[1] = {got};
  size_t cap[1] = {sizeof(got)};
  int tag[1] = {3};
  moe_net_request_t* rreq = NULL;
  ck_assert_int_eq(t->irecv(x.recv, 1, data, cap, tag, NULL, &rreq), ncclSuccess);
  ck_assert_ptr_nonnull(rreq);
  /* Write 0 takes streams 0..3, write 1 the same four again (round robin):
   * on each stream write 0's chunk comes first. */
  int n0 = 0, n1 = 0;
  size_t c0 = 0, c1 = 0;
  moe_sock_stripe_split(len0, NSTREAMS, &n0, &c0);
  moe_sock_stripe_split(len1, NSTREAMS, &n1, &c1);
  ck_assert_int_eq(n0, NSTREAMS);
  ck_assert_int_eq(n1, NSTREAMS);
  peer_t p = {.n = 0};
  for (int si = NSTREAMS - 1; si >= 0; si--) {
    moe_sock_chunk_t a = expected_chunk(&x, 0, off0, len0, si), b = expected_chunk(&x, 1, off1, len1, si);
    add_chunk(&p, x.rc.data[si], &a, payload + a.offset, a.size, AFTER_NONE);
    add_chunk(&p, x.rc.data[si], &b, payload + b.offset, b.size, AFTER_NONE);
    if (si == 1) break; /* stream 0 later */
  }
  /* Stream 0 is missing: nothing may be signalled, the message waits. */
  peer_run_quiet(&p, x.recv, 150);
  int done = 0;
  ck_assert_int_eq(t->test(rreq, &done, NULL), ncclSuccess);
  ck_assert_msg(!done, "a message completed before the writes sent ahead of it landed");
  moe_sock_chunk_t a0 = expected_chunk(&x, 0, off0, len0, 0), b0 = expected_chunk(&x, 1, off1, len1, 0);
  add_chunk(&p, x.rc.data[0], &a0, payload + a0.offset, a0.size, AFTER_NONE);
  add_chunk(&p, x.rc.data[0], &b0, payload + b0.offset, b0.size, AFTER_NONE);
  peer_start(&p);
  for (uint32_t i = 100; i <= 102; i++) ck_assert_uint_eq(next_imm(x.recv), i);
  peer_join(&p);
  ck_assert_int_eq(memcmp(x.region + off0, payload + off0, len0), 0);
  ck_assert_int_eq(memcmp(x.region + off1, payload + off1, len1), 0);
  ck_assert_int_eq(memcmp(x.region, payload, 16), 0);
  ck_assert_msg(net_all_bytes(x.region + 16, off0 - 16, POISON), "bytes outside the writes changed");
  ck_assert_msg(net_all_bytes(x.region + off0 + len0, off1 - off0 - len0, POISON), "bytes outside the writes changed");
  ck_assert_msg(net_all_bytes(x.region + off1 + len1, size - off1 - len1, POISON), "bytes outside the writes changed");
  ck_assert_int_eq(raw_wait(t, rreq, NULL), ncclSuccess);
  ck_assert_str_eq(got, msg);
  free(payload);
  rx_close(&x);
}
END_TEST

/* What a hostile peer sends on the stream of a striped write's first chunk. */
typedef enum {
  BAD_WID,       /* a chunk of another write */
  BAD_OFFSET,    /* aimed elsewhere in the region */
  BAD_INDEX,     /* another chunk's number */
  BAD_SIZE,      /* longer than announced */
  BAD_KEY,       /* another region's key */
  BAD_CHECKSUM,  /* a flipped bit */
  BAD_MAGIC,     /* payload where the header should be (out of step) */
  TRUNCATED,     /* header and half the payload, then the stream closes */
  RESET,         /* header and a few bytes, then a TCP reset */
  SILENT,        /* nothing at all */
  BAD_KINDS
} bad_kind_t;

static const char* const BAD_NAMES[BAD_KINDS] = {"wid",   "offset", "index",     "size",  "key",
                                                 "checksum", "magic", "truncated", "reset", "silent"};

START_TEST(test_receiver_rejects_bad_chunks) {
  const bad_kind_t kind = (bad_kind_t)_i;
  rx_t x;
  const size_t size = (size_t)2 << 20;
  rx_open(&x, size);
  const uint64_t off = 4096;
  const size_t len = (size_t)1 << 20;
  char* payload = malloc(len + 4096);
  memset(payload, 0x3C, len + 4096);
  send_striped_hdr(&x, off, len, 7);
  moe_sock_chunk_t h = expected_chunk(&x, 0, off, len, 0);
  size_t sent_payload = 0; /* bytes of the chunk's payload the backend may take */
  const int fd = x.rc.data[0];
  peer_t p = {.n = 0};
  switch (kind) {
    case BAD_WID: h.wid = 1; break;
    case BAD_OFFSET: h.offset += 4096; break;
    case BAD_INDEX: h.index = 1; break;
    case BAD_SIZE: h.size += 4096; break;
    case BAD_KEY: h.key ^= 1ull << 20; break;
    default: break;
  }
  switch (kind) {
    case BAD_CHECKSUM:
      add_chunk(&p, fd, &h, payload, h.size, AFTER_NONE);
      p.jobs[0].hdr[9] ^= 0x10;
      break;
    case BAD_MAGIC: add_chunk(&p, fd, NULL, payload, h.size, AFTER_NONE); break;
    case TRUNCATED:
      sent_payload = h.size / 2;
      add_chunk(&p, fd, &h, payload, sent_payload, AFTER_SHUT_WR);
      break;
    case RESET:
      sent_payload = 1000;
      add_chunk(&p, fd, &h, payload, sent_payload, AFTER_RESET);
      x.rc.data[0] = -1; /* the reset closes it */
      break;
    case SILENT: break;
    default: add_chunk(&p, fd, &h, payload, h.size, AFTER_NONE); break;
  }
  /* The other chunks are fine: they may land, but no immediate may come. */
  int n = 0;
  size_t chunk = 0;
  moe_sock_stripe_split(len, NSTREAMS, &n, &chunk);
  for (int c = 1; c < n; c++) {
    moe_sock_chunk_t g = expected_chunk(&x, 0, off, len, c);
    add_chunk(&p, x.rc.data[c], &g, payload, g.size, AFTER_NONE);
  }
  peer_start(&p);
  const uint64_t took = poll_until_error(x.recv);
  peer_join(&p);
  ck_assert_msg(took < (uint64_t)TIMEOUT_MS * 5, "%s: the error took %llu ms", BAD_NAMES[kind],
                (unsigned long long)took);
  pause_ms(50);
  /* Chunk 0's range got at most the good bytes it carried; nothing else
   * outside the write changed. */
  ck_assert_msg(net_all_bytes(x.region + off + sent_payload, chunk - sent_payload, POISON),
                "%s: bytes of a rejected chunk landed", BAD_NAMES[kind]);
  ck_assert_msg(net_all_bytes(x.region, off, POISON), "%s: bytes before the write changed", BAD_NAMES[kind]);
  ck_assert_msg(net_all_bytes(x.region + off + len, size - off - len, POISON), "%s: bytes after the write changed",
                BAD_NAMES[kind]);
  free(payload);
  rx_close(&x);
}
END_TEST

/* Deregistration while chunks of a striped write are still on the wire
 * waits until they landed: after it returns nothing writes into the region. */
START_TEST(test_dereg_waits_for_striped_chunks) {
  setenv("NCCL_MOE_TIMEOUT_MS", "10000", 1); /* the late chunk must not count as a stall on a busy machine */
  t->fini();
  t = raw_transport();
  rx_t x;
  const size_t size = (size_t)1 << 20;
  rx_open(&x, size);
  char* payload = malloc(size);
  memset(payload, 0x5C, size);
  send_striped_hdr(&x, 0, size, 9);
  peer_t p = {.n = 0};
  for (int c = 1; c < NSTREAMS; c++) {
    moe_sock_chunk_t h = expected_chunk(&x, 0, 0, size, c);
    add_chunk(&p, x.rc.data[c], &h, payload, h.size, AFTER_NONE);
  }
  moe_sock_chunk_t h0 = expected_chunk(&x, 0, 0, size, 0);
  add_chunk(&p, x.rc.data[0], &h0, payload, 1000, AFTER_NONE);
  peer_run_quiet(&p, x.recv, 20);
  /* The receiver is inside chunk 0; its rest comes 200 ms into dereg. */
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (x.region[999] != 0x5C) {
    expect_quiet(x.recv, 1);
    ck_assert(net_now_ms() < deadline);
  }
  p.jobs[0] = (job_t){.fd = x.rc.data[0], .payload = payload, .len = h0.size - 1000};
  p.n = 1;
  pthread_t th;
  ck_assert_int_eq(pthread_create(&th, NULL, late_main, &p), 0);
  ck_assert_int_eq(t->dereg_mr(x.recv, x.mr), ncclSuccess);
  memset(x.region, POISON, size); /* the caller's memory again */
  pthread_join(th, NULL);
  ck_assert_uint_eq(next_imm(x.recv), 9);
  expect_quiet(x.recv, 50);
  ck_assert_msg(net_all_bytes(x.region, size, POISON), "a chunk landed in the region after dereg returned");
  ck_assert_msg(net_guarded_free(x.region, x.size), "a guard around the region was overwritten");
  ck_assert_int_eq(t->close(x.recv), ncclSuccess);
  ck_assert_int_eq(t->close(x.listen), ncclSuccess);
  raw_close(&x.rc);
  free(payload);
}
END_TEST

/* A striped header beyond its region, or with a key of no region, is
 * refused before any chunk is taken. */
START_TEST(test_receiver_rejects_bad_striped_header) {
  for (int bad = 0; bad < 2; bad++) {
    rx_t x;
    rx_open(&x, (size_t)1 << 20);
    moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .flags = MOE_SOCK_HDR_FLAG_STRIPED, .size = (size_t)512 << 10,
                        .offset = bad == 0 ? (size_t)768 << 10 : 0, .key = x.key.key ^ (bad == 1 ? 1ull << 30 : 0)};
    ck_assert_int_eq(raw_send_hdr(x.rc.ctrl, &h), 0);
    (void)poll_until_error(x.recv);
    ck_assert(net_all_bytes(x.region, x.size, POISON));
    rx_close(&x);
  }
}
END_TEST

/* A peer that closes its control stream right after announcing a striped
 * write (the proxy's destroy): the receiver stays quiet while the write is
 * in flight, signals it once its chunks landed, then reports the close
 * (_i 0). Chunks that never come end in an error within the stall timeout
 * (_i 1: data streams open and silent; _i 2: closed too), no immediate. */
START_TEST(test_close_after_striped_write) {
  rx_t x;
  const size_t size = (size_t)1 << 20;
  rx_open(&x, size);
  char* payload = malloc(size);
  memset(payload, 0x6D, size);
  send_striped_hdr(&x, 0, size, 5);
  ck_assert_int_eq(shutdown(x.rc.ctrl, SHUT_WR), 0);
  if (_i == 2)
    for (int c = 0; c < NSTREAMS; c++) ck_assert_int_eq(shutdown(x.rc.data[c], SHUT_WR), 0);
  if (_i == 0) {
    expect_quiet(x.recv, 50); /* the control stream's end is seen with the write pending */
    peer_t p = {.n = 0};
    int n = 0;
    size_t chunk = 0;
    moe_sock_stripe_split(size, NSTREAMS, &n, &chunk);
    for (int c = 0; c < n; c++) {
      moe_sock_chunk_t h = expected_chunk(&x, 0, 0, size, c);
      add_chunk(&p, x.rc.data[c], &h, payload, h.size, AFTER_NONE);
    }
    peer_start(&p);
    ck_assert_uint_eq(next_imm(x.recv), 5);
    peer_join(&p);
    ck_assert(net_all_bytes(x.region, size, 0x6D));
  }
  const uint64_t took = poll_until_error(x.recv);
  ck_assert_msg(took < (uint64_t)TIMEOUT_MS * 5, "case %d: the error took %llu ms", _i, (unsigned long long)took);
  if (_i != 0) ck_assert(net_all_bytes(x.region, size, POISON));
  free(payload);
  rx_close(&x);
}
END_TEST

/* ------------------------------------------------------------------ sender */

/* The backend's send comm connected to a raw listener. */
typedef struct {
  raw_listener_t l;
  raw_conn_t rc;
  moe_net_comm_t* send;
} tx_t;

static void tx_open(tx_t* x) {
  ck_assert_int_eq(raw_listen(&x->l), 0);
  x->send = raw_connect_comm(t, x->l.handle);
  ck_assert_int_eq(raw_accept(&x->l, &x->rc, 5000), 0);
  ck_assert_int_eq(x->rc.nstreams, NSTREAMS);
}

static void tx_close(tx_t* x) {
  ck_assert_int_eq(t->close(x->send), ncclSuccess);
  raw_close(&x->rc);
  raw_listener_close(&x->l);
}

/* Reads one striped write off the wire and checks every header against
 * what was posted; `first_stream`: where its chunk 0 must be. */
static void read_striped(tx_t* x, uint64_t wid, const moe_net_rkey_t* key, uint64_t offset, const char* src,
                         size_t len, uint32_t imm, int first_stream) {
  uint8_t buf[MOE_SOCK_HDR_BYTES];
  ck_assert_int_eq(raw_recv_all(x->rc.ctrl, buf, sizeof(buf), 5000), 0);
  moe_sock_hdr_t h;
  ck_assert_int_eq(moe_sock_hdr_decode(buf, sizeof(buf), &h), ncclSuccess);
  ck_assert_int_eq(h.op, MOE_SOCK_OP_WRITE);
  ck_assert_uint_eq(h.flags, MOE_SOCK_HDR_FLAG_IMM | MOE_SOCK_HDR_FLAG_STRIPED);
  ck_assert_uint_eq(h.size, len);
  ck_assert_uint_eq(h.offset, offset);
  ck_assert_uint_eq(h.key, key->key);
  ck_assert_uint_eq(h.imm, imm);
  int n = 0;
  size_t chunk = 0;
  moe_sock_stripe_split(len, NSTREAMS, &n, &chunk);
  char* got = malloc(chunk);
  for (int c = 0; c < n; c++) {
    uint8_t ch[MOE_SOCK_CHUNK_BYTES];
    const int fd = x->rc.data[(first_stream + c) % NSTREAMS];
    ck_assert_int_eq(raw_recv_all(fd, ch, sizeof(ch), 5000), 0);
    moe_sock_chunk_t k;
    ck_assert_int_eq(moe_sock_chunk_decode(ch, sizeof(ch), &k), ncclSuccess);
    const size_t clen = len - (size_t)c * chunk < chunk ? len - (size_t)c * chunk : chunk;
    ck_assert_uint_eq(k.wid, wid);
    ck_assert_uint_eq(k.index, (uint32_t)c);
    ck_assert_uint_eq(k.key, key->key);
    ck_assert_uint_eq(k.offset, offset + (size_t)c * chunk);
    ck_assert_uint_eq(k.size, clen);
    ck_assert_int_eq(raw_recv_all(fd, got, clen, 5000), 0);
    ck_assert_int_eq(memcmp(got, src + (size_t)c * chunk, clen), 0);
  }
  free(got);
}

START_TEST(test_sender_stripes_large_writes) {
  tx_t x;
  tx_open(&x);
  const size_t len = ((size_t)1 << 20) + 4096 * 3 + 17;
  char* src = malloc(len);
  net_fill(src, len, 5);
  const moe_net_rkey_t key = {.addr = 0, .size = (size_t)8 << 20, .key = 0xabcdef12345ull};
  moe_net_request_t* w = NULL;
  ck_assert_int_eq(t->write(x.send, src, len, NULL, &key, 4096, 1, 55, &w), ncclSuccess);
  ck_assert_ptr_nonnull(w);
  read_striped(&x, 0, &key, 4096, src, len, 55, 0);
  ck_assert_int_eq(raw_wait(t, w, NULL), ncclSuccess);
  /* A small write stays inline on the control stream. */
  ck_assert_int_eq(t->write(x.send, src, 100, NULL, &key, 0, 1, 56, &w), ncclSuccess);
  uint8_t buf[MOE_SOCK_HDR_BYTES];
  ck_assert_int_eq(raw_recv_all(x.rc.ctrl, buf, sizeof(buf), 5000), 0);
  moe_sock_hdr_t h;
  ck_assert_int_eq(moe_sock_hdr_decode(buf, sizeof(buf), &h), ncclSuccess);
  ck_assert_uint_eq(h.flags, MOE_SOCK_HDR_FLAG_IMM);
  char small[100];
  ck_assert_int_eq(raw_recv_all(x.rc.ctrl, small, sizeof(small), 5000), 0);
  ck_assert_int_eq(memcmp(small, src, sizeof(small)), 0);
  ck_assert_int_eq(raw_wait(t, w, NULL), ncclSuccess);
  /* The next striped write is number 1 and continues the round robin. */
  int n = 0;
  size_t chunk = 0;
  moe_sock_stripe_split(len, NSTREAMS, &n, &chunk);
  ck_assert_int_eq(t->write(x.send, src, (size_t)300 << 10, NULL, &key, 0, 1, 57, &w), ncclSuccess);
  read_striped(&x, 1, &key, 0, src, (size_t)300 << 10, 57, n % NSTREAMS);
  ck_assert_int_eq(raw_wait(t, w, NULL), ncclSuccess);
  free(src);
  tx_close(&x);
}
END_TEST

/* A data stream reset under the sender: the write reports an error within
 * the timeout, never success and never a hang. */
START_TEST(test_sender_reports_dead_stream) {
  tx_t x;
  tx_open(&x);
  const size_t len = (size_t)4 << 20;
  char* src = malloc(len);
  memset(src, 1, len);
  const moe_net_rkey_t key = {.addr = 0, .size = len, .key = 0x1234500ull};
  raw_reset(x.rc.data[2]);
  x.rc.data[2] = -1;
  pause_ms(50);
  moe_net_request_t* w = NULL;
  ck_assert_int_eq(t->write(x.send, src, len, NULL, &key, 0, 1, 1, &w), ncclSuccess);
  ck_assert_ptr_nonnull(w);
  const uint64_t t0 = net_now_ms();
  ck_assert_int_ne(raw_wait(t, w, NULL), ncclSuccess);
  ck_assert_uint_lt(net_now_ms() - t0, (uint64_t)TIMEOUT_MS * 5);
  free(src);
  tx_close(&x);
}
END_TEST

/* NCCL_MOE_SOCKET_STRIPE_KB=0: every write stays on the control socket. */
START_TEST(test_striping_can_be_turned_off) {
  setenv("NCCL_MOE_SOCKET_STRIPE_KB", "0", 1);
  t->fini();
  t = raw_transport();
  tx_t x;
  tx_open(&x);
  const size_t len = (size_t)1 << 20;
  char* src = malloc(len);
  char* got = malloc(len);
  net_fill(src, len, 9);
  const moe_net_rkey_t key = {.addr = 0, .size = len, .key = 0x77000ull};
  moe_net_request_t* w = NULL;
  ck_assert_int_eq(t->write(x.send, src, len, NULL, &key, 0, 1, 3, &w), ncclSuccess);
  ck_assert_ptr_nonnull(w);
  uint8_t buf[MOE_SOCK_HDR_BYTES];
  ck_assert_int_eq(raw_recv_all(x.rc.ctrl, buf, sizeof(buf), 5000), 0);
  moe_sock_hdr_t h;
  ck_assert_int_eq(moe_sock_hdr_decode(buf, sizeof(buf), &h), ncclSuccess);
  ck_assert_uint_eq(h.flags, MOE_SOCK_HDR_FLAG_IMM);
  ck_assert_uint_eq(h.size, len);
  /* The test thread drives the control socket: read while it is tested. */
  size_t have = 0;
  int done = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (have < len || !done) {
    ssize_t n = recv(x.rc.ctrl, got + have, len - have, MSG_DONTWAIT);
    if (n > 0) have += (size_t)n;
    if (!done) ck_assert_int_eq(t->test(w, &done, NULL), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_int_eq(memcmp(got, src, len), 0);
  free(got);
  free(src);
  tx_close(&x);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_sock_stripe");
  TCase* tc = tcase_create("stripe");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_receiver_orders_striped_writes);
  tcase_add_loop_test(tc, test_receiver_rejects_bad_chunks, 0, BAD_KINDS);
  tcase_add_test(tc, test_receiver_rejects_bad_striped_header);
  tcase_add_test(tc, test_dereg_waits_for_striped_chunks);
  tcase_add_loop_test(tc, test_close_after_striped_write, 0, 3);
  tcase_add_test(tc, test_sender_stripes_large_writes);
  tcase_add_test(tc, test_sender_reports_dead_stream);
  tcase_add_test(tc, test_striping_can_be_turned_off);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
