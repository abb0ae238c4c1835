/* SPDX-License-Identifier: Apache-2.0 */
/* The error record (kernels/moe_error.h), both halves on CPU threads: the
 * kernels' half (claim word + published words; on the GPU the claim is an
 * atomicCAS in device memory, tests/gpu/test_error_record_gpu) and the host's
 * half racing to record different errors leave exactly one winner per side
 * and kind of claim (one from NONE, one fatal); the record reads as the
 * combination the protocol defines, with the kernels' fatal winner's details
 * intact; a reader racing with them never sees a code go back to none, a
 * fatal code give way to a non-fatal one or to a lesser cause, or details
 * that are not the winner's. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Writers yield between the steps of a claim: on a machine of few cores the
 * races then happen every round. */
#define MOE_ERROR_TEST_PAUSE() sched_yield()
#include "kernels/moe_error.h"
#include "test_common.h"

#define WRITERS 6
#define KERNEL_WRITERS 4 /* writers 0..3 play the kernels' half, the others the host's */
#define RECORDS 16 /* records raced for per round: each writer claims them all, in order */
#define ROUNDS 300

static const int codes[] = {MOE_KERR_BAD_EXPERT, MOE_KERR_CAPACITY, MOE_KERR_MISMATCH,
                            MOE_KERR_TIMEOUT,    MOE_KERR_BAD_NOTIFY, MOE_KERR_NET};
#define NCODES ((int)(sizeof(codes) / sizeof(codes[0])))

/* Details that name their writer and record (and use both words of the
 * 64-bit fields). */
static moe_error_details_t details_of(int round, int k, int id) {
  moe_error_details_t d;
  d.wait = id % (MOE_WAIT_NET_CHUNK + 1);
  d.peer = id;
  d.want = ((unsigned long long)(id + 1) << 40) | ((unsigned long long)k << 20) | (unsigned long long)round;
  d.seen = ~d.want;
  return d;
}

static int details_equal(const moe_error_details_t* a, const moe_error_details_t* b) {
  return a->wait == b->wait && a->peer == b->peer && a->want == b->want && a->seen == b->seen;
}

typedef struct {
  volatile int rec[RECORDS][MOE_ERR_WORDS];
  int claim[RECORDS];         /* the kernels' claim words */
  int code[RECORDS][WRITERS]; /* what each writer records this round */
  int won[RECORDS][WRITERS];
  int round;                  /* -1 while the main thread resets */
  atomic_int go;              /* round + 1: the writers' start signal */
  atomic_int readerStop;
  int readerBad;              /* the first inconsistency the reader saw, as a line number */
  pthread_barrier_t start, end;
} race_t;

typedef struct {
  race_t* r;
  int id;
} writer_arg_t;

static int record(race_t* r, int k, int id, int round) {
  const moe_error_details_t d = details_of(round, k, id);
  if (id < KERNEL_WRITERS) return moe_error_record_kernel(&r->claim[k], r->rec[k], r->code[k][id], &d);
  return moe_error_record_host(r->rec[k], r->code[k][id]);
}

static void* writer(void* p) {
  writer_arg_t* w = p;
  race_t* r = w->r;
  for (int i = 0; i < ROUNDS; i++) {
    pthread_barrier_wait(&r->start);
    while (atomic_load_explicit(&r->go, memory_order_acquire) != i + 1) sched_yield(); /* start together */
    for (int k = 0; k < RECORDS; k++) r->won[k][w->id] = record(r, k, w->id, i);
    pthread_barrier_wait(&r->end);
  }
  return NULL;
}

/* Reads the records while the writers race: a code only moves NONE ->
 * non-fatal -> fatal -> a fatal code of a deeper cause, and details, when
 * present, are those of a kernels' writer that recorded the code read. */
