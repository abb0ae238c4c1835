/* SPDX-License-Identifier: Apache-2.0 */
/* Comm set-up on the host, without a GPU: the NCCL of the caller found at
 * run time (none loaded; a libnccl.so.2 loaded RTLD_LOCAL; one only in the
 * global symbol scope), config bounds, ncclMoeCommDestroy(NULL), the
 * transport reference the internode part holds, the connection loop's
 * back-off, the in-process all-gather of virtual ranks, and node grouping.
 * argv[1], argv[2]: the fake NCCL as libnccl.so.2 and under another name. */
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/moe_env.h"
#include "common/moe_log.h"
#include "core/moe_backoff.h"
#include "core/moe_bootstrap.h"
#include "core/moe_comm.h"
#include "core/moe_config.h"
#include "core/moe_inter.h"
#include "core/moe_nccl.h"
#include "nccl_moe.h"
#include "test_common.h"
#include "transport/moe_transport.h"

static const char* g_fake_soname;
static const char* g_fake_other;

static ncclMoeConfig_t small_config(void) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.maxTokensPerRank = 16, c.hidden = 256, c.numExperts = 8, c.maxTopk = 2;
  return c;
}

static int count_nccl(struct dl_phdr_info* info, size_t size, void* arg) {
  (void)size;
  const char* base = strrchr(info->dlpi_name, '/');
  base = base != NULL ? base + 1 : info->dlpi_name;
  if (strncmp(base, "libnccl.so", strlen("libnccl.so")) == 0) ++*(int*)arg;
  return 0;
}

static int loaded_nccl_objects(void) {
  int n = 0;
  dl_iterate_phdr(count_nccl, &n);
  return n;
}

static void* fn_address(const void* fn_field) {
  void* p;
  memcpy(&p, fn_field, sizeof(p));
  return p;
}

/* ------------------------------------------------------ NCCL at run time */
START_TEST(test_init_without_nccl_is_a_clear_error) {
  /* The preconditions, so that this test can fail: no NCCL anywhere. */
  ck_assert_int_eq(loaded_nccl_objects(), 0);
  ck_assert_ptr_null(dlsym(RTLD_DEFAULT, "ncclCommUserRank"));
  ncclMoeConfig_t c = small_config();
  ncclMoeComm_t untouched = (ncclMoeComm_t)(uintptr_t)0x5a5a;
  ncclMoeComm_t comm = untouched;
  ck_assert_int_eq(ncclMoeCommInit((ncclComm_t)(uintptr_t)0x1234, &c, &comm), ncclInvalidUsage);
  ck_assert_ptr_eq(comm, untouched);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "no NCCL is loaded in this process: ncclMoeCommInit needs the NCCL "
                                              "that created the communicator") != NULL,
                "message: %s", ncclMoeGetLastError());
  const moe_nccl_t* t = NULL;
  ck_assert_int_eq(moe_nccl_get(&t), ncclInvalidUsage);
  ck_assert_int_eq(ncclMoeCommInit(NULL, &c, &comm), ncclInvalidArgument);
}
END_TEST

START_TEST(test_resolver_finds_a_local_libnccl_by_link_map) {
  void* h = dlopen(g_fake_soname, RTLD_NOW | RTLD_LOCAL);
  ck_assert_msg(h != NULL, "dlopen %s: %s", g_fake_soname, dlerror());
  ck_assert_ptr_null(dlsym(RTLD_DEFAULT, "ncclCommUserRank")); /* not in the global scope */
  const moe_nccl_t* t = NULL;
  ck_assert_int_eq(moe_nccl_get(&t), ncclSuccess);
  ck_assert_msg(strstr(t->where, "libnccl.so.2") != NULL, "found in %s", t->where);
  ck_assert_ptr_eq(fn_address(&t->commUserRank), dlsym(h, "ncclCommUserRank"));
  ck_assert_ptr_eq(fn_address(&t->allGather), dlsym(h, "ncclAllGather"));
  const moe_nccl_t* again = NULL;
  ck_assert_int_eq(moe_nccl_get(&again), ncclSuccess);
  ck_assert_ptr_eq(again, t); /* resolved once */

  /* ncclMoeCommInit asks it: rank, count, then the device, which fails. */
  int* calls = dlsym(h, "fake_nccl_calls");
  ck_assert_ptr_nonnull(calls);
  ncclMoeConfig_t c = small_config();
  ncclMoeComm_t comm = NULL;
  ck_assert_int_eq(ncclMoeCommInit((ncclComm_t)(uintptr_t)0x1234, &c, &comm), ncclInvalidUsage);
  ck_assert_int_eq(*calls, 3);
  ck_assert_ptr_null(comm);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "ncclCommCuDevice") != NULL &&
                    strstr(ncclMoeGetLastError(), "libnccl.so.2") != NULL,
                "message: %s", ncclMoeGetLastError());
}
END_TEST

START_TEST(test_resolver_falls_back_to_the_global_scope) {
  void* h = dlopen(g_fake_other, RTLD_NOW | RTLD_GLOBAL);
  ck_assert_msg(h != NULL, "dlopen %s: %s", g_fake_other, dlerror());
  ck_assert_int_eq(loaded_nccl_objects(), 0); /* its name is no libnccl.so* */
  const moe_nccl_t* t = NULL;
  ck_assert_int_eq(moe_nccl_get(&t), ncclSuccess);
  ck_assert_str_eq(t->where, "the global symbol scope");
  ck_assert_ptr_eq(fn_address(&t->commCount), dlsym(h, "ncclCommCount"));
}
END_TEST

