/* SPDX-License-Identifier: Apache-2.0 */
/* Helpers shared by the network backends: NCCL's interface/device list syntax
 * (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) and little-endian wire encoding. */
#ifndef MOE_NET_UTIL_H_
#define MOE_NET_UTIL_H_

#include <nccl.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_NET_IFLIST_MAX 32
#define MOE_NET_IFNAME_MAX 64

/* One entry of "name[:port]"; port -1 matches any port. */
typedef struct {
  char name[MOE_NET_IFNAME_MAX];
  int port;
} moe_net_ifent_t;

/* A parsed list in NCCL's syntax: comma-separated "name[:port[:rail[:plane]]]"
 * entries; a leading '^' makes it an exclude list, a following '=' asks for
 * exact names instead of prefixes. An empty list matches everything (and so
 * "^" alone matches nothing, as in NCCL). */
typedef struct {
  int exclude;
  int exact;
  int count;
  moe_net_ifent_t ent[MOE_NET_IFLIST_MAX];
} moe_net_iflist_t;

/* Parses `spec` (NULL or "" gives the empty list). An empty port means any
 * port. Too many entries, an empty or too long name, a port that is not a
 * number in [1, 255], or a rail/plane that is not a number is
 * ncclInvalidArgument (NCCL would keep such an entry, never matching). */
ncclResult_t moe_net_iflist_parse(const char* spec, moe_net_iflist_t* list_p);

/* 1 when `name` (with `port`, -1 when ports do not apply) is selected. */
int moe_net_iflist_match(const moe_net_iflist_t* list, const char* name, int port);

/* FNV-1a, used as a checksum for handles and hellos (catches truncated or
 * corrupted blobs; it is not a security measure). */
uint32_t moe_net_fnv1a(const void* data, size_t len);

static inline void moe_put_u16(uint8_t* p, uint16_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
}
static inline void moe_put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void moe_put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t moe_get_u16(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t moe_get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}
static inline uint64_t moe_get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}
/* 1 when bytes [p, p+len) are all zero. */
static inline int moe_all_zero(const uint8_t* p, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (p[i] != 0) return 0;
  return 1;
}

#ifdef __cplusplus
}
#endif
#endif
