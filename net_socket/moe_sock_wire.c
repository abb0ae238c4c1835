/* SPDX-License-Identifier: Apache-2.0 */
#include "net_socket/moe_sock_wire.h"

#include <string.h>

#include "common/moe_log.h"
#include "transport/moe_net_util.h"
#include "transport/moe_transport.h"

ncclResult_t moe_sock_handle_encode(const moe_net_addr_handle_t* h, void* buf, size_t len) {
  return moe_net_addr_handle_encode(MOE_NET_KIND_SOCKET, h, buf, len);
}

ncclResult_t moe_sock_handle_decode(const void* buf, size_t len, moe_net_addr_handle_t* h_p) {
  return moe_net_addr_handle_decode(MOE_NET_KIND_SOCKET, buf, len, h_p);
}

/* Hello layout: u32 magic, u8 version, u8 kind(0 ctrl, 1 data), u8 index,
 * u8 nstreams, u64 nonce, u64 conn_id, u32 reserved, u32 checksum. */
void moe_sock_hello_encode(const moe_sock_hello_t* h, uint8_t buf[MOE_SOCK_HELLO_BYTES]) {
  memset(buf, 0, MOE_SOCK_HELLO_BYTES);
  moe_put_u32(buf, MOE_SOCK_HELLO_MAGIC);
  buf[4] = MOE_SOCK_WIRE_VERSION;
  buf[5] = h->index < 0 ? 0 : 1;
  buf[6] = (uint8_t)(h->index < 0 ? 0 : h->index);
  buf[7] = (uint8_t)h->nstreams;
  moe_put_u64(buf + 8, h->nonce);
  moe_put_u64(buf + 16, h->conn_id);
  moe_put_u32(buf + 28, moe_net_fnv1a(buf, 28));
}

ncclResult_t moe_sock_hello_decode(const uint8_t* buf, size_t len, moe_sock_hello_t* h_p) {
  if (buf == NULL || len < MOE_SOCK_HELLO_BYTES)
    return MOE_ERROR(ncclRemoteError, "connection hello truncated (%zu bytes)", len);
  if (moe_get_u32(buf) != MOE_SOCK_HELLO_MAGIC || buf[4] != MOE_SOCK_WIRE_VERSION)
    return MOE_ERROR(ncclRemoteError, "connection hello: bad magic or version %d (not this plugin?)", buf[4]);
  if (moe_get_u32(buf + 28) != moe_net_fnv1a(buf, 28))
    return MOE_ERROR(ncclRemoteError, "connection hello checksum mismatch");
  moe_sock_hello_t h = {.nonce = moe_get_u64(buf + 8), .conn_id = moe_get_u64(buf + 16), .nstreams = buf[7]};
  if (buf[5] > 1 || moe_get_u32(buf + 24) != 0 || h.conn_id == 0 || h.nstreams < 1 ||
      h.nstreams > MOE_SOCK_MAX_STREAMS || (buf[5] == 0 && buf[6] != 0) || (buf[5] == 1 && buf[6] >= h.nstreams))
    return MOE_ERROR(ncclRemoteError, "connection hello has invalid fields (kind %d index %d of %d)", buf[5],
                     buf[6], buf[7]);
  h.index = buf[5] == 0 ? -1 : buf[6];
  *h_p = h;
  return ncclSuccess;
}

/* Header layout: u16 magic, u8 op, u8 flags, i32 tag, u64 size, u64 offset,
 * u64 key, u32 imm, u32 reserved (0). */
void moe_sock_hdr_encode(const moe_sock_hdr_t* h, uint8_t buf[MOE_SOCK_HDR_BYTES]) {
  moe_put_u16(buf, MOE_SOCK_HDR_MAGIC);
  buf[2] = (uint8_t)h->op;
  buf[3] = (uint8_t)h->flags;
  moe_put_u32(buf + 4, (uint32_t)h->tag);
  moe_put_u64(buf + 8, h->size);
  moe_put_u64(buf + 16, h->offset);
  moe_put_u64(buf + 24, h->key);
  moe_put_u32(buf + 32, h->imm);
  moe_put_u32(buf + 36, 0);
}

