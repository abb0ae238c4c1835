/* SPDX-License-Identifier: Apache-2.0 */
/* What the verbs backend exchanges with its peer, and the arithmetic of its
 * clear-to-send FIFO. Pure functions (no verbs calls) so they are unit tested
 * and fuzzed on hosts without an HCA.
 *
 * Connection set-up: listen() opens a TCP side channel and puts its address
 * in the handle (same layout as the socket backend's handle, backend byte
 * MOE_NET_KIND_IB). The connector sends its connection info (QP numbers, LID,
 * GID, MTU, FIFO address) over that channel, the acceptor answers with its
 * own; both move their QPs to RTS. Every field is validated before use.
 *
 * Data: the receiver RDMA-writes a clear-to-send entry (buffers, sizes, rkeys,
 * tags) into slot seq % MOE_IB_FIFO_DEPTH of the sender's FIFO; the sender
 * writes the data there, split over the connection's QPs, and completes with
 * one write-with-immediate per QP. */
#ifndef MOE_IB_WIRE_H_
#define MOE_IB_WIRE_H_

#include <stdint.h>

#include "transport/moe_net_handle.h"
#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_IB_WIRE_VERSION 1
/* QPs per connection at most (NCCL_IB_QPS_PER_CONNECTION is clamped to it). */
#define MOE_IB_MAX_QPS 16
#define MOE_IB_FIFO_DEPTH MOE_NET_MAX_REQUESTS

typedef moe_net_addr_handle_t moe_ib_handle_t;
ncclResult_t moe_ib_handle_encode(const moe_ib_handle_t* h, void* buf, size_t len);
ncclResult_t moe_ib_handle_decode(const void* buf, size_t len, moe_ib_handle_t* h_p);

/* --- connection info (side channel) -------------------------------------- */
#define MOE_IB_CONN_MAGIC 0x514f454du /* "MOEQ" */
#define MOE_IB_CONN_INFO_BYTES 120
typedef enum { MOE_IB_LINK_IB = 1, MOE_IB_LINK_ETH = 2 } moe_ib_link_t;

typedef struct {
  uint64_t nonce;      /* echoes the listener's handle nonce */
  int link;            /* moe_ib_link_t */
  int nqps;            /* [1, MOE_IB_MAX_QPS] */
  int mtu;             /* enum ibv_mtu value, [1, 5] */
  uint16_t lid;        /* InfiniBand only, never 0 there */
  uint8_t port;
  uint8_t gid[16];     /* RoCE: the GID chosen by NCCL's rules */
  uint64_t fifo_addr;  /* sender side: where the receiver writes CTS entries */
  uint32_t fifo_rkey;
  uint32_t psn;        /* < 2^24 */
  uint32_t qpn[MOE_IB_MAX_QPS]; /* < 2^24, non-zero for the first nqps */
} moe_ib_conn_info_t;

void moe_ib_conn_info_encode(const moe_ib_conn_info_t* c, uint8_t buf[MOE_IB_CONN_INFO_BYTES]);
ncclResult_t moe_ib_conn_info_decode(const uint8_t* buf, size_t len, moe_ib_conn_info_t* c_p);

/* --- clear-to-send FIFO ---------------------------------------------------- */
typedef struct {
  uint64_t addr;
  uint32_t size;
  uint32_t rkey;
  int32_t tag;
  uint32_t reserved;
} moe_ib_cts_elem_t;

/* One FIFO slot. The receiver writes it whole; `idx` (seq + 1, never 0) marks
 * it valid for the sender's message number seq. */
typedef struct {
  moe_ib_cts_elem_t elem[MOE_NET_MAX_RECVS];
  uint64_t sizes_addr;  /* receiver's array of MOE_NET_MAX_RECVS u32 sizes (n > 1) */
  uint32_t sizes_rkey;
  uint32_t n;
  uint64_t idx;
  uint64_t pad[2];
} moe_ib_cts_t;

/* The slot a sequence number lives in. */
static inline uint32_t moe_ib_fifo_slot(uint64_t seq) { return (uint32_t)(seq % MOE_IB_FIFO_DEPTH); }
/* The receiver may post its request number `posted` only when the slot's
 * previous user (posted - depth) has completed. */
static inline int moe_ib_fifo_can_post(uint64_t posted, uint64_t completed) {
  return posted - completed < MOE_IB_FIFO_DEPTH;
}
/* Takes the slot the sender polls for message `seq` out of the FIFO. The
 * peer may rewrite that memory at any time, so the slot is copied once and
 * only the copy is checked and used: 0 not there yet, 1 ready (*copy_p
 * holds it), -1 malformed (an error: n or a size out of range). */
int moe_ib_cts_take(const volatile moe_ib_cts_t* slot, uint64_t seq, moe_ib_cts_t* copy_p);

/* Which element of a taken entry a send of `size` bytes with `tag` fills,
 * skipping the elements in the bit mask `taken`: its index, else
 * MOE_IB_CTS_NO_TAG (no free element has that tag) or MOE_IB_CTS_TOO_BIG
 * (the element with that tag is smaller than the message: truncation). */
#define MOE_IB_CTS_NO_TAG (-1)
#define MOE_IB_CTS_TOO_BIG (-2)
int moe_ib_cts_match(const moe_ib_cts_t* cts, uint32_t taken, int tag, size_t size);

/* Splits `size` bytes over `nqps` QPs: QP q gets [*off_p, *off_p + *len_p).
 * Chunks are aligned to 128 bytes except the last; some QPs may get 0. */
void moe_ib_split(size_t size, int nqps, int q, size_t* off_p, size_t* len_p);

#ifdef __cplusplus
}
#endif
#endif