static void* reader(void* p) {
  race_t* r = p;
  int lastRound = -1, last[RECORDS];
  for (int k = 0; !atomic_load(&r->readerStop); k = (k + 1) % RECORDS) {
    moe_error_details_t d = {0, -1, 0, 0};
    const int round = __atomic_load_n(&r->round, __ATOMIC_ACQUIRE);
    if (round < 0) continue; /* being reset */
    int has = 0;
    const int code = moe_error_read_host(r->rec[k], &d, &has);
    const int peerCode = has && d.peer >= 0 && d.peer < KERNEL_WRITERS ? r->code[k][d.peer] : MOE_KERR_NONE;
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the reads above before the check below */
    if (__atomic_load_n(&r->round, __ATOMIC_RELAXED) != round) continue; /* reset meanwhile */
    if (round != lastRound) {
      lastRound = round;
      for (int j = 0; j < RECORDS; j++) last[j] = MOE_KERR_NONE;
    }
    int bad = 0;
    if (code == MOE_KERR_NONE && last[k] != MOE_KERR_NONE) bad = __LINE__;
    if (moe_kerr_fatal(last[k]) && (!moe_kerr_fatal(code) || moe_kerr_cause(last[k], code) != code)) bad = __LINE__;
    if (has && !moe_kerr_fatal(code)) bad = __LINE__;
    if (has) {
      if (d.peer < 0 || d.peer >= KERNEL_WRITERS) {
        bad = __LINE__;
      } else {
        const moe_error_details_t want = details_of(round, k, d.peer);
        if (!details_equal(&d, &want) || peerCode != code) bad = __LINE__;
      }
    }
    if (bad && r->readerBad == 0) r->readerBad = bad;
    last[k] = code;
  }
  return NULL;
}

/* One side's writers [from, to) after a round: at most one non-fatal winner,
 * exactly one fatal winner when any wrote a fatal code. Returns that side's fatal winner (-1: none) and in *soft its non-fatal
 * winner (-1: none). */
static int side_winners(race_t* r, int round, int k, int from, int to, int* soft) {
  int anyFatal = 0, fatalWins = 0, softWins = 0, fatal = -1;
  *soft = -1;
  for (int i = from; i < to; i++) anyFatal |= moe_kerr_fatal(r->code[k][i]);
  for (int i = from; i < to; i++) {
    if (!r->won[k][i]) continue;
    if (moe_kerr_fatal(r->code[k][i])) {
      fatalWins++;
      fatal = i;
    } else {
      softWins++;
      *soft = i;
    }
  }
  ck_assert_msg(softWins <= 1, "round %d record %d: %d non-fatal writers won on one side", round, k, softWins);
  ck_assert_msg(fatalWins == (anyFatal ? 1 : 0), "round %d record %d: %d fatal writers won on one side", round, k,
                fatalWins);
  ck_assert_msg(softWins + fatalWins > 0 || to == from, "round %d record %d: nobody won", round, k);
  return fatal;
}

/* After a round: the winners per side, and the record reads as their
 * combination. Returns whether a non-fatal code was replaced by a fatal
 * one. */
static int check_record(race_t* r, int round, int k) {
  int kSoft, hSoft;
  const int kFatal = side_winners(r, round, k, 0, KERNEL_WRITERS, &kSoft);
  const int hFatal = side_winners(r, round, k, KERNEL_WRITERS, WRITERS, &hSoft);
  const int kCode = kFatal >= 0 ? r->code[k][kFatal] : MOE_KERR_NONE;
  const int hCode = hFatal >= 0 ? r->code[k][hFatal] : hSoft >= 0 ? r->code[k][hSoft] : MOE_KERR_NONE;
  int want;
  if (kFatal >= 0 || hFatal >= 0) want = moe_kerr_cause(kCode, hFatal >= 0 ? hCode : MOE_KERR_NONE);
  else want = kSoft >= 0 ? r->code[k][kSoft] : hCode;
  moe_error_details_t d = {0, -1, 0, 0};
  int has = 0;
  const int code = moe_error_read_host(r->rec[k], &d, &has);
  ck_assert_int_eq(code, want);
  ck_assert_int_eq(r->rec[k][MOE_ERR_HOST], hCode);
  ck_assert_int_eq(r->rec[k][MOE_ERR_DEV_FATAL], kCode);
  ck_assert_int_eq(r->rec[k][MOE_ERR_DEV_SOFT], kSoft >= 0 ? r->code[k][kSoft] : MOE_KERR_NONE);
  if (kFatal < 0 || code != kCode) {
    ck_assert_msg(!has, "round %d record %d: details with code %d", round, k, code);
  } else {
    const moe_error_details_t wantD = details_of(round, k, kFatal);
    ck_assert_msg(has, "round %d record %d: no details after the kernels' fatal code", round, k);
    ck_assert_msg(details_equal(&d, &wantD), "round %d record %d: details are not those of writer %d (peer %d)",
                  round, k, kFatal, d.peer);
  }
  return (kSoft >= 0 && kFatal >= 0) || (hSoft >= 0 && hFatal >= 0);
}

