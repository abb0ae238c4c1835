/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: random bytes into every parser that reads network or
 * user input in the net backends (socket handle, hello, message header, IB
 * handle, NCCL_SOCKET_IFNAME / NCCL_IB_HCA lists). A crash, a sanitizer report
 * or a decoded value outside its documented range is a bug.
 *
 *   ./fuzz_net_parsers -max_total_time=60 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "net_ib/moe_ib_wire.h"
#include "net_socket/moe_sock_wire.h"
#include "transport/moe_net_util.h"
#include "transport/moe_transport.h"

int LLVMFuzzerInitialize(int* argc, char*** argv) {
  (void)argc, (void)argv;
  setenv("NCCL_MOE_DEBUG", "NONE", 1); /* every rejected input would log a warning */
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe_net_addr_handle_t h;
  if (moe_sock_handle_decode(data, size, &h) == ncclSuccess) {
    if (h.nonce == 0 || (h.addr.ss_family != AF_INET && h.addr.ss_family != AF_INET6)) abort();
    uint8_t again[MOE_NET_HANDLE_BYTES];
    if (moe_sock_handle_encode(&h, again, sizeof(again)) != ncclSuccess) abort();
  }
  moe_sock_hello_t hello;
  if (moe_sock_hello_decode(data, size, &hello) == ncclSuccess)
    if (hello.nstreams < 1 || hello.nstreams > MOE_SOCK_MAX_STREAMS || hello.index >= hello.nstreams) abort();
  moe_sock_hdr_t hdr;
  if (moe_sock_hdr_decode(data, size, &hdr) == ncclSuccess) {
    if (hdr.size > MOE_NET_MAX_MSG_BYTES || (hdr.op != MOE_SOCK_OP_MSG && hdr.op != MOE_SOCK_OP_WRITE)) abort();
    if (hdr.op == MOE_SOCK_OP_MSG && (hdr.key != 0 || hdr.offset != 0 || hdr.flags != 0 || hdr.imm != 0)) abort();
    if ((hdr.flags & MOE_SOCK_HDR_FLAG_STRIPED) && hdr.size == 0) abort();
    uint8_t again[MOE_SOCK_HDR_BYTES]; /* what was accepted encodes to the same bytes */
    moe_sock_hdr_encode(&hdr, again);
    if (memcmp(again, data, MOE_SOCK_HDR_BYTES) != 0) abort();
  }
  moe_sock_chunk_t chunk;
  if (moe_sock_chunk_decode(data, size, &chunk) == ncclSuccess) {
    if (chunk.size == 0 || chunk.size > MOE_NET_MAX_MSG_BYTES || chunk.index >= MOE_SOCK_MAX_STREAMS ||
        chunk.offset + chunk.size < chunk.offset)
      abort();
    uint8_t again[MOE_SOCK_CHUNK_BYTES];
    moe_sock_chunk_encode(&chunk, again);
    if (memcmp(again, data, MOE_SOCK_CHUNK_BYTES) != 0) abort();
  }
  moe_ib_handle_t ih;
  if (moe_ib_handle_decode(data, size, &ih) == ncclSuccess)
    if (ih.nonce == 0) abort();
  moe_ib_conn_info_t ci;
  if (moe_ib_conn_info_decode(data, size, &ci) == ncclSuccess)
    if (ci.nqps < 1 || ci.nqps > MOE_IB_MAX_QPS) abort();
  /* A clear-to-send slot as the peer may write it: only a checked copy is used. */
  if (size >= sizeof(moe_ib_cts_t)) {
    moe_ib_cts_t slot, copy;
    memcpy(&slot, data, sizeof(slot));
    if (moe_ib_cts_take(&slot, slot.idx - 1, &copy) == 1) {
      if (copy.n < 1 || copy.n > MOE_NET_MAX_RECVS) abort();
      int e = moe_ib_cts_match(&copy, 0, copy.elem[0].tag, copy.elem[0].size);
      if (e < 0 || (uint32_t)e >= copy.n) abort();
    }
  }
  char text[512];
  size_t n = size < sizeof(text) - 1 ? size : sizeof(text) - 1;
  memcpy(text, data, n);
  text[n] = '\0';
  moe_net_iflist_t list;
  if (moe_net_iflist_parse(text, &list) == ncclSuccess) {
    if (list.count < 0 || list.count > MOE_NET_IFLIST_MAX) abort();
    (void)moe_net_iflist_match(&list, "mlx5_0", 1);
  }
  return 0;
}
