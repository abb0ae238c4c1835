/* SPDX-License-Identifier: Apache-2.0 */
/* Verbs device and port discovery, NCCL_IB_HCA filtering and GID selection. */
#ifndef MOE_IB_DEVS_H_
#define MOE_IB_DEVS_H_

#include <stdint.h>

#include "net_ib/moe_ib_verbs.h"
#include "transport/moe_net_util.h"
#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_IB_SYSFS_ROOT "/sys/class/infiniband"
#define MOE_IB_MAX_GIDS 256

/* The GID rules in force (NCCL_IB_GID_INDEX, NCCL_IB_ADDR_FAMILY,
 * NCCL_IB_ROCE_VERSION_NUM). */
typedef struct {
  int gid_index;    /* >= 0: use exactly this entry; -1: choose */
  int family;       /* AF_INET, AF_INET6, or 0 = IPv4-mapped first, then IPv6 */
  int roce_version; /* 1 or 2 */
} moe_ib_gid_rules_t;

/* Parses NCCL_IB_ADDR_FAMILY ("", "AF_INET", "AF_INET6"). */
ncclResult_t moe_ib_parse_family(const char* text, int* family_p);

/* Picks the GID of a RoCE port from sysfs (`root`/<dev>/ports/<port>/gids/<i>
 * and gid_attrs/types/<i>): an explicit index wins; otherwise the lowest
 * index whose GID is set, of the wanted family (IPv4-mapped or a non-link-
 * local IPv6) and of the wanted RoCE version. */
ncclResult_t moe_ib_select_gid(const char* root, const char* dev, int port, const moe_ib_gid_rules_t* rules,
                               int* index_p, uint8_t gid_p[16]);

/* Port speed in Mbps from ibv_port_attr's active_speed and active_width codes. */
int moe_ib_port_speed_mbps(int active_speed, int active_width);

/* One usable (device, port): a device of this backend. */
typedef struct {
  char name[MOE_NET_NAME_MAX];
  char pci_path[MOE_NET_PATH_MAX];
  int port;
  int link;          /* moe_ib_link_t */
  uint16_t lid;
  int mtu;           /* enum ibv_mtu */
  int speed_mbps;
  uint64_t guid;
  int gid_index;
  uint8_t gid[16];
  int ptr_support;   /* NCCL_PTR_* */
  int dmabuf;        /* ibv_reg_dmabuf_mr works */
  int max_qp_wr;
  struct ibv_context* ctx;
  struct ibv_pd* pd;
} moe_ib_dev_t;

/* Opens every active port selected by `hca_spec` (NCCL_IB_HCA syntax).
 * Devices found: *ndev_p (0 is not an error). */
ncclResult_t moe_ib_find_devs(const moe_ib_verbs_t* v, const char* hca_spec, const moe_ib_gid_rules_t* rules,
                              moe_ib_dev_t* devs, int max_devs, int* ndev_p);
void moe_ib_close_devs(const moe_ib_verbs_t* v, moe_ib_dev_t* devs, int ndev);

/* The backend's table (registered with transport/ when the library loads). */
extern const moe_transport_t moe_transport_ib;

#ifdef __cplusplus
}
#endif
#endif