/* ------------------------------------------------------ config, destroy */
START_TEST(test_num_sms_is_bounded) {
  ncclMoeConfig_t c = small_config(), out;
  ck_assert_int_eq(NCCL_MOE_MAX_SMS, 1024);
  c.numSMs = NCCL_MOE_MAX_SMS;
  ck_assert_int_eq(moe_config_resolve(&c, 2, &out), ncclSuccess);
  ck_assert_int_eq(out.numSMs, NCCL_MOE_MAX_SMS);
  const int bad[] = {NCCL_MOE_MAX_SMS + 1, INT_MAX, -1};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    c.numSMs = bad[i];
    ck_assert_int_eq(moe_config_resolve(&c, 2, &out), ncclInvalidArgument);
    ck_assert_msg(strstr(ncclMoeGetLastError(), "config.numSMs") != NULL && strstr(ncclMoeGetLastError(), "1024"),
                  "numSMs %d: %s", bad[i], ncclMoeGetLastError());
  }
}
END_TEST

START_TEST(test_destroy_null_is_a_no_op) {
  ck_assert_int_eq(ncclMoeCommDestroy(NULL), ncclSuccess);
}
END_TEST

/* ------------------------------------------- the transport's reference */
static int g_inits, g_finis, g_devices;

static ncclResult_t fake_init(void) {
  g_inits++;
  return ncclSuccess;
}
static void fake_fini(void) { g_finis++; }
static ncclResult_t fake_devices(int* n) {
  *n = g_devices;
  return ncclSuccess;
}
static ncclResult_t fake_props(int dev, moe_net_props_t* p) {
  (void)dev;
  memset(p, 0, sizeof(*p));
  p->ptr_support = NCCL_PTR_HOST;
  return ncclSuccess;
}
static ncclResult_t fake_listen(int dev, void* handle, moe_net_comm_t** listen_p) {
  (void)dev, (void)handle, (void)listen_p;
  return ncclSystemError;
}
static const moe_transport_t g_fake = {.name = "fake", .kind = MOE_NET_KIND_SOCKET, .init = fake_init,
                                       .fini = fake_fini, .devices = fake_devices, .get_properties = fake_props,
                                       .listen = fake_listen};

static void use_fake_transport(void) {
  setenv("NCCL_MOE_NET_BACKEND", "socket", 1);
  moe_env_reload();
  moe_transport_register(&g_fake);
  g_inits = g_finis = 0;
}

/* A comm whose internode set-up fails at `devices` (no CUDA at all) or
 * later (pinned memory without a GPU, or the listen): the transport's init()
 * must be undone either way. */
static void create_fails_and_releases(int devices) {
  use_fake_transport();
  g_devices = devices;
  struct ncclMoeComm comm;
  memset(&comm, 0, sizeof(comm));
  comm.nRanks = 2;
  ncclMoeConfig_t c = small_config();
  ck_assert_int_eq(moe_config_resolve(&c, 2, &comm.config), ncclSuccess);
  moe_layout_compute(&comm.config, 2, &comm.layout);
  int nodeKey[2] = {0, 1};
  moe_topo_t topo;
  ck_assert_int_eq(moe_topo_build(2, 0, nodeKey, &topo), ncclSuccess);
  moe_inter_comm_t* inter = NULL;
  ck_assert_int_ne(moe_inter_create(&comm, &topo, &inter), ncclSuccess);
  ck_assert_ptr_null(inter);
  ck_assert_int_eq(g_inits, 1);
  ck_assert_int_eq(g_finis, 1);
}

START_TEST(test_internode_create_failure_releases_transport) {
  create_fails_and_releases(0);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "no device"));
  create_fails_and_releases(1);
}
END_TEST

START_TEST(test_internode_destroy_releases_transport) {
  use_fake_transport();
  moe_inter_comm_t* inter = calloc(1, sizeof(*inter));
  ck_assert_ptr_nonnull(inter);
  inter->transport = &g_fake;
  moe_inter_destroy(inter);
  ck_assert_int_eq(g_finis, 1);
  moe_inter_destroy(NULL);
  ck_assert_int_eq(g_finis, 1);
}
END_TEST

