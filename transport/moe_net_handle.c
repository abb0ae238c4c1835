/* SPDX-License-Identifier: Apache-2.0 */
/* The address handle both backends put on the wire (transport/moe_net_handle.h). */
#include "transport/moe_net_handle.h"

#include <string.h>

#include "common/moe_log.h"
#include "transport/moe_net_util.h"

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

_Static_assert(MOE_NET_ADDR_HANDLE_WIRE_BYTES == HOFF_CHECKSUM + 4, "handle wire size");
_Static_assert(MOE_NET_ADDR_HANDLE_SCRATCH_OFF + MOE_NET_ADDR_HANDLE_SCRATCH_BYTES <= MOE_NET_HANDLE_BYTES,
               "handle scratch must fit in NCCL's handle");

ncclResult_t moe_net_addr_handle_encode(int kind, const moe_net_addr_handle_t* h, void* buf, size_t len) {
  if (len < MOE_NET_HANDLE_BYTES) return MOE_ERROR(ncclInternalError, "handle buffer too small (%zu)", len);
  uint8_t* p = (uint8_t*)buf;
  memset(p, 0, MOE_NET_HANDLE_BYTES);
  moe_put_u32(p + HOFF_MAGIC, MOE_NET_ADDR_HANDLE_MAGIC);
  p[HOFF_VERSION] = MOE_NET_ADDR_HANDLE_VERSION;
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

ncclResult_t moe_net_addr_handle_decode(int kind, const void* buf, size_t len, moe_net_addr_handle_t* h_p) {
  const uint8_t* p = (const uint8_t*)buf;
  if (p == NULL || len < MOE_NET_ADDR_HANDLE_WIRE_BYTES)
    return MOE_ERROR(ncclInvalidArgument, "socket handle truncated (%zu bytes, need %d)", len,
                     MOE_NET_ADDR_HANDLE_WIRE_BYTES);
  if (moe_get_u32(p + HOFF_MAGIC) != MOE_NET_ADDR_HANDLE_MAGIC)
    return MOE_ERROR(ncclInvalidArgument, "not a socket handle of this plugin (bad magic 0x%08x)",
                     moe_get_u32(p + HOFF_MAGIC));
  if (p[HOFF_VERSION] != MOE_NET_ADDR_HANDLE_VERSION)
    return MOE_ERROR(ncclInvalidArgument, "socket handle version %d, this library speaks %d: mixed versions?",
                     p[HOFF_VERSION], MOE_NET_ADDR_HANDLE_VERSION);
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
  size_t tail_end = len < MOE_NET_ADDR_HANDLE_SCRATCH_OFF ? len : MOE_NET_ADDR_HANDLE_SCRATCH_OFF;
  if (!moe_all_zero(p + MOE_NET_ADDR_HANDLE_WIRE_BYTES, tail_end - MOE_NET_ADDR_HANDLE_WIRE_BYTES))
    return MOE_ERROR(ncclInvalidArgument, "socket handle has garbage after its fields");
  if (len > MOE_NET_ADDR_HANDLE_SCRATCH_OFF + MOE_NET_ADDR_HANDLE_SCRATCH_BYTES) {
    size_t off = MOE_NET_ADDR_HANDLE_SCRATCH_OFF + MOE_NET_ADDR_HANDLE_SCRATCH_BYTES;
    size_t end = len < MOE_NET_HANDLE_BYTES ? len : MOE_NET_HANDLE_BYTES;
    if (end > off && !moe_all_zero(p + off, end - off))
      return MOE_ERROR(ncclInvalidArgument, "socket handle has garbage after its fields");
  }
  moe_net_addr_handle_t h = {.nonce = nonce};
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
