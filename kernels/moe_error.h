/* SPDX-License-Identifier: Apache-2.0 */
/* The comm's error record: a few ints of host-mapped memory that the kernels
 * (many blocks at once) and the host (the network proxy thread, an abort)
 * write, and the host reads. The protocol lives here once, both halves.
 *
 * Host and kernels claim in different words: a GPU's atomics on host memory
 * are atomic with respect to the CPU's only where the link has native host
 * atomics (not over PCIe on x86), so no kernel ever does an atomic on the
 * record.
 *  - The host half claims MOE_ERR_HOST with a compare-and-swap (CPU atomics,
 *    host memory). Host codes carry no details.
 *  - The kernels claim a word of device memory (the claim word) with
 *    atomicCAS, then the winner publishes into the record with plain stores:
 *    a non-fatal code to MOE_ERR_DEV_SOFT; a fatal code's details (what a
 *    timed-out wait waited for; MOE_ERR_WAIT = -1 when none) first, then, after
 *    a system fence, the code to MOE_ERR_DEV_FATAL. A loser never touches the
 *    record.
 *  - Claim rule, for both words: a non-fatal code (a bad batch: every rank
 *    keeps calling in step) claims only while the word is MOE_KERR_NONE; a
 *    fatal code (the comm is unusable, see moe_kerr_fatal) also replaces a
 *    non-fatal one; a fatal code is final. So each side has at most one
 *    non-fatal and one fatal winner.
 *  - A reader combines the sides: a fatal code if either side has one (both:
 *    the root cause first, moe_kerr_cause: a proxy failure explains a timed-out
 *    wait, which explains nothing about an abort), else the non-fatal one.
 *    Details belong to the kernels' fatal code and are read only when that is
 *    the code reported: load MOE_ERR_DEV_FATAL (acquire), then the details.
 *  - The kernels see the comm broken when their claim word or MOE_ERR_HOST is
 *    fatal.
 * Each rank has its own record and claim word; the racing writers are its own
 * kernels' threads and its own host threads. */
#ifndef MOE_ERROR_H_
#define MOE_ERROR_H_

