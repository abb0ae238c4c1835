/* SPDX-License-Identifier: Apache-2.0 */
/* The address handle both backends exchange: a TCP address (the socket
 * backend's listener, or the verbs backend's side channel), the listener's
 * random nonce and a backend byte (moe_net_kind_t), checksummed. Decoding
 * validates every field: a handle arrives from a peer. */
#ifndef MOE_NET_HANDLE_H_
#define MOE_NET_HANDLE_H_

#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <nccl.h>

#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_NET_ADDR_HANDLE_VERSION 1
#define MOE_NET_ADDR_HANDLE_MAGIC 0x484f454du /* "MOEH" */
/* Bytes [0, MOE_NET_ADDR_HANDLE_WIRE_BYTES) travel to the peer; the connector
 * keeps its retry state in [MOE_NET_ADDR_HANDLE_SCRATCH_OFF, +SCRATCH_BYTES) of
 * its own copy (NCCL hands the same handle memory to every connect() retry),
 * and the listener leaves that range zero. */
#define MOE_NET_ADDR_HANDLE_WIRE_BYTES 44
#define MOE_NET_ADDR_HANDLE_SCRATCH_OFF 64
#define MOE_NET_ADDR_HANDLE_SCRATCH_BYTES 16

typedef struct {
  struct sockaddr_storage addr; /* AF_INET or AF_INET6 with the port */
  socklen_t addr_len;
  uint64_t nonce;               /* the listener's random id; hellos must carry it */
} moe_net_addr_handle_t;

/* Writes the wire part of a handle of backend `kind` into `buf` (`len` >=
 * MOE_NET_HANDLE_BYTES, zeroed first). */
ncclResult_t moe_net_addr_handle_encode(int kind, const moe_net_addr_handle_t* h, void* buf, size_t len);
/* Parses `len` bytes. Checks magic, version, backend, family, port, nonce,
 * checksum and that every unused byte of the wire part is zero. */
ncclResult_t moe_net_addr_handle_decode(int kind, const void* buf, size_t len, moe_net_addr_handle_t* h_p);

#ifdef __cplusplus
}
#endif
#endif
