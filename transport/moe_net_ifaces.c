/* SPDX-License-Identifier: Apache-2.0 */
/* Interface discovery for TCP (transport/moe_net_ifaces.h). */
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/moe_check.h"
#include "transport/moe_net_ifaces.h"

#define MOE_NET_DEFAULT_SPEED_MBPS 10000

const char* moe_net_addr_str(const struct sockaddr_storage* addr, char* buf, size_t len) {
  char ip[INET6_ADDRSTRLEN] = "?";
  int port = 0;
  if (addr->ss_family == AF_INET) {
    const struct sockaddr_in* a = (const struct sockaddr_in*)addr;
    inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
    port = ntohs(a->sin_port);
  } else if (addr->ss_family == AF_INET6) {
    const struct sockaddr_in6* a = (const struct sockaddr_in6*)addr;
    inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
    port = ntohs(a->sin6_port);
  }
  snprintf(buf, len, "%s<%d>", ip, port);
  return buf;
}

static void moe_net_iface_dev_sysfs(const char* sysfs_net, moe_net_iface_t* dev) {
  char path[PATH_MAX];
  char resolved[PATH_MAX];
  dev->pci_path[0] = '\0';
  dev->speed_mbps = MOE_NET_DEFAULT_SPEED_MBPS;
  snprintf(path, sizeof(path), "%s/%s/device", sysfs_net, dev->name);
  if (realpath(path, resolved) != NULL && strlen(resolved) < sizeof(dev->pci_path))
    strcpy(dev->pci_path, resolved);
  snprintf(path, sizeof(path), "%s/%s/speed", sysfs_net, dev->name);
  FILE* f = fopen(path, "r");
  if (f != NULL) {
    int speed = 0;
    /* Virtual links report -1 or nothing: keep the default then. */
    if (fscanf(f, "%d", &speed) == 1 && speed > 0) dev->speed_mbps = speed;
    fclose(f);
  }
}

static int moe_net_iface_addr_usable(const struct sockaddr* sa) {
  if (sa == NULL) return 0;
  if (sa->sa_family == AF_INET) return 1;
  if (sa->sa_family != AF_INET6) return 0;
  /* Link-local IPv6 needs a scope id the peer cannot know. */
  return !IN6_IS_ADDR_LINKLOCAL(&((const struct sockaddr_in6*)sa)->sin6_addr);
}

/* Collects up interfaces matching `list`, one address each (IPv4 first). */
static int moe_net_iface_collect(struct ifaddrs* ifs, const moe_net_iflist_t* list, const char* sysfs_net,
                            moe_net_iface_t* devs, int max_devs) {
  int n = 0;
  for (int family_pass = 0; family_pass < 2; family_pass++) {
    int want = family_pass == 0 ? AF_INET : AF_INET6;
    for (struct ifaddrs* it = ifs; it != NULL && n < max_devs; it = it->ifa_next) {
      if (!moe_net_iface_addr_usable(it->ifa_addr) || it->ifa_addr->sa_family != want) continue;
      if ((it->ifa_flags & IFF_UP) == 0) continue;
      if (strlen(it->ifa_name) >= MOE_NET_IFNAME_MAX || !moe_net_iflist_match(list, it->ifa_name, -1)) continue;
      int dup = 0;
      for (int i = 0; i < n; i++) dup |= strcmp(devs[i].name, it->ifa_name) == 0;
      if (dup) continue;
      moe_net_iface_t* d = &devs[n++];
      memset(d, 0, sizeof(*d));
      strcpy(d->name, it->ifa_name);
      d->addr_len = want == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
      memcpy(&d->addr, it->ifa_addr, d->addr_len);
      moe_net_iface_dev_sysfs(sysfs_net, d);
    }
  }
  return n;
}

ncclResult_t moe_net_find_ifaces(const char* ifname_spec, const char* sysfs_net, moe_net_iface_t* devs,
                                int max_devs, int* ndev_p) {
  struct ifaddrs* ifs = NULL;
  if (getifaddrs(&ifs) != 0) return MOE_ERROR(ncclSystemError, "getifaddrs failed: %m");
  ncclResult_t res = ncclSuccess;
  int n = 0;
  if (ifname_spec != NULL && ifname_spec[0] != '\0') {
    moe_net_iflist_t list;
    MOE_CHECK_GOTO(moe_net_iflist_parse(ifname_spec, &list), res, out_free);
    n = moe_net_iface_collect(ifs, &list, sysfs_net, devs, max_devs);
    if (n == 0) MOE_WARN("NCCL_SOCKET_IFNAME=\"%s\" matches no interface that is up", ifname_spec);
  } else {
    static const char* const defaults[] = {"ib", "^docker,lo,virbr", "lo"};
    for (size_t i = 0; i < sizeof(defaults) / sizeof(defaults[0]) && n == 0; i++) {
      moe_net_iflist_t list;
      MOE_CHECK_GOTO(moe_net_iflist_parse(defaults[i], &list), res, out_free);
      n = moe_net_iface_collect(ifs, &list, sysfs_net, devs, max_devs);
    }
  }
  *ndev_p = n;
out_free:
  freeifaddrs(ifs);
  return res;
}