/* --------------------------------------------------------------- backoff */
static double seconds(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* A poll loop that waits ~100 ms for something that never comes uses a
 * small part of a core (it spun at 100% before). */
START_TEST(test_backoff_does_not_spin) {
  moe_backoff_t b;
  moe_backoff_init(&b, MOE_BACKOFF_SETUP_MAX_NS);
  const double wall0 = seconds(CLOCK_MONOTONIC), cpu0 = seconds(CLOCK_THREAD_CPUTIME_ID);
  long polls = 0;
  while (seconds(CLOCK_MONOTONIC) - wall0 < 0.1) {
    moe_backoff_wait(&b);
    polls++;
  }
  const double wall = seconds(CLOCK_MONOTONIC) - wall0, cpu = seconds(CLOCK_THREAD_CPUTIME_ID) - cpu0;
  printf("backoff: %ld polls, %.1f ms cpu in %.1f ms\n", polls, cpu * 1e3, wall * 1e3);
  ck_assert_msg(cpu < 0.25 * wall, "%.1f ms of cpu in %.1f ms", cpu * 1e3, wall * 1e3);
  ck_assert_int_gt(polls, MOE_BACKOFF_SPINS + MOE_BACKOFF_YIELDS); /* it still polls */
  /* The sleep grows to the cap and no further. */
  ck_assert_uint_ge(b.sleepNs, MOE_BACKOFF_SETUP_MAX_NS);
  ck_assert_uint_le(b.sleepNs, 2 * MOE_BACKOFF_SETUP_MAX_NS);
  moe_backoff_reset(&b);
  ck_assert_uint_eq(b.rounds, 0);
}
END_TEST

/* ---------------------------------------- the in-process all-gather */
#define AG_MAX_RANKS 16
#define AG_MAX_ROUNDS 8
#define AG_MAX_BYTES 4096

typedef struct {
  moe_local_member_t member;
  uint64_t seed;
  int rounds, abortAfter, skip;
  size_t bytes[AG_MAX_ROUNDS];
  int nRanks, failures, badBytes;
  char error[512];
} ag_rank_t;

static unsigned char ag_byte(uint64_t seed, int round, int rank, size_t i) {
  uint64_t x = seed ^ ((uint64_t)round << 48) ^ ((uint64_t)rank << 32) ^ i;
  x *= 0x9E3779B97F4A7C15ull;
  return (unsigned char)(x >> 56);
}

static void* ag_main(void* arg) {
  ag_rank_t* r = arg;
  unsigned char* send = malloc(AG_MAX_BYTES);
  unsigned char* recv = malloc((size_t)AG_MAX_RANKS * AG_MAX_BYTES);
  moe_rng_t rng;
  moe_rng_init(&rng, r->seed + (uint64_t)r->member.rank);
  for (int round = 0; round < r->rounds; round++) {
    if (round == r->abortAfter) {
      moe_local_group_abort(r->member.group, r->member.rank);
      break;
    }
    if (r->skip) break;
    const size_t n = r->bytes[round];
    for (size_t i = 0; i < n; i++) send[i] = ag_byte(r->seed, round, r->member.rank, i);
    if (moe_rng_below(&rng, 2)) usleep(moe_rng_below(&rng, 2000)); /* arrive in any order */
    memset(recv, 0xEE, (size_t)r->nRanks * n);
    if (moe_local_allgather(send, recv, n, &r->member) != 0) {
      r->failures++;
      snprintf(r->error, sizeof(r->error), "%s", moe_last_error());
      break;
    }
    for (int q = 0; q < r->nRanks; q++)
      for (size_t i = 0; i < n; i++)
        if (recv[(size_t)q * n + i] != ag_byte(r->seed, round, q, i)) r->badBytes++;
  }
  free(send);
  free(recv);
  return NULL;
}

/* Runs nRanks members for `rounds` rounds of random sizes. */
static void ag_run(ag_rank_t* ranks, int nRanks, int rounds, int timeoutMs, moe_local_group_t** group_p) {
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed() ^ 0xa11ull);
  size_t bytes[AG_MAX_ROUNDS];
  for (int i = 0; i < rounds; i++) bytes[i] = 1 + moe_rng_below(&rng, AG_MAX_BYTES);
  ck_assert_int_eq(moe_local_group_create(nRanks, timeoutMs, group_p), ncclSuccess);
  pthread_t th[AG_MAX_RANKS];
  for (int r = 0; r < nRanks; r++) {
    ranks[r].member = (moe_local_member_t){.group = *group_p, .rank = r};
    ranks[r].seed = moe_test_seed();
    ranks[r].rounds = rounds;
    ranks[r].nRanks = nRanks;
    memcpy(ranks[r].bytes, bytes, sizeof(bytes));
    ck_assert_int_eq(pthread_create(&th[r], NULL, ag_main, &ranks[r]), 0);
  }
  for (int r = 0; r < nRanks; r++) pthread_join(th[r], NULL);
}

START_TEST(test_local_allgather_rounds) {
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed());
  const int nRanks = 2 + (int)moe_rng_below(&rng, AG_MAX_RANKS - 1), rounds = 3 + (int)moe_rng_below(&rng, 6);
  ag_rank_t ranks[AG_MAX_RANKS];
  memset(ranks, 0, sizeof(ranks));
  for (int r = 0; r < AG_MAX_RANKS; r++) ranks[r].abortAfter = -1;
  moe_local_group_t* g = NULL;
  ag_run(ranks, nRanks, rounds, 10000, &g);
  for (int r = 0; r < nRanks; r++) {
    ck_assert_msg(ranks[r].failures == 0, "rank %d of %d: %s", r, nRanks, ranks[r].error);
    ck_assert_msg(ranks[r].badBytes == 0, "rank %d of %d: %d wrong bytes", r, nRanks, ranks[r].badBytes);
  }
  ck_assert_int_eq(moe_local_group_first_failure(g), -1);
  moe_local_group_destroy(g);
}
END_TEST

