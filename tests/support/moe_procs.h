/* SPDX-License-Identifier: Apache-2.0 */
/* Ranks in separate processes of one host, bootstrapped out of band (test
 * and benchmark support, never shipped). A parent, the hub, starts N copies
 * of a program with fork + exec (a child never inherits a CUDA context: the
 * hub must not have made one before spawning), one rank each, and relays
 * their all-gathers over one Unix socket per child: the all-gather callback
 * of ncclMoeCommInitOob. Children also report progress to the hub on the same
 * socket (a step reached, an error seen and when), so that a test can kill a
 * rank at a chosen point and time what the survivors see.
 *
 * A child that dies makes every all-gather, pending or later, fail at once
 * (with a message naming it) instead of waiting. Children die with the hub
 * (PR_SET_PDEATHSIG), so a killed test leaves no rank spinning on the GPU. */
#ifndef MOE_PROCS_H_
#define MOE_PROCS_H_

#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_OOB_MAX_RANKS 64
/* Largest payload of one message (an all-gather of every rank, a report). */
#define MOE_OOB_MAX_BYTES (4u << 20)
/* Environment the hub gives each child. */
#define MOE_OOB_ENV_FD "MOE_OOB_FD"
#define MOE_OOB_ENV_RANK "MOE_OOB_RANK"
#define MOE_OOB_ENV_NRANKS "MOE_OOB_NRANKS"

/* ------------------------------------------------------------ child side */
typedef struct {
  int fd;
  int rank, nRanks;
  int timeoutMs;      /* bound on one all-gather */
  unsigned int round; /* all-gathers so far */
  char error[256];    /* why the last call failed */
} moe_oob_t;

/* Attaches to the hub from the environment it set; -1 when this process
 * was not started by a hub (or the variables are bad). */
int moe_oob_attach(moe_oob_t* oob, int timeoutMs);

/* ncclMoeAllGatherFn_t (ctx: the moe_oob_t): 0, or -1 with oob->error set
 * (the hub said a rank died or disagreed, or no answer within timeoutMs). */
int moe_oob_allgather(const void* send, void* recv, size_t bytes, void* ctx);

/* A report to the hub: a kind of the caller's, a value, optional bytes. */
int moe_oob_report(moe_oob_t* oob, int kind, long long value, const void* data, size_t bytes);

/* CLOCK_MONOTONIC in ns: one clock for every process of the host. */
long long moe_oob_now_ns(void);

/* -------------------------------------------------------------- hub side */
typedef struct moe_hub moe_hub_t;

typedef struct {
  int nRanks;
  char* const* argv;      /* the program (argv[0], a path) and its arguments, for every child */
  const char* const* env; /* NAME=VALUE set in every child's environment (over this process's own), NULL-terminated; may be NULL */
} moe_hub_args_t;

/* Events the hub hands to the caller while it serves. */
enum {
  MOE_HUB_REPORT = 1, /* a child's moe_oob_report: kind, value, data */
  MOE_HUB_EXIT = 2,   /* a child's socket closed (it exited or died) */
  MOE_HUB_TICK = 3    /* nothing happened for a while (about every 10 ms) */
};
typedef struct {
  int type;           /* MOE_HUB_* */
  int rank;           /* -1 for a tick */
  int kind;           /* of a report */
  long long value;
  long long atNs;     /* when the hub saw it (moe_oob_now_ns) */
  const void* data;
  size_t bytes;
} moe_hub_event_t;
/* Returns non-zero to stop serving. */
typedef int (*moe_hub_fn)(moe_hub_t* hub, const moe_hub_event_t* ev, void* arg);

/* Starts the children. 0, or -1 with a message on stderr (the children
 * already started are killed). */
int moe_hub_spawn(const moe_hub_args_t* args, moe_hub_t** hub_p);

/* Serves all-gathers and reports until every child's socket closed (0), fn
 * asked to stop (1), or timeoutMs passed (-1). */
int moe_hub_serve(moe_hub_t* hub, int timeoutMs, moe_hub_fn fn, void* arg);

pid_t moe_hub_pid(const moe_hub_t* hub, int rank);
int moe_hub_nranks(const moe_hub_t* hub);

/* Waits up to timeoutMs for every child to end, then kills (SIGKILL) and
 * reaps the rest. status[r] (may be NULL): the waitpid status, or -1 for a
 * child that had to be killed. Returns the number of children that had to
 * be killed. */
int moe_hub_reap(moe_hub_t* hub, int timeoutMs, int* status);

/* Kills and reaps any child still there, closes everything. */
void moe_hub_free(moe_hub_t* hub);

/* A waitpid status in words ("exit 0", "signal 9 (Killed)"). */
const char* moe_hub_status_str(int status, char* buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif
