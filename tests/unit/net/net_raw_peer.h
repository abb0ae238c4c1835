/* SPDX-License-Identifier: Apache-2.0 */
/* A hand-made peer of the socket backend for the hostile-peer tests: plain
 * TCP sockets that speak the wire format (net_socket/moe_sock_wire.h)
 * directly, so a test can send what a real peer never would (a reset data
 * stream, a header with a guessed key, a payload that stops halfway) and see
 * exactly what the backend sends. Also the transport set-up those tests share. */
#ifndef NET_RAW_PEER_H_
#define NET_RAW_PEER_H_

#include <stddef.h>
#include <stdint.h>

#include "net_socket/moe_sock_wire.h"
#include "transport/moe_transport.h"

typedef struct {
  int ctrl;
  int nstreams;
  int data[MOE_SOCK_MAX_STREAMS];
} raw_conn_t;

/* Connects to the listener of `handle` as connection `conn_id` with
 * `nstreams` data streams and sends every hello. 0 on success. */
int raw_dial(const void* handle, int nstreams, uint64_t conn_id, raw_conn_t* rc);
void raw_close(raw_conn_t* rc);
/* Closes with a TCP reset (SO_LINGER 0): the other side sees ECONNRESET. */
void raw_reset(int fd);
/* Blocking send/receive of all bytes; -1 on an error or EOF (receive: also
 * after timeout_ms). */
int raw_send_all(int fd, const void* buf, size_t len);
int raw_send_hdr(int fd, const moe_sock_hdr_t* h);
int raw_recv_all(int fd, void* buf, size_t len, int timeout_ms);

/* A raw listener the backend's connect() dials: handle[] is what connect takes. */
typedef struct {
  int fd;
  uint64_t nonce;
  uint8_t handle[MOE_NET_HANDLE_BYTES];
} raw_listener_t;

int raw_listen(raw_listener_t* l);
/* Accepts the sockets of one connection (control and data streams, in the
 * order of their hellos' indices); the connector must have sent its hellos. */
int raw_accept(raw_listener_t* l, raw_conn_t* rc, int timeout_ms);
void raw_listener_close(raw_listener_t* l);

/* The socket transport on loopback, for tests that link the layers. */
const moe_transport_t* raw_transport(void);
/* Backend-side comms: listen + connect + accept on loopback. */
void raw_pair(const moe_transport_t* t, moe_net_comm_t** send, moe_net_comm_t** recv, moe_net_comm_t** listen);
/* Accepts one connection on `listen`, failing the test after the deadline. */
moe_net_comm_t* raw_accept_comm(const moe_transport_t* t, moe_net_comm_t* listen);
/* The backend's connect() to `handle` until it returns a comm. */
moe_net_comm_t* raw_connect_comm(const moe_transport_t* t, const void* handle);
/* test() until done; the result (ncclSuccess or the error), failing the
 * test after the deadline. */
ncclResult_t raw_wait(const moe_transport_t* t, moe_net_request_t* req, size_t* sizes);

#endif
