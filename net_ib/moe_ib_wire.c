/* SPDX-License-Identifier: Apache-2.0 */
#include "net_ib/moe_ib_wire.h"

#include <string.h>

#include "common/moe_log.h"
#include "transport/moe_net_util.h"

_Static_assert(sizeof(moe_ib_cts_elem_t) == 24, "CTS element layout");
_Static_assert(sizeof(moe_ib_cts_t) == 24 * MOE_NET_MAX_RECVS + 40, "CTS entry layout");
_Static_assert(MOE_NET_MAX_MSG_BYTES <= UINT32_MAX, "sizes travel as u32 (CTS entries, immediates)");

ncclResult_t moe_ib_handle_encode(const moe_ib_handle_t* h, void* buf, size_t len) {
  return moe_net_addr_handle_encode(MOE_NET_KIND_IB, h, buf, len);
}

ncclResult_t moe_ib_handle_decode(const void* buf, size_t len, moe_ib_handle_t* h_p) {
  return moe_net_addr_handle_decode(MOE_NET_KIND_IB, buf, len, h_p);
}

enum {
  COFF_MAGIC = 0, COFF_VERSION = 4, COFF_LINK = 5, COFF_NQPS = 6, COFF_MTU = 7, COFF_NONCE = 8,
  COFF_LID = 16, COFF_PORT = 18, COFF_RSVD = 19, COFF_GID = 20, COFF_FIFO_ADDR = 36, COFF_FIFO_RKEY = 44,
  COFF_PSN = 48, COFF_QPN = 52, COFF_CHECKSUM = 52 + 4 * MOE_IB_MAX_QPS,
};
_Static_assert(COFF_CHECKSUM + 4 == MOE_IB_CONN_INFO_BYTES, "conn info size");

#define MOE_IB_24BIT ((1u << 24) - 1)

void moe_ib_conn_info_encode(const moe_ib_conn_info_t* c, uint8_t buf[MOE_IB_CONN_INFO_BYTES]) {
  memset(buf, 0, MOE_IB_CONN_INFO_BYTES);
  moe_put_u32(buf + COFF_MAGIC, MOE_IB_CONN_MAGIC);
  buf[COFF_VERSION] = MOE_IB_WIRE_VERSION;
  buf[COFF_LINK] = (uint8_t)c->link;
  buf[COFF_NQPS] = (uint8_t)c->nqps;
  buf[COFF_MTU] = (uint8_t)c->mtu;
  moe_put_u64(buf + COFF_NONCE, c->nonce);
  moe_put_u16(buf + COFF_LID, c->lid);
  buf[COFF_PORT] = c->port;
  memcpy(buf + COFF_GID, c->gid, 16);
  moe_put_u64(buf + COFF_FIFO_ADDR, c->fifo_addr);
  moe_put_u32(buf + COFF_FIFO_RKEY, c->fifo_rkey);
  moe_put_u32(buf + COFF_PSN, c->psn);
  for (int q = 0; q < MOE_IB_MAX_QPS; q++) moe_put_u32(buf + COFF_QPN + 4 * q, q < c->nqps ? c->qpn[q] : 0);
  moe_put_u32(buf + COFF_CHECKSUM, moe_net_fnv1a(buf, COFF_CHECKSUM));
}

ncclResult_t moe_ib_conn_info_decode(const uint8_t* buf, size_t len, moe_ib_conn_info_t* c_p) {
  if (buf == NULL || len < MOE_IB_CONN_INFO_BYTES)
    return MOE_ERROR(ncclRemoteError, "ib: connection info truncated (%zu bytes)", len);
  if (moe_get_u32(buf + COFF_MAGIC) != MOE_IB_CONN_MAGIC || buf[COFF_VERSION] != MOE_IB_WIRE_VERSION)
    return MOE_ERROR(ncclRemoteError, "ib: connection info has a bad magic or version %d", buf[COFF_VERSION]);
  if (moe_get_u32(buf + COFF_CHECKSUM) != moe_net_fnv1a(buf, COFF_CHECKSUM))
    return MOE_ERROR(ncclRemoteError, "ib: connection info checksum mismatch");
  moe_ib_conn_info_t c = {.nonce = moe_get_u64(buf + COFF_NONCE), .link = buf[COFF_LINK], .nqps = buf[COFF_NQPS],
                          .mtu = buf[COFF_MTU], .lid = moe_get_u16(buf + COFF_LID), .port = buf[COFF_PORT],
                          .fifo_addr = moe_get_u64(buf + COFF_FIFO_ADDR),
                          .fifo_rkey = moe_get_u32(buf + COFF_FIFO_RKEY), .psn = moe_get_u32(buf + COFF_PSN)};
  memcpy(c.gid, buf + COFF_GID, 16);
  int ok = (c.link == MOE_IB_LINK_IB || c.link == MOE_IB_LINK_ETH) && c.nqps >= 1 && c.nqps <= MOE_IB_MAX_QPS &&
           c.mtu >= 1 && c.mtu <= 5 && c.port >= 1 && buf[COFF_RSVD] == 0 && c.psn <= MOE_IB_24BIT &&
           (c.link != MOE_IB_LINK_IB || c.lid != 0);
  for (int q = 0; q < MOE_IB_MAX_QPS && ok; q++) {
    c.qpn[q] = moe_get_u32(buf + COFF_QPN + 4 * q);
    ok = q < c.nqps ? c.qpn[q] != 0 && c.qpn[q] <= MOE_IB_24BIT : c.qpn[q] == 0;
  }
  if (!ok)
    return MOE_ERROR(ncclRemoteError, "ib: connection info has invalid fields (link %d, %d QPs, mtu %d, lid %u)",
                     c.link, c.nqps, c.mtu, c.lid);
  *c_p = c;
  return ncclSuccess;
}

int moe_ib_cts_take(const volatile moe_ib_cts_t* slot, uint64_t seq, moe_ib_cts_t* copy_p) {
  if (slot->idx != seq + 1) return 0;
  __atomic_thread_fence(__ATOMIC_ACQUIRE);
  moe_ib_cts_t c;
  memcpy(&c, (const void*)(uintptr_t)slot, sizeof(c)); /* one read of the peer's bytes */
  /* The slot may have changed under the copy: only a copy that still names
   * this message and is well formed counts. */
  if (c.idx != seq + 1) return 0;
  if (c.n < 1 || c.n > MOE_NET_MAX_RECVS) return -1;
  for (uint32_t i = 0; i < c.n; i++)
    if (c.elem[i].size > MOE_NET_MAX_MSG_BYTES) return -1;
  *copy_p = c;
  return 1;
}

int moe_ib_cts_match(const moe_ib_cts_t* cts, uint32_t taken, int tag, size_t size) {
  for (uint32_t i = 0; i < cts->n && i < MOE_NET_MAX_RECVS; i++) {
    if ((taken & (1u << i)) != 0 || cts->elem[i].tag != tag) continue;
    return size > cts->elem[i].size ? MOE_IB_CTS_TOO_BIG : (int)i;
  }
  return MOE_IB_CTS_NO_TAG;
}

void moe_ib_split(size_t size, int nqps, int q, size_t* off_p, size_t* len_p) {
  const size_t align = 128;
  size_t per = (size + (size_t)nqps - 1) / (size_t)nqps;
  per = (per + align - 1) / align * align;
  size_t off = per * (size_t)q;
  if (off > size) off = size;
  size_t len = size - off < per ? size - off : per;
  *off_p = off;
  *len_p = len;
}