/* A member that fails ends the others' wait at once, naming it. */
START_TEST(test_local_allgather_abort) {
  ag_rank_t ranks[4];
  memset(ranks, 0, sizeof(ranks));
  for (int r = 0; r < 4; r++) ranks[r].abortAfter = r == 2 ? 1 : -1;
  moe_local_group_t* g = NULL;
  const double t0 = seconds(CLOCK_MONOTONIC);
  ag_run(ranks, 4, 3, 20000, &g);
  ck_assert_msg(seconds(CLOCK_MONOTONIC) - t0 < 10.0, "the abort was not seen before the timeout");
  for (int r = 0; r < 4; r++) {
    ck_assert_int_eq(ranks[r].badBytes, 0);
    if (r == 2) continue;
    ck_assert_int_eq(ranks[r].failures, 1);
    ck_assert_msg(strstr(ranks[r].error, "virtual rank 2 failed") != NULL, "rank %d: %s", r, ranks[r].error);
  }
  ck_assert_int_eq(moe_local_group_first_failure(g), 2);
  moe_local_group_destroy(g);
}
END_TEST

/* A member that never comes: the others give up after the timeout. */
START_TEST(test_local_allgather_timeout) {
  ag_rank_t ranks[3];
  memset(ranks, 0, sizeof(ranks));
  for (int r = 0; r < 3; r++) ranks[r].abortAfter = -1;
  ranks[1].skip = 1;
  moe_local_group_t* g = NULL;
  const double t0 = seconds(CLOCK_MONOTONIC);
  ag_run(ranks, 3, 2, 200, &g);
  const double s = seconds(CLOCK_MONOTONIC) - t0;
  ck_assert_msg(s >= 0.19 && s < 10.0, "%.2f s", s);
  ck_assert_int_eq(ranks[0].failures + ranks[2].failures, 2);
  ck_assert_msg(strstr(ranks[0].error, "within 200 ms") != NULL || strstr(ranks[0].error, "failed") != NULL, "%s",
                ranks[0].error);
  const int first = moe_local_group_first_failure(g);
  ck_assert(first == 0 || first == 2);
  moe_local_group_destroy(g);
}
END_TEST

static int fail_quietly(const void* send, void* recv, size_t bytes, void* ctx) {
  (void)send, (void)recv, (void)bytes, (void)ctx;
  return 42;
}

static int fail_remote(const void* send, void* recv, size_t bytes, void* ctx) {
  (void)send, (void)recv, (void)bytes, (void)ctx;
  return (int)MOE_ERROR(ncclRemoteError, "the store went away");
}

START_TEST(test_bootstrap_allgather_errors) {
  char send[8] = {0}, recv[16];
  moe_bootstrap_t b = {.rank = 1, .nRanks = 2, .allgather = fail_quietly};
  ck_assert_int_eq(moe_bootstrap_allgather(&b, send, recv, sizeof(send), "peer information"), ncclSystemError);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "rank 1: the bootstrap all-gather of peer information (8 bytes per "
                                              "rank) failed (42)") != NULL, "%s", ncclMoeGetLastError());
  b.allgather = fail_remote;
  ck_assert_int_eq(moe_bootstrap_allgather(&b, send, recv, sizeof(send), "network handles"), ncclRemoteError);
  ck_assert_msg(strstr(ncclMoeGetLastError(), "network handles") != NULL &&
                    strstr(ncclMoeGetLastError(), "the store went away") != NULL, "%s", ncclMoeGetLastError());
}
END_TEST

/* ------------------------------------------------------ node grouping */
static void host(moe_peer_info_t* p, const char* name, const char* bus) {
  memset(p, 0, sizeof(*p));
  snprintf(p->host, sizeof(p->host), "%s", name);
  snprintf(p->bootId, sizeof(p->bootId), "boot-%s", name);
  snprintf(p->busId, sizeof(p->busId), "%s", bus);
}

static void reach(moe_peer_info_t* p, const char* bus) {
  snprintf(p->reach[p->nReach++], MOE_BUS_ID_LEN, "%s", bus);
}

/* Ranks interleaved over two hosts: on host a every GPU maps every other
 * (one node), on host b one pair cannot (every rank of b its own node). */
START_TEST(test_node_keys) {
  static const char* const bus[4] = {"0000:01:00.0", "0000:02:00.0", "0000:03:00.0", "0000:04:00.0"};
  moe_peer_info_t all[8];
  for (int r = 0; r < 8; r++) {
    host(&all[r], r % 2 == 0 ? "a" : "b", bus[r / 2]);
    for (int d = 0; d < 4; d++)
      if (!(r == 3 && d == 3)) reach(&all[r], bus[d]); /* rank 3 (host b) cannot map bus 3 */
  }
  int key[8];
  moe_node_keys(all, 8, key);
  for (int r = 2; r < 8; r += 2) ck_assert_int_eq(key[r], key[0]);
  for (int r = 1; r < 8; r += 2)
    for (int q = 0; q < 8; q++)
      if (q != r) ck_assert_int_ne(key[r], key[q]);
  moe_topo_t topo;
  ck_assert_int_eq(moe_topo_build(8, 0, key, &topo), ncclInvalidArgument); /* 4 + 1 + 1 + 1 + 1 */
  /* Same host names on another boot are other hosts; a rank with
   * NCCL_MOE_P2P_DISABLE=1 splits its host. */
  for (int r = 0; r < 8; r++) {
    host(&all[r], "a", bus[r % 4]);
    if (r >= 4) snprintf(all[r].bootId, sizeof(all[r].bootId), "boot-again");
    for (int d = 0; d < 4; d++) reach(&all[r], bus[d]);
  }
  moe_node_keys(all, 8, key);
  for (int r = 0; r < 8; r++) ck_assert_int_eq(key[r], key[r < 4 ? 0 : 4]);
  ck_assert_int_ne(key[0], key[4]);
  ck_assert_int_eq(moe_topo_build(8, 5, key, &topo), ncclSuccess);
  ck_assert(topo.nNodes == 2 && topo.ranksPerNode == 4 && topo.node == 1 && topo.local == 1);
  all[6].p2pDisable = 1;
  moe_node_keys(all, 8, key);
  for (int r = 4; r < 8; r++)
    for (int q = 0; q < 8; q++)
      if (q != r) ck_assert_int_ne(key[r], key[q]);
}
END_TEST