#ifdef __cplusplus
extern "C" {
#endif

/* Error codes (the record's code word). */
enum {
  MOE_KERR_NONE = 0,
  MOE_KERR_TIMEOUT = 1,      /* a peer did not arrive in time (fatal) */
  MOE_KERR_BAD_EXPERT = 2,   /* a topk id outside [-1, numExperts) */
  MOE_KERR_CAPACITY = 3,     /* a rank received more than its capacity */
  MOE_KERR_MISMATCH = 4,     /* ranks disagree on hidden / type / topk */
  MOE_KERR_BAD_NOTIFY = 5,   /* a notify message with impossible counts (fatal) */
  MOE_KERR_NET = 6,          /* the network proxy failed: transport error, bad peer data (fatal) */
  MOE_KERR_ABORT = 7,        /* the host aborted the comm (ncclMoeCommAbort): every wait ends (fatal) */
};

/* What a wait waited for (the record's MOE_ERR_WAIT word after a timeout). */
typedef enum {
  MOE_WAIT_BARRIER = 0,   /* the intranode barrier (notify, end of dispatch / combine): epochs */
  MOE_WAIT_LL_COUNTS = 1, /* low latency: count messages (dispatch send): use numbers */
  MOE_WAIT_LL_DATA = 2,   /* low latency: dispatched rows (dispatch receive): use numbers */
  MOE_WAIT_LL_COMBINE = 3,/* low latency: combine rows (combine receive): use numbers */
  MOE_WAIT_NET = 4,       /* through the proxy: a node's slab sent / arrived: operation numbers */
  MOE_WAIT_NET_CHUNK = 5, /* through the proxy: chunks of a slab landed: progress words (moe_net_progress) */
} moe_wait_t;

/* Words of the record (ints; a 64-bit value takes two, low word first). */
enum {
  MOE_ERR_HOST = 0,      /* the host's code, claimed there by compare-and-swap */
  MOE_ERR_DEV_SOFT = 1,  /* the kernels' non-fatal code (their claim won in device memory) */
  MOE_ERR_DEV_FATAL = 2, /* the kernels' fatal code, stored after its details */
  MOE_ERR_WAIT = 3,      /* moe_wait_t of the kernels' fatal code; -1: no details */
  MOE_ERR_PEER = 4,      /* the rank that did not arrive; -1 when the waiter cannot tell */
  MOE_ERR_WANT = 5,      /* [2] the value waited for */
  MOE_ERR_SEEN = 7,      /* [2] the last value read */
  MOE_ERR_WORDS = 9
};

/* A timed-out wait: what, for which value, from whom, and what it saw. */
typedef struct {
  int wait;             /* moe_wait_t */
  int peer;
  unsigned long long want, seen;
} moe_error_details_t;

/* Functions of the kernels' headers that host and device code share. */
#ifdef __CUDACC__
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

/* Fatal codes end the comm: every later kernel does nothing, every entry
 * point fails. */
static inline MOE_HD int moe_kerr_fatal(int code) {
  return code == MOE_KERR_TIMEOUT || code == MOE_KERR_BAD_NOTIFY || code == MOE_KERR_NET || code == MOE_KERR_ABORT;
}

/* Whether `code` may replace `cur` in the code word (see the protocol). */
static inline MOE_HD int moe_kerr_replaces(int cur, int code) {
  return code != MOE_KERR_NONE && (cur == MOE_KERR_NONE || (!moe_kerr_fatal(cur) && moe_kerr_fatal(code)));
}

/* Of two fatal codes recorded on both sides, the one a reader reports: the
 * root cause (a failed proxy or a corrupt notify leaves waits to time out;
 * an abort ends waits too). */
static inline MOE_HD int moe_kerr_cause_rank(int code) {
  return code == MOE_KERR_NET ? 4 : code == MOE_KERR_BAD_NOTIFY ? 3 : code == MOE_KERR_TIMEOUT ? 2 : code == MOE_KERR_ABORT ? 1 : 0;
}

static inline MOE_HD int moe_kerr_cause(int a, int b) {
  return moe_kerr_cause_rank(b) > moe_kerr_cause_rank(a) ? b : a;
}

static inline MOE_HD void moe_error_put_u64(volatile int* rec, int word, unsigned long long v) {
  rec[word] = (int)(unsigned)v;
  rec[word + 1] = (int)(unsigned)(v >> 32);
}

static inline MOE_HD unsigned long long moe_error_get_u64(const volatile int* rec, int word) {
  return (unsigned long long)(unsigned)rec[word] | ((unsigned long long)(unsigned)rec[word + 1] << 32);
}

/* The winner's detail words (before it publishes them). */
static inline MOE_HD void moe_error_put_details(volatile int* rec, const moe_error_details_t* d) {
  rec[MOE_ERR_WAIT] = d->wait;
  rec[MOE_ERR_PEER] = d->peer;
  moe_error_put_u64(rec, MOE_ERR_WANT, d->want);
  moe_error_put_u64(rec, MOE_ERR_SEEN, d->seen);
}

/* --------------------------------------------------------------- claims */
/* The unit test defines this (as sched_yield()) to widen the windows between
 * the steps of a claim, where a race would show. */
#ifndef MOE_ERROR_TEST_PAUSE
#define MOE_ERROR_TEST_PAUSE() ((void)0)
#endif

/* Compare-and-swap on a claim word: a GPU's atomicCAS on device memory, or
 * the CPU's on host memory (where the host half's word is; the unit test's
 * stand-in for the kernels' claim word too). Returns the old value. */
static inline MOE_HD int moe_error_cas(int* word, int expected, int desired) {
#ifdef __CUDA_ARCH__
  return atomicCAS(word, expected, desired);
#else
  MOE_ERROR_TEST_PAUSE();
  __atomic_compare_exchange_n(word, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  return expected;
#endif
}

/* A fence that orders this thread's earlier writes before its later ones
 * for every observer (other GPUs, the CPU). */
static inline MOE_HD void moe_error_fence(void) {
#ifdef __CUDA_ARCH__
  __threadfence_system();
#else
  MOE_ERROR_TEST_PAUSE();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

/* Claims `word` for `code` by the claim rule: 1 when this call set it. */
static inline MOE_HD int moe_error_claim(int* word, int code) {
  int cur = MOE_KERR_NONE;
  if (code == MOE_KERR_NONE) return 0; /* nothing to record */
  for (;;) {
    const int prev = moe_error_cas(word, cur, code);
    if (prev == cur) return 1;
    if (!moe_kerr_replaces(prev, code)) return 0;
    cur = prev;
  }
}

/* The kernels' half, from any thread of any block (also run on the CPU by
 * the unit test): claims `claim` (device memory), and the winner publishes
 * `code` with its details (NULL: none; ignored unless the code is fatal) into
 * the record. Returns 1 when this call recorded it. Everything this thread
 * wrote before is visible to a reader that sees the code. */
static inline MOE_HD int moe_error_record_kernel(int* claim, volatile int* rec, int code,
                                                 const moe_error_details_t* d) {
  if (code == MOE_KERR_NONE) return 0;
  moe_error_fence(); /* this thread's earlier writes before the code */
  if (!moe_error_claim(claim, code)) return 0;
  if (!moe_kerr_fatal(code)) {
    rec[MOE_ERR_DEV_SOFT] = code;
    return 1;
  }
  if (d != NULL) moe_error_put_details(rec, d);
  else rec[MOE_ERR_WAIT] = -1;
  moe_error_fence(); /* the details before the word that publishes them */
  rec[MOE_ERR_DEV_FATAL] = code;
  return 1;
}

/* Whether the kernels' claim word or the host's code is fatal (the kernels'
 * view: every later kernel of the comm does nothing). */
static inline MOE_HD int moe_error_fatal(const volatile int* claim, const volatile int* rec) {
  return moe_kerr_fatal(*claim) || moe_kerr_fatal(rec[MOE_ERR_HOST]);
}

/* ------------------------------------------------------------ host half */
/* Records `code` (no details) on the host's side. Returns 1 when this call
 * set it, 0 when the host's word kept an earlier code. Everything this
 * thread wrote before (an error message, say) is visible to a reader that
 * sees the code. */
static inline int moe_error_record_host(volatile int* rec, int code) {
  return moe_error_claim((int*)&rec[MOE_ERR_HOST], code);
}

/* Reads the record (both sides combined, see the protocol): returns the
 * code; *d_p (may be NULL) gets the details and *has_p whether there are
 * any. */
static inline int moe_error_read_host(const volatile int* rec, moe_error_details_t* d_p, int* has_p) {
  const int host = __atomic_load_n(&rec[MOE_ERR_HOST], __ATOMIC_ACQUIRE);
  const int devFatal = __atomic_load_n(&rec[MOE_ERR_DEV_FATAL], __ATOMIC_ACQUIRE);
  const int devSoft = __atomic_load_n(&rec[MOE_ERR_DEV_SOFT], __ATOMIC_ACQUIRE);
  int code;
  if (moe_kerr_fatal(host) || devFatal != MOE_KERR_NONE)
    code = moe_kerr_cause(moe_kerr_fatal(host) ? host : MOE_KERR_NONE, devFatal);
  else
    code = devSoft != MOE_KERR_NONE ? devSoft : host;
  const int has = code == devFatal && devFatal != MOE_KERR_NONE && rec[MOE_ERR_WAIT] >= 0;
  if (d_p != NULL && has) {
    d_p->wait = rec[MOE_ERR_WAIT];
    d_p->peer = rec[MOE_ERR_PEER];
    d_p->want = moe_error_get_u64(rec, MOE_ERR_WANT);
    d_p->seen = moe_error_get_u64(rec, MOE_ERR_SEEN);
  }
  if (has_p != NULL) *has_p = has;
  return code;
}

#ifdef __cplusplus
}
#endif

#endif