START_TEST(test_racing_writers_one_winner) {
  moe_rng_t rng;
  moe_rng_init(&rng, moe_test_seed());
  race_t* r = calloc(1, sizeof(*r));
  ck_assert_ptr_nonnull(r);
  r->round = -1;
  pthread_barrier_init(&r->start, NULL, WRITERS + 1);
  pthread_barrier_init(&r->end, NULL, WRITERS + 1);
  pthread_t th[WRITERS], rd;
  writer_arg_t args[WRITERS];
  for (int i = 0; i < WRITERS; i++) {
    args[i] = (writer_arg_t){r, i};
    ck_assert_int_eq(pthread_create(&th[i], NULL, writer, &args[i]), 0);
  }
  ck_assert_int_eq(pthread_create(&rd, NULL, reader, r), 0);
  int upgrades = 0;
  for (int round = 0; round < ROUNDS; round++) {
    /* Fresh records and codes; the reader learns of the reset through round. */
    __atomic_store_n(&r->round, -1, __ATOMIC_RELEASE);
    for (int k = 0; k < RECORDS; k++) {
      for (int w = 0; w < MOE_ERR_WORDS; w++) r->rec[k][w] = 0;
      r->claim[k] = 0;
      for (int i = 0; i < WRITERS; i++) r->code[k][i] = codes[moe_rng_below(&rng, NCODES)];
    }
    __atomic_store_n(&r->round, round, __ATOMIC_RELEASE);
    pthread_barrier_wait(&r->start);
    atomic_store_explicit(&r->go, round + 1, memory_order_release);
    pthread_barrier_wait(&r->end);
    for (int k = 0; k < RECORDS; k++) upgrades += check_record(r, round, k);
  }
  atomic_store(&r->readerStop, 1);
  for (int i = 0; i < WRITERS; i++) pthread_join(th[i], NULL);
  pthread_join(rd, NULL);
  ck_assert_msg(r->readerBad == 0, "the reader saw an inconsistent record (check at line %d)", r->readerBad);
  ck_assert_msg(upgrades > 0, "no record had a non-fatal code replaced by a fatal one");
  pthread_barrier_destroy(&r->start);
  pthread_barrier_destroy(&r->end);
  free(r);
}
END_TEST

