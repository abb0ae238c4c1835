/* SPDX-License-Identifier: Apache-2.0 */
/* After a request reports an error, nothing touches its buffer again (issue
 * 15, items 1 and 10). A raw peer breaks one data stream of a large message
 * while another stream still carries bytes: once test() or irecv() reported
 * the error, the bytes still arriving must not land in the receive buffer,
 * and a send buffer reused after the error must not leak onto the wire. A
 * local buffer that is not memory is reported as the caller's error, naming
 * the buffer, not as the peer's. */
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/moe_log.h"
#include "net_raw_peer.h"
#include "net_test_util.h"
#include "test_common.h"

#define MSG_BYTES ((size_t)4 << 20) /* two 2 MiB chunks over two streams */
#define POISON 0xA5
#define LATE_WAIT_MS 300 /* how long late bytes get to land (they would on loopback in far less) */

static const moe_transport_t* t;

static void setup(void) {
  setenv("NCCL_MOE_TIMEOUT_MS", "5000", 1);
  setenv("NCCL_SOCKET_NTHREADS", "2", 1);
  setenv("NCCL_NSOCKS_PERTHREAD", "1", 1);
  t = raw_transport();
}

static void teardown(void) { t->fini(); }

/* A recv comm of ours whose peer is `rc` (two data streams). */
static moe_net_comm_t* raw_recv_comm(moe_net_comm_t** listen, raw_conn_t* rc) {
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, listen), ncclSuccess);
  ck_assert_int_eq(raw_dial(handle, 2, 7, rc), 0);
  return raw_accept_comm(t, *listen);
}

static int all_poison(const char* buf, size_t len) {
  for (size_t i = 0; i < len; i++)
    if ((unsigned char)buf[i] != POISON) return 0;
  return 1;
}

static void pause_ms(int ms) { poll(NULL, 0, ms); }

/* Stream 0 is reset while stream 1 still owes its chunk: test() reports the
 * error, then stream 1 delivers. The buffer must stay as it was. */
START_TEST(test_recv_buffer_untouched_after_test_error) {
  moe_net_comm_t *listen, *recv;
  raw_conn_t rc;
  recv = raw_recv_comm(&listen, &rc);
  char* buf = malloc(MSG_BYTES);
  memset(buf, POISON, MSG_BYTES);
  void* data[1] = {buf};
  size_t cap[1] = {MSG_BYTES};
  int tag[1] = {3};
  moe_net_request_t* req = NULL;
  ck_assert_int_eq(t->irecv(recv, 1, data, cap, tag, NULL, &req), ncclSuccess);
  ck_assert_ptr_nonnull(req);
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_MSG, .tag = 3, .size = MSG_BYTES};
  ck_assert_int_eq(raw_send_hdr(rc.ctrl, &h), 0);
  /* Let the receiver read the header and hand both chunks to its streams. */
  for (int i = 0; i < 20; i++) {
    int done = 0;
    ck_assert_int_eq(t->test(req, &done, NULL), ncclSuccess);
    ck_assert_int_eq(done, 0);
    pause_ms(5);
  }
  raw_reset(rc.data[0]);
  rc.data[0] = -1;
  ncclResult_t res = raw_wait(t, req, NULL);
  ck_assert_int_ne(res, ncclSuccess);
  /* The caller was told: its buffer is its own again. Stream 1 delivers now. */
  char* late = malloc(MSG_BYTES / 2);
  memset(late, 0x3C, MSG_BYTES / 2);
  (void)raw_send_all(rc.data[1], late, MSG_BYTES / 2); /* may fail: the receiver shut the stream */
  pause_ms(LATE_WAIT_MS);
  ck_assert_msg(all_poison(buf, MSG_BYTES / 2), "the first chunk's range changed after the error");
  ck_assert_msg(all_poison(buf + MSG_BYTES / 2, MSG_BYTES / 2), "stream 1 wrote into the buffer after test() failed");
  free(late);
  free(buf);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
  raw_close(&rc);
}
END_TEST

/* A bulk header, then a corrupt one: irecv() matches the first (its chunks
 * go to the streams) and fails on the second. The payload that arrives
 * afterwards must not land. */
START_TEST(test_recv_buffer_untouched_after_irecv_error) {
  moe_net_comm_t *listen, *recv;
  raw_conn_t rc;
  recv = raw_recv_comm(&listen, &rc);
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_MSG, .tag = 0, .size = MSG_BYTES};
  ck_assert_int_eq(raw_send_hdr(rc.ctrl, &h), 0);
  uint8_t junk[MOE_SOCK_HDR_BYTES];
  memset(junk, 0x41, sizeof(junk));
  ck_assert_int_eq(raw_send_all(rc.ctrl, junk, sizeof(junk)), 0);
  pause_ms(50); /* both headers are in the receiver's socket buffer */
  char* buf = malloc(MSG_BYTES);
  memset(buf, POISON, MSG_BYTES);
  void* data[1] = {buf};
  size_t cap[1] = {MSG_BYTES};
  int tag[1] = {0};
  moe_net_request_t* req = NULL;
  ck_assert_int_eq(t->irecv(recv, 1, data, cap, tag, NULL, &req), ncclRemoteError);
  char* late = malloc(MSG_BYTES / 2);
  memset(late, 0x3C, MSG_BYTES / 2);
  for (int s = 0; s < 2; s++) (void)raw_send_all(rc.data[s], late, MSG_BYTES / 2);
  pause_ms(LATE_WAIT_MS);
  ck_assert_msg(all_poison(buf, MSG_BYTES), "payload landed in the buffer after irecv() failed");
  ck_assert_ptr_null(req); /* a failed irecv hands out no request */
  free(late);
  free(buf);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
  raw_close(&rc);
}
END_TEST