/* ------------------------------------------------ out-of-band set-up */
static void good_info(moe_peer_info_t* p, int r, int n) {
  memset(p, 0, sizeof(*p));
  p->magic = MOE_BOOT_MAGIC;
  p->bytes = (uint32_t)sizeof(*p);
  p->rank = r;
  p->nRanks = n;
  p->pid = 100 + r;
  snprintf(p->host, sizeof(p->host), "host");
  snprintf(p->busId, sizeof(p->busId), "0000:0%d:00.0", r % 2);
  p->nReach = 1;
  snprintf(p->reach[0], sizeof(p->reach[0]), "%s", p->busId);
  ncclMoeConfig_t c = small_config();
  c.numExperts = 24; /* a multiple of every rank count used here */
  ck_assert_int_eq(moe_config_resolve(&c, n, &p->config), ncclSuccess);
}

/* Every kind of bad data from the all-gather is a clear error, and strings
 * arrive terminated whatever was sent. */
START_TEST(test_peer_infos_check) {
  enum { N = 3 };
  moe_peer_info_t all[N];
  for (int r = 0; r < N; r++) good_info(&all[r], r, N);
  memset(all[1].host, 'h', sizeof(all[1].host)); /* unterminated */
  memset(all[2].ipcError, 'e', sizeof(all[2].ipcError));
  ck_assert_int_eq(moe_peer_infos_check(all, N, 0), ncclSuccess);
  ck_assert_uint_lt(strlen(all[1].host), sizeof(all[1].host));
  ck_assert_uint_lt(strlen(all[2].ipcError), sizeof(all[2].ipcError));
  struct {
    const char* what;
    ncclResult_t want;
    const char* msg;
  } cases[] = {
      {"magic", ncclInvalidUsage, "not from this version"},   {"bytes", ncclInvalidUsage, "not from this version"},
      {"rank", ncclInvalidArgument, "says it is rank 0 of 3"}, {"nRanks", ncclInvalidArgument, "of 4, not rank 1 of 3"},
      {"status", ncclUnhandledCudaError, "rank 1 failed its set-up (unhandled cuda error, before the peer "
                                         "exchange): fffff"},
      {"hidden", ncclInvalidArgument, "hidden is 256 here and 512 there"},
      {"timeout", ncclInvalidArgument, "timeoutMs is"},
      {"nReach", ncclRemoteError, "impossible"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    for (int r = 0; r < N; r++) good_info(&all[r], r, N);
    moe_peer_info_t* p = &all[1];
    const char* w = cases[i].what;
    if (strcmp(w, "magic") == 0) p->magic ^= 1;
    if (strcmp(w, "bytes") == 0) p->bytes--;
    if (strcmp(w, "rank") == 0) p->rank = 0;
    if (strcmp(w, "nRanks") == 0) p->nRanks = 4;
    if (strcmp(w, "status") == 0) {
      p->status = ncclUnhandledCudaError;
      memset(p->failure, 'f', sizeof(p->failure)); /* unterminated */
      p->config.hidden = 0;                        /* a failed rank's config counts for nothing */
    }
    if (strcmp(w, "hidden") == 0) p->config.hidden = 512;
    if (strcmp(w, "timeout") == 0) p->config.timeoutMs++;
    if (strcmp(w, "nReach") == 0) p->nReach = MOE_MAX_VISIBLE_DEVICES + 1;
    ck_assert_msg(moe_peer_infos_check(all, N, 0) == cases[i].want, "%s: %d", w, moe_peer_infos_check(all, N, 0));
    ck_assert_msg(strstr(ncclMoeGetLastError(), cases[i].msg) != NULL, "%s: '%s'", w, ncclMoeGetLastError());
  }
}
END_TEST

START_TEST(test_config_diff_and_gpu_ranks) {
  ncclMoeConfig_t a = small_config(), b = small_config();
  long long x = 0, y = 0;
  ck_assert_ptr_null(moe_config_diff(&a, &b, &x, &y));
  b.llMaxTokensPerRank = 7; /* the last field */
  ck_assert_str_eq(moe_config_diff(&a, &b, &x, &y), "llMaxTokensPerRank");
  ck_assert(x == 0 && y == 7);
  b = a;
  b.maxTopk = 3;
  b.numSMs = 4;
  ck_assert_str_eq(moe_config_diff(&a, &b, &x, &y), "maxTopk"); /* the first that differs */
  /* Ranks 0, 2, 4 on bus 0 of one host, 1 and 3 on bus 1; rank 5 on bus 0 of another host. */
  moe_peer_info_t all[6];
  for (int r = 0; r < 6; r++) good_info(&all[r], r, 6);
  snprintf(all[5].host, sizeof(all[5].host), "other");
  ck_assert_int_eq(moe_gpu_ranks(all, 6, 0), 3);
  ck_assert_int_eq(moe_gpu_ranks(all, 6, 3), 2);
  ck_assert_int_eq(moe_gpu_ranks(all, 6, 5), 1);
  /* No bus id: the same process and ordinal only. */
  for (int r = 0; r < 6; r++) all[r].busId[0] = '\0', all[r].pid = 7, all[r].device = r % 2;
  ck_assert_int_eq(moe_gpu_ranks(all, 6, 0), 3);
}
END_TEST

/* All-gathers that break the contract, each on its own. */
static int ag_overrun(const void* send, void* recv, size_t bytes, void* ctx) {
  const int n = *(const int*)ctx;
  for (int r = 0; r < n; r++) memcpy((char*)recv + (size_t)r * bytes, send, bytes);
  memset((char*)recv + (size_t)n * bytes, 0, 8); /* one past the end */
  return 0;
}

static int ag_misplaced(const void* send, void* recv, size_t bytes, void* ctx) {
  const int n = *(const int*)ctx;
  memset(recv, 0x11, (size_t)n * bytes); /* rank r's own bytes are not at r * bytes */
  (void)send;
  return 0;
}

static int ag_copy(const void* send, void* recv, size_t bytes, void* ctx) {
  const int n = *(const int*)ctx;
  for (int r = 0; r < n; r++) memcpy((char*)recv + (size_t)r * bytes, send, bytes);
  return 0;
}

START_TEST(test_bootstrap_allgather_checks_the_callback) {
  int n = 3;
  char send[24], recv[3 * 24];
  memset(send, 0x42, sizeof(send));
  moe_bootstrap_t b = {.rank = 1, .nRanks = n, .allgather = ag_copy, .ctx = &n};
  ck_assert_int_eq(moe_bootstrap_allgather(&b, send, recv, sizeof(send), "x"), ncclSuccess);
  ck_assert_int_eq(recv[2 * 24 + 23], 0x42);
  b.allgather = ag_overrun;
  ck_assert_int_eq(moe_bootstrap_allgather(&b, send, recv, sizeof(send), "x"), ncclInvalidUsage);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "wrote past"));
  b.allgather = ag_misplaced;
  ck_assert_int_eq(moe_bootstrap_allgather(&b, send, recv, sizeof(send), "x"), ncclInvalidUsage);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "offset r * bytes"));
}
END_TEST