/* One thread, in order: the rules the race above relies on. */
START_TEST(test_claim_rules) {
  volatile int rec[MOE_ERR_WORDS] = {0};
  int claim = 0;
  moe_error_details_t d = {MOE_WAIT_NET_CHUNK, 3, 0xfedcba9876543210ull, 0x0123456789abcdefull}, got;
  int has = 1;
  ck_assert_int_eq(moe_error_read_host(rec, &got, &has), MOE_KERR_NONE);
  ck_assert_int_eq(has, 0);
  /* The kernels' half. A non-fatal code: claims from NONE only, never with details. */
  ck_assert_int_eq(moe_error_record_kernel(&claim, rec, MOE_KERR_CAPACITY, &d), 1);
  ck_assert_int_eq(moe_error_record_kernel(&claim, rec, MOE_KERR_MISMATCH, NULL), 0);
  ck_assert_int_eq(moe_error_read_host(rec, &got, &has), MOE_KERR_CAPACITY);
  ck_assert_int_eq(has, 0);
  ck_assert(!moe_error_fatal(&claim, rec));
  for (int w = MOE_ERR_DEV_FATAL; w < MOE_ERR_WORDS; w++) ck_assert_int_eq(rec[w], 0);
  /* A host code that is not fatal does not hide the kernels' one. */
  ck_assert_int_eq(moe_error_record_host(rec, MOE_KERR_MISMATCH), 1);
  ck_assert_int_eq(moe_error_read_host(rec, NULL, NULL), MOE_KERR_CAPACITY);
  /* A fatal code replaces it, with its details; nothing replaces a fatal code. */
  ck_assert_int_eq(moe_error_record_kernel(&claim, rec, MOE_KERR_TIMEOUT, &d), 1);
  moe_error_details_t other = {MOE_WAIT_BARRIER, 1, 5, 4};
  ck_assert_int_eq(moe_error_record_kernel(&claim, rec, MOE_KERR_NET, &other), 0);
  ck_assert_int_eq(moe_error_record_kernel(&claim, rec, MOE_KERR_TIMEOUT, &other), 0);
  ck_assert_int_eq(moe_error_record_kernel(&claim, rec, MOE_KERR_BAD_EXPERT, NULL), 0);
  ck_assert_int_eq(moe_error_read_host(rec, &got, &has), MOE_KERR_TIMEOUT);
  ck_assert_int_eq(has, 1);
  ck_assert(details_equal(&got, &d));
  ck_assert(moe_error_fatal(&claim, rec));
  /* The host's abort does not hide the kernels' timeout (the deeper cause);
   * the host's proxy failure does, and then there are no details. */
  ck_assert_int_eq(moe_error_record_host(rec, MOE_KERR_ABORT), 1);
  ck_assert_int_eq(moe_error_read_host(rec, &got, &has), MOE_KERR_TIMEOUT);
  ck_assert_int_eq(has, 1);
  volatile int rec2[MOE_ERR_WORDS] = {0};
  int claim2 = 0;
  ck_assert_int_eq(moe_error_record_kernel(&claim2, rec2, MOE_KERR_TIMEOUT, &d), 1);
  ck_assert_int_eq(moe_error_record_host(rec2, MOE_KERR_NET), 1);
  ck_assert_int_eq(moe_error_record_host(rec2, MOE_KERR_ABORT), 0);
  ck_assert_int_eq(moe_error_read_host(rec2, &got, &has), MOE_KERR_NET);
  ck_assert_int_eq(has, 0);
  /* The host's fatal code alone: the kernels see the comm broken. */
  volatile int rec3[MOE_ERR_WORDS] = {0};
  int claim3 = 0;
  ck_assert_int_eq(moe_error_record_host(rec3, MOE_KERR_ABORT), 1);
  ck_assert(moe_error_fatal(&claim3, rec3));
  ck_assert_int_eq(moe_error_read_host(rec3, NULL, &has), MOE_KERR_ABORT);
  ck_assert_int_eq(has, 0);
  /* The kernels' fatal code without details reads as one without details. */
  volatile int rec4[MOE_ERR_WORDS] = {0};
  int claim4 = 0;
  ck_assert_int_eq(moe_error_record_kernel(&claim4, rec4, MOE_KERR_BAD_NOTIFY, NULL), 1);
  ck_assert_int_eq(moe_error_read_host(rec4, &got, &has), MOE_KERR_BAD_NOTIFY);
  ck_assert_int_eq(has, 0);
}
END_TEST

START_TEST(test_fatal_codes) {
  ck_assert(moe_kerr_fatal(MOE_KERR_TIMEOUT) && moe_kerr_fatal(MOE_KERR_NET) && moe_kerr_fatal(MOE_KERR_BAD_NOTIFY));
  ck_assert(!moe_kerr_fatal(MOE_KERR_NONE) && !moe_kerr_fatal(MOE_KERR_BAD_EXPERT) &&
            !moe_kerr_fatal(MOE_KERR_CAPACITY) && !moe_kerr_fatal(MOE_KERR_MISMATCH));
  ck_assert(!moe_kerr_replaces(MOE_KERR_NONE, MOE_KERR_NONE));
  volatile int rec[MOE_ERR_WORDS] = {0};
  int claim = 0;
  ck_assert_int_eq(moe_error_record_host(rec, MOE_KERR_NONE), 0);
  ck_assert_int_eq(moe_error_record_kernel(&claim, rec, MOE_KERR_NONE, NULL), 0);
  ck_assert_int_eq(moe_kerr_cause(MOE_KERR_ABORT, MOE_KERR_TIMEOUT), MOE_KERR_TIMEOUT);
  ck_assert_int_eq(moe_kerr_cause(MOE_KERR_NET, MOE_KERR_TIMEOUT), MOE_KERR_NET);
  ck_assert_int_eq(moe_kerr_cause(MOE_KERR_TIMEOUT, MOE_KERR_BAD_NOTIFY), MOE_KERR_BAD_NOTIFY);
  ck_assert_int_eq(moe_error_read_host(rec, NULL, NULL), MOE_KERR_NONE);
}
END_TEST

int main(void) {
  Suite* s = suite_create("error_record");
  TCase* tc = tcase_create("record");
  tcase_add_test(tc, test_claim_rules);
  tcase_add_test(tc, test_fatal_codes);
  tcase_add_test(tc, test_racing_writers_one_winner);
  tcase_set_timeout(tc, 60);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
