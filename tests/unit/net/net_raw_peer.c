/* SPDX-License-Identifier: Apache-2.0 */
#include "net_raw_peer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/moe_env.h"
#include "net_test_util.h"
#include "test_common.h"
#include "transport/moe_net_handle.h"

int raw_send_all(int fd, const void* buf, size_t len) {
  const char* p = buf;
  while (len > 0) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

int raw_send_hdr(int fd, const moe_sock_hdr_t* h) {
  uint8_t buf[MOE_SOCK_HDR_BYTES];
  moe_sock_hdr_encode(h, buf);
  return raw_send_all(fd, buf, sizeof(buf));
}

int raw_recv_all(int fd, void* buf, size_t len, int timeout_ms) {
  char* p = buf;
  uint64_t deadline = net_now_ms() + (uint64_t)timeout_ms;
  while (len > 0) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int left = (int)(deadline - net_now_ms());
    if (net_now_ms() >= deadline || poll(&pfd, 1, left) <= 0) return -1;
    ssize_t n = recv(fd, p, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

void raw_reset(int fd) {
  struct linger lg = {.l_onoff = 1, .l_linger = 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  close(fd);
}

static int raw_connect_addr(const moe_net_addr_handle_t* h) {
  int fd = socket(h->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, (const struct sockaddr*)&h->addr, h->addr_len) != 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

int raw_dial(const void* handle, int nstreams, uint64_t conn_id, raw_conn_t* rc) {
  moe_net_addr_handle_t h;
  if (moe_sock_handle_decode(handle, MOE_NET_HANDLE_BYTES, &h) != ncclSuccess) return -1;
  memset(rc, 0, sizeof(*rc));
  rc->nstreams = nstreams;
  for (int i = -1; i < nstreams; i++) {
    int fd = raw_connect_addr(&h);
    if (fd < 0) return -1;
    if (i < 0)
      rc->ctrl = fd;
    else
      rc->data[i] = fd;
    uint8_t hello[MOE_SOCK_HELLO_BYTES];
    moe_sock_hello_t hh = {.nonce = h.nonce, .conn_id = conn_id, .index = i, .nstreams = nstreams};
    moe_sock_hello_encode(&hh, hello);
    if (raw_send_all(fd, hello, sizeof(hello)) != 0) return -1;
  }
  return 0;
}

void raw_close(raw_conn_t* rc) {
  if (rc->ctrl >= 0) close(rc->ctrl);
  for (int i = 0; i < rc->nstreams; i++)
    if (rc->data[i] >= 0) close(rc->data[i]);
  rc->ctrl = -1;
  rc->nstreams = 0;
}

int raw_listen(raw_listener_t* l) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(a);
  l->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (l->fd < 0 || bind(l->fd, (struct sockaddr*)&a, sizeof(a)) != 0 || listen(l->fd, 128) != 0 ||
      getsockname(l->fd, (struct sockaddr*)&a, &len) != 0)
    return -1;
  l->nonce = moe_net_random_u64();
  moe_net_addr_handle_t h = {.addr_len = len, .nonce = l->nonce};
  memcpy(&h.addr, &a, sizeof(a));
  memset(l->handle, 0, sizeof(l->handle));
  return moe_sock_handle_encode(&h, l->handle, sizeof(l->handle)) == ncclSuccess ? 0 : -1;
}

int raw_accept(raw_listener_t* l, raw_conn_t* rc, int timeout_ms) {
  memset(rc, 0, sizeof(*rc));
  rc->ctrl = -1;
  int have = 0, want = 1;
  while (have < want) {
    struct pollfd pfd = {.fd = l->fd, .events = POLLIN};
    if (poll(&pfd, 1, timeout_ms) <= 0) return -1;
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return -1;
    uint8_t buf[MOE_SOCK_HELLO_BYTES];
    moe_sock_hello_t h;
    if (raw_recv_all(fd, buf, sizeof(buf), timeout_ms) != 0 || moe_sock_hello_decode(buf, sizeof(buf), &h) != ncclSuccess ||
        h.nonce != l->nonce) {
      close(fd);
      return -1;
    }
    want = 1 + h.nstreams;
    rc->nstreams = h.nstreams;
    if (h.index < 0)
      rc->ctrl = fd;
    else
      rc->data[h.index] = fd;
    have++;
  }
  return 0;
}

void raw_listener_close(raw_listener_t* l) {
  if (l->fd >= 0) close(l->fd);
  l->fd = -1;
}

const moe_transport_t* raw_transport(void) {
  net_test_env();
  moe_env_reload();
  const moe_transport_t* t = NULL;
  ck_assert_int_eq(moe_transport_select(&t), ncclSuccess);
  ck_assert_str_eq(t->name, "socket");
  return t;
}

moe_net_comm_t* raw_accept_comm(const moe_transport_t* t, moe_net_comm_t* listen) {
  moe_net_comm_t* recv = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (recv == NULL) {
    ck_assert_int_eq(t->accept(listen, &recv), ncclSuccess);
    ck_assert_msg(net_now_ms() < deadline, "accept did not complete");
  }
  return recv;
}

moe_net_comm_t* raw_connect_comm(const moe_transport_t* t, const void* handle) {
  uint8_t copy[MOE_NET_HANDLE_BYTES];
  memcpy(copy, handle, sizeof(copy));
  moe_net_conn_config_t cfg = {.traffic_class = NCCL_NET_TRAFFIC_CLASS_UNDEF};
  moe_net_comm_t* send = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (send == NULL) {
    ck_assert_int_eq(t->connect(0, &cfg, copy, &send), ncclSuccess);
    ck_assert_msg(net_now_ms() < deadline, "connect did not complete");
  }
  return send;
}

void raw_pair(const moe_transport_t* t, moe_net_comm_t** send, moe_net_comm_t** recv, moe_net_comm_t** listen) {
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, listen), ncclSuccess);
  uint8_t copy[MOE_NET_HANDLE_BYTES];
  memcpy(copy, handle, sizeof(copy));
  moe_net_conn_config_t cfg = {.traffic_class = NCCL_NET_TRAFFIC_CLASS_UNDEF};
  *send = *recv = NULL;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (*send == NULL || *recv == NULL) {
    if (*send == NULL) ck_assert_int_eq(t->connect(0, &cfg, copy, send), ncclSuccess);
    if (*recv == NULL) ck_assert_int_eq(t->accept(*listen, recv), ncclSuccess);
    ck_assert_msg(net_now_ms() < deadline, "connection set-up did not complete");
  }
}

ncclResult_t raw_wait(const moe_transport_t* t, moe_net_request_t* req, size_t* sizes) {
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  for (;;) {
    int done = 0;
    ncclResult_t res = t->test(req, &done, sizes);
    if (res != ncclSuccess || done) return res;
    ck_assert_msg(net_now_ms() < deadline, "request neither completed nor failed within %d ms", NET_TEST_DEADLINE_MS);
  }
}
