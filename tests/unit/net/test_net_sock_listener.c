/* SPDX-License-Identifier: Apache-2.0 */
/* A listener flooded with connections that never say hello (issue 15, item
 * 6): 300 silent TCP connections, more than the listener serves at once, must
 * not hold a real connection back until the silent ones time out. */
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net_raw_peer.h"
#include "net_test_util.h"
#include "test_common.h"
#include "transport/moe_net_handle.h"

#define SILENT 300
/* Far less than NCCL_MOE_TIMEOUT_MS below: a real connection must not wait for it. */
#define CONNECT_BOUND_MS 5000

static const moe_transport_t* t;

static void setup(void) {
  setenv("NCCL_MOE_TIMEOUT_MS", "30000", 1);
  t = raw_transport();
}

static void teardown(void) { t->fini(); }

START_TEST(test_silent_connections_do_not_starve_real_ones) {
  moe_net_comm_t* listen;
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, &listen), ncclSuccess);
  moe_net_addr_handle_t h;
  ck_assert_int_eq(moe_sock_handle_decode(handle, sizeof(handle), &h), ncclSuccess);
  int silent[SILENT];
  for (int i = 0; i < SILENT; i++) {
    silent[i] = socket(h.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(silent[i], 0);
    ck_assert_int_eq(connect(silent[i], (struct sockaddr*)&h.addr, h.addr_len), 0);
  }
  /* The listener takes them in (and finds nothing to hand out). */
  for (int i = 0; i < 4; i++) {
    moe_net_comm_t* none = NULL;
    ck_assert_int_eq(t->accept(listen, &none), ncclSuccess);
    ck_assert_ptr_null(none);
    poll(NULL, 0, 10);
  }
  uint8_t copy[MOE_NET_HANDLE_BYTES];
  memcpy(copy, handle, sizeof(copy));
  moe_net_conn_config_t cfg = {.traffic_class = NCCL_NET_TRAFFIC_CLASS_UNDEF};
  moe_net_comm_t *send = NULL, *recv = NULL;
  uint64_t t0 = net_now_ms();
  while (send == NULL || recv == NULL) {
    if (send == NULL) ck_assert_int_eq(t->connect(0, &cfg, copy, &send), ncclSuccess);
    if (recv == NULL) ck_assert_int_eq(t->accept(listen, &recv), ncclSuccess);
    ck_assert_msg(net_now_ms() - t0 < CONNECT_BOUND_MS, "a real connection waited %d ms behind %d silent ones",
                  CONNECT_BOUND_MS, SILENT);
  }
  /* And it works. */
  char out[100] = "through the crowd", in[100] = {0};
  moe_net_request_t *s, *r;
  void* data[1] = {in};
  size_t cap[1] = {sizeof(in)};
  int tag[1] = {1};
  ck_assert_int_eq(t->isend(send, out, sizeof(out), 1, NULL, &s), ncclSuccess);
  ck_assert_int_eq(t->irecv(recv, 1, data, cap, tag, NULL, &r), ncclSuccess);
  ck_assert_int_eq(raw_wait(t, s, NULL), ncclSuccess);
  ck_assert_int_eq(raw_wait(t, r, NULL), ncclSuccess);
  ck_assert_str_eq(in, out);
  for (int i = 0; i < SILENT; i++) close(silent[i]);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
}
END_TEST

/* A connection that sends part of its hello and stops is dropped well before
 * NCCL_MOE_TIMEOUT_MS (the hello has its own, shorter, bound). */
START_TEST(test_partial_hello_dropped_early) {
  setenv("NCCL_MOE_TIMEOUT_MS", "60000", 1);
  t->fini();
  t = raw_transport();
  moe_net_comm_t* listen;
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, &listen), ncclSuccess);
  moe_net_addr_handle_t h;
  ck_assert_int_eq(moe_sock_handle_decode(handle, sizeof(handle), &h), ncclSuccess);
  int fd = socket(h.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ck_assert_int_eq(connect(fd, (struct sockaddr*)&h.addr, h.addr_len), 0);
  ck_assert_int_eq(raw_send_all(fd, "MOEC", 4), 0);
  uint64_t t0 = net_now_ms();
  char c;
  for (;;) {
    moe_net_comm_t* none = NULL;
    ck_assert_int_eq(t->accept(listen, &none), ncclSuccess);
    ck_assert_ptr_null(none);
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if (poll(&pfd, 1, 50) > 0 && recv(fd, &c, 1, MSG_DONTWAIT) <= 0) break; /* closed by the listener */
    ck_assert_msg(net_now_ms() - t0 < 20000, "a half hello held its socket for 20 s");
  }
  close(fd);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_sock_listener");
  TCase* tc = tcase_create("listener");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 90);
  tcase_add_test(tc, test_silent_connections_do_not_starve_real_ones);
  tcase_add_test(tc, test_partial_hello_dropped_early);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
