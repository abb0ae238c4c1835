#include "transport/moe_net_util.h"

#include <errno.h>
#include <stdlib.h>

#include "common/moe_log.h"

#define MOE_NET_PORT_MAX 255

static ncclResult_t moe_net_ifent_parse(const char* text, size_t len, moe_net_ifent_t* ent_p) {
  const char* colon = memchr(text, ':', len);
  size_t name_len = colon != NULL ? (size_t)(colon - text) : len;
  if (name_len == 0 || name_len >= MOE_NET_IFNAME_MAX)
    return MOE_ERROR(ncclInvalidArgument, "interface list entry \"%.*s\": name empty or longer than %d",
                     (int)len, text, MOE_NET_IFNAME_MAX - 1);
  moe_net_ifent_t ent = {.port = -1};
  memcpy(ent.name, text, name_len);
  if (colon != NULL) {
    char digits[8] = "";
    size_t dlen = len - name_len - 1;
    if (dlen == 0 || dlen >= sizeof(digits))
      return MOE_ERROR(ncclInvalidArgument, "interface list entry \"%.*s\": bad port", (int)len, text);
    memcpy(digits, colon + 1, dlen);
    char* end = NULL;
    errno = 0;
    long port = strtol(digits, &end, 10);
    if (errno != 0 || *end != '\0' || port < 1 || port > MOE_NET_PORT_MAX)
      return MOE_ERROR(ncclInvalidArgument, "interface list entry \"%.*s\": port must be in [1, %d]",
                       (int)len, text, MOE_NET_PORT_MAX);
    ent.port = (int)port;
  }
  *ent_p = ent;
  return ncclSuccess;
}

ncclResult_t moe_net_iflist_parse(const char* spec, moe_net_iflist_t* list_p) {
  moe_net_iflist_t list = {0};
  if (spec == NULL) spec = "";
  if (spec[0] == '^') {
    list.exclude = 1;
    spec++;
  }
  if (spec[0] == '=') {
    list.exact = 1;
    spec++;
  }
  while (*spec != '\0') {
    const char* comma = strchr(spec, ',');
    size_t len = comma != NULL ? (size_t)(comma - spec) : strlen(spec);
    if (len > 0) {  /* NCCL tolerates empty entries ("a,,b"); so do we */
      if (list.count == MOE_NET_IFLIST_MAX)
        return MOE_ERROR(ncclInvalidArgument, "interface list has more than %d entries", MOE_NET_IFLIST_MAX);
      ncclResult_t res = moe_net_ifent_parse(spec, len, &list.ent[list.count]);
      if (res != ncclSuccess) return res;
      list.count++;
    }
    spec += len;
    if (*spec == ',') spec++;
  }
  *list_p = list;
  return ncclSuccess;
}

int moe_net_iflist_match(const moe_net_iflist_t* list, const char* name, int port) {
  if (list->count == 0) return 1;
  int found = 0;
  for (int i = 0; i < list->count && !found; i++) {
    const moe_net_ifent_t* e = &list->ent[i];
    int name_ok = list->exact ? strcmp(name, e->name) == 0 : strncmp(name, e->name, strlen(e->name)) == 0;
    int port_ok = e->port == -1 || port == -1 || e->port == port;
    found = name_ok && port_ok;
  }
  return found != list->exclude;
}

uint32_t moe_net_fnv1a(const void* data, size_t len) {
  const uint8_t* p = (const uint8_t*)data;
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < len; i++) {
    h ^= p[i];
    h *= 16777619u;
  }
  return h;
}
