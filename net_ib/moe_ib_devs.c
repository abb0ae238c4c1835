/* SPDX-License-Identifier: Apache-2.0 */
#include "net_ib/moe_ib_devs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/moe_check.h"
#include "common/moe_env.h"
#include "net_ib/moe_ib_wire.h"

ncclResult_t moe_ib_parse_family(const char* text, int* family_p) {
  if (text == NULL || text[0] == '\0') *family_p = 0;
  else if (strcasecmp(text, "AF_INET") == 0) *family_p = AF_INET;
  else if (strcasecmp(text, "AF_INET6") == 0) *family_p = AF_INET6;
  else return MOE_ERROR(ncclInvalidArgument, "NCCL_IB_ADDR_FAMILY=\"%s\": expected AF_INET or AF_INET6", text);
  return ncclSuccess;
}

/* Reads a sysfs GID ("xxxx:xxxx:...:xxxx"); 0 when absent or malformed. */
static int moe_ib_read_gid(const char* path, uint8_t gid[16]) {
  FILE* f = fopen(path, "r");
  if (f == NULL) return 0;
  char text[64] = "";
  int ok = fgets(text, sizeof(text), f) != NULL;
  fclose(f);
  text[strcspn(text, "\n")] = '\0';
  return ok && inet_pton(AF_INET6, text, gid) == 1;
}

/* 1 or 2 from gid_attrs/types/<i> ("IB/RoCE v1", "RoCE v2"); 0 when unknown. */
static int moe_ib_read_roce_version(const char* path) {
  FILE* f = fopen(path, "r");
  if (f == NULL) return 0;
  char text[64] = "";
  int ok = fgets(text, sizeof(text), f) != NULL;
  fclose(f);
  if (!ok) return 0;
  if (strncmp(text, "RoCE v2", 7) == 0) return 2;
  if (strncmp(text, "IB/RoCE v1", 10) == 0 || strncmp(text, "RoCE v1", 7) == 0) return 1;
  return 0;
}

static int moe_ib_gid_family(const uint8_t gid[16]) {
  static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (memcmp(gid, mapped, 12) == 0) return AF_INET;
  if (gid[0] == 0xfe && (gid[1] & 0xc0) == 0x80) return 0; /* link-local: not routable between hosts */
  return AF_INET6;
}

/* One GID table entry: 1 read (gid, RoCE version 1/2 or 0 unknown), 0 empty
 * or unreadable, -1 past the end of the table. */
typedef int (*moe_ib_gid_reader_t)(void* arg, int index, uint8_t gid[16], int* version_p);

typedef struct {
  const char* root;
  const char* dev;
  int port;
} moe_ib_sysfs_gids_t;

static int moe_ib_sysfs_gid(void* arg, int index, uint8_t gid[16], int* version_p) {
  const moe_ib_sysfs_gids_t* s = (const moe_ib_sysfs_gids_t*)arg;
  char path[PATH_MAX];
  snprintf(path, sizeof(path), "%s/%s/ports/%d/gids/%d", s->root, s->dev, s->port, index);
  if (!moe_ib_read_gid(path, gid)) return access(path, F_OK) == 0 ? 0 : -1;
  snprintf(path, sizeof(path), "%s/%s/ports/%d/gid_attrs/types/%d", s->root, s->dev, s->port, index);
  *version_p = moe_ib_read_roce_version(path);
  return 1;
}

typedef struct {
  const moe_ib_verbs_t* v;
  struct ibv_context* ctx;
  int port;
  int table_len;
} moe_ib_verbs_gids_t;

static int moe_ib_verbs_gid(void* arg, int index, uint8_t gid[16], int* version_p) {
  const moe_ib_verbs_gids_t* g = (const moe_ib_verbs_gids_t*)arg;
  if (index >= g->table_len) return -1;
  struct ibv_gid_entry e;
  memset(&e, 0, sizeof(e));
  if (g->v->query_gid_ex(g->ctx, (uint32_t)g->port, (uint32_t)index, &e, 0, sizeof(e)) != 0) return 0; /* ENODATA: empty */
  memcpy(gid, e.gid.raw, 16);
  *version_p = e.gid_type == IBV_GID_TYPE_ROCE_V2 ? 2 : e.gid_type == IBV_GID_TYPE_ROCE_V1 ? 1 : 0;
  return 1;
}

/* NCCL's rules over a GID table: an explicit index wins; otherwise the lowest
 * index whose GID is set, of the wanted family (IPv4-mapped first unless
 * forced) and RoCE version. */
