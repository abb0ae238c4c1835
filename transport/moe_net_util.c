/* SPDX-License-Identifier: Apache-2.0 */
#include "transport/moe_net_util.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>

#include "common/moe_log.h"

#define MOE_NET_PORT_MAX 255
#define MOE_NET_IFENT_FIELDS 3 /* port, rail, plane */

/* Parses a decimal field of an entry; "" gives `empty`. 0 when not a number in [lo, hi]. */
static int moe_net_ifent_number(const char* text, size_t len, int empty, long lo, long hi, int* value_p) {
  if (len == 0) {
    *value_p = empty;
    return 1;
  }
  char digits[16] = "";
  if (len >= sizeof(digits)) return 0;
  memcpy(digits, text, len);
  char* end = NULL;
  errno = 0;
  long v = strtol(digits, &end, 10);
  if (errno != 0 || *end != '\0' || v < lo || v > hi) return 0;
  *value_p = (int)v;
  return 1;
}

/* "name[:port[:rail[:plane]]]" as NCCL's parseStringList reads it: an empty
 * port means any port; rail and plane (newer NCCLs) are accepted and unused
 * here. Where NCCL would silently keep an entry that can never match (a port
 * that is not a number, an empty name), we report it instead. */
static ncclResult_t moe_net_ifent_parse(const char* text, size_t len, moe_net_ifent_t* ent_p) {
  const char* colon = memchr(text, ':', len);
  size_t name_len = colon != NULL ? (size_t)(colon - text) : len;
  if (name_len == 0 || name_len >= MOE_NET_IFNAME_MAX)
    return MOE_ERROR(ncclInvalidArgument, "interface list entry \"%.*s\": name empty or longer than %d",
                     (int)len, text, MOE_NET_IFNAME_MAX - 1);
  moe_net_ifent_t ent = {.port = -1};
  memcpy(ent.name, text, name_len);
  const char* field = colon != NULL ? colon + 1 : NULL;
  const char* stop = text + len;
  for (int f = 0; field != NULL && f < MOE_NET_IFENT_FIELDS; f++) {
    const char* next = memchr(field, ':', (size_t)(stop - field));
    size_t flen = (size_t)((next != NULL ? next : stop) - field);
    int value = -1;
    int ok = f == 0 ? moe_net_ifent_number(field, flen, -1, 1, MOE_NET_PORT_MAX, &value)
                    : moe_net_ifent_number(field, flen, -1, 0, INT_MAX, &value);
    if (!ok)
      return MOE_ERROR(ncclInvalidArgument, "interface list entry \"%.*s\": the %s must be a number%s", (int)len,
                       text, f == 0 ? "port" : f == 1 ? "rail" : "plane", f == 0 ? " in [1, 255]" : "");
    if (f == 0) ent.port = value;
    field = next != NULL ? next + 1 : NULL;
  }
  if (field != NULL)
    return MOE_ERROR(ncclInvalidArgument, "interface list entry \"%.*s\": more than name:port:rail:plane", (int)len,
                     text);
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
  /* An empty list matches everything, so "^" alone excludes everything (NCCL). */
  int found = list->count == 0;
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
