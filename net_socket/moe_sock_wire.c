#include "net_socket/moe_sock_wire.h"

#include <string.h>

#include "moe_log.h"
#include "transport/moe_net_util.h"
#include "transport/moe_transport.h"

/* Handle layout (wire part). */
enum {
  HOFF_MAGIC = 0,     /* u32 */
  HOFF_VERSION = 4,   /* u8 */
  HOFF_KIND = 5,      /* u8 moe_net_kind_t */
  HOFF_FAMILY = 6,    /* u8: 4 or 6 */
  HOFF_PORT = 8,      /* u16, host order value */
  HOFF_ADDR = 12,     /* 16 bytes: IPv4 in the first 4 */
  HOFF_NONCE = 32,    /* u64 */
  HOFF_CHECKSUM = 40, /* u32 over [0, 40) */
};

_Static_assert(MOE_SOCK_HANDLE_WIRE_BYTES == HOFF_CHECKSUM + 4, "handle wire size");
_Static_assert(MOE_SOCK_HANDLE_SCRATCH_OFF + MOE_SOCK_HANDLE_SCRATCH_BYTES <= MOE_NET_HANDLE_BYTES,
               "handle scratch must fit in NCCL's handle");

ncclResult_t moe_net_addr_handle_encode(int kind, const moe_sock_handle_t* h, void* buf, size_t len) {
  if (len < MOE_NET_HANDLE_BYTES) return MOE_ERROR(ncclInternalError, "handle buffer too small (%zu)", len);
  uint8_t* p = (uint8_t*)buf;
  memset(p, 0, MOE_NET_HANDLE_BYTES);
  moe_put_u32(p + HOFF_MAGIC, MOE_SOCK_HANDLE_MAGIC);
  p[HOFF_VERSION] = MOE_SOCK_WIRE_VERSION;
  p[HOFF_KIND] = (uint8_t)kind;
  if (h->addr.ss_family == AF_INET) {
    const struct sockaddr_in* a = (const struct sockaddr_in*)&h->addr;
    p[HOFF_FAMILY] = 4;
    moe_put_u16(p + HOFF_PORT, ntohs(a->sin_port));
    memcpy(p + HOFF_ADDR, &a->sin_addr, 4);
  } else if (h->addr.ss_family == AF_INET6) {
    const struct sockaddr_in6* a = (const struct sockaddr_in6*)&h->addr;
    p[HOFF_FAMILY] = 6;
    moe_put_u16(p + HOFF_PORT, ntohs(a->sin6_port));
    memcpy(p + HOFF_ADDR, &a->sin6_addr, 16);
  } else {
    return MOE_ERROR(ncclInternalError, "handle: unsupported address family %d", h->addr.ss_family);
  }
  moe_put_u64(p + HOFF_NONCE, h->nonce);
  moe_put_u32(p + HOFF_CHECKSUM, moe_net_fnv1a(p, HOFF_CHECKSUM));
  return ncclSuccess;
}

ncclResult_t moe_net_addr_handle_decode(int kind, const void* buf, size_t len, moe_sock_handle_t* h_p) {
  const uint8_t* p = (const uint8_t*)buf;
  if (p == NULL || len < MOE_SOCK_HANDLE_WIRE_BYTES)
    return MOE_ERROR(ncclInvalidArgument, "socket handle truncated (%zu bytes, need %d)", len,
                     MOE_SOCK_HANDLE_WIRE_BYTES);
  if (moe_get_u32(p + HOFF_MAGIC) != MOE_SOCK_HANDLE_MAGIC)
    return MOE_ERROR(ncclInvalidArgument, "not a socket handle of this plugin (bad magic 0x%08x)",
                     moe_get_u32(p + HOFF_MAGIC));
  if (p[HOFF_VERSION] != MOE_SOCK_WIRE_VERSION)
    return MOE_ERROR(ncclInvalidArgument, "socket handle version %d, this library speaks %d: mixed versions?",
                     p[HOFF_VERSION], MOE_SOCK_WIRE_VERSION);
  if (p[HOFF_KIND] != kind)
    return MOE_ERROR(ncclInvalidArgument, "handle is for backend %d, not %d: both sides must use the same "
                     "NCCL_MOE_NET_BACKEND", p[HOFF_KIND], kind);
  if (moe_get_u32(p + HOFF_CHECKSUM) != moe_net_fnv1a(p, HOFF_CHECKSUM))
    return MOE_ERROR(ncclInvalidArgument, "socket handle checksum mismatch (corrupted)");
  int family = p[HOFF_FAMILY];
  uint16_t port = moe_get_u16(p + HOFF_PORT);
  uint64_t nonce = moe_get_u64(p + HOFF_NONCE);
  if ((family != 4 && family != 6) || port == 0 || nonce == 0 || p[7] != 0 || moe_get_u16(p + 10) != 0 ||
      (family == 4 && !moe_all_zero(p + HOFF_ADDR + 4, 12)))
    return MOE_ERROR(ncclInvalidArgument, "socket handle has invalid fields (family %d, port %u)", family, port);
  size_t tail_end = len < MOE_SOCK_HANDLE_SCRATCH_OFF ? len : MOE_SOCK_HANDLE_SCRATCH_OFF;
  if (!moe_all_zero(p + MOE_SOCK_HANDLE_WIRE_BYTES, tail_end - MOE_SOCK_HANDLE_WIRE_BYTES))
    return MOE_ERROR(ncclInvalidArgument, "socket handle has garbage after its fields");
  if (len > MOE_SOCK_HANDLE_SCRATCH_OFF + MOE_SOCK_HANDLE_SCRATCH_BYTES) {
    size_t off = MOE_SOCK_HANDLE_SCRATCH_OFF + MOE_SOCK_HANDLE_SCRATCH_BYTES;
    size_t end = len < MOE_NET_HANDLE_BYTES ? len : MOE_NET_HANDLE_BYTES;
    if (end > off && !moe_all_zero(p + off, end - off))
      return MOE_ERROR(ncclInvalidArgument, "socket handle has garbage after its fields");
  }
  moe_sock_handle_t h = {.nonce = nonce};
  if (family == 4) {
    struct sockaddr_in* a = (struct sockaddr_in*)&h.addr;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    memcpy(&a->sin_addr, p + HOFF_ADDR, 4);
    h.addr_len = sizeof(*a);
  } else {
    struct sockaddr_in6* a = (struct sockaddr_in6*)&h.addr;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    memcpy(&a->sin6_addr, p + HOFF_ADDR, 16);
    h.addr_len = sizeof(*a);
  }
  *h_p = h;
  return ncclSuccess;
}

