/* SPDX-License-Identifier: Apache-2.0 */
/* The out-of-band harness of the multiproc tier and the benchmark
 * (tests/support/moe_procs.h), on the CPU: a hub spawns copies of this
 * program, which all-gather random bytes of random sizes through it and
 * check every rank's; a child that dies, stops or sends the wrong size makes
 * the others' all-gathers fail in bounded time with a message naming it;
 * the hub reaps (or kills) every child. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_common.h"
#include "tests/support/moe_procs.h"

#define CHILD_ROUNDS_MAX 16
#define MAX_BYTES 20000
#define REPORT_ROUND 1  /* value: the round done */
#define REPORT_FAILED 2 /* value: the round that failed; data: why */
#define REPORT_DONE 3
#define ENV_MODE "TEST_PROCS_MODE"
#define ENV_SEED "TEST_PROCS_SEED"
#define ENV_ROUNDS "TEST_PROCS_ROUNDS"

static unsigned char byte_of(unsigned long long seed, int round, int rank, size_t i) {
  unsigned long long x = seed ^ ((unsigned long long)round << 48) ^ ((unsigned long long)rank << 32) ^ i;
  x *= 0x9E3779B97F4A7C15ull;
  return (unsigned char)(x >> 56);
}

static size_t round_bytes(unsigned long long seed, int round) {
  moe_rng_t r;
  moe_rng_init(&r, seed + (unsigned long long)round);
  return moe_rng_below(&r, 4) == 0 ? 0 : 1 + moe_rng_below(&r, MAX_BYTES);
}

/* ------------------------------------------------------------ the child */
static int child_main(void) {
  moe_oob_t oob;
  if (moe_oob_attach(&oob, 3000) != 0) return 3;
  const char* mode = getenv(ENV_MODE);
  const unsigned long long seed = strtoull(getenv(ENV_SEED), NULL, 0);
  const int rounds = atoi(getenv(ENV_ROUNDS));
  unsigned char* send = malloc(MAX_BYTES);
  unsigned char* recv = malloc((size_t)MAX_BYTES * oob.nRanks);
  int rc = 0;
  for (int round = 0; round < rounds; round++) {
    size_t bytes = round_bytes(seed, round);
    /* "wrongsize": the last rank disagrees on the size of round 2. */
    if (strcmp(mode, "wrongsize") == 0 && round == 2 && oob.rank == oob.nRanks - 1) bytes += 8;
    for (size_t i = 0; i < bytes; i++) send[i] = byte_of(seed, round, oob.rank, i);
    if (moe_oob_allgather(send, recv, bytes, &oob) != 0) {
      moe_oob_report(&oob, REPORT_FAILED, round, oob.error, strlen(oob.error) + 1);
      rc = 0; /* the failure is what the test looks for */
      goto out;
    }
    for (int q = 0; q < oob.nRanks; q++)
      for (size_t i = 0; i < bytes; i++)
        if (recv[(size_t)q * bytes + i] != byte_of(seed, round, q, i)) {
          fprintf(stderr, "rank %d round %d: byte %zu of rank %d wrong\n", oob.rank, round, i, q);
          rc = 4;
          goto out;
        }
    moe_oob_report(&oob, REPORT_ROUND, round, NULL, 0);
  }
  moe_oob_report(&oob, REPORT_DONE, 0, NULL, 0);
out:
  free(send);
  free(recv);
  return rc;
}

/* ------------------------------------------------------------- the hub */
typedef struct {
  int victim, victimRound, victimSignal; /* signal the victim once it reported victimRound */
  int stopAfterFailures, failures;       /* stop serving after this many failure reports (0: never) */
  long long hitAt;
  int rounds[MOE_OOB_MAX_RANKS], failedRound[MOE_OOB_MAX_RANKS], done[MOE_OOB_MAX_RANKS];
  long long failedAt[MOE_OOB_MAX_RANKS];
  char why[MOE_OOB_MAX_RANKS][256];
} watch_t;