/* Rounds after the first: one rank's local failure is every rank's error,
 * naming it; without failures the payloads arrive. */
typedef struct {
  moe_local_member_t member;
  int nRanks;
  ncclResult_t local, res;
  int payload[4];
  int got[4 * 4];
  char error[512];
} round_rank_t;

static void* round_main(void* arg) {
  round_rank_t* r = arg;
  if (r->local != ncclSuccess) r->local = MOE_ERROR(r->local, "cannot map rank 0's buffer (a test)");
  r->res = moe_bootstrap_round(&(moe_bootstrap_t){.rank = r->member.rank, .nRanks = r->nRanks,
                                                  .allgather = moe_local_allgather, .ctx = &r->member},
                               r->local, r->payload, r->got, sizeof(r->payload), "test payload");
  snprintf(r->error, sizeof(r->error), "%s", r->res == ncclSuccess ? "" : moe_last_error());
  return NULL;
}

static void run_round(round_rank_t* ranks, int n) {
  moe_local_group_t* g = NULL;
  ck_assert_int_eq(moe_local_group_create(n, 10000, &g), ncclSuccess);
  pthread_t th[4];
  for (int r = 0; r < n; r++) {
    ranks[r].member = (moe_local_member_t){.group = g, .rank = r};
    ranks[r].nRanks = n;
    for (int i = 0; i < 4; i++) ranks[r].payload[i] = 10 * r + i;
    ck_assert_int_eq(pthread_create(&th[r], NULL, round_main, &ranks[r]), 0);
  }
  for (int r = 0; r < n; r++) pthread_join(th[r], NULL);
  moe_local_group_destroy(g);
}

START_TEST(test_rounds_carry_failures) {
  round_rank_t ranks[3];
  memset(ranks, 0, sizeof(ranks));
  run_round(ranks, 3);
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(ranks[r].res == ncclSuccess, "rank %d: %s", r, ranks[r].error);
    for (int q = 0; q < 3; q++)
      for (int i = 0; i < 4; i++) ck_assert_int_eq(ranks[r].got[q * 4 + i], 10 * q + i);
  }
  memset(ranks, 0, sizeof(ranks));
  ranks[1].local = ncclUnhandledCudaError;
  run_round(ranks, 3);
  for (int r = 0; r < 3; r++) {
    ck_assert_int_eq(ranks[r].res, ncclUnhandledCudaError);
    ck_assert_msg(strstr(ranks[r].error, "cannot map rank 0's buffer (a test)") != NULL, "rank %d: %s", r,
                  ranks[r].error);
    if (r != 1)
      ck_assert_msg(strstr(ranks[r].error, "rank 1 failed its set-up (unhandled cuda error, before the test "
                                           "payload exchange)") != NULL, "rank %d: %s", r, ranks[r].error);
  }
}
END_TEST

