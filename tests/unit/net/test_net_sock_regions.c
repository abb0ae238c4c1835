/* SPDX-License-Identifier: Apache-2.0 */
/* Registered regions facing a hostile peer (issue 15, items 3, 4, 5, 7): a
 * region is reachable only from the connection it was registered on and only
 * under an unguessable key; deregistration waits for (or stops) a write that
 * is landing in the region; a full ring of immediates ends in an error after
 * the timeout instead of a silent stop; registration refuses regions that
 * cannot be memory. Guard bytes around every region catch a stray write. */
#include <pthread.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "net_raw_peer.h"
#include "net_test_util.h"
#include "test_common.h"

#define POISON 0xA5

static const moe_transport_t* t;

static void setup(void) {
  setenv("NCCL_MOE_TIMEOUT_MS", "1000", 1);
  t = raw_transport();
}

static void teardown(void) { t->fini(); }

static void pause_ms(int ms) { poll(NULL, 0, ms); }

/* poll_imm until it fails (bounded); asserts no immediate came. */
static ncclResult_t poll_until_error(moe_net_comm_t* recv) {
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  for (;;) {
    uint32_t imm;
    int got = 0;
    ncclResult_t res = t->poll_imm(recv, &imm, &got);
    ck_assert_int_eq(got, 0);
    if (res != ncclSuccess) return res;
    ck_assert_msg(net_now_ms() < deadline, "the bad write was never reported");
  }
}

static void send_write(int fd, uint64_t key, uint64_t offset, size_t size, int fill, uint32_t imm) {
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .flags = MOE_SOCK_HDR_FLAG_IMM, .size = size, .offset = offset,
                      .key = key, .imm = imm};
  ck_assert_int_eq(raw_send_hdr(fd, &h), 0);
  char* payload = malloc(size + 1);
  memset(payload, fill, size);
  ck_assert_int_eq(raw_send_all(fd, payload, size), 0);
  free(payload);
}

/* Connection A registers a region. A peer on connection B writes with the
 * first key the old scheme handed out (slot 0, generation 1), a peer on C
 * with A's exact key: both are errors on their own connection, and A's
 * region is untouched. */