static int on_event(moe_hub_t* hub, const moe_hub_event_t* ev, void* arg) {
  watch_t* w = arg;
  if (ev->type != MOE_HUB_REPORT) return 0;
  if (ev->kind == REPORT_ROUND) {
    w->rounds[ev->rank] = (int)ev->value + 1;
    if (ev->rank == w->victim && ev->value == w->victimRound && w->hitAt == 0) {
      kill(moe_hub_pid(hub, ev->rank), w->victimSignal);
      w->hitAt = moe_oob_now_ns();
    }
  } else if (ev->kind == REPORT_FAILED) {
    w->failedRound[ev->rank] = (int)ev->value;
    w->failedAt[ev->rank] = ev->atNs;
    snprintf(w->why[ev->rank], sizeof(w->why[ev->rank]), "%.*s", (int)ev->bytes, (const char*)ev->data);
    if (++w->failures == w->stopAfterFailures) return 1;
  } else if (ev->kind == REPORT_DONE) {
    w->done[ev->rank] = 1;
  }
  return 0;
}

/* Spawns n children in `mode`, serves them, reaps them. */
static void run(int n, const char* mode, int rounds, watch_t* w, int* status) {
  char modeEnv[64], seedEnv[64], roundsEnv[64];
  const unsigned long long seed = moe_test_seed() ^ (unsigned long long)n;
  snprintf(modeEnv, sizeof(modeEnv), "%s=%s", ENV_MODE, mode);
  snprintf(seedEnv, sizeof(seedEnv), "%s=%llu", ENV_SEED, seed);
  snprintf(roundsEnv, sizeof(roundsEnv), "%s=%d", ENV_ROUNDS, rounds);
  const char* env[] = {modeEnv, seedEnv, roundsEnv, NULL};
  char* argv[] = {"/proc/self/exe", NULL};
  moe_hub_args_t a = {.nRanks = n, .argv = argv, .env = env};
  for (int r = 0; r < n; r++) w->failedRound[r] = -1;
  moe_hub_t* hub = NULL;
  ck_assert_int_eq(moe_hub_spawn(&a, &hub), 0);
  ck_assert_int_eq(moe_hub_nranks(hub), n);
  const int served = moe_hub_serve(hub, 20000, on_event, w);
  ck_assert_int_eq(moe_hub_reap(hub, 5000, status), 0);
  moe_hub_free(hub);
  ck_assert_int_eq(served, 0);
}

static watch_t* new_watch(void) {
  watch_t* w = calloc(1, sizeof(watch_t));
  w->victim = -1;
  return w;
}

START_TEST(test_allgathers_of_every_size) {
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed());
  const int n = 2 + (int)moe_rng_below(&rng, 6);
  watch_t* w = new_watch();
  int status[MOE_OOB_MAX_RANKS];
  setenv(ENV_MODE, "wrongsize", 1); /* the hub's variables win over this process's */
  run(n, "plain", CHILD_ROUNDS_MAX, w, status);
  unsetenv(ENV_MODE);
  for (int r = 0; r < n; r++) {
    char s[64];
    ck_assert_msg(WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0, "rank %d of %d: %s", r, n,
                  moe_hub_status_str(status[r], s, sizeof(s)));
    ck_assert_msg(w->done[r] && w->rounds[r] == CHILD_ROUNDS_MAX, "rank %d: %d rounds, failed at %d: %s", r,
                  w->rounds[r], w->failedRound[r], w->why[r]);
  }
  free(w);
}
END_TEST

/* A rank killed between rounds: the others' next all-gather fails at once. */
START_TEST(test_dead_rank_fails_the_others) {
  watch_t* w = new_watch();
  w->victim = 2, w->victimRound = 3, w->victimSignal = SIGKILL;
  int status[MOE_OOB_MAX_RANKS];
  run(4, "plain", CHILD_ROUNDS_MAX, w, status);
  ck_assert(WIFSIGNALED(status[2]) && WTERMSIG(status[2]) == SIGKILL);
  for (int r = 0; r < 4; r++) {
    if (r == 2) continue;
    ck_assert_msg(WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0, "rank %d", r);
    ck_assert_msg(w->failedRound[r] >= 3 && w->failedRound[r] <= 5, "rank %d failed at round %d", r,
                  w->failedRound[r]);
    ck_assert_msg(strstr(w->why[r], "rank 2") != NULL && strstr(w->why[r], "went away") != NULL, "rank %d: %s", r,
                  w->why[r]);
    ck_assert_msg(w->failedAt[r] - w->hitAt < 2000000000LL, "rank %d saw it after %lld ms", r,
                  (w->failedAt[r] - w->hitAt) / 1000000);
  }
  free(w);
}
END_TEST

