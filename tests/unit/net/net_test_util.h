/* SPDX-License-Identifier: Apache-2.0 */
/* Helpers for the net-plugin tests: load the built plugin with dlopen and
 * drive it the way NCCL's proxy thread does (non-blocking connect/accept
 * retried until non-NULL, requests retried when NULL, test() polled). */
#ifndef MOE_NET_TEST_UTIL_H_
#define MOE_NET_TEST_UTIL_H_

#include <nccl.h>
#include <stddef.h>
#include <stdint.h>

#include "nccl_net/net.h"

/* Wall-clock bound for any loop in the tests: a hang is a failure. */
#define NET_TEST_DEADLINE_MS 20000

typedef struct {
  void* lib;
  ncclNet_v11_t* net;
} net_plugin_t;

/* Sets the environment every test wants: the socket backend unless the run
 * chose another (NCCL_MOE_NET_BACKEND), the loopback interface. */
void net_test_env(void);
/* 1 when this run drives the ib backend (over the verbs emulator in CI). */
int net_test_ib(void);
/* 1 when that ib backend runs on the verbs emulator (NCCL_MOE_IBVERBS_LIBRARY),
 * whose device names and properties the tests know; 0 on a real HCA. */
int net_test_emulated(void);

/* dlopen()s `path` (NULL: $MOE_NET_PLUGIN_PATH) and finds ncclNetPlugin_v11. */
int net_plugin_load(const char* path, net_plugin_t* p);
void net_plugin_unload(net_plugin_t* p);
/* The loaded plugin's ncclMoeGetLastError() (its own copy, not this
 * program's): the message of the last failure on this thread. */
const char* net_plugin_last_error(const net_plugin_t* p);

/* Connects a send comm to a recv comm on `dev`, calling connect and accept
 * alternately until both are non-NULL. Returns ncclSuccess or the error. */
ncclResult_t net_connect_pair(ncclNet_v11_t* net, void* ctx, int dev, void** send_comm, void** recv_comm,
                              void** listen_comm);

/* Polls test() until done (yielding between calls); sizes may be NULL. */
ncclResult_t net_wait(ncclNet_v11_t* net, void* request, int* sizes);

/* isend/irecv retried while they hand back a NULL request. */
ncclResult_t net_isend(ncclNet_v11_t* net, void* comm, void* data, size_t size, int tag, void* mh, void** req);
ncclResult_t net_irecv(ncclNet_v11_t* net, void* comm, int n, void** data, size_t* sizes, int* tags, void** mh,
                       void** req);

/* regMr of host memory as NCCL does it (every buffer NCCL hands to isend,
 * irecv and iflush is registered); NULL on failure. */
void* net_reg(ncclNet_v11_t* net, void* comm, void* data, size_t size);
void net_dereg(ncclNet_v11_t* net, void* comm, void* mh);

/* Fills/checks a deterministic pattern for (seed, size). */
void net_fill(void* buf, size_t size, uint64_t seed);
int net_check(const void* buf, size_t size, uint64_t seed);

uint64_t net_now_ms(void);

/* A region of `size` bytes filled with `fill` between two guard areas
 * (NET_GUARD bytes of NET_GUARD_BYTE each side); net_guarded_free frees it
 * and returns 0 when a guard was overwritten. */
#define NET_GUARD 4096
#define NET_GUARD_BYTE 0xE7
char* net_guarded_alloc(size_t size, int fill);
int net_guarded_free(char* region, size_t size);

/* Whether the n bytes at p all equal v. */
int net_all_bytes(const char* p, size_t n, int v);

#endif