START_TEST(test_region_only_reachable_from_its_connection) {
  moe_net_comm_t* listen;
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, &listen), ncclSuccess);
  raw_conn_t a, b, c;
  ck_assert_int_eq(raw_dial(handle, 1, 1, &a), 0);
  moe_net_comm_t* recvA = raw_accept_comm(t, listen);
  ck_assert_int_eq(raw_dial(handle, 1, 2, &b), 0);
  moe_net_comm_t* recvB = raw_accept_comm(t, listen);
  ck_assert_int_eq(raw_dial(handle, 1, 3, &c), 0);
  moe_net_comm_t* recvC = raw_accept_comm(t, listen);
  enum { SIZE = 4096 };
  char* region = net_guarded_alloc(SIZE, 0);
  void* mr = NULL;
  ck_assert_int_eq(t->reg_mr(recvA, region, SIZE, NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(mr, &key), ncclSuccess);
  send_write(b.ctrl, (uint64_t)1 << 12, 0, 64, 0x77, 1);
  ck_assert_int_eq(poll_until_error(recvB), ncclRemoteError);
  send_write(c.ctrl, key.key, 0, 64, 0x77, 2);
  ck_assert_int_eq(poll_until_error(recvC), ncclRemoteError);
  /* A itself still works, and nothing landed. */
  uint32_t imm;
  int got = 1;
  ck_assert_int_eq(t->poll_imm(recvA, &imm, &got), ncclSuccess);
  ck_assert_int_eq(got, 0);
  ck_assert_msg(net_all_bytes(region, SIZE, 0), "a write from another connection landed in the region");
  send_write(a.ctrl, key.key, 8, 16, 0x42, 3);
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (!got) {
    ck_assert_int_eq(t->poll_imm(recvA, &imm, &got), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_uint_eq(imm, 3);
  ck_assert(net_all_bytes(region, 8, 0) && net_all_bytes(region + 8, 16, 0x42) && net_all_bytes(region + 24, SIZE - 24, 0));
  ck_assert_int_eq(t->dereg_mr(recvA, mr), ncclSuccess);
  ck_assert_msg(net_guarded_free(region, SIZE), "a guard around the region was overwritten");
  moe_net_comm_t* comms[] = {recvA, recvB, recvC, listen};
  for (int i = 0; i < 4; i++) ck_assert_int_eq(t->close(comms[i]), ncclSuccess);
  raw_close(&a);
  raw_close(&b);
  raw_close(&c);
}
END_TEST

/* Keys carry random bits: distinct on every registration, never a small
 * counter a peer could enumerate, and a registration belongs to its comm. */
START_TEST(test_keys_are_unguessable_and_scoped) {
  moe_net_comm_t *send, *recv, *listen;
  raw_pair(t, &send, &recv, &listen);
  enum { N = 64 };
  static char bufs[N][64];
  void* mrs[2][N];
  uint64_t keys[2 * N];
  for (int i = 0; i < N; i++) {
    moe_net_rkey_t k;
    ck_assert_int_eq(t->reg_mr(recv, bufs[i], sizeof(bufs[i]), NCCL_PTR_HOST, -1, 0, &mrs[0][i]), ncclSuccess);
    ck_assert_int_eq(t->mr_key(mrs[0][i], &k), ncclSuccess);
    keys[i] = k.key;
    ck_assert_int_eq(t->reg_mr(send, bufs[i], sizeof(bufs[i]), NCCL_PTR_HOST, -1, 0, &mrs[1][i]), ncclSuccess);
    ck_assert_int_eq(t->mr_key(mrs[1][i], &k), ncclSuccess);
    keys[N + i] = k.key;
  }
  for (int i = 0; i < 2 * N; i++) {
    ck_assert_msg(keys[i] >> 32 != 0, "key 0x%llx has no random high bits", (unsigned long long)keys[i]);
    for (int j = 0; j < i; j++) ck_assert_msg(keys[i] != keys[j], "two registrations share key 0x%llx",
                                              (unsigned long long)keys[i]);
  }
  /* A registration is deregistered on its own comm only, and only once. */
  ck_assert_int_eq(t->dereg_mr(send, mrs[0][0]), ncclInvalidArgument);
  for (int i = 0; i < N; i++) {
    ck_assert_int_eq(t->dereg_mr(recv, mrs[0][i]), ncclSuccess);
    ck_assert_int_eq(t->dereg_mr(send, mrs[1][i]), ncclSuccess);
  }
  ck_assert_int_eq(t->dereg_mr(recv, mrs[0][0]), ncclInvalidArgument);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
}
END_TEST

typedef struct {
  int fd;
  const char* payload;
  size_t len;
  int delay_ms;
} late_send_t;

static void* late_sender(void* p) {
  late_send_t* a = p;
  pause_ms(a->delay_ms);
  (void)raw_send_all(a->fd, a->payload, a->len); /* may fail when the receiver gave up */
  return NULL;
}

/* Half of a write's payload is in when the region is deregistered; the rest
 * comes 200 ms later. Deregistration waits for it, so the region (the
 * caller's memory again once dereg returns) is never written afterwards. */
START_TEST(test_dereg_waits_for_write_in_flight) {
  setenv("NCCL_MOE_TIMEOUT_MS", "10000", 1); /* the late half must not count as a stall on a busy machine */
  t->fini();
  t = raw_transport();
  moe_net_comm_t* listen;
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, &listen), ncclSuccess);
  raw_conn_t rc;
  ck_assert_int_eq(raw_dial(handle, 1, 1, &rc), 0);
  moe_net_comm_t* recv = raw_accept_comm(t, listen);
  const size_t size = (size_t)1 << 20, first = 32 << 10;
  char* region = net_guarded_alloc(size, 0);
  void* mr = NULL;
  ck_assert_int_eq(t->reg_mr(recv, region, size, NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(mr, &key), ncclSuccess);
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .flags = MOE_SOCK_HDR_FLAG_IMM, .size = size, .key = key.key, .imm = 9};
  ck_assert_int_eq(raw_send_hdr(rc.ctrl, &h), 0);
  char* payload = malloc(size);
  memset(payload, 0x5C, size);
  ck_assert_int_eq(raw_send_all(rc.ctrl, payload, first), 0);
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (region[first - 1] != 0x5C) { /* the receiver is inside the write */
    uint32_t imm;
    int got = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    ck_assert_int_eq(got, 0);
    ck_assert(net_now_ms() < deadline);
  }
  late_send_t rest = {.fd = rc.ctrl, .payload = payload + first, .len = size - first, .delay_ms = 200};
  pthread_t th;
  ck_assert_int_eq(pthread_create(&th, NULL, late_sender, &rest), 0);
  ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
  memset(region, POISON, size); /* the caller's memory again */
  pthread_join(th, NULL);
  /* The write completed before dereg returned: its immediate is there. */
  uint32_t imm = 0;
  int got = 0;
  deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (!got) {
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_uint_eq(imm, 9);
  for (int i = 0; i < 20; i++) {
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    pause_ms(5);
  }
  ck_assert_msg(net_all_bytes(region, size, POISON), "the write landed in the region after dereg returned");
  ck_assert_msg(net_guarded_free(region, size), "a guard around the region was overwritten");
  free(payload);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
  raw_close(&rc);
}
END_TEST

/* The same with a peer that never sends the rest: dereg gives up after the
 * timeout (failing the connection) and the rest, sent afterwards, goes
 * nowhere. */
START_TEST(test_dereg_of_stalled_write_is_bounded) {
  moe_net_comm_t* listen;
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, &listen), ncclSuccess);
  raw_conn_t rc;
  ck_assert_int_eq(raw_dial(handle, 1, 1, &rc), 0);
  moe_net_comm_t* recv = raw_accept_comm(t, listen);
  const size_t size = 64 << 10, first = 1000;
  char* region = net_guarded_alloc(size, 0);
  void* mr = NULL;
  ck_assert_int_eq(t->reg_mr(recv, region, size, NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(mr, &key), ncclSuccess);
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .size = size, .key = key.key};
  ck_assert_int_eq(raw_send_hdr(rc.ctrl, &h), 0);
  char* payload = malloc(size);
  memset(payload, 0x5C, size);
  ck_assert_int_eq(raw_send_all(rc.ctrl, payload, first), 0);
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (region[first - 1] != 0x5C) {
    uint32_t imm;
    int got = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  uint64_t t0 = net_now_ms();
  ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
  ck_assert_uint_lt(net_now_ms() - t0, 10000);
  memset(region, POISON, size);
  (void)raw_send_all(rc.ctrl, payload + first, size - first);
  pause_ms(100);
  ck_assert_int_ne(poll_until_error(recv), ncclSuccess);
  ck_assert_msg(net_all_bytes(region, size, POISON), "the stalled write landed after dereg returned");
  ck_assert_msg(net_guarded_free(region, size), "a guard around the region was overwritten");
  free(payload);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
  raw_close(&rc);
}
END_TEST