/* A stopped rank: the others' all-gather times out (3 s) and says so; the
 * hub then kills the stopped one when it reaps. */
START_TEST(test_stopped_rank_times_out) {
  watch_t* w = new_watch();
  w->victim = 0, w->victimRound = 1, w->victimSignal = SIGSTOP;
  char modeEnv[] = ENV_MODE "=plain", roundsEnv[] = ENV_ROUNDS "=6";
  char seedEnv[64];
  snprintf(seedEnv, sizeof(seedEnv), "%s=%llu", ENV_SEED, (unsigned long long)moe_test_seed());
  const char* env[] = {modeEnv, seedEnv, roundsEnv, NULL};
  char* argv[] = {"/proc/self/exe", NULL};
  moe_hub_args_t a = {.nRanks = 3, .argv = argv, .env = env};
  for (int r = 0; r < 3; r++) w->failedRound[r] = -1;
  moe_hub_t* hub = NULL;
  ck_assert_int_eq(moe_hub_spawn(&a, &hub), 0);
  /* Until the two others reported their failure (the stopped one never closes its socket). */
  w->stopAfterFailures = 2;
  const int served = moe_hub_serve(hub, 8000, on_event, w);
  ck_assert_int_eq(served, 1);
  int status[3];
  ck_assert_int_eq(moe_hub_reap(hub, 2000, status), 1); /* the stopped rank */
  moe_hub_free(hub);
  ck_assert_int_eq(status[0], -1);
  int timedOut = 0;
  for (int r = 1; r < 3; r++) {
    /* The stop lands while rank 0 is in round 2 or already sent it. The
     * first survivor to give up times out; the other may instead hear that
     * the first went away. */
    ck_assert_msg(w->failedRound[r] == 2 || w->failedRound[r] == 3, "rank %d failed at round %d", r, w->failedRound[r]);
    timedOut += strstr(w->why[r], "no answer") != NULL;
    ck_assert_msg(strstr(w->why[r], "no answer") != NULL || strstr(w->why[r], "went away") != NULL, "rank %d: %s", r,
                  w->why[r]);
    const long long ms = (w->failedAt[r] - w->hitAt) / 1000000;
    ck_assert_msg(ms >= 2500 && ms < 4500, "rank %d gave up after %lld ms (its timeout: 3000)", r, ms);
  }
  ck_assert_int_ge(timedOut, 1);
  free(w);
}
END_TEST

START_TEST(test_size_mismatch_fails_everyone) {
  watch_t* w = new_watch();
  int status[MOE_OOB_MAX_RANKS];
  run(3, "wrongsize", 6, w, status);
  for (int r = 0; r < 3; r++) {
    ck_assert_msg(WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0, "rank %d", r);
    ck_assert_msg(w->failedRound[r] == 2, "rank %d failed at round %d: %s", r, w->failedRound[r], w->why[r]);
    ck_assert_msg(strstr(w->why[r], "the others are at round") != NULL, "rank %d: %s", r, w->why[r]);
  }
  free(w);
}
END_TEST

int main(void) {
  if (getenv(MOE_OOB_ENV_FD) != NULL) return child_main();
  moe_test_seed();
  Suite* s = suite_create("procs");
  TCase* tc = tcase_create("hub");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_allgathers_of_every_size);
  tcase_add_test(tc, test_dead_rank_fails_the_others);
  tcase_add_test(tc, test_stopped_rank_times_out);
  tcase_add_test(tc, test_size_mismatch_fails_everyone);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
