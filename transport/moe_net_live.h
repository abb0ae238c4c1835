/* SPDX-License-Identifier: Apache-2.0 */
/* A registry of live objects: which pointers a layer handed out and has not
 * taken back yet.
 *
 * NCCL hands the plugin back opaque pointers (contexts, comms, registration
 * handles). A second close, deregMr or finalize of one of them points at
 * freed memory, so no field inside it (a magic number, a "closed" flag) can
 * tell: the compiler may even drop a store into memory that is freed right
 * after. The plugin looks the pointer up here first and only then touches
 * it; take() answers "was live" exactly once, so the second release of an
 * object is caught without reading it. */
#ifndef MOE_NET_LIVE_H_
#define MOE_NET_LIVE_H_

#include <nccl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What an entry is (an object is live as one kind at a time). */
typedef enum {
  MOE_NET_LIVE_CTX = 1,
  MOE_NET_LIVE_LISTEN,
  MOE_NET_LIVE_SEND,
  MOE_NET_LIVE_RECV,
  MOE_NET_LIVE_MR,
} moe_net_live_kind_t;

typedef struct {
  uintptr_t obj;
  uint32_t kind; /* moe_net_live_kind_t; 0 empty, MOE_NET_LIVE_TOMBSTONE removed */
} moe_net_live_ent_t;

/* Open addressing over a table that grows with the number of objects and is
 * freed when the last one is taken back. Lookups share a read lock. */
typedef struct {
  pthread_rwlock_t lock;
  moe_net_live_ent_t* ent;
  size_t cap;   /* a power of two, or 0 */
  size_t used;  /* live entries plus tombstones */
  size_t count; /* live entries */
} moe_net_live_t;

#define MOE_NET_LIVE_INITIALIZER {.lock = PTHREAD_RWLOCK_INITIALIZER}

/* Records `obj` as live; ncclSystemError when out of memory. */
ncclResult_t moe_net_live_add(moe_net_live_t* set, const void* obj, moe_net_live_kind_t kind);
/* 1 when `obj` is live as `kind`. */
int moe_net_live_has(moe_net_live_t* set, const void* obj, moe_net_live_kind_t kind);
/* Removes `obj` if it is live as `kind`: 1 when it was, 0 otherwise. */
int moe_net_live_take(moe_net_live_t* set, const void* obj, moe_net_live_kind_t kind);
/* Frees the table (library unload); every entry is forgotten. */
void moe_net_live_clear(moe_net_live_t* set);

#ifdef __cplusplus
}
#endif
#endif