/* Round 1 between a rank that set up (a stand-in comm: no GPU here) and one
 * that failed: both return an error, the first naming the second. */
typedef struct {
  moe_local_member_t member;
  struct ncclMoeComm* comm;
  ncclResult_t local, res;
  char error[512];
} xchg_rank_t;

static void* xchg_main(void* arg) {
  xchg_rank_t* r = arg;
  if (r->local != ncclSuccess) r->local = MOE_ERROR(r->local, "out of device memory (a test)");
  moe_peer_info_t* all = NULL;
  moe_topo_t topo;
  r->res = moe_bootstrap_exchange(&(moe_bootstrap_t){.rank = r->member.rank, .nRanks = 2,
                                                     .allgather = moe_local_allgather, .ctx = &r->member},
                                  r->comm, r->local, &all, &topo);
  snprintf(r->error, sizeof(r->error), "%s", r->res == ncclSuccess ? "" : moe_last_error());
  free(all);
  return NULL;
}

static void run_exchange(xchg_rank_t* ranks) {
  moe_local_group_t* g = NULL;
  ck_assert_int_eq(moe_local_group_create(2, 10000, &g), ncclSuccess);
  pthread_t th[2];
  for (int r = 0; r < 2; r++) {
    ranks[r].member = (moe_local_member_t){.group = g, .rank = r};
    ck_assert_int_eq(pthread_create(&th[r], NULL, xchg_main, &ranks[r]), 0);
  }
  for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
  moe_local_group_destroy(g);
}

START_TEST(test_exchange_reports_failed_and_mismatched_ranks) {
  struct ncclMoeComm comms[2];
  memset(comms, 0, sizeof(comms));
  for (int r = 0; r < 2; r++) {
    ncclMoeConfig_t c = small_config();
    comms[r].rank = r, comms[r].nRanks = 2;
    ck_assert_int_eq(moe_config_resolve(&c, 2, &comms[r].config), ncclSuccess);
  }
  xchg_rank_t ranks[2];
  memset(ranks, 0, sizeof(ranks));
  ranks[0].comm = &comms[0];
  ranks[1].local = ncclSystemError;
  run_exchange(ranks);
  ck_assert_int_eq(ranks[1].res, ncclSystemError);
  ck_assert_ptr_nonnull(strstr(ranks[1].error, "out of device memory (a test)"));
  ck_assert_int_eq(ranks[0].res, ncclSystemError);
  ck_assert_msg(strstr(ranks[0].error, "rank 1 failed its set-up") != NULL &&
                    strstr(ranks[0].error, "out of device memory (a test)") != NULL, "%s", ranks[0].error);
  /* Both set up, with different configs: both refuse, naming the field. */
  memset(ranks, 0, sizeof(ranks));
  comms[1].config.numExperts = 16;
  ranks[0].comm = &comms[0], ranks[1].comm = &comms[1];
  run_exchange(ranks);
  for (int r = 0; r < 2; r++) {
    ck_assert_int_eq(ranks[r].res, ncclInvalidArgument);
    ck_assert_msg(strstr(ranks[r].error, "numExperts") != NULL, "rank %d: %s", r, ranks[r].error);
  }
}
END_TEST

/* ncclMoeCommInitOob: bad arguments fail before any all-gather; a rank
 * whose set-up fails (no GPU here, or a bad config) still takes part in the
 * first round, so its peers return instead of waiting. */
typedef struct {
  moe_local_member_t member;
  int calls;
  ncclMoeConfig_t config;
  ncclResult_t res;
  ncclMoeComm_t comm;
} oob_rank_t;

static int oob_counting_allgather(const void* send, void* recv, size_t bytes, void* ctx) {
  oob_rank_t* r = ctx;
  r->calls++;
  return moe_local_allgather(send, recv, bytes, &r->member);
}

static void* oob_main(void* arg) {
  oob_rank_t* r = arg;
  r->res = ncclMoeCommInitOob(r->member.rank, 2, oob_counting_allgather, r, &r->config, &r->comm);
  return NULL;
}

