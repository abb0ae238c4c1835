/* SPDX-License-Identifier: Apache-2.0 */
/* Host-side polling without burning a core: a poll loop calls
 * moe_backoff_wait() after each unsuccessful check. The first checks follow
 * each other closely (a quick answer costs no sleep), then the thread yields,
 * then it sleeps for a time that doubles up to `maxSleepNs`. The loop's own
 * deadline still bounds the wait; this only spaces the checks. */
#ifndef MOE_BACKOFF_H_
#define MOE_BACKOFF_H_

#include <sched.h>
#include <stdint.h>
#include <time.h>

/* Checks in a row before the first yield, and yields before the first sleep. */
#define MOE_BACKOFF_SPINS 64
#define MOE_BACKOFF_YIELDS 64
#define MOE_BACKOFF_FIRST_SLEEP_NS 1000
/* The longest sleep of a connection loop (set-up: a millisecond is nothing). */
#define MOE_BACKOFF_SETUP_MAX_NS 1000000

typedef struct {
  uint32_t rounds;
  uint64_t sleepNs, maxSleepNs;
} moe_backoff_t;

static inline void moe_backoff_init(moe_backoff_t* b, uint64_t maxSleepNs) {
  b->rounds = 0;
  b->sleepNs = MOE_BACKOFF_FIRST_SLEEP_NS;
  b->maxSleepNs = maxSleepNs;
}

/* Progress was made: the next checks follow closely again. */
static inline void moe_backoff_reset(moe_backoff_t* b) { moe_backoff_init(b, b->maxSleepNs); }

static inline void moe_backoff_wait(moe_backoff_t* b) {
  if (b->rounds < MOE_BACKOFF_SPINS) {
    b->rounds++;
    return;
  }
  if (b->rounds < MOE_BACKOFF_SPINS + MOE_BACKOFF_YIELDS) {
    b->rounds++;
    sched_yield();
    return;
  }
  const uint64_t ns = b->sleepNs < b->maxSleepNs ? b->sleepNs : b->maxSleepNs;
  struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)};
  nanosleep(&ts, NULL);
  if (b->sleepNs < b->maxSleepNs) b->sleepNs *= 2;
}

#endif
