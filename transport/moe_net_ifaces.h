/* SPDX-License-Identifier: Apache-2.0 */
/* Network interfaces for TCP: the socket backend's devices and the verbs
 * backend's side channel, chosen as NCCL chooses them. */
#ifndef MOE_NET_IFACES_H_
#define MOE_NET_IFACES_H_

#include <net/if.h>
#include <sys/socket.h>

#include <nccl.h>

#include "transport/moe_net_util.h"
#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One usable interface (a device of the socket backend, the side channel of the verbs backend). */
typedef struct {
  char name[MOE_NET_IFNAME_MAX];
  struct sockaddr_storage addr; /* port 0 */
  socklen_t addr_len;
  char pci_path[MOE_NET_PATH_MAX];
  int speed_mbps;
} moe_net_iface_t;

/* Finds the interfaces to use, as NCCL does: NCCL_SOCKET_IFNAME when set
 * (prefixes; '^' excludes, '=' exact), else IPoIB interfaces, else the first
 * non-loopback interfaces that are up (docker and virbr bridges excluded),
 * else loopback. `sysfs_net` ("/sys/class/net" normally) is read for the
 * PCI path and link speed. Returns the number found (0 is not an error). */
ncclResult_t moe_net_find_ifaces(const char* ifname_spec, const char* sysfs_net, moe_net_iface_t* devs,
                                int max_devs, int* ndev_p);

/* Formats an address as "ip<port>" for messages. */
const char* moe_net_addr_str(const struct sockaddr_storage* addr, char* buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
