/* SPDX-License-Identifier: Apache-2.0 */
/* Every environment parameter the library reads, parsed in one place.
 *
 * Values are read once, on first use. A malformed or out-of-range value gives
 * a warning and the default; it never fails or crashes. Tests that change the
 * environment call moe_env_reload(). */
#ifndef MOE_ENV_H_
#define MOE_ENV_H_

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_ENV_STR_MAX 256
/* Largest NCCL_MOE_NUM_SMS (the same bound as config.numSMs, NCCL_MOE_MAX_SMS). */
#define MOE_ENV_MAX_SMS 1024

typedef enum { MOE_NET_BACKEND_AUTO = 0, MOE_NET_BACKEND_IB, MOE_NET_BACKEND_SOCKET } moe_net_backend_t;

typedef struct {
  int debug_level;         /* NCCL_MOE_DEBUG: NONE|WARN|INFO|TRACE (moe_log_level_t), default WARN */
  int timeout_ms;          /* NCCL_MOE_TIMEOUT_MS: bound on every wait for a peer, default 60000 */
  int p2p_disable;         /* NCCL_MOE_P2P_DISABLE: 1 = never map peers' memory directly */
  int num_sms;             /* NCCL_MOE_NUM_SMS: SM budget override, 0 = config/auto */
  int net_backend;         /* NCCL_MOE_NET_BACKEND: auto|ib|socket (moe_net_backend_t) */
  int net_chunk_kb;        /* NCCL_MOE_NET_CHUNK_KB: smallest internode slab chunk, default 256 */
  char ibverbs_library[MOE_ENV_STR_MAX]; /* NCCL_MOE_IBVERBS_LIBRARY: what to dlopen instead of
                                            libibverbs.so.1 (e.g. the test verbs emulator); read
                                            once, when the ib backend first starts */
  char collnet_plugin[MOE_ENV_STR_MAX];  /* NCCL_MOE_COLLNET_PLUGIN: a CollNet plugin library whose
                                            ncclCollNetPlugin_v* we pass through, read when NCCL
                                            loads us; "" = we export no CollNet */
  /* NCCL's own variables, honoured with NCCL's meaning. */
  int ib_disable;                       /* NCCL_IB_DISABLE: 1 = no verbs backend (auto picks socket) */
  char ib_hca[MOE_ENV_STR_MAX];         /* NCCL_IB_HCA, "" = all devices */
  int ib_gid_index;                     /* NCCL_IB_GID_INDEX, -1 = choose by NCCL's rules */
  char ib_addr_family[MOE_ENV_STR_MAX]; /* NCCL_IB_ADDR_FAMILY, "" = any */
  int ib_roce_version;                  /* NCCL_IB_ROCE_VERSION_NUM, default 2 */
  int ib_qps_per_conn;                  /* NCCL_IB_QPS_PER_CONNECTION, default 1 */
  int ib_timeout;                       /* NCCL_IB_TIMEOUT, default 20 */
  int ib_retry_cnt;                     /* NCCL_IB_RETRY_CNT, default 7 */
  int ib_sl;                            /* NCCL_IB_SL, default 0 */
  int ib_tc;                            /* NCCL_IB_TC, default 0 */
  char socket_ifname[MOE_ENV_STR_MAX];  /* NCCL_SOCKET_IFNAME, "" = first non-loopback up */
  int socket_nthreads;                  /* NCCL_SOCKET_NTHREADS, default 2 */
  int socket_nsocks_per_thread;         /* NCCL_NSOCKS_PERTHREAD, default 2 */
  int socket_stripe_kb;                 /* NCCL_MOE_SOCKET_STRIPE_KB: smallest one-sided write the socket
                                           backend stripes over its data streams, 0 = never; default 256 */
  int net_gdr_level;                    /* NCCL_NET_GDR_LEVEL as a number (LOC=0..SYS=5), -1 = unset */
} moe_env_t;

/* The parsed environment (parsed on the first call). Never NULL. */
const moe_env_t* moe_env(void);

/* Parses the environment again (NCCL_MOE_DEBUG too). Not safe while other threads read moe_env(). */
void moe_env_reload(void);

/* The integer parser behind moe_env(), exposed for tests: parses `text` as a
 * base-10 integer in [min, max]; on NULL/empty returns `def` silently, on any
 * other failure warns (naming `name`) and returns `def`. */
int moe_env_parse_int(const char* name, const char* text, int def, int min, int max);

#ifdef __cplusplus
}
#endif
#endif