START_TEST(test_init_oob_arguments_and_failed_set_up) {
  oob_rank_t one;
  memset(&one, 0, sizeof(one));
  one.config = small_config();
  ncclMoeComm_t comm = NULL;
  ck_assert_int_eq(ncclMoeCommInitOob(0, 2, NULL, &one, &one.config, &comm), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeCommInitOob(0, 2, oob_counting_allgather, &one, &one.config, NULL), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeCommInitOob(2, 2, oob_counting_allgather, &one, &one.config, &comm), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "rank = 2"));
  ck_assert_int_eq(ncclMoeCommInitOob(-1, 2, oob_counting_allgather, &one, &one.config, &comm), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeCommInitOob(0, 0, oob_counting_allgather, &one, &one.config, &comm), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeCommInitOob(0, NCCL_MOE_MAX_RANKS + 1, oob_counting_allgather, &one, &one.config, &comm),
                   ncclInvalidArgument);
  ck_assert_int_eq(one.calls, 0);

  oob_rank_t ranks[2];
  memset(ranks, 0, sizeof(ranks));
  moe_local_group_t* g = NULL;
  ck_assert_int_eq(moe_local_group_create(2, 10000, &g), ncclSuccess);
  pthread_t th[2];
  for (int r = 0; r < 2; r++) {
    ranks[r].member = (moe_local_member_t){.group = g, .rank = r};
    ranks[r].config = small_config();
  }
  ranks[1].config.magic = 0; /* rank 1's config is bad; rank 0 has no GPU here */
  for (int r = 0; r < 2; r++) ck_assert_int_eq(pthread_create(&th[r], NULL, oob_main, &ranks[r]), 0);
  for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
  moe_local_group_destroy(g);
  ck_assert_int_ne(ranks[0].res, ncclSuccess);
  ck_assert_int_eq(ranks[1].res, ncclInvalidArgument);
  for (int r = 0; r < 2; r++) {
    ck_assert_ptr_null(ranks[r].comm);
    ck_assert_int_eq(ranks[r].calls, 1); /* the first round, then every rank stops */
  }
}
END_TEST

/* The abort mark: the host's side of the record, set by compare-and-swap;
 * a bad batch the kernels recorded gives way to it, a timeout they recorded
 * is what the comm reports (the root cause). */
START_TEST(test_abort_marks_the_error_record) {
  ck_assert_int_eq(ncclMoeCommAbort(NULL), ncclSuccess);
  struct ncclMoeComm comm;
  memset(&comm, 0, sizeof(comm));
  moe_comm_mark_aborted(&comm); /* never set up: nothing to mark */
  int rec[MOE_ERR_WORDS] = {0};
  comm.hostError = rec;
  ck_assert_int_eq(moe_comm_ready(&comm), ncclSuccess);
  rec[MOE_ERR_DEV_SOFT] = MOE_KERR_BAD_EXPERT; /* a bad batch: the comm stays usable */
  ck_assert_int_eq(moe_comm_ready(&comm), ncclSuccess);
  moe_comm_mark_aborted(&comm);
  ck_assert_int_eq(rec[MOE_ERR_HOST], MOE_KERR_ABORT);
  ck_assert_int_eq(moe_comm_ready(&comm), ncclInvalidUsage);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "aborted"));
  rec[MOE_ERR_WAIT] = -1;
  rec[MOE_ERR_DEV_FATAL] = MOE_KERR_TIMEOUT; /* the kernels' timeout explains more than the abort */
  ck_assert_int_eq(moe_comm_ready(&comm), ncclSystemError);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "did not answer"));
  moe_comm_mark_aborted(&comm);
  ck_assert_int_eq(moe_comm_ready(&comm), ncclSystemError);
  /* Abort's bounded wait: nothing of this comm runs, so it is idle at once. */
  ck_assert_int_eq(moe_comm_wait_idle_for(&comm, 1000), 1);
  for (int code = MOE_KERR_NONE; code <= MOE_KERR_ABORT; code++)
    ck_assert_int_eq(moe_kerr_fatal(code), code == MOE_KERR_TIMEOUT || code == MOE_KERR_BAD_NOTIFY ||
                                                    code == MOE_KERR_NET || code == MOE_KERR_ABORT);
}
END_TEST

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s FAKE_LIBNCCL_SO_2 FAKE_GLOBAL_NCCL_SO\n", argv[0]);
    return 1;
  }
  g_fake_soname = argv[1];
  g_fake_other = argv[2];
  moe_test_seed();
  Suite* s = suite_create("core_setup");
  TCase* tn = tcase_create("nccl_at_run_time");
  tcase_add_test(tn, test_init_without_nccl_is_a_clear_error);
  tcase_add_test(tn, test_resolver_finds_a_local_libnccl_by_link_map);
  tcase_add_test(tn, test_resolver_falls_back_to_the_global_scope);
  suite_add_tcase(s, tn);
  TCase* tc = tcase_create("comm");
  tcase_add_test(tc, test_num_sms_is_bounded);
  tcase_add_test(tc, test_destroy_null_is_a_no_op);
  tcase_add_test(tc, test_internode_create_failure_releases_transport);
  tcase_add_test(tc, test_internode_destroy_releases_transport);
  tcase_add_test(tc, test_backoff_does_not_spin);
  suite_add_tcase(s, tc);
  TCase* tb = tcase_create("bootstrap");
  tcase_set_timeout(tb, 60);
  tcase_add_test(tb, test_local_allgather_rounds);
  tcase_add_test(tb, test_local_allgather_abort);
  tcase_add_test(tb, test_local_allgather_timeout);
  tcase_add_test(tb, test_bootstrap_allgather_errors);
  tcase_add_test(tb, test_node_keys);
  tcase_add_test(tb, test_peer_infos_check);
  tcase_add_test(tb, test_config_diff_and_gpu_ranks);
  tcase_add_test(tb, test_bootstrap_allgather_checks_the_callback);
  tcase_add_test(tb, test_rounds_carry_failures);
  tcase_add_test(tb, test_exchange_reports_failed_and_mismatched_ranks);
  tcase_add_test(tb, test_init_oob_arguments_and_failed_set_up);
  tcase_add_test(tb, test_abort_marks_the_error_record);
  suite_add_tcase(s, tb);
  return moe_test_run(s);
}