ncclResult_t moe_sock_handle_encode(const moe_sock_handle_t* h, void* buf, size_t len) {
  return moe_net_addr_handle_encode(MOE_NET_KIND_SOCKET, h, buf, len);
}

ncclResult_t moe_sock_handle_decode(const void* buf, size_t len, moe_sock_handle_t* h_p) {
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
 * u32 key, u32 imm. */
void moe_sock_hdr_encode(const moe_sock_hdr_t* h, uint8_t buf[MOE_SOCK_HDR_BYTES]) {
  moe_put_u16(buf, MOE_SOCK_HDR_MAGIC);
  buf[2] = (uint8_t)h->op;
  buf[3] = (uint8_t)h->flags;
  moe_put_u32(buf + 4, (uint32_t)h->tag);
  moe_put_u64(buf + 8, h->size);
  moe_put_u64(buf + 16, h->offset);
  moe_put_u32(buf + 24, h->key);
  moe_put_u32(buf + 28, h->imm);
}

ncclResult_t moe_sock_hdr_decode(const uint8_t* buf, size_t len, moe_sock_hdr_t* h_p) {
  if (buf == NULL || len < MOE_SOCK_HDR_BYTES)
    return MOE_ERROR(ncclRemoteError, "message header truncated (%zu bytes)", len);
  if (moe_get_u16(buf) != MOE_SOCK_HDR_MAGIC)
    return MOE_ERROR(ncclRemoteError, "message header: bad magic 0x%04x (stream out of sync)", moe_get_u16(buf));
  moe_sock_hdr_t h = {.op = buf[2], .flags = buf[3], .tag = (int)moe_get_u32(buf + 4),
                      .size = moe_get_u64(buf + 8), .offset = moe_get_u64(buf + 16),
                      .key = moe_get_u32(buf + 24), .imm = moe_get_u32(buf + 28)};
  if (h.size > MOE_NET_MAX_MSG_BYTES)
    return MOE_ERROR(ncclRemoteError, "message header: size %llu exceeds the limit %zu",
                     (unsigned long long)h.size, MOE_NET_MAX_MSG_BYTES);
  if (h.op == MOE_SOCK_OP_MSG) {
    if (h.flags != 0 || h.offset != 0 || h.key != 0 || h.imm != 0)
      return MOE_ERROR(ncclRemoteError, "message header: message with write fields set");
  } else if (h.op == MOE_SOCK_OP_WRITE) {
    if ((h.flags & ~MOE_SOCK_HDR_FLAG_IMM) != 0 || h.tag != 0 || ((h.flags & MOE_SOCK_HDR_FLAG_IMM) == 0 && h.imm != 0))
      return MOE_ERROR(ncclRemoteError, "message header: write with invalid flags 0x%x", h.flags);
  } else {
    return MOE_ERROR(ncclRemoteError, "message header: unknown op %d", h.op);
  }
  *h_p = h;
  return ncclSuccess;
}

void moe_sock_split(size_t size, int nstreams, int* nchunks_p, size_t* chunk_p) {
  const size_t align = 4096;
  size_t chunk = (size + (size_t)nstreams - 1) / (size_t)nstreams;
  if (chunk < MOE_SOCK_MIN_CHUNK) chunk = MOE_SOCK_MIN_CHUNK;
  chunk = (chunk + align - 1) / align * align;
  int nchunks = size == 0 ? 0 : (int)((size + chunk - 1) / chunk);
  *nchunks_p = nchunks;
  *chunk_p = chunk;
}