/* MOE_IMM_RING + 1 zero-byte writes with immediates, then a message. */
static void fill_ring_then_message(moe_net_comm_t* send, moe_net_comm_t* recv, const moe_net_rkey_t* key,
                                   const char* msg, size_t len) {
  static char src[1];
  for (uint32_t i = 0; i <= MOE_IMM_RING; i++) {
    moe_net_request_t* w = NULL;
    ck_assert_int_eq(t->write(send, src, 0, NULL, key, 0, 1, i, &w), ncclSuccess);
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(raw_wait(t, w, NULL), ncclSuccess);
  }
  moe_net_request_t* s = NULL;
  ck_assert_int_eq(t->isend(send, (void*)msg, len, 4, NULL, &s), ncclSuccess);
  ck_assert_int_eq(raw_wait(t, s, NULL), ncclSuccess);
  (void)recv;
}

/* Nobody polls immediates: the message behind a full ring must end in an
 * error after the timeout, not wait forever. */
START_TEST(test_full_immediate_ring_is_an_error) {
  moe_net_comm_t *send, *recv, *listen;
  raw_pair(t, &send, &recv, &listen);
  char region[64];
  void* mr = NULL;
  ck_assert_int_eq(t->reg_mr(recv, region, sizeof(region), NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(mr, &key), ncclSuccess);
  const char msg[] = "behind the immediates";
  fill_ring_then_message(send, recv, &key, msg, sizeof(msg));
  char got[sizeof(msg)];
  void* data[1] = {got};
  size_t cap[1] = {sizeof(got)};
  int tag[1] = {4};
  moe_net_request_t* r = NULL;
  uint64_t t0 = net_now_ms();
  ncclResult_t res = t->irecv(recv, 1, data, cap, tag, NULL, &r);
  if (res == ncclSuccess) res = raw_wait(t, r, NULL);
  ck_assert_int_eq(res, ncclRemoteError);
  ck_assert_uint_lt(net_now_ms() - t0, 10000);
  ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
}
END_TEST

/* The same traffic with a receiver that polls: back-pressure, every
 * immediate in order, then the message. */
START_TEST(test_full_immediate_ring_drains_in_order) {
  moe_net_comm_t *send, *recv, *listen;
  raw_pair(t, &send, &recv, &listen);
  char region[64];
  void* mr = NULL;
  ck_assert_int_eq(t->reg_mr(recv, region, sizeof(region), NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(mr, &key), ncclSuccess);
  const char msg[] = "behind the immediates";
  fill_ring_then_message(send, recv, &key, msg, sizeof(msg));
  uint32_t next = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (next <= MOE_IMM_RING) {
    uint32_t imm;
    int got = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    if (got) ck_assert_uint_eq(imm, next++);
    ck_assert(net_now_ms() < deadline);
  }
  char got[sizeof(msg)];
  void* data[1] = {got};
  size_t cap[1] = {sizeof(got)};
  int tag[1] = {4};
  moe_net_request_t* r = NULL;
  ck_assert_int_eq(t->irecv(recv, 1, data, cap, tag, NULL, &r), ncclSuccess);
  ck_assert_int_eq(raw_wait(t, r, NULL), ncclSuccess);
  ck_assert_str_eq(got, msg);
  ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
}
END_TEST

/* 1 when some page of [p, p + pages pages) is mapped now. */
static int some_page_mapped(const char* p, size_t pages) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  for (size_t i = 0; i < pages; i++) {
    unsigned char v;
    if (mincore((void*)(p + i * page), page, &v) == 0) return 1;
  }
  return 0;
}

/* Registration of a region with unmapped pages is refused. Other threads
 * (the transport's, the sanitizer's allocator) may map memory into a hole
 * between its munmap and the call: a region that was accepted but is
 * mapped again afterwards proves nothing, so that case is tried again with a
 * fresh hole; a region still unmapped after the call must have been refused. */
static void check_hole_refused(moe_net_comm_t* recv, size_t pages, size_t hole_first, size_t hole_pages,
                               size_t offset, size_t size) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  for (int attempt = 0; attempt < 20; attempt++) {
    char* base = mmap(NULL, pages * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ck_assert_ptr_ne(base, MAP_FAILED);
    ck_assert_int_eq(munmap(base + hole_first * page, hole_pages * page), 0);
    void* mr = NULL;
    const ncclResult_t res = t->reg_mr(recv, base + offset, size, NCCL_PTR_HOST, -1, 0, &mr);
    const int filled = some_page_mapped(base + hole_first * page, hole_pages);
    if (res == ncclSuccess) ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
    munmap(base, pages * page); /* the hole too: munmap of unmapped pages is fine */
    if (res == ncclInvalidArgument) return;
    ck_assert_msg(filled, "region [%p, +%zu bytes) with %zu unmapped pages accepted (result %d)",
                  (void*)(base + offset), size, hole_pages, (int)res);
  }
  ck_abort_msg("a hole of %zu pages was refilled by other mappings on every attempt", hole_pages);
}

/* Regions that cannot be memory are refused with ncclInvalidArgument. */
START_TEST(test_registration_checks_the_region) {
  moe_net_comm_t *send, *recv, *listen;
  raw_pair(t, &send, &recv, &listen);
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  static char ok[256];
  const struct {
    void* data;
    size_t size;
  } bad[] = {
      {NULL, 10},
      {ok, SIZE_MAX},
      {ok, (size_t)MOE_NET_MAX_REG_BYTES + 1},
      {(void*)(UINTPTR_MAX - page + 1), 2 * page},
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    void* mr = NULL;
    ck_assert_msg(t->reg_mr(recv, bad[i].data, bad[i].size, NCCL_PTR_HOST, -1, 0, &mr) == ncclInvalidArgument,
                  "bad region %zu (%p, %zu bytes) accepted", i, bad[i].data, bad[i].size);
  }
  check_hole_refused(recv, 4, 0, 4, 0, 4 * page);      /* all of it unmapped */
  check_hole_refused(recv, 2, 1, 1, 0, 2 * page);      /* the second page a hole */
  check_hole_refused(recv, 2, 1, 1, page - 8, 16);     /* 16 bytes straddling into the hole */
  char* one = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert_ptr_ne(one, MAP_FAILED);
  void* mr = NULL;
  ck_assert_int_eq(t->reg_mr(recv, one, page, NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
  munmap(one, page);
  ck_assert_int_eq(t->reg_mr(recv, ok + 1, sizeof(ok) - 1, NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
  ck_assert_int_eq(t->reg_mr(recv, NULL, 0, NCCL_PTR_HOST, -1, 0, &mr), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(recv, mr), ncclSuccess);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_sock_regions");
  TCase* tc = tcase_create("regions");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_region_only_reachable_from_its_connection);
  tcase_add_test(tc, test_keys_are_unguessable_and_scoped);
  tcase_add_test(tc, test_dereg_waits_for_write_in_flight);
  tcase_add_test(tc, test_dereg_of_stalled_write_is_bounded);
  tcase_add_test(tc, test_full_immediate_ring_is_an_error);
  tcase_add_test(tc, test_full_immediate_ring_drains_in_order);
  tcase_add_test(tc, test_registration_checks_the_region);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