ncclResult_t moe_sock_hdr_decode(const uint8_t* buf, size_t len, moe_sock_hdr_t* h_p) {
  if (buf == NULL || len < MOE_SOCK_HDR_BYTES)
    return MOE_ERROR(ncclRemoteError, "message header truncated (%zu bytes)", len);
  if (moe_get_u16(buf) != MOE_SOCK_HDR_MAGIC)
    return MOE_ERROR(ncclRemoteError, "message header: bad magic 0x%04x (stream out of sync)", moe_get_u16(buf));
  moe_sock_hdr_t h = {.op = buf[2], .flags = buf[3], .tag = (int)moe_get_u32(buf + 4),
                      .size = moe_get_u64(buf + 8), .offset = moe_get_u64(buf + 16),
                      .key = moe_get_u64(buf + 24), .imm = moe_get_u32(buf + 32)};
  if (moe_get_u32(buf + 36) != 0) return MOE_ERROR(ncclRemoteError, "message header: reserved bytes set");
  if (h.size > MOE_NET_MAX_MSG_BYTES)
    return MOE_ERROR(ncclRemoteError, "message header: size %llu exceeds the limit %zu",
                     (unsigned long long)h.size, MOE_NET_MAX_MSG_BYTES);
  if (h.op == MOE_SOCK_OP_MSG) {
    if (h.flags != 0 || h.offset != 0 || h.key != 0 || h.imm != 0)
      return MOE_ERROR(ncclRemoteError, "message header: message with write fields set");
  } else if (h.op == MOE_SOCK_OP_WRITE) {
    if ((h.flags & ~(MOE_SOCK_HDR_FLAG_IMM | MOE_SOCK_HDR_FLAG_STRIPED)) != 0 || h.tag != 0 ||
        ((h.flags & MOE_SOCK_HDR_FLAG_IMM) == 0 && h.imm != 0) ||
        ((h.flags & MOE_SOCK_HDR_FLAG_STRIPED) != 0 && h.size == 0))
      return MOE_ERROR(ncclRemoteError, "message header: write with invalid flags 0x%x", h.flags);
  } else {
    return MOE_ERROR(ncclRemoteError, "message header: unknown op %d", h.op);
  }
  *h_p = h;
  return ncclSuccess;
}

static void moe_sock_split_min(size_t size, int nstreams, size_t min_chunk, int* nchunks_p, size_t* chunk_p) {
  const size_t align = 4096;
  size_t chunk = (size + (size_t)nstreams - 1) / (size_t)nstreams;
  if (chunk < min_chunk) chunk = min_chunk;
  chunk = (chunk + align - 1) / align * align;
  int nchunks = size == 0 ? 0 : (int)((size + chunk - 1) / chunk);
  *nchunks_p = nchunks;
  *chunk_p = chunk;
}

void moe_sock_split(size_t size, int nstreams, int* nchunks_p, size_t* chunk_p) {
  moe_sock_split_min(size, nstreams, MOE_SOCK_MIN_CHUNK, nchunks_p, chunk_p);
}

void moe_sock_stripe_split(size_t size, int nstreams, int* nchunks_p, size_t* chunk_p) {
  moe_sock_split_min(size, nstreams, MOE_SOCK_STRIPE_MIN_CHUNK, nchunks_p, chunk_p);
}

/* Chunk header layout: u32 magic, u32 index, u64 wid, u64 key, u64 offset,
 * u32 size, u32 checksum (FNV-1a of the first 36 bytes). */
void moe_sock_chunk_encode(const moe_sock_chunk_t* c, uint8_t buf[MOE_SOCK_CHUNK_BYTES]) {
  moe_put_u32(buf, MOE_SOCK_CHUNK_MAGIC);
  moe_put_u32(buf + 4, c->index);
  moe_put_u64(buf + 8, c->wid);
  moe_put_u64(buf + 16, c->key);
  moe_put_u64(buf + 24, c->offset);
  moe_put_u32(buf + 32, c->size);
  moe_put_u32(buf + 36, moe_net_fnv1a(buf, 36));
}

ncclResult_t moe_sock_chunk_decode(const uint8_t* buf, size_t len, moe_sock_chunk_t* c_p) {
  if (buf == NULL || len < MOE_SOCK_CHUNK_BYTES)
    return MOE_ERROR(ncclRemoteError, "chunk header truncated (%zu bytes)", len);
  if (moe_get_u32(buf) != MOE_SOCK_CHUNK_MAGIC)
    return MOE_ERROR(ncclRemoteError, "chunk header: bad magic 0x%08x (data stream out of sync)", moe_get_u32(buf));
  if (moe_get_u32(buf + 36) != moe_net_fnv1a(buf, 36)) return MOE_ERROR(ncclRemoteError, "chunk header checksum mismatch");
  moe_sock_chunk_t c = {.index = moe_get_u32(buf + 4), .wid = moe_get_u64(buf + 8), .key = moe_get_u64(buf + 16),
                        .offset = moe_get_u64(buf + 24), .size = moe_get_u32(buf + 32)};
  if (c.size == 0 || c.size > MOE_NET_MAX_MSG_BYTES || c.index >= MOE_SOCK_MAX_STREAMS ||
      c.offset > UINT64_MAX - c.size)
    return MOE_ERROR(ncclRemoteError, "chunk header has invalid fields (chunk %u, %u bytes at offset %llu)", c.index,
                     c.size, (unsigned long long)c.offset);
  *c_p = c;
  return ncclSuccess;
}
