/* SPDX-License-Identifier: Apache-2.0 */
#include "transport/moe_net_live.h"

#include <stdlib.h>

#include "common/moe_check.h"

#define MOE_NET_LIVE_TOMBSTONE 0xffffffffu
#define MOE_NET_LIVE_MIN_CAP 64

static size_t moe_net_live_hash(uintptr_t obj, size_t cap) {
  uint64_t x = (uint64_t)obj * 0x9E3779B97F4A7C15ull; /* Fibonacci hashing: spreads aligned pointers */
  return (size_t)(x >> 17) & (cap - 1);
}

/* The slot holding obj, or -1. Caller holds the lock. */
static long moe_net_live_find(const moe_net_live_t* set, uintptr_t obj) {
  if (set->cap == 0) return -1;
  for (size_t i = moe_net_live_hash(obj, set->cap), n = 0; n < set->cap; i = (i + 1) & (set->cap - 1), n++) {
    const moe_net_live_ent_t* e = &set->ent[i];
    if (e->kind == 0) return -1;
    if (e->kind != MOE_NET_LIVE_TOMBSTONE && e->obj == obj) return (long)i;
  }
  return -1;
}

static void moe_net_live_put(moe_net_live_ent_t* ent, size_t cap, uintptr_t obj, uint32_t kind) {
  size_t i = moe_net_live_hash(obj, cap);
  while (ent[i].kind != 0 && ent[i].kind != MOE_NET_LIVE_TOMBSTONE) i = (i + 1) & (cap - 1);
  ent[i] = (moe_net_live_ent_t){.obj = obj, .kind = kind};
}

/* Rehashes into a table sized for count + 1 entries at most half full. */
static ncclResult_t moe_net_live_grow(moe_net_live_t* set) {
  size_t cap = MOE_NET_LIVE_MIN_CAP;
  while (cap < 4 * (set->count + 1)) cap *= 2;
  moe_net_live_ent_t* ent = calloc(cap, sizeof(*ent));
  if (ent == NULL) return MOE_ERROR(ncclSystemError, "out of memory for the table of %zu live objects", set->count + 1);
  for (size_t i = 0; i < set->cap; i++)
    if (set->ent[i].kind != 0 && set->ent[i].kind != MOE_NET_LIVE_TOMBSTONE)
      moe_net_live_put(ent, cap, set->ent[i].obj, set->ent[i].kind);
  free(set->ent);
  set->ent = ent;
  set->cap = cap;
  set->used = set->count;
  return ncclSuccess;
}

ncclResult_t moe_net_live_add(moe_net_live_t* set, const void* obj, moe_net_live_kind_t kind) {
  ncclResult_t res = ncclSuccess;
  pthread_rwlock_wrlock(&set->lock);
  if (moe_net_live_find(set, (uintptr_t)obj) >= 0) {
    res = MOE_ERROR(ncclInternalError, "object %p registered as live twice", obj);
    goto out_unlock;
  }
  if (2 * (set->used + 1) > set->cap) MOE_CHECK_GOTO(moe_net_live_grow(set), res, out_unlock);
  moe_net_live_put(set->ent, set->cap, (uintptr_t)obj, (uint32_t)kind);
  set->used++;
  set->count++;
out_unlock:
  pthread_rwlock_unlock(&set->lock);
  return res;
}

int moe_net_live_has(moe_net_live_t* set, const void* obj, moe_net_live_kind_t kind) {
  pthread_rwlock_rdlock(&set->lock);
  long i = moe_net_live_find(set, (uintptr_t)obj);
  int live = i >= 0 && set->ent[i].kind == (uint32_t)kind;
  pthread_rwlock_unlock(&set->lock);
  return live;
}

int moe_net_live_take(moe_net_live_t* set, const void* obj, moe_net_live_kind_t kind) {
  pthread_rwlock_wrlock(&set->lock);
  long i = moe_net_live_find(set, (uintptr_t)obj);
  int live = i >= 0 && set->ent[i].kind == (uint32_t)kind;
  if (live) {
    set->ent[i].kind = MOE_NET_LIVE_TOMBSTONE;
    if (--set->count == 0) { /* nothing left: give the memory back */
      free(set->ent);
      set->ent = NULL;
      set->cap = set->used = 0;
    }
  }
  pthread_rwlock_unlock(&set->lock);
  return live;
}

void moe_net_live_clear(moe_net_live_t* set) {
  pthread_rwlock_wrlock(&set->lock);
  free(set->ent);
  set->ent = NULL;
  set->cap = set->used = set->count = 0;
  pthread_rwlock_unlock(&set->lock);
}
