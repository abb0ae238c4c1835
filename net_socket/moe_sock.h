/* Internals of the TCP backend shared between its files and its tests. */
#ifndef MOE_SOCK_H_
#define MOE_SOCK_H_

#include <net/if.h>
#include <sys/socket.h>

#include "net_socket/moe_sock_wire.h"
#include "transport/moe_net_util.h"
#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One usable interface (a device of this backend). */
typedef struct {
  char name[MOE_NET_IFNAME_MAX];
  struct sockaddr_storage addr; /* port 0 */
  socklen_t addr_len;
  char pci_path[MOE_NET_PATH_MAX];
  int speed_mbps;
} moe_sock_dev_t;

/* Finds the interfaces to use, as NCCL does: NCCL_SOCKET_IFNAME when set
 * (prefixes; '^' excludes, '=' exact), else IPoIB interfaces, else the first
 * non-loopback interfaces that are up (docker and virbr bridges excluded),
 * else loopback. `sysfs_net` ("/sys/class/net" normally) is read for the
 * PCI path and link speed. Returns the number found (0 is not an error). */
ncclResult_t moe_sock_find_devs(const char* ifname_spec, const char* sysfs_net, moe_sock_dev_t* devs,
                                int max_devs, int* ndev_p);

/* Formats an address as "ip<port>" for messages. */
const char* moe_sock_addr_str(const struct sockaddr_storage* addr, char* buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
