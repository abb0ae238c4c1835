/* SPDX-License-Identifier: Apache-2.0 */
/* The comm's error record: a few ints of host-mapped memory that the kernels
 * (many blocks at once) and the network proxy thread (on the CPU) write, and
 * the host reads. The protocol lives here once, both halves: the host half is
 * plain C (the proxy, moe_comm_error and the unit test use it), the device
 * half is compiled only by nvcc.
 *
 * Protocol:
 *  - A writer claims the record with a compare-and-swap on the code word
 *    (device: atomicCAS_system; host: __atomic_compare_exchange_n), never a
 *    plain store. A non-fatal code (a bad batch: every rank keeps calling in
 *    step) claims it only while it is MOE_KERR_NONE; a fatal code (the comm is
 *    unusable, see moe_kerr_fatal) also replaces a non-fatal one, so a comm
 *    that broke after a bad batch still reads as broken. A fatal code is final.
 *  - Details (what a timed-out wait waited for) exist only with a fatal code,
 *    and only its winner writes them: the detail words first, then
 *    MOE_ERR_DETAILS = that code, with release. A loser never touches them.
 *  - A reader loads the code (acquire), then MOE_ERR_DETAILS (acquire): equal
 *    to the code, the detail words are complete and final; otherwise there
 *    are none (not yet, or none for this code).
 * Each rank has its own record; the racing writers are its own kernels'
 * threads and its own proxy thread. */
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
  MOE_ERR_CODE = 0,     /* MOE_KERR_*, claimed by compare-and-swap */
  MOE_ERR_DETAILS = 1,  /* the code whose details below are complete; else none */
  MOE_ERR_WAIT = 2,     /* moe_wait_t */
  MOE_ERR_PEER = 3,     /* the rank that did not arrive; -1 when the waiter cannot tell */
  MOE_ERR_WANT = 4,     /* [2] the value waited for */
  MOE_ERR_SEEN = 6,     /* [2] the last value read */
  MOE_ERR_WORDS = 8
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

/* ------------------------------------------------------------ host half */
/* The unit test defines this (as sched_yield()) to widen the windows between
 * the steps of a claim, where a race would show. */
#ifndef MOE_ERROR_TEST_PAUSE
#define MOE_ERROR_TEST_PAUSE() ((void)0)
#endif

/* Records `code` with its details (NULL: none; ignored unless the code is
 * fatal). Returns 1 when this call set the code, 0 when the record kept an
 * earlier one. Everything this thread wrote before (an error message, say)
 * is visible to a reader that sees the code. */
static inline int moe_error_record_host(volatile int* rec, int code, const moe_error_details_t* d) {
  int cur = MOE_KERR_NONE;
  if (code == MOE_KERR_NONE) return 0; /* nothing to record */
  MOE_ERROR_TEST_PAUSE();
  while (!__atomic_compare_exchange_n(&rec[MOE_ERR_CODE], &cur, code, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    if (!moe_kerr_replaces(cur, code)) return 0; /* cur: the code there now */
    MOE_ERROR_TEST_PAUSE();
  }
  if (d != NULL && moe_kerr_fatal(code)) {
    MOE_ERROR_TEST_PAUSE();
    moe_error_put_details(rec, d);
    MOE_ERROR_TEST_PAUSE();
    __atomic_store_n(&rec[MOE_ERR_DETAILS], code, __ATOMIC_RELEASE);
  }
  return 1;
}

/* Reads the record: returns the code; *d_p (may be NULL) gets the details
 * and *has_p whether there are any. */
static inline int moe_error_read_host(const volatile int* rec, moe_error_details_t* d_p, int* has_p) {
  const int code = __atomic_load_n(&rec[MOE_ERR_CODE], __ATOMIC_ACQUIRE);
  const int has = code != MOE_KERR_NONE && __atomic_load_n(&rec[MOE_ERR_DETAILS], __ATOMIC_ACQUIRE) == code;
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

/* ---------------------------------------------------------- device half */
#ifdef __CUDACC__
/* The same as moe_error_record_host, from any thread of any block: the record
 * is host-mapped, so the fences and the compare-and-swap are at system
 * scope. */
__device__ inline bool moe_error_record_dev(volatile int* rec, int code, const moe_error_details_t* d) {
  int* word = const_cast<int*>(&rec[MOE_ERR_CODE]);
  int cur = MOE_KERR_NONE;
  if (code == MOE_KERR_NONE) return false; /* nothing to record */
  __threadfence_system(); /* this thread's earlier writes before the code */
  for (;;) {
    const int prev = atomicCAS_system(word, cur, code);
    if (prev == cur) break;
    if (!moe_kerr_replaces(prev, code)) return false;
    cur = prev;
  }
  if (d != NULL && moe_kerr_fatal(code)) {
    moe_error_put_details(rec, d);
    __threadfence_system(); /* the details before the word that publishes them */
    rec[MOE_ERR_DETAILS] = code;
  }
  return true;
}
#endif

#endif
