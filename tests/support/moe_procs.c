/* SPDX-License-Identifier: Apache-2.0 */
/* The hub and its children (moe_procs.h). One message format both ways: a
 * header, then `bytes` of payload. The hub validates every header it reads
 * (a child may be killed mid-write: a short message is a closed socket). */
#include "tests/support/moe_procs.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char** environ;

#define MOE_OOB_MAGIC 0x6d4f6f42u /* "mOoB" */
#define MOE_HUB_TICK_MS 10
#define MOE_HUB_REAP_POLL_US 5000
#define MOE_OOB_ENV_LEN 64

enum { MSG_GATHER = 1, MSG_REPORT = 2, MSG_GATHER_OK = 3, MSG_GATHER_FAIL = 4 };

typedef struct {
  uint32_t magic, type;
  int32_t rank, kind;
  uint32_t round, pad;
  int64_t value;
  uint64_t bytes;
} moe_oob_msg_t;

long long moe_oob_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ----------------------------------------------------------- plain I/O */
static int write_all(int fd, const void* buf, size_t n) {
  const char* p = buf;
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Reads n bytes, waiting at most until deadlineNs (0: no bound). */
static int read_all(int fd, void* buf, size_t n, long long deadlineNs) {
  char* p = buf;
  while (n > 0) {
    int waitMs = -1;
    if (deadlineNs > 0) {
      const long long left = deadlineNs - moe_oob_now_ns();
      waitMs = left > 0 ? (int)(left / 1000000) + 1 : 0; /* what already arrived is still read */
    }
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    const int pr = poll(&pfd, 1, waitMs);
    if (pr < 0 && errno == EINTR) continue;
    if (pr < 0) return -1;
    if (pr == 0) {
      if (deadlineNs > 0 && moe_oob_now_ns() >= deadlineNs) return -2;
      continue;
    }
    ssize_t r = recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    p += r;
    n -= (size_t)r;
  }
  return 0;
}

static int send_msg(int fd, const moe_oob_msg_t* h, const void* data) {
  if (write_all(fd, h, sizeof(*h)) != 0) return -1;
  return h->bytes > 0 ? write_all(fd, data, h->bytes) : 0;
}

/* ------------------------------------------------------------ child side */
static int env_int(const char* name, int* v) {
  const char* s = getenv(name);
  if (s == NULL || *s == '\0') return -1;
  char* end = NULL;
  const long x = strtol(s, &end, 10);
  if (*end != '\0' || x < 0 || x > 1 << 20) return -1;
  *v = (int)x;
  return 0;
}

int moe_oob_attach(moe_oob_t* oob, int timeoutMs) {
  memset(oob, 0, sizeof(*oob));
  oob->fd = -1;
  int fd = -1, rank = -1, n = 0;
  if (env_int(MOE_OOB_ENV_FD, &fd) != 0 || env_int(MOE_OOB_ENV_RANK, &rank) != 0 ||
      env_int(MOE_OOB_ENV_NRANKS, &n) != 0 || n < 1 || n > MOE_OOB_MAX_RANKS || rank >= n ||
      fcntl(fd, F_GETFD) < 0)
    return -1;
  fcntl(fd, F_SETFD, FD_CLOEXEC); /* not for this process's own children */
  oob->fd = fd;
  oob->rank = rank;
  oob->nRanks = n;
  oob->timeoutMs = timeoutMs;
  return 0;
}

int moe_oob_allgather(const void* send, void* recv, size_t bytes, void* ctx) {
  moe_oob_t* o = ctx;
  if ((unsigned long long)bytes * (unsigned long long)o->nRanks > MOE_OOB_MAX_BYTES) {
    snprintf(o->error, sizeof(o->error), "all-gather of %zu bytes per rank: more than the hub relays", bytes);
    return -1;
  }
  const unsigned int round = o->round++;
  moe_oob_msg_t h = {.magic = MOE_OOB_MAGIC, .type = MSG_GATHER, .rank = o->rank, .round = round, .bytes = bytes};
  if (send_msg(o->fd, &h, send) != 0) {
    snprintf(o->error, sizeof(o->error), "rank %d: cannot reach the hub (round %u)", o->rank, round);
    return -1;
  }
  const long long deadline = moe_oob_now_ns() + (long long)o->timeoutMs * 1000000LL;
  moe_oob_msg_t r;
  int rc = read_all(o->fd, &r, sizeof(r), deadline);
  if (rc != 0) {
    snprintf(o->error, sizeof(o->error), "rank %d: %s in all-gather round %u", o->rank,
             rc == -2 ? "no answer from the hub within the timeout" : "the hub went away", round);
    return -1;
  }
  const size_t want = bytes * (size_t)o->nRanks;
  if (r.magic != MOE_OOB_MAGIC || r.round != round || r.bytes > MOE_OOB_MAX_BYTES ||
      (r.type == MSG_GATHER_OK && r.bytes != want) || (r.type != MSG_GATHER_OK && r.type != MSG_GATHER_FAIL)) {
    snprintf(o->error, sizeof(o->error), "rank %d: bad answer from the hub (type %u, round %u/%u, %llu bytes)",
             o->rank, r.type, r.round, round, (unsigned long long)r.bytes);
    return -1;
  }
  if (r.type == MSG_GATHER_OK) {
    if (read_all(o->fd, recv, want, deadline) != 0) {
      snprintf(o->error, sizeof(o->error), "rank %d: all-gather round %u cut short", o->rank, round);
      return -1;
    }
    return 0;
  }
  /* The whole reason is read (the next message starts after it). */
  char* why = malloc(r.bytes + 1);
  if (why == NULL || read_all(o->fd, why, r.bytes, deadline) != 0) {
    snprintf(o->error, sizeof(o->error), "rank %d: all-gather round %u failed (no reason came)", o->rank, round);
  } else {
    why[r.bytes] = '\0';
    snprintf(o->error, sizeof(o->error), "rank %d: all-gather round %u failed: %.200s", o->rank, round, why);
  }
  free(why);
  return -1;
}

int moe_oob_report(moe_oob_t* o, int kind, long long value, const void* data, size_t bytes) {
  if (o->fd < 0 || bytes > MOE_OOB_MAX_BYTES) return -1;
  moe_oob_msg_t h = {.magic = MOE_OOB_MAGIC, .type = MSG_REPORT, .rank = o->rank, .kind = kind, .value = value,
                     .bytes = bytes};
  return send_msg(o->fd, &h, data);
}

/* -------------------------------------------------------------- hub side */
typedef struct {
  pid_t pid;
  int fd;             /* -1 once closed */
  int reaped, status;
  /* the message being read */
  moe_oob_msg_t head;
  size_t haveHead;
  char* data;
  size_t haveData;
  /* its contribution to the pending all-gather */
  char* gather;
  int gathered;
} moe_hub_child_t;

struct moe_hub {
  int n;
  moe_hub_child_t c[MOE_OOB_MAX_RANKS];
  unsigned int round;    /* the all-gather being collected */
  size_t gatherBytes;
  int nGathered;
  char broken[200];      /* set once a child died or disagreed: every all-gather fails */
};

static char* fmt_env(const char* name, long v) {
  char* s = malloc(MOE_OOB_ENV_LEN);
  if (s != NULL) snprintf(s, MOE_OOB_ENV_LEN, "%s=%ld", name, v);
  return s;
}

/* Whether `var` (NAME=VALUE) sets a name one of `extra` sets too. */
static int overridden(const char* var, const char* const* extra) {
  const char* eq = strchr(var, '=');
  const size_t n = eq != NULL ? (size_t)(eq - var) : strlen(var);
  for (size_t i = 0; extra != NULL && extra[i] != NULL; i++)
    if (strncmp(extra[i], var, n) == 0 && extra[i][n] == '=') return 1;
  return 0;
}

/* environ (less what `extra` sets again) + extra + the child's own
 * variables; NULL on failure. */
static char** child_env(const char* const* extra, int fd, int rank, int n) {
  size_t ne = 0, nx = 0;
  while (environ[ne] != NULL) ne++;
  while (extra != NULL && extra[nx] != NULL) nx++;
  char** env = calloc(ne + nx + 4, sizeof(char*));
  if (env == NULL) return NULL;
  size_t k = 0;
  for (size_t i = 0; i < ne; i++)
    if (strncmp(environ[i], "MOE_OOB_", 8) != 0 && !overridden(environ[i], extra)) env[k++] = environ[i];
  for (size_t i = 0; i < nx; i++) env[k++] = (char*)extra[i];
  env[k++] = fmt_env(MOE_OOB_ENV_FD, fd);
  env[k++] = fmt_env(MOE_OOB_ENV_RANK, rank);
  env[k++] = fmt_env(MOE_OOB_ENV_NRANKS, n);
  env[k] = NULL;
  if (env[k - 1] == NULL || env[k - 2] == NULL || env[k - 3] == NULL) {
    for (size_t i = k - 3; i < k; i++) free(env[i]);
    free(env);
    return NULL;
  }
  return env;
}

static void free_child_env(char** env) {
  if (env == NULL) return;
  size_t k = 0;
  while (env[k] != NULL) k++;
  for (size_t i = k - 3; i < k; i++) free(env[i]);
  free(env);
}

int moe_hub_spawn(const moe_hub_args_t* a, moe_hub_t** hub_p) {
  if (a->nRanks < 1 || a->nRanks > MOE_OOB_MAX_RANKS || a->argv == NULL || a->argv[0] == NULL) {
    fprintf(stderr, "hub: bad arguments (%d ranks)\n", a->nRanks);
    return -1;
  }
  moe_hub_t* h = calloc(1, sizeof(*h));
  if (h == NULL) return -1;
  h->n = a->nRanks;
  for (int r = 0; r < h->n; r++) h->c[r].fd = -1, h->c[r].pid = -1;
  fflush(stdout);
  fflush(stderr);
  const pid_t parent = getpid();
  for (int r = 0; r < h->n; r++) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
      perror("hub: socketpair");
      goto fail;
    }
    char** env = child_env(a->env, sv[1], r, h->n);
    if (env == NULL) {
      close(sv[0]), close(sv[1]);
      goto fail;
    }
    const pid_t pid = fork();
    if (pid == 0) {
      /* Dies with the hub; and the hub may already be gone. */
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      fcntl(sv[1], F_SETFD, 0); /* the child's end survives exec */
      execve(a->argv[0], a->argv, env);
      fprintf(stderr, "hub: cannot run %s: %s\n", a->argv[0], strerror(errno));
      _exit(127);
    }
    free_child_env(env);
    close(sv[1]);
    if (pid < 0) {
      perror("hub: fork");
      close(sv[0]);
      goto fail;
    }
    h->c[r].pid = pid;
    h->c[r].fd = sv[0];
  }
  *hub_p = h;
  return 0;
fail:
  moe_hub_free(h);
  return -1;
}

pid_t moe_hub_pid(const moe_hub_t* h, int rank) { return rank >= 0 && rank < h->n ? h->c[rank].pid : -1; }
int moe_hub_nranks(const moe_hub_t* h) { return h->n; }

static void close_child(moe_hub_child_t* c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  free(c->data);
  c->data = NULL;
  free(c->gather);
  c->gather = NULL;
  c->gathered = 0;
}

/* Every child waiting in the pending all-gather gets `why`; later ones too. */
static void break_gathers(moe_hub_t* h, const char* why) {
  if (h->broken[0] == '\0') snprintf(h->broken, sizeof(h->broken), "%s", why);
  for (int r = 0; r < h->n; r++) {
    moe_hub_child_t* c = &h->c[r];
    if (!c->gathered || c->fd < 0) continue;
    moe_oob_msg_t m = {.magic = MOE_OOB_MAGIC, .type = MSG_GATHER_FAIL, .rank = r, .round = h->round,
                       .bytes = strlen(h->broken)};
    send_msg(c->fd, &m, h->broken);
    free(c->gather);
    c->gather = NULL;
    c->gathered = 0;
  }
  h->nGathered = 0;
}

static void finish_gather(moe_hub_t* h) {
  const size_t b = h->gatherBytes, total = b * (size_t)h->n;
  char* all = malloc(total > 0 ? total : 1);
  if (all == NULL) {
    break_gathers(h, "the hub is out of memory");
    return;
  }
  for (int r = 0; r < h->n; r++) memcpy(all + (size_t)r * b, h->c[r].gather, b);
  for (int r = 0; r < h->n; r++) {
    moe_hub_child_t* c = &h->c[r];
    moe_oob_msg_t m = {.magic = MOE_OOB_MAGIC, .type = MSG_GATHER_OK, .rank = r, .round = h->round, .bytes = total};
    if (c->fd >= 0) send_msg(c->fd, &m, all);
    free(c->gather);
    c->gather = NULL;
    c->gathered = 0;
  }
  free(all);
  h->nGathered = 0;
  h->round++;
}