static ncclResult_t moe_ib_pick_gid(moe_ib_gid_reader_t read, void* arg, const char* dev, int port,
                                    const moe_ib_gid_rules_t* rules, int* index_p, uint8_t gid_p[16]) {
  uint8_t gid[16];
  int version = 0;
  if (rules->gid_index >= 0) {
    if (read(arg, rules->gid_index, gid, &version) != 1 || moe_all_zero(gid, 16))
      return MOE_ERROR(ncclInvalidArgument, "ib: NCCL_IB_GID_INDEX=%d: %s port %d has no GID there", rules->gid_index,
                       dev, port);
    *index_p = rules->gid_index;
    memcpy(gid_p, gid, 16);
    return ncclSuccess;
  }
  int families[2] = {rules->family != 0 ? rules->family : AF_INET, rules->family != 0 ? -1 : AF_INET6};
  for (int pass = 0; pass < 2; pass++) {
    if (families[pass] < 0) continue;
    for (int i = 0; i < MOE_IB_MAX_GIDS; i++) {
      int got = read(arg, i, gid, &version);
      if (got < 0) break; /* end of the table */
      if (got == 0 || moe_all_zero(gid, 16) || moe_ib_gid_family(gid) != families[pass]) continue;
      if (version != rules->roce_version) continue;
      *index_p = i;
      memcpy(gid_p, gid, 16);
      return ncclSuccess;
    }
  }
  return MOE_ERROR(ncclSystemError, "ib: %s port %d has no RoCE v%d GID of the wanted family (NCCL_IB_ADDR_FAMILY, "
                   "NCCL_IB_ROCE_VERSION_NUM, NCCL_IB_GID_INDEX)", dev, port, rules->roce_version);
}

ncclResult_t moe_ib_select_gid(const char* root, const char* dev, int port, const moe_ib_gid_rules_t* rules,
                               int* index_p, uint8_t gid_p[16]) {
  moe_ib_sysfs_gids_t s = {.root = root, .dev = dev, .port = port};
  return moe_ib_pick_gid(moe_ib_sysfs_gid, &s, dev, port, rules, index_p, gid_p);
}

/* sysfs when it has the port's GID table (NCCL's source), else the verbs
 * GID query (containers without /sys/class/infiniband, the verbs emulator). */
static ncclResult_t moe_ib_port_gid(const moe_ib_verbs_t* v, struct ibv_context* ctx, const char* dev, int port,
                                    int table_len, const moe_ib_gid_rules_t* rules, int* index_p, uint8_t gid_p[16]) {
  char path[PATH_MAX];
  snprintf(path, sizeof(path), "%s/%s/ports/%d/gids", MOE_IB_SYSFS_ROOT, dev, port);
  if (access(path, F_OK) == 0 || v->query_gid_ex == NULL)
    return moe_ib_select_gid(MOE_IB_SYSFS_ROOT, dev, port, rules, index_p, gid_p);
  moe_ib_verbs_gids_t g = {.v = v, .ctx = ctx, .port = port, .table_len = table_len};
  return moe_ib_pick_gid(moe_ib_verbs_gid, &g, dev, port, rules, index_p, gid_p);
}

int moe_ib_port_speed_mbps(int active_speed, int active_width) {
  int gbps;
  switch (active_speed) {
    case 1: gbps = 2500; break;     /* SDR, in Mbps per lane */
    case 2: gbps = 5000; break;     /* DDR */
    case 4: case 8: gbps = 10000; break; /* QDR, FDR10 */
    case 16: gbps = 14000; break;   /* FDR */
    case 32: gbps = 25000; break;   /* EDR */
    case 64: gbps = 50000; break;   /* HDR */
    case 128: gbps = 100000; break; /* NDR */
    case 256: gbps = 200000; break; /* XDR */
    default: gbps = 10000; break;
  }
  int lanes;
  switch (active_width) {
    case 1: lanes = 1; break;
    case 2: lanes = 4; break;
    case 4: lanes = 8; break;
    case 8: lanes = 12; break;
    case 16: lanes = 2; break;
    default: lanes = 1; break;
  }
  return gbps * lanes;
}

/* GPU memory support: dma-buf when the provider registers one (probed with an
 * invalid fd: EBADF means "would work", EOPNOTSUPP means never), else the
 * nvidia-peermem kernel module; none when NCCL_NET_GDR_LEVEL=LOC. */
static void moe_ib_probe_gdr(const moe_ib_verbs_t* v, moe_ib_dev_t* d) {
  d->ptr_support = NCCL_PTR_HOST;
  d->dmabuf = 0;
  if (moe_env()->net_gdr_level == 0) return;
  if (v->reg_dmabuf_mr != NULL) {
    errno = 0;
    struct ibv_mr* mr = v->reg_dmabuf_mr(d->pd, 0, 0, 0, -1, 0);
    if (mr != NULL) v->dereg_mr(mr);
    d->dmabuf = errno != EOPNOTSUPP && errno != EPROTONOSUPPORT;
  }
  int peermem = access("/sys/kernel/mm/memory_peers/nv_mem/version", F_OK) == 0 ||
                access("/sys/module/nvidia_peermem/version", F_OK) == 0;
  if (d->dmabuf) d->ptr_support |= NCCL_PTR_CUDA | NCCL_PTR_DMABUF;
  else if (peermem) d->ptr_support |= NCCL_PTR_CUDA;
}

