/* SPDX-License-Identifier: Apache-2.0 */
#include "common/moe_env.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/moe_log.h"

#define MOE_DEFAULT_TIMEOUT_MS 60000
#define MOE_DEFAULT_NET_CHUNK_KB 256
/* Striping is off until a GPU host shows it pays (docs/INTERNODE.md): on the
 * 2-core development machine it made 1-4 MiB writes slower. */
#define MOE_DEFAULT_SOCKET_STRIPE_KB 0

static moe_env_t moe_env_values;
static pthread_once_t moe_env_once = PTHREAD_ONCE_INIT;

int moe_env_parse_int(const char* name, const char* text, int def, int min, int max) {
  if (text == NULL || text[0] == '\0') return def;
  errno = 0;
  char* end = NULL;
  long v = strtol(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < min || v > max) {
    MOE_WARN("ignoring %s=\"%s\": expected an integer in [%d, %d]; using %d", name, text, min, max,
             def);
    return def;
  }
  return (int)v;
}

static int moe_env_int(const char* name, int def, int min, int max) {
  return moe_env_parse_int(name, getenv(name), def, min, max);
}

static void moe_env_str(const char* name, char* dst) {
  const char* v = getenv(name);
  dst[0] = '\0';
  if (v == NULL) return;
  if (strlen(v) >= MOE_ENV_STR_MAX) {
    MOE_WARN("ignoring %s: longer than %d characters", name, MOE_ENV_STR_MAX - 1);
    return;
  }
  strcpy(dst, v);
}

/* Maps `text` to the index of a matching name (case-insensitive), else def. */
static int moe_env_choice(const char* name, const char* const* names, int count, int def) {
  const char* v = getenv(name);
  if (v == NULL || v[0] == '\0') return def;
  for (int i = 0; i < count; i++)
    if (strcasecmp(v, names[i]) == 0) return i;
  MOE_WARN("ignoring %s=\"%s\": not a known value; using %s", name, v, names[def]);
  return def;
}

static const char* const moe_backend_names[] = {"auto", "ib", "socket"};
static const char* const moe_gdr_names[] = {"LOC", "PIX", "PXB", "PHB", "SYS"};

static int moe_env_gdr_level(void) {
  const char* v = getenv("NCCL_NET_GDR_LEVEL");
  if (v == NULL || v[0] == '\0') return -1;
  for (int i = 0; i < (int)(sizeof(moe_gdr_names) / sizeof(moe_gdr_names[0])); i++)
    if (strcasecmp(v, moe_gdr_names[i]) == 0) return i;
  return moe_env_parse_int("NCCL_NET_GDR_LEVEL", v, -1, 0, 5);
}

static void moe_env_parse(void) {
  moe_env_t* e = &moe_env_values;
  e->debug_level = moe_log_level();
  e->timeout_ms = moe_env_int("NCCL_MOE_TIMEOUT_MS", MOE_DEFAULT_TIMEOUT_MS, 1, INT_MAX);
  e->p2p_disable = moe_env_int("NCCL_MOE_P2P_DISABLE", 0, 0, 1);
  e->num_sms = moe_env_int("NCCL_MOE_NUM_SMS", 0, 0, MOE_ENV_MAX_SMS);
  e->net_backend = moe_env_choice("NCCL_MOE_NET_BACKEND", moe_backend_names, 3, MOE_NET_BACKEND_AUTO);
  e->net_chunk_kb = moe_env_int("NCCL_MOE_NET_CHUNK_KB", MOE_DEFAULT_NET_CHUNK_KB, 1, 1 << 20);
  moe_env_str("NCCL_MOE_IBVERBS_LIBRARY", e->ibverbs_library);
  moe_env_str("NCCL_MOE_COLLNET_PLUGIN", e->collnet_plugin);
  e->ib_disable = moe_env_int("NCCL_IB_DISABLE", 0, 0, INT_MAX) != 0; /* NCCL: any non-zero value */
  moe_env_str("NCCL_IB_HCA", e->ib_hca);
  e->ib_gid_index = moe_env_int("NCCL_IB_GID_INDEX", -1, -1, 255);
  moe_env_str("NCCL_IB_ADDR_FAMILY", e->ib_addr_family);
  e->ib_roce_version = moe_env_int("NCCL_IB_ROCE_VERSION_NUM", 2, 1, 2);
  e->ib_qps_per_conn = moe_env_int("NCCL_IB_QPS_PER_CONNECTION", 1, 1, 128);
  e->ib_timeout = moe_env_int("NCCL_IB_TIMEOUT", 20, 1, 31);
  e->ib_retry_cnt = moe_env_int("NCCL_IB_RETRY_CNT", 7, 0, 7);
  e->ib_sl = moe_env_int("NCCL_IB_SL", 0, 0, 15);
  e->ib_tc = moe_env_int("NCCL_IB_TC", 0, 0, 255);
  moe_env_str("NCCL_SOCKET_IFNAME", e->socket_ifname);
  e->socket_nthreads = moe_env_int("NCCL_SOCKET_NTHREADS", 2, 1, 16);
  e->socket_nsocks_per_thread = moe_env_int("NCCL_NSOCKS_PERTHREAD", 2, 1, 16);
  e->socket_stripe_kb = moe_env_int("NCCL_MOE_SOCKET_STRIPE_KB", MOE_DEFAULT_SOCKET_STRIPE_KB, 0, 1 << 20);
  e->net_gdr_level = moe_env_gdr_level();
}

const moe_env_t* moe_env(void) {
  pthread_once(&moe_env_once, moe_env_parse);
  return &moe_env_values;
}

void moe_env_reload(void) {
  pthread_once(&moe_env_once, moe_env_parse);
  moe_log_reload();
  moe_env_parse();
}