static void on_gather(moe_hub_t* h, int r, moe_hub_child_t* c) {
  char why[200];
  if (h->broken[0] != '\0') {
    c->gathered = 1; /* answered at once */
    break_gathers(h, h->broken);
    return;
  }
  if (c->head.round != h->round || (h->nGathered > 0 && c->head.bytes != h->gatherBytes) || c->gathered) {
    snprintf(why, sizeof(why), "rank %d sent all-gather round %u of %llu bytes, the others are at round %u of %zu", r,
             c->head.round, (unsigned long long)c->head.bytes, h->round, h->gatherBytes);
    c->gathered = 1;
    break_gathers(h, why);
    return;
  }
  if (h->nGathered == 0) h->gatherBytes = c->head.bytes;
  c->gather = c->data;
  c->data = NULL;
  c->gathered = 1;
  if (++h->nGathered == h->n) finish_gather(h);
}

/* Reads what child r sent; 1 when a whole message is there (in c->head and
 * c->data), 0 when more is needed, -1 when the socket closed or lied. */
static int read_child(moe_hub_child_t* c) {
  if (c->haveHead < sizeof(c->head)) {
    ssize_t n = recv(c->fd, (char*)&c->head + c->haveHead, sizeof(c->head) - c->haveHead, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (n <= 0) return -1;
    c->haveHead += (size_t)n;
    if (c->haveHead < sizeof(c->head)) return 0;
    if (c->head.magic != MOE_OOB_MAGIC || c->head.bytes > MOE_OOB_MAX_BYTES ||
        (c->head.type != MSG_GATHER && c->head.type != MSG_REPORT))
      return -1;
    c->data = malloc(c->head.bytes > 0 ? c->head.bytes : 1);
    if (c->data == NULL) return -1;
    c->haveData = 0;
  }
  if (c->haveData < c->head.bytes) {
    ssize_t n = recv(c->fd, c->data + c->haveData, c->head.bytes - c->haveData, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (n <= 0) return -1;
    c->haveData += (size_t)n;
    if (c->haveData < c->head.bytes) return 0;
  }
  c->haveHead = 0;
  return 1;
}

int moe_hub_serve(moe_hub_t* h, int timeoutMs, moe_hub_fn fn, void* arg) {
  const long long deadline = moe_oob_now_ns() + (long long)timeoutMs * 1000000LL;
  for (;;) {
    struct pollfd pfd[MOE_OOB_MAX_RANKS];
    int idx[MOE_OOB_MAX_RANKS], np = 0;
    for (int r = 0; r < h->n; r++)
      if (h->c[r].fd >= 0) {
        pfd[np] = (struct pollfd){.fd = h->c[r].fd, .events = POLLIN};
        idx[np++] = r;
      }
    if (np == 0) return 0;
    const long long left = deadline - moe_oob_now_ns();
    if (left <= 0) return -1;
    const int waitMs = left / 1000000 < MOE_HUB_TICK_MS ? (int)(left / 1000000) + 1 : MOE_HUB_TICK_MS;
    const int pr = poll(pfd, (nfds_t)np, waitMs);
    if (pr < 0 && errno != EINTR) return -1;
    if (pr <= 0) {
      moe_hub_event_t ev = {.type = MOE_HUB_TICK, .rank = -1, .atNs = moe_oob_now_ns()};
      if (fn != NULL && fn(h, &ev, arg)) return 1;
      continue;
    }
    for (int i = 0; i < np; i++) {
      if (pfd[i].revents == 0) continue;
      const int r = idx[i];
      moe_hub_child_t* c = &h->c[r];
      const int got = read_child(c);
      if (got == 0) continue;
      const long long at = moe_oob_now_ns();
      if (got < 0) {
        close_child(c);
        char why[200];
        snprintf(why, sizeof(why), "rank %d (pid %d) went away", r, (int)c->pid);
        break_gathers(h, why);
        moe_hub_event_t ev = {.type = MOE_HUB_EXIT, .rank = r, .atNs = at};
        if (fn != NULL && fn(h, &ev, arg)) return 1;
        continue;
      }
      if (c->head.type == MSG_GATHER) {
        on_gather(h, r, c);
        free(c->data); /* kept (as c->gather) only when it joined the round */
        c->data = NULL;
        continue;
      }
      moe_hub_event_t ev = {.type = MOE_HUB_REPORT, .rank = r, .kind = c->head.kind, .value = c->head.value,
                            .atNs = at, .data = c->data, .bytes = c->head.bytes};
      const int stop = fn != NULL && fn(h, &ev, arg);
      free(c->data);
      c->data = NULL;
      if (stop) return 1;
    }
  }
}

int moe_hub_reap(moe_hub_t* h, int timeoutMs, int* status) {
  const long long deadline = moe_oob_now_ns() + (long long)timeoutMs * 1000000LL;
  int killed = 0;
  for (;;) {
    int left = 0;
    for (int r = 0; r < h->n; r++) {
      moe_hub_child_t* c = &h->c[r];
      if (c->pid <= 0 || c->reaped) continue;
      int st = 0;
      const pid_t w = waitpid(c->pid, &st, WNOHANG);
      if (w == c->pid || (w < 0 && errno == ECHILD)) {
        c->reaped = 1;
        c->status = w == c->pid ? st : -1;
      } else {
        left++;
      }
    }
    if (left == 0) break;
    if (moe_oob_now_ns() > deadline) {
      for (int r = 0; r < h->n; r++) {
        moe_hub_child_t* c = &h->c[r];
        if (c->pid <= 0 || c->reaped) continue;
        kill(c->pid, SIGCONT); /* a stopped child takes SIGKILL too, but be plain about it */
        kill(c->pid, SIGKILL);
        waitpid(c->pid, NULL, 0);
        c->reaped = 1;
        c->status = -1;
        killed++;
      }
      break;
    }
    usleep(MOE_HUB_REAP_POLL_US);
  }
  if (status != NULL)
    for (int r = 0; r < h->n; r++) status[r] = h->c[r].pid > 0 ? h->c[r].status : -1;
  return killed;
}

void moe_hub_free(moe_hub_t* h) {
  if (h == NULL) return;
  moe_hub_reap(h, 0, NULL);
  for (int r = 0; r < h->n; r++) close_child(&h->c[r]);
  free(h);
}

const char* moe_hub_status_str(int st, char* buf, size_t n) {
  if (st == -1) snprintf(buf, n, "killed by the hub (did not end in time)");
  else if (WIFEXITED(st)) snprintf(buf, n, "exit %d", WEXITSTATUS(st));
  else if (WIFSIGNALED(st)) snprintf(buf, n, "signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
  else snprintf(buf, n, "status 0x%x", st);
  return buf;
}