static ncclResult_t moe_ib_open_port(const moe_ib_verbs_t* v, struct ibv_device* dev, struct ibv_context* ctx,
                                     const struct ibv_device_attr* dattr, int port,
                                     const moe_ib_gid_rules_t* rules, moe_ib_dev_t* d) {
  struct ibv_port_attr pattr;
  memset(&pattr, 0, sizeof(pattr));
  if (v->query_port(ctx, (uint8_t)port, &pattr) != 0 || pattr.state != IBV_PORT_ACTIVE) return ncclSystemError;
  if (pattr.link_layer != IBV_LINK_LAYER_INFINIBAND && pattr.link_layer != IBV_LINK_LAYER_ETHERNET)
    return ncclSystemError;
  memset(d, 0, sizeof(*d));
  snprintf(d->name, sizeof(d->name), "%s", v->get_device_name(dev));
  char path[PATH_MAX], real[PATH_MAX];
  snprintf(path, sizeof(path), "%s/%s/device", MOE_IB_SYSFS_ROOT, d->name);
  if (realpath(path, real) != NULL && strlen(real) < sizeof(d->pci_path)) strcpy(d->pci_path, real);
  d->port = port;
  d->link = pattr.link_layer == IBV_LINK_LAYER_INFINIBAND ? MOE_IB_LINK_IB : MOE_IB_LINK_ETH;
  d->lid = pattr.lid;
  d->mtu = pattr.active_mtu;
  d->speed_mbps = moe_ib_port_speed_mbps(pattr.active_speed, pattr.active_width);
  d->guid = dattr->node_guid;
  d->max_qp_wr = dattr->max_qp_wr;
  d->ctx = ctx;
  if (d->link == MOE_IB_LINK_ETH) {
    MOE_CHECK(moe_ib_port_gid(v, ctx, d->name, port, pattr.gid_tbl_len, rules, &d->gid_index, d->gid));
  } else {
    union ibv_gid gid;
    d->gid_index = rules->gid_index >= 0 ? rules->gid_index : 0;
    if (v->query_gid(ctx, (uint8_t)port, d->gid_index, &gid) == 0) memcpy(d->gid, gid.raw, 16);
  }
  d->pd = v->alloc_pd(ctx);
  if (d->pd == NULL) return MOE_ERROR(ncclSystemError, "ib: ibv_alloc_pd on %s failed: %m", d->name);
  moe_ib_probe_gdr(v, d);
  return ncclSuccess;
}

ncclResult_t moe_ib_find_devs(const moe_ib_verbs_t* v, const char* hca_spec, const moe_ib_gid_rules_t* rules,
                              moe_ib_dev_t* devs, int max_devs, int* ndev_p) {
  moe_net_iflist_t list;
  MOE_CHECK(moe_net_iflist_parse(hca_spec, &list));
  int nlist = 0;
  struct ibv_device** all = v->get_device_list(&nlist);
  int n = 0;
  for (int i = 0; all != NULL && i < nlist && n < max_devs; i++) {
    const char* name = v->get_device_name(all[i]);
    struct ibv_context* ctx = v->open_device(all[i]);
    if (ctx == NULL) continue;
    struct ibv_device_attr dattr;
    int used = 0;
    if (v->query_device(ctx, &dattr) == 0) {
      for (int port = 1; port <= dattr.phys_port_cnt && n < max_devs; port++) {
        if (!moe_net_iflist_match(&list, name, port)) continue;
        if (moe_ib_open_port(v, all[i], ctx, &dattr, port, rules, &devs[n]) != ncclSuccess) continue;
        MOE_INFO(NCCL_INIT | NCCL_NET, "ib device %d: %s port %d (%s, %d Mbps, GID index %d)", n, name, port,
                 devs[n].link == MOE_IB_LINK_IB ? "IB" : "RoCE", devs[n].speed_mbps, devs[n].gid_index);
        n++;
        used = 1;
      }
    }
    /* Ports share the context: it stays open when any port is used. */
    if (!used) v->close_device(ctx);
  }
  if (all != NULL) v->free_device_list(all);
  *ndev_p = n;
  return ncclSuccess;
}

void moe_ib_close_devs(const moe_ib_verbs_t* v, moe_ib_dev_t* devs, int ndev) {
  for (int i = 0; i < ndev; i++) {
    if (devs[i].pd != NULL) v->dealloc_pd(devs[i].pd);
    int shared = 0;
    for (int j = i + 1; j < ndev; j++) shared |= devs[j].ctx == devs[i].ctx;
    if (!shared) v->close_device(devs[i].ctx);
  }
}