/* The send side: a 64 MiB message over two streams to a peer that reads
 * neither; stream 0 is reset, test() fails, the caller reuses its buffer.
 * Whatever the peer still reads on stream 1 must be the old bytes: the
 * helper thread stopped sending from the buffer before the error came. */
START_TEST(test_send_buffer_untouched_after_test_error) {
  const size_t bytes = (size_t)64 << 20;
  raw_listener_t l;
  ck_assert_int_eq(raw_listen(&l), 0);
  moe_net_comm_t* send = raw_connect_comm(t, l.handle);
  raw_conn_t rc;
  ck_assert_int_eq(raw_accept(&l, &rc, NET_TEST_DEADLINE_MS), 0);
  ck_assert_int_eq(rc.nstreams, 2);
  char* buf = malloc(bytes);
  memset(buf, 0x11, bytes);
  moe_net_request_t* req = NULL;
  ck_assert_int_eq(t->isend(send, buf, bytes, 9, NULL, &req), ncclSuccess);
  ck_assert_ptr_nonnull(req);
  uint8_t hdr[MOE_SOCK_HDR_BYTES];
  ck_assert_int_eq(raw_recv_all(rc.ctrl, hdr, sizeof(hdr), NET_TEST_DEADLINE_MS), 0);
  for (int i = 0; i < 10; i++) {
    int done = 0;
    ck_assert_int_eq(t->test(req, &done, NULL), ncclSuccess);
    ck_assert_int_eq(done, 0);
    pause_ms(5);
  }
  raw_reset(rc.data[0]);
  rc.data[0] = -1;
  ck_assert_int_ne(raw_wait(t, req, NULL), ncclSuccess);
  memset(buf, 0x22, bytes); /* the caller reuses its buffer */
  /* Drain stream 1: bytes already in flight are the old ones; nothing new. */
  static char chunk[1 << 16];
  size_t got = 0, fresh = 0;
  for (;;) {
    struct pollfd pfd = {.fd = rc.data[1], .events = POLLIN};
    if (poll(&pfd, 1, LATE_WAIT_MS) <= 0) break;
    ssize_t n = recv(rc.data[1], chunk, sizeof(chunk), 0);
    if (n <= 0) break;
    for (ssize_t i = 0; i < n; i++) fresh += chunk[i] == 0x22;
    got += (size_t)n;
  }
  ck_assert_msg(fresh == 0, "%zu of %zu bytes read from stream 1 were sent from the buffer after test() failed", fresh,
                got);
  free(buf);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  raw_close(&rc);
  raw_listener_close(&l);
}
END_TEST

/* isend from memory that is not readable: the caller's error, naming its
 * buffer (inline on the control stream, and split over the data streams). */
START_TEST(test_bad_local_buffer_is_local_error) {
  moe_net_comm_t *send, *recv, *listen;
  raw_pair(t, &send, &recv, &listen);
  const size_t bulk = MSG_BYTES;
  char* bad = mmap(NULL, bulk, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ck_assert_ptr_ne(bad, MAP_FAILED);
  moe_net_request_t* req = NULL;
  moe_clear_last_error();
  ncclResult_t res = t->isend(send, bad, 100, 0, NULL, &req);
  if (res == ncclSuccess) res = raw_wait(t, req, NULL);
  ck_assert_msg(res == ncclInvalidArgument || res == ncclSystemError, "inline: result %d, want a local error", res);
  ck_assert_msg(strstr(moe_last_error(), "local buffer") != NULL, "inline: message \"%s\"", moe_last_error());
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);

  raw_pair(t, &send, &recv, &listen);
  moe_clear_last_error();
  res = t->isend(send, bad, bulk, 0, NULL, &req);
  if (res == ncclSuccess) res = raw_wait(t, req, NULL);
  ck_assert_msg(res == ncclInvalidArgument || res == ncclSystemError, "bulk: result %d, want a local error", res);
  ck_assert_msg(strstr(moe_last_error(), "local buffer") != NULL, "bulk: message \"%s\"", moe_last_error());
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
  munmap(bad, bulk);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_sock_cancel");
  TCase* tc = tcase_create("cancel");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_recv_buffer_untouched_after_test_error);
  tcase_add_test(tc, test_recv_buffer_untouched_after_irecv_error);
  tcase_add_test(tc, test_send_buffer_untouched_after_test_error);
  tcase_add_test(tc, test_bad_local_buffer_is_local_error);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
