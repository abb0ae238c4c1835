/* SPDX-License-Identifier: Apache-2.0 */
/* The socket backend facing a misbehaving peer: a hand-made TCP client talks
 * to the plugin's listen comm with garbage hellos, a corrupt message header,
 * and a message that stops halfway. Each must be an error (or a dropped
 * connection), never a crash or a hang; stalls end after NCCL_MOE_TIMEOUT_MS. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net_socket/moe_sock_wire.h"
#include "net_test_util.h"
#include "test_common.h"

#define STALL_TIMEOUT_MS 500

static net_plugin_t plugin;
static ncclNet_v11_t* net;
static void* ctx;
static void* listen_comm;
static char handle[NCCL_NET_HANDLE_MAXSIZE];

static void setup(void) {
  net_test_env();
  setenv("NCCL_MOE_TIMEOUT_MS", "500", 1);
  ck_assert_int_eq(net_plugin_load(NULL, &plugin), 0);
  net = plugin.net;
  ck_assert_int_eq(net->init(&ctx, 1, NULL, NULL, NULL), ncclSuccess);
  memset(handle, 0, sizeof(handle));
  ck_assert_int_eq(net->listen(ctx, 0, handle, &listen_comm), ncclSuccess);
}

static void teardown(void) {
  ck_assert_int_eq(net->closeListen(listen_comm), ncclSuccess);
  ck_assert_int_eq(net->finalize(ctx), ncclSuccess);
  net_plugin_unload(&plugin);
}

static int raw_connect(void) {
  moe_net_addr_handle_t h;
  ck_assert_int_eq(moe_sock_handle_decode(handle, sizeof(handle), &h), ncclSuccess);
  int fd = socket(h.addr.ss_family, SOCK_STREAM, 0);
  ck_assert_int_ge(fd, 0);
  ck_assert_int_eq(connect(fd, (struct sockaddr*)&h.addr, h.addr_len), 0);
  return fd;
}

static void raw_send(int fd, const void* buf, size_t len) {
  ck_assert_int_eq(send(fd, buf, len, MSG_NOSIGNAL), (ssize_t)len);
}

/* Opens a well-formed one-stream connection; returns the control fd. */
static int raw_connection(int* data_fd, void** recv_comm) {
  moe_net_addr_handle_t h;
  ck_assert_int_eq(moe_sock_handle_decode(handle, sizeof(handle), &h), ncclSuccess);
  int ctrl = raw_connect();
  *data_fd = raw_connect();
  uint8_t hello[MOE_SOCK_HELLO_BYTES];
  moe_sock_hello_t hh = {.nonce = h.nonce, .conn_id = 42, .index = -1, .nstreams = 1};
  moe_sock_hello_encode(&hh, hello);
  raw_send(ctrl, hello, sizeof(hello));
  hh.index = 0;
  moe_sock_hello_encode(&hh, hello);
  raw_send(*data_fd, hello, sizeof(hello));
  *recv_comm = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (*recv_comm == NULL) {
    ck_assert_int_eq(net->accept(listen_comm, recv_comm, NULL), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  return ctrl;
}

static ncclResult_t post_and_wait(void* recv_comm, size_t cap, uint64_t* elapsed_ms) {
  char* buf = malloc(cap);
  void* data[1] = {buf};
  size_t sizes[1] = {cap};
  int tags[1] = {0};
  void* req = NULL;
  uint64_t t0 = net_now_ms();
  ncclResult_t res = net_irecv(net, recv_comm, 1, data, sizes, tags, NULL, &req);
  if (res == ncclSuccess) res = net_wait(net, req, NULL);
  *elapsed_ms = net_now_ms() - t0;
  free(buf);
  return res;
}

START_TEST(test_garbage_hello_dropped) {
  /* A stranger sends junk; another sends a hello for a different listener. */
  int junk = raw_connect();
  raw_send(junk, "GET / HTTP/1.1\r\n\r\nxxxxxxxxxxxxxxxx", 34);
  int wrong = raw_connect();
  uint8_t hello[MOE_SOCK_HELLO_BYTES];
  moe_sock_hello_t hh = {.nonce = 12345, .conn_id = 1, .index = -1, .nstreams = 1};
  moe_sock_hello_encode(&hh, hello);
  raw_send(wrong, hello, sizeof(hello));
  int silent = raw_connect(); /* connects and says nothing: dropped after the timeout */
  void* rcomm = NULL;
  for (int i = 0; i < 50; i++) {
    ck_assert_int_eq(net->accept(listen_comm, &rcomm, NULL), ncclSuccess);
    ck_assert_ptr_null(rcomm);
  }
  /* A real connection still gets through. */
  void* send = NULL;
  char remote[NCCL_NET_HANDLE_MAXSIZE];
  memcpy(remote, handle, sizeof(remote));
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (send == NULL || rcomm == NULL) {
    if (send == NULL) ck_assert_int_eq(net->connect(ctx, 0, remote, &send, NULL), ncclSuccess);
    if (rcomm == NULL) ck_assert_int_eq(net->accept(listen_comm, &rcomm, NULL), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  /* The junk sockets were closed by the listener. */
  char c;
  ck_assert_int_le(recv(junk, &c, 1, 0), 0); /* EOF or reset: closed */
  ck_assert_int_le(recv(wrong, &c, 1, 0), 0);
  usleep((STALL_TIMEOUT_MS + 100) * 1000);
  void* none = NULL;
  ck_assert_int_eq(net->accept(listen_comm, &none, NULL), ncclSuccess);
  ck_assert_ptr_null(none);
  ck_assert_int_le(recv(silent, &c, 1, 0), 0);
  close(junk);
  close(wrong);
  close(silent);
  ck_assert_int_eq(net->closeSend(send), ncclSuccess);
  ck_assert_int_eq(net->closeRecv(rcomm), ncclSuccess);
}
END_TEST

START_TEST(test_corrupt_header_is_error) {
  int data_fd;
  void* recv;
  int ctrl = raw_connection(&data_fd, &recv);
  uint8_t hdr[MOE_SOCK_HDR_BYTES];
  memset(hdr, 0x41, sizeof(hdr));
  raw_send(ctrl, hdr, sizeof(hdr));
  uint64_t ms;
  ck_assert_int_eq(post_and_wait(recv, 100, &ms), ncclRemoteError);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  close(ctrl);
  close(data_fd);
}
END_TEST

START_TEST(test_oversized_header_is_error) {
  int data_fd;
  void* recv;
  int ctrl = raw_connection(&data_fd, &recv);
  uint8_t hdr[MOE_SOCK_HDR_BYTES];
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_MSG, .size = (uint64_t)1 << 40};
  moe_sock_hdr_encode(&h, hdr);
  raw_send(ctrl, hdr, sizeof(hdr));
  uint64_t ms;
  ck_assert_int_eq(post_and_wait(recv, 100, &ms), ncclRemoteError);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  close(ctrl);
  close(data_fd);
}
END_TEST

START_TEST(test_write_outside_region_is_error) {
  int data_fd;
  void* recv;
  int ctrl = raw_connection(&data_fd, &recv);
  uint8_t hdr[MOE_SOCK_HDR_BYTES];
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .size = 8, .offset = 0, .key = 0x7777};
  moe_sock_hdr_encode(&h, hdr);
  raw_send(ctrl, hdr, sizeof(hdr));
  raw_send(ctrl, "12345678", 8);
  uint64_t ms;
  ck_assert_int_eq(post_and_wait(recv, 100, &ms), ncclRemoteError);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  close(ctrl);
  close(data_fd);
}
END_TEST

START_TEST(test_stalled_inline_message_times_out) {
  int data_fd;
  void* recv;
  int ctrl = raw_connection(&data_fd, &recv);
  uint8_t hdr[MOE_SOCK_HDR_BYTES];
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_MSG, .size = 1000};
  moe_sock_hdr_encode(&h, hdr);
  raw_send(ctrl, hdr, sizeof(hdr));
  raw_send(ctrl, "only ten b", 10);
  uint64_t ms = 0;
  ck_assert_int_eq(post_and_wait(recv, 1000, &ms), ncclRemoteError);
  ck_assert_uint_ge(ms, STALL_TIMEOUT_MS / 2);
  ck_assert_uint_lt(ms, 10 * STALL_TIMEOUT_MS);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  close(ctrl);
  close(data_fd);
}
END_TEST

START_TEST(test_stalled_bulk_message_times_out) {
  int data_fd;
  void* recv;
  int ctrl = raw_connection(&data_fd, &recv);
  uint8_t hdr[MOE_SOCK_HDR_BYTES];
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_MSG, .size = 1 << 20};
  moe_sock_hdr_encode(&h, hdr);
  raw_send(ctrl, hdr, sizeof(hdr));
  char part[1000] = {0};
  raw_send(data_fd, part, sizeof(part)); /* then nothing: the peer hangs */
  uint64_t ms = 0;
  ck_assert_int_eq(post_and_wait(recv, 1 << 20, &ms), ncclRemoteError);
  ck_assert_uint_ge(ms, STALL_TIMEOUT_MS / 2);
  ck_assert_uint_lt(ms, 10 * STALL_TIMEOUT_MS);
  ck_assert_int_eq(net->closeRecv(recv), ncclSuccess);
  close(ctrl);
  close(data_fd);
}
END_TEST

START_TEST(test_connect_to_nothing_fails) {
  /* A handle whose listener is gone: refused, an error and not a hang. */
  char gone[NCCL_NET_HANDLE_MAXSIZE] = {0};
  void* l2 = NULL;
  ck_assert_int_eq(net->listen(ctx, 0, gone, &l2), ncclSuccess);
  ck_assert_int_eq(net->closeListen(l2), ncclSuccess);
  void* send = NULL;
  ncclResult_t res = ncclSuccess;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (res == ncclSuccess && send == NULL) {
    res = net->connect(ctx, 0, gone, &send, NULL);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_int_eq(res, ncclRemoteError);
  ck_assert_ptr_null(send);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_socket_raw");
  TCase* tc = tcase_create("raw_peer");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_garbage_hello_dropped);
  tcase_add_test(tc, test_corrupt_header_is_error);
  tcase_add_test(tc, test_oversized_header_is_error);
  tcase_add_test(tc, test_write_outside_region_is_error);
  tcase_add_test(tc, test_stalled_inline_message_times_out);
  tcase_add_test(tc, test_stalled_bulk_message_times_out);
  tcase_add_test(tc, test_connect_to_nothing_fails);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
