/* SPDX-License-Identifier: Apache-2.0 */
/* What the socket backend puts on the wire, and the parsers that check it.
 *
 * Everything that arrives from a peer (the handle, the per-socket hello, the
 * per-message header) is decoded by a function here that validates every
 * field before anything uses it; a malformed or truncated blob is
 * ncclInvalidArgument / ncclRemoteError with a message, never a crash. All
 * integers are little-endian. The fuzz target (tests/fuzz) drives these. */
#ifndef MOE_SOCK_WIRE_H_
#define MOE_SOCK_WIRE_H_

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <nccl.h>

#include "transport/moe_net_handle.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 2: 64-bit region keys in a 40-byte header. 3: large one-sided writes
 * striped over the data streams, each chunk behind a chunk header. */
#define MOE_SOCK_WIRE_VERSION 3
/* Data streams per connection at most (NCCL_SOCKET_NTHREADS x NCCL_NSOCKS_PERTHREAD is clamped to this). */
#define MOE_SOCK_MAX_STREAMS 64

/* --- handle: the address handle of transport/moe_net_handle.h, backend byte
 * MOE_NET_KIND_SOCKET. */
ncclResult_t moe_sock_handle_encode(const moe_net_addr_handle_t* h, void* buf, size_t len);
ncclResult_t moe_sock_handle_decode(const void* buf, size_t len, moe_net_addr_handle_t* h_p);

/* --- hello: the first bytes the connector sends on every socket ----------- */
#define MOE_SOCK_HELLO_MAGIC 0x434f454du /* "MOEC" */
#define MOE_SOCK_HELLO_BYTES 32
typedef struct {
  uint64_t nonce;     /* must equal the listener's */
  uint64_t conn_id;   /* groups the sockets of one connection; never 0 */
  int index;          /* -1: the control socket, else the data stream index */
  int nstreams;       /* data streams of this connection, [1, MOE_SOCK_MAX_STREAMS] */
} moe_sock_hello_t;

void moe_sock_hello_encode(const moe_sock_hello_t* h, uint8_t buf[MOE_SOCK_HELLO_BYTES]);
ncclResult_t moe_sock_hello_decode(const uint8_t* buf, size_t len, moe_sock_hello_t* h_p);

/* --- message header: precedes every message on the control socket --------- */
#define MOE_SOCK_HDR_MAGIC 0x484du /* "MH" */
#define MOE_SOCK_HDR_BYTES 40
typedef enum { MOE_SOCK_OP_MSG = 1, MOE_SOCK_OP_WRITE = 2 } moe_sock_op_t;
#define MOE_SOCK_HDR_FLAG_IMM 0x1u
/* A write whose payload follows on the data streams as chunks, each behind a
 * chunk header (below), instead of after the header on the control socket. */
#define MOE_SOCK_HDR_FLAG_STRIPED 0x2u

typedef struct {
  int op;            /* moe_sock_op_t */
  unsigned flags;    /* MOE_SOCK_HDR_FLAG_* (writes only; STRIPED needs size > 0) */
  int tag;           /* messages: the sender's tag */
  uint64_t size;     /* payload bytes, <= MOE_NET_MAX_MSG_BYTES */
  uint64_t offset;   /* writes: byte offset into the target region */
  uint64_t key;      /* writes: the target region's key (moe_net_rkey_t.key) */
  uint32_t imm;      /* writes with MOE_SOCK_HDR_FLAG_IMM: the immediate */
} moe_sock_hdr_t;

void moe_sock_hdr_encode(const moe_sock_hdr_t* h, uint8_t buf[MOE_SOCK_HDR_BYTES]);
ncclResult_t moe_sock_hdr_decode(const uint8_t* buf, size_t len, moe_sock_hdr_t* h_p);

/* --- splitting a large message over the data streams ---------------------- */
/* Messages up to this size travel inline on the control socket. */
#define MOE_SOCK_INLINE_MAX ((size_t)512 << 10)
/* No chunk on a data stream is smaller than this (except a message's tail). */
#define MOE_SOCK_MIN_CHUNK ((size_t)1 << 20)
/* Both sides compute the same split from the size and the stream count:
 * at most nstreams chunks (one per stream), each a multiple of 4 KiB and at
 * least MOE_SOCK_MIN_CHUNK but the last. */
void moe_sock_split(size_t size, int nstreams, int* nchunks_p, size_t* chunk_p);

/* --- striped one-sided writes --------------------------------------------- */
/* Which writes the sender stripes is its own choice
 * (NCCL_MOE_SOCKET_STRIPE_KB; default 0, never: writes below it travel inline
 * on the control socket); the receiver takes either form. */
/* No chunk of a striped write is smaller than this (except its tail). */
#define MOE_SOCK_STRIPE_MIN_CHUNK ((size_t)64 << 10)
/* The split of a striped write: the rule of moe_sock_split with
 * MOE_SOCK_STRIPE_MIN_CHUNK. */
void moe_sock_stripe_split(size_t size, int nstreams, int* nchunks_p, size_t* chunk_p);

/* Precedes every chunk of a striped write on its data stream. The receiver
 * derives every field from the write's control header (writes are numbered
 * per connection from 0 in control-stream order) and accepts a chunk only
 * when its header matches exactly, so a stream out of step, a chunk of the
 * wrong write or aimed elsewhere is an error before any payload byte lands. */
#define MOE_SOCK_CHUNK_MAGIC 0x4b434d53u /* "SMCK" */
#define MOE_SOCK_CHUNK_BYTES 40
typedef struct {
  uint64_t wid;     /* the striped write's number on its connection */
  uint64_t key;     /* the target region's key, as in the control header */
  uint64_t offset;  /* the chunk's byte offset in the target region */
  uint32_t size;    /* payload bytes that follow, in (0, MOE_NET_MAX_MSG_BYTES] */
  uint32_t index;   /* the chunk's index within its write, < MOE_SOCK_MAX_STREAMS */
} moe_sock_chunk_t;

void moe_sock_chunk_encode(const moe_sock_chunk_t* c, uint8_t buf[MOE_SOCK_CHUNK_BYTES]);
ncclResult_t moe_sock_chunk_decode(const uint8_t* buf, size_t len, moe_sock_chunk_t* c_p);

#ifdef __cplusplus
}
#endif
#endif
