/* SPDX-License-Identifier: Apache-2.0 */
/* The TCP backend of moe_transport_t.
 *
 * A connection is one control socket plus `nstreams` data sockets
 * (NCCL_SOCKET_NTHREADS x NCCL_NSOCKS_PERTHREAD). Every message starts with a
 * 40-byte header on the control socket; payloads up to MOE_SOCK_INLINE_MAX
 * follow it there, larger ones are split over the data sockets and moved by
 * helper threads (one per NCCL_NSOCKS_PERTHREAD sockets), so one large
 * message uses several TCP streams and cores. The control socket is driven by
 * the thread that calls isend/irecv/test. Both sides derive the same split
 * from the header, so a message's chunks carry no headers of their own.
 * One-sided writes below NCCL_MOE_SOCKET_STRIPE_KB travel inline on the
 * control socket (latency); larger ones are striped over the data sockets,
 * each chunk behind a chunk header the receiver checks against what the
 * write's control header announced, with completions and immediates kept in
 * posting order (moe_sock_stripe.h).
 *
 * The receiver matches each header against its oldest posted irecv (tags pick
 * the buffer) and rejects one larger than the buffer: a truncation is an error
 * on the receiving side and poisons the comm, as the stream cannot be resynced.
 *
 * The first error poisons the comm (moe_sock_fail): its sockets are shut down
 * and its helper threads drop their queued chunks and confirm it, before the
 * error reaches the caller, so no thread touches a buffer whose request
 * reported an error. Registered regions belong to the comm they were
 * registered on, under a 64-bit key with 52 random bits; only that comm's
 * peer can write into them, and only with the key. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/moe_check.h"
#include "common/moe_env.h"
#include "net_socket/moe_sock.h"
#include "net_socket/moe_sock_stripe.h"

#define MOE_SOCK_LISTEN_BACKLOG 4096
/* Tasks a data stream can queue: every buffer of every request, and every
 * striped write a peer may have announced, one chunk each. */
#define MOE_SOCK_RING (MOE_NET_MAX_REQUESTS * MOE_NET_MAX_RECVS + MOE_SOCK_MAX_RWRITES)
/* Helper threads re-check for shutdown and stalls this often while blocked in poll(). */
#define MOE_SOCK_POLL_SLICE_MS 50
/* Sockets that connected but have not sent their hello yet, per listen comm.
 * When full, the oldest is dropped for a new one: silent connections cannot
 * keep real ones waiting in the kernel's backlog. */
#define MOE_SOCK_MAX_INCOMING 256
/* A hello must arrive this soon after the connection (or NCCL_MOE_TIMEOUT_MS
 * when shorter): a real connector sends it at once. */
#define MOE_SOCK_HELLO_TIMEOUT_MS 5000
/* New sockets one accept() call takes from the kernel at most. */
#define MOE_SOCK_ACCEPT_BURST (2 * MOE_SOCK_MAX_INCOMING)
#define MOE_SOCK_MAX_GROUPS 64
/* connect() calls in flight in the process at most. */
#define MOE_SOCK_MAX_PENDING 4096
#define MOE_SOCK_PENDING_MAGIC 0x504f454du /* "MOEP" */
/* Registered regions per comm at most; a key's low bits are the slot. */
#define MOE_SOCK_MR_SLOT_BITS 12
#define MOE_SOCK_MAX_MRS (1 << MOE_SOCK_MR_SLOT_BITS)
#define MOE_SOCK_MR_MIN_SLOTS 16
#define MOE_SOCK_MR_MAGIC 0x524d4f4du /* "MOMR" */

/* ------------------------------------------------------------------------ */
/* Process-wide state: the devices and the registries. Survives nothing on
 * purpose: it is rebuilt by init() after the last fini() (or a reload). */

typedef struct moe_sock_pending moe_sock_pending_t;
typedef struct moe_sock_mr moe_sock_mr_t;

static struct {
  pthread_mutex_t lock;
  int refs;
  int ndevs;
  moe_net_iface_t devs[MOE_NET_MAX_DEVS];
  moe_sock_pending_t* pending[MOE_SOCK_MAX_PENDING];
} moe_sock_g = {.lock = PTHREAD_MUTEX_INITIALIZER};

static uint64_t moe_sock_timeout_ns(void) { return (uint64_t)moe_env()->timeout_ms * 1000000ull; }

/* A stall clock (*since_ns, 0: not stalled), at `now`: starts it, and is 1
 * once the stall has lasted longer than the timeout. */
static int moe_sock_stalled(uint64_t* since_ns, uint64_t now) {
  if (*since_ns == 0) *since_ns = now;
  return now - *since_ns > moe_sock_timeout_ns();
}

/* ------------------------------------------------------------------------ */
/* Comms, requests and helper threads. */

typedef struct moe_sock_comm moe_sock_comm_t;
typedef struct moe_sock_req moe_sock_req_t;

typedef struct {
  char* buf;
  size_t size;
  size_t done;
  moe_sock_track_t* track; /* the request's or the write's: counts the chunk done */
  int has_chunk;           /* a striped write's chunk: `chunk` goes before the payload */
  moe_sock_chunk_t chunk;  /* the header to send, or the one the receiver expects */
} moe_sock_task_t;

typedef struct {
  int fd;
  int dead;                         /* an I/O error left it out of sync */
  _Atomic uint32_t head;            /* next task to run (helper thread) */
  _Atomic uint32_t tail;            /* next free entry (comm thread) */
  uint64_t stall_since_ns;          /* 0: progressing */
  uint8_t chdr[MOE_SOCK_CHUNK_BYTES]; /* the head task's chunk header (helper thread) */
  size_t chdr_done;                 /* ... bytes of it moved */
  moe_sock_task_t ring[MOE_SOCK_RING];
} moe_sock_stream_t;

typedef struct {
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond; /* CLOCK_MONOTONIC: the comm thread waits on it with a deadline */
  int started;
  int stop;
  int cancel;    /* the comm failed: drop every queued chunk */
  int cancelled; /* ... done: no chunk of this thread is in progress */
  int index;
  moe_sock_comm_t* comm;
} moe_sock_worker_t;

typedef enum { MOE_SOCK_REQ_FREE = 0, MOE_SOCK_REQ_CTRL, MOE_SOCK_REQ_DATA, MOE_SOCK_REQ_DONE } moe_sock_req_state_t;

typedef struct {
  char* buf;
  size_t cap;
  int tag;
  size_t size;
  int matched;
} moe_sock_slot_t;

struct moe_sock_req {
  moe_net_request_t base;
  moe_sock_comm_t* comm;
  int state;
  int is_write;
  int n;
  moe_sock_slot_t slot[MOE_NET_MAX_RECVS];
  int nmatched;
  uint8_t hdr[MOE_SOCK_HDR_BYTES]; /* send side: the encoded header */
  size_t ctrl_off;                 /* send side: header+inline bytes written */
  int striped;                     /* send side: a write whose payload goes over the data streams */
  moe_sock_chunk_t wchunk;         /* ... its key and target offset (wid: its number) */
  uint64_t wseq;                   /* send side, writes: posting order */
  uint64_t after_writes;           /* receive side: writes filed before this message (wq.pushed) */
  moe_sock_track_t track;          /* chunks on the data streams */
};

struct moe_sock_comm {
  moe_net_comm_t base;
  pthread_mutex_t lock;
  int dev;
  int ctrl_fd;
  int nstreams;
  int nworkers;
  int next_stream;
  ncclResult_t failed;  /* sticky: the first error that broke the comm */
  moe_sock_req_t reqs[MOE_NET_MAX_REQUESTS];
  moe_sock_req_t* ctrlq[MOE_NET_MAX_REQUESTS]; /* requests with control-socket work, in order */
  int ctrlq_head;
  int ctrlq_count;
  /* Receive side: the header being read and the payload it announced. */
  uint8_t rhdr[MOE_SOCK_HDR_BYTES];
  size_t rhdr_got;
  int rhdr_valid;
  moe_sock_hdr_t rh;
  char* rdst;           /* where inline payload bytes go */
  size_t rleft;         /* inline payload bytes still to read */
  moe_sock_req_t* rreq; /* the request the inline payload belongs to (NULL: a write) */
  moe_sock_mr_t* rmr;   /* the region a write's payload lands in (NULL: a message) */
  int rslot;
  int rimm_pending;     /* a write's immediate to publish once its bytes landed */
  uint32_t rimm;
  moe_imm_ring_t imms;
  uint64_t imm_full_since_ns; /* 0: the immediate ring has room */
  moe_sock_wq_t wq;           /* striped writes not signalled yet (moe_sock_stripe.h) */
  uint64_t rwid;              /* the number the next striped write from the peer has */
  uint64_t wq_full_since_ns;  /* 0: the FIFO has room */
  uint64_t swid;              /* send side: the number of our next striped write */
  uint64_t wseq;              /* send side: writes posted */
  uint64_t ctrl_stall_since_ns;
  /* Regions registered on this comm, by the slot in their key's low bits. */
  moe_sock_mr_t** mrs;
  int mr_slots;
  int quiesced;         /* the helper threads dropped their chunks (after a failure) */
  moe_sock_worker_t* workers;
  moe_sock_stream_t* streams;
};

struct moe_sock_mr {
  uint32_t magic;
  uint64_t key;  /* slot | random bits << MOE_SOCK_MR_SLOT_BITS */
  char* base;
  size_t size;
};

static void moe_sock_quiesce(moe_sock_comm_t* comm);

/* Poisons the comm with its first error and stops every data transfer of it
 * before the error can reach a caller. Comm thread, comm lock held. */
static ncclResult_t moe_sock_fail(moe_sock_comm_t* comm, ncclResult_t res) {
  if (comm->failed == ncclSuccess) {
    comm->failed = res;
    moe_sock_quiesce(comm);
  }
  return res;
}

static ncclResult_t moe_sock_set_opts(int fd, int nodelay) {
  int one = 1;
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0)
    return MOE_ERROR(ncclSystemError, "fcntl(O_NONBLOCK) failed: %m");
  if (nodelay && setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0)
    return MOE_ERROR(ncclSystemError, "setsockopt(TCP_NODELAY) failed: %m");
  /* A peer whose host died never closes the socket: keepalive and a bound on
   * unacknowledged data turn that into an error instead of a hang. */
  unsigned int user_timeout = (unsigned int)moe_env()->timeout_ms;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout));
  return ncclSuccess;
}

/* Non-blocking transfer; *n_p bytes moved (0 would block). Errors are
 * ncclRemoteError / ncclSystemError; the stream's end is 1 in *eof_p, or an
 * ncclRemoteError where eof_p is NULL. */
static ncclResult_t moe_sock_io_eof(int fd, int is_send, void* buf, size_t len, size_t* n_p, int* eof_p) {
  *n_p = 0;
  if (eof_p != NULL) *eof_p = 0;
  if (len == 0) return ncclSuccess;
  for (;;) {
    ssize_t n = is_send ? send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL) : recv(fd, buf, len, MSG_DONTWAIT);
    if (n > 0) {
      *n_p = (size_t)n;
      return ncclSuccess;
    }
    if (n == 0 && eof_p != NULL) {
      *eof_p = 1;
      return ncclSuccess;
    }
    if (n == 0) return MOE_ERROR(ncclRemoteError, "socket: the peer closed the connection");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return ncclSuccess;
    if (errno == EFAULT) /* our caller's buffer, not the peer */
      return MOE_ERROR(ncclInvalidArgument, "socket %s: the local buffer [%p, +%zu bytes) is not accessible memory",
                       is_send ? "send" : "recv", buf, len);
    return MOE_ERROR(errno == ECONNRESET || errno == EPIPE || errno == ETIMEDOUT ? ncclRemoteError : ncclSystemError,
                     "socket %s failed: %m", is_send ? "send" : "recv");
  }
}

static ncclResult_t moe_sock_io(int fd, int is_send, void* buf, size_t len, size_t* n_p) {
  return moe_sock_io_eof(fd, is_send, buf, len, n_p, NULL);
}

/* ------------------------------------------------------------------------ */
/* Helper threads: each owns the data streams s with s % nworkers == index. */

static void moe_sock_task_finish(moe_sock_stream_t* s, moe_sock_task_t* t, ncclResult_t res, const char* msg) {
  if (res != ncclSuccess) moe_sock_track_error(t->track, res, msg);
  s->chdr_done = 0;
  atomic_fetch_sub_explicit(&t->track->chunks_pending, 1, memory_order_release);
  atomic_fetch_add_explicit(&s->head, 1, memory_order_release);
}

/* The chunk header of a striped write's chunk. Sending: it leaves with the
 * first payload bytes. Receiving: it is read alone and must be exactly the
 * one the control header announced before a payload byte lands. *n_p bytes
 * moved (header and payload); s->chdr_done counts the header's. */
static ncclResult_t moe_sock_chunk_io(moe_sock_stream_t* s, moe_sock_task_t* t, int is_send, size_t* n_p) {
  *n_p = 0;
  if (is_send) {
    if (s->chdr_done == 0) moe_sock_chunk_encode(&t->chunk, s->chdr);
    struct iovec iov[2] = {{s->chdr + s->chdr_done, MOE_SOCK_CHUNK_BYTES - s->chdr_done}, {t->buf, t->size}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    ssize_t n;
    do n = sendmsg(s->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return ncclSuccess;
    if (n < 0 && errno == EFAULT)
      return MOE_ERROR(ncclInvalidArgument, "socket write: the local buffer [%p, +%zu bytes) is not accessible memory",
                       t->buf, t->size);
    if (n <= 0) return MOE_ERROR(ncclRemoteError, "socket: sending a write's chunk failed: %m");
    size_t hleft = MOE_SOCK_CHUNK_BYTES - s->chdr_done;
    if ((size_t)n > hleft) t->done += (size_t)n - hleft;
    s->chdr_done += (size_t)n < hleft ? (size_t)n : hleft;
    *n_p = (size_t)n;
    return ncclSuccess;
  }
  MOE_CHECK(moe_sock_io(s->fd, 0, s->chdr + s->chdr_done, MOE_SOCK_CHUNK_BYTES - s->chdr_done, n_p));
  s->chdr_done += *n_p;
  if (s->chdr_done < MOE_SOCK_CHUNK_BYTES) return ncclSuccess;
  moe_sock_chunk_t c;
  MOE_CHECK(moe_sock_chunk_decode(s->chdr, MOE_SOCK_CHUNK_BYTES, &c));
  const moe_sock_chunk_t* e = &t->chunk;
  if (c.wid != e->wid || c.index != e->index || c.key != e->key || c.offset != e->offset || c.size != e->size)
    return MOE_ERROR(ncclRemoteError, "socket: the peer sent chunk %u of write %llu (%u bytes at offset %llu) where "
                     "chunk %u of write %llu (%u bytes at offset %llu) was due", c.index, (unsigned long long)c.wid,
                     c.size, (unsigned long long)c.offset, e->index, (unsigned long long)e->wid, e->size,
                     (unsigned long long)e->offset);
  return ncclSuccess;
}

/* Moves bytes of a stream's head task (its chunk header first); *n_p bytes moved. */
static ncclResult_t moe_sock_task_io(moe_sock_stream_t* s, moe_sock_task_t* t, int is_send, size_t* n_p) {
  if (t->has_chunk && s->chdr_done < MOE_SOCK_CHUNK_BYTES) return moe_sock_chunk_io(s, t, is_send, n_p);
  MOE_CHECK(moe_sock_io(s->fd, is_send, t->buf + t->done, t->size - t->done, n_p));
  t->done += *n_p;
  return ncclSuccess;
}

/* Runs one pass over the worker's streams; returns 1 when bytes moved. */
static int moe_sock_worker_pass(moe_sock_worker_t* w, int is_send, struct pollfd* pfds, int* npfd_p) {
  moe_sock_comm_t* comm = w->comm;
  int progressed = 0;
  int npfd = 0;
  uint64_t now = 0;
  for (int si = w->index; si < comm->nstreams; si += comm->nworkers) {
    moe_sock_stream_t* s = &comm->streams[si];
    uint32_t head = atomic_load_explicit(&s->head, memory_order_relaxed);
    if (head == atomic_load_explicit(&s->tail, memory_order_acquire)) continue;
    moe_sock_task_t* t = &s->ring[head % MOE_SOCK_RING];
    if (s->dead) {
      moe_sock_task_finish(s, t, ncclRemoteError, "socket: the data stream broke on an earlier message");
      progressed = 1;
      continue;
    }
    size_t n = 0;
    ncclResult_t res = moe_sock_task_io(s, t, is_send, &n);
    if (res != ncclSuccess) {
      s->dead = 1;
      moe_sock_task_finish(s, t, res, moe_last_error());
      progressed = 1;
      continue;
    }
    if (n > 0) {
      s->stall_since_ns = 0;
      progressed = 1;
      if (t->done == t->size && (!t->has_chunk || s->chdr_done == MOE_SOCK_CHUNK_BYTES))
        moe_sock_task_finish(s, t, ncclSuccess, NULL);
      continue;
    }
    if (now == 0) now = moe_net_now_ns();
    if (moe_sock_stalled(&s->stall_since_ns, now)) {
      char msg[MOE_SOCK_ERR_MAX];
      snprintf(msg, sizeof(msg), "socket: data stream %d made no progress for %d ms: peer dead or stuck", si,
               moe_env()->timeout_ms);
      MOE_WARN("%s", msg);
      s->dead = 1;
      moe_sock_task_finish(s, t, ncclRemoteError, msg);
      progressed = 1;
      continue;
    }
    pfds[npfd].fd = s->fd;
    pfds[npfd].events = is_send ? POLLOUT : POLLIN;
    pfds[npfd].revents = 0;
    npfd++;
  }
  *npfd_p = npfd;
  return progressed;
}

static int moe_sock_worker_idle(moe_sock_worker_t* w) {
  moe_sock_comm_t* comm = w->comm;
  for (int si = w->index; si < comm->nstreams; si += comm->nworkers) {
    moe_sock_stream_t* s = &comm->streams[si];
    if (atomic_load_explicit(&s->head, memory_order_relaxed) != atomic_load_explicit(&s->tail, memory_order_acquire))
      return 0;
  }
  return 1;
}

/* Finishes every queued chunk of the worker's streams without moving a byte
 * (the comm failed). Worker lock held. */
static void moe_sock_worker_drop(moe_sock_worker_t* w) {
  moe_sock_comm_t* comm = w->comm;
  for (int si = w->index; si < comm->nstreams; si += comm->nworkers) {
    moe_sock_stream_t* s = &comm->streams[si];
    s->dead = 1;
    while (atomic_load_explicit(&s->head, memory_order_relaxed) != atomic_load_explicit(&s->tail, memory_order_acquire))
      moe_sock_task_finish(s, &s->ring[atomic_load_explicit(&s->head, memory_order_relaxed) % MOE_SOCK_RING],
                           ncclRemoteError, "socket: transfer cancelled: the connection failed");
  }
}

static void* moe_sock_worker_main(void* arg) {
  moe_sock_worker_t* w = (moe_sock_worker_t*)arg;
  int is_send = w->comm->base.type == MOE_NET_COMM_SEND;
  struct pollfd pfds[MOE_SOCK_MAX_STREAMS];
  for (;;) {
    pthread_mutex_lock(&w->lock);
    /* Waiting for local work, not for a peer: no timeout needed here. */
    while (!w->stop && !w->cancel && moe_sock_worker_idle(w)) pthread_cond_wait(&w->cond, &w->lock);
    int stop = w->stop;
    if (!stop && w->cancel) {
      /* Between passes no chunk is in progress: drop them all and confirm,
       * so that the comm thread may report the failure (moe_sock_quiesce). */
      moe_sock_worker_drop(w);
      w->cancelled = 1;
      pthread_cond_broadcast(&w->cond);
      while (!w->stop && moe_sock_worker_idle(w)) pthread_cond_wait(&w->cond, &w->lock);
      pthread_mutex_unlock(&w->lock);
      continue;
    }
    pthread_mutex_unlock(&w->lock);
    if (stop) break;
    int npfd = 0;
    if (!moe_sock_worker_pass(w, is_send, pfds, &npfd) && npfd > 0) poll(pfds, (nfds_t)npfd, MOE_SOCK_POLL_SLICE_MS);
  }
  return NULL;
}

/* Queues a chunk on a stream and wakes its helper thread; `chunk` NULL: no
 * chunk header. */
static ncclResult_t moe_sock_push_task(moe_sock_comm_t* comm, int si, char* buf, size_t size, moe_sock_track_t* track,
                                       const moe_sock_chunk_t* chunk) {
  moe_sock_stream_t* s = &comm->streams[si];
  moe_sock_worker_t* w = &comm->workers[si % comm->nworkers];
  uint32_t tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
  if (tail - atomic_load_explicit(&s->head, memory_order_acquire) >= MOE_SOCK_RING)
    return MOE_ERROR(ncclInternalError, "socket: data stream %d task ring full", si);
  moe_sock_task_t* t = &s->ring[tail % MOE_SOCK_RING];
  t->buf = buf;
  t->size = size;
  t->done = 0;
  t->track = track;
  t->has_chunk = chunk != NULL;
  if (chunk != NULL) t->chunk = *chunk;
  pthread_mutex_lock(&w->lock);
  atomic_store_explicit(&s->tail, tail + 1, memory_order_release);
  pthread_cond_signal(&w->cond);
  pthread_mutex_unlock(&w->lock);
  return ncclSuccess;
}

/* Queues `nchunks` chunks of `chunk` bytes of a payload on consecutive data
 * streams. Both sides queue in control-stream order, so stream by stream the
 * receiver expects what the sender sends. `wchunk` (NULL for messages): the
 * write's chunk header, whose offset is the payload's in its region. */
static ncclResult_t moe_sock_queue_chunks(moe_sock_comm_t* comm, moe_sock_track_t* track, char* buf, size_t size,
                                          int nchunks, size_t chunk, const moe_sock_chunk_t* wchunk) {
  atomic_fetch_add_explicit(&track->chunks_pending, nchunks, memory_order_relaxed);
  for (int c = 0; c < nchunks; c++) {
    size_t off = (size_t)c * chunk;
    size_t len = size - off < chunk ? size - off : chunk;
    int si = (comm->next_stream + c) % comm->nstreams;
    moe_sock_chunk_t h;
    if (wchunk != NULL)
      h = (moe_sock_chunk_t){.wid = wchunk->wid, .key = wchunk->key, .offset = wchunk->offset + off,
                             .size = (uint32_t)len, .index = (uint32_t)c};
    ncclResult_t res = moe_sock_push_task(comm, si, buf + off, len, track, wchunk != NULL ? &h : NULL);
    if (res != ncclSuccess) {
      atomic_fetch_sub_explicit(&track->chunks_pending, nchunks - c, memory_order_relaxed);
      return moe_sock_fail(comm, res);
    }
  }
  comm->next_stream = (comm->next_stream + nchunks) % comm->nstreams;
  return ncclSuccess;
}

/* Splits a large message over the data streams (same rule on both sides). */
static ncclResult_t moe_sock_dispatch(moe_sock_comm_t* comm, moe_sock_req_t* req, char* buf, size_t size) {
  int nchunks = 0;
  size_t chunk = 0;
  moe_sock_split(size, comm->nstreams, &nchunks, &chunk);
  return moe_sock_queue_chunks(comm, &req->track, buf, size, nchunks, chunk, NULL);
}

/* Splits a striped write over the data streams; `w` names it (wid, key,
 * offset of buf in the target region). */
static ncclResult_t moe_sock_dispatch_write(moe_sock_comm_t* comm, moe_sock_track_t* track, char* buf, size_t size,
                                            const moe_sock_chunk_t* w) {
  int nchunks = 0;
  size_t chunk = 0;
  moe_sock_stripe_split(size, comm->nstreams, &nchunks, &chunk);
  return moe_sock_queue_chunks(comm, track, buf, size, nchunks, chunk, w);
}

/* Stops every transfer of a failed comm: shuts its sockets down (waking a
 * helper thread blocked on the peer, and telling the peer) and waits until
 * each helper thread confirmed it dropped its chunks. Afterwards no thread
 * reads or writes a request's buffer, so the error may be reported. Bounded:
 * a helper thread confirms at the end of its current pass, which the
 * shutdown cuts short. */
static void moe_sock_quiesce(moe_sock_comm_t* comm) {
  if (comm->quiesced) return;
  comm->quiesced = 1;
  for (int si = 0; si < comm->nstreams; si++)
    if (comm->streams[si].fd >= 0) shutdown(comm->streams[si].fd, SHUT_RDWR);
  if (comm->ctrl_fd >= 0) shutdown(comm->ctrl_fd, SHUT_RDWR);
  struct timespec deadline;
  clock_gettime(CLOCK_MONOTONIC, &deadline);
  deadline.tv_sec += moe_env()->timeout_ms / 1000 + 1;
  for (int wi = 0; wi < comm->nworkers; wi++) {
    moe_sock_worker_t* w = &comm->workers[wi];
    if (!w->started) continue;
    pthread_mutex_lock(&w->lock);
    w->cancel = 1;
    pthread_cond_broadcast(&w->cond);
    while (!w->cancelled)
      if (pthread_cond_timedwait(&w->cond, &w->lock, &deadline) == ETIMEDOUT) {
        MOE_WARN("socket: helper thread %d did not stop its transfers within %d ms", wi, moe_env()->timeout_ms);
        break;
      }
    pthread_mutex_unlock(&w->lock);
  }
}

/* ------------------------------------------------------------------------ */
/* Comm creation and teardown. */

static void moe_sock_comm_destroy(moe_sock_comm_t* comm) {
  if (comm == NULL) return;
  /* A helper thread may sit in poll() on a peer for a whole slice: wake it
   * (bytes already queued in the kernel still go out, as with close()). */
  if (comm->streams != NULL)
    for (int s = 0; s < comm->nstreams; s++)
      if (comm->streams[s].fd >= 0) shutdown(comm->streams[s].fd, SHUT_RDWR);
  for (int w = 0; w < comm->nworkers; w++) {
    moe_sock_worker_t* wk = &comm->workers[w];
    if (!wk->started) continue;
    pthread_mutex_lock(&wk->lock);
    wk->stop = 1;
    pthread_cond_signal(&wk->cond);
    pthread_mutex_unlock(&wk->lock);
    pthread_join(wk->thread, NULL);
  }
  for (int w = 0; w < comm->nworkers; w++) {
    pthread_cond_destroy(&comm->workers[w].cond);
    pthread_mutex_destroy(&comm->workers[w].lock);
  }
  if (comm->streams != NULL)
    for (int s = 0; s < comm->nstreams; s++)
      if (comm->streams[s].fd >= 0) close(comm->streams[s].fd);
  if (comm->ctrl_fd >= 0) close(comm->ctrl_fd);
  /* Registrations the user did not take back go with their comm. */
  for (int i = 0; i < comm->mr_slots; i++) free(comm->mrs[i]);
  free(comm->mrs);
  pthread_mutex_destroy(&comm->lock);
  free(comm->workers);
  free(comm->streams);
  free(comm);
}

/* Takes ownership of the sockets (closes them on failure too). */
static ncclResult_t moe_sock_comm_create(moe_net_comm_type_t type, int dev, int ctrl_fd, int nstreams,
                                         const int* data_fds, moe_sock_comm_t** comm_p) {
  ncclResult_t res = ncclSuccess;
  moe_sock_comm_t* comm = calloc(1, sizeof(*comm));
  if (comm == NULL) {
    close(ctrl_fd);
    for (int s = 0; s < nstreams; s++) close(data_fds[s]);
    return MOE_ERROR(ncclSystemError, "socket: out of memory for a comm");
  }
  comm->base = (moe_net_comm_t){.magic = MOE_NET_COMM_MAGIC, .type = type, .transport = &moe_transport_socket};
  pthread_mutex_init(&comm->lock, NULL);
  comm->dev = dev;
  comm->ctrl_fd = ctrl_fd;
  comm->nstreams = nstreams;
  comm->nworkers = moe_env()->socket_nthreads < nstreams ? moe_env()->socket_nthreads : nstreams;
  comm->streams = calloc((size_t)nstreams, sizeof(*comm->streams));
  comm->workers = calloc((size_t)comm->nworkers, sizeof(*comm->workers));
  if (comm->streams == NULL || comm->workers == NULL) {
    for (int s = 0; s < nstreams; s++) close(data_fds[s]);
    comm->nworkers = 0;
    comm->nstreams = 0;  /* the fds are closed already */
    res = MOE_ERROR(ncclSystemError, "socket: out of memory for %d streams", nstreams);
    goto out_destroy;
  }
  for (int s = 0; s < nstreams; s++) comm->streams[s].fd = data_fds[s];
  for (int r = 0; r < MOE_NET_MAX_REQUESTS; r++) comm->reqs[r].comm = comm;
  pthread_condattr_t cattr;
  pthread_condattr_init(&cattr);
  pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC);
  for (int w = 0; w < comm->nworkers; w++) {
    moe_sock_worker_t* wk = &comm->workers[w];
    pthread_mutex_init(&wk->lock, NULL);
    pthread_cond_init(&wk->cond, &cattr);
    wk->index = w;
    wk->comm = comm;
  }
  pthread_condattr_destroy(&cattr);
  for (int w = 0; w < comm->nworkers; w++) {
    int err = pthread_create(&comm->workers[w].thread, NULL, moe_sock_worker_main, &comm->workers[w]);
    if (err != 0) {
      res = MOE_ERROR(ncclSystemError, "socket: cannot start a helper thread: %s", strerror(err));
      goto out_destroy;
    }
    comm->workers[w].started = 1;
  }
  *comm_p = comm;
  return ncclSuccess;
out_destroy:
  moe_sock_comm_destroy(comm);
  return res;
}

/* ------------------------------------------------------------------------ */
/* init / devices / properties */

static ncclResult_t moe_sock_init(void) {
  ncclResult_t res = ncclSuccess;
  pthread_mutex_lock(&moe_sock_g.lock);
  if (moe_sock_g.refs == 0) {
    int n = 0;
    MOE_CHECK_GOTO(moe_net_find_ifaces(moe_env()->socket_ifname, "/sys/class/net", moe_sock_g.devs,
                                      MOE_NET_MAX_DEVS, &n), res, out_unlock);
    if (n == 0) {
      res = MOE_ERROR(ncclSystemError, "socket: no usable network interface (NCCL_SOCKET_IFNAME=\"%s\")",
                      moe_env()->socket_ifname);
      goto out_unlock;
    }
    moe_sock_g.ndevs = n;
    for (int i = 0; i < n; i++) {
      char buf[96];
      MOE_INFO(NCCL_INIT | NCCL_NET, "socket device %d: %s %s", i, moe_sock_g.devs[i].name,
               moe_net_addr_str(&moe_sock_g.devs[i].addr, buf, sizeof(buf)));
    }
  }
  moe_sock_g.refs++;
out_unlock:
  pthread_mutex_unlock(&moe_sock_g.lock);
  return res;
}

static void moe_sock_fini(void) {
  pthread_mutex_lock(&moe_sock_g.lock);
  if (moe_sock_g.refs > 0 && --moe_sock_g.refs == 0) moe_sock_g.ndevs = 0;
  pthread_mutex_unlock(&moe_sock_g.lock);
}

static ncclResult_t moe_sock_devices(int* ndev_p) {
  pthread_mutex_lock(&moe_sock_g.lock);
  int n = moe_sock_g.ndevs;
  pthread_mutex_unlock(&moe_sock_g.lock);
  *ndev_p = n;
  return ncclSuccess;
}

static ncclResult_t moe_sock_get_dev(int dev, moe_net_iface_t* dev_p) {
  pthread_mutex_lock(&moe_sock_g.lock);
  int n = moe_sock_g.ndevs;
  if (dev >= 0 && dev < n) *dev_p = moe_sock_g.devs[dev];
  pthread_mutex_unlock(&moe_sock_g.lock);
  if (dev < 0 || dev >= n) return MOE_ERROR(ncclInvalidArgument, "socket: device %d out of range [0, %d)", dev, n);
  return ncclSuccess;
}

static ncclResult_t moe_sock_get_properties(int dev, moe_net_props_t* props_p) {
  moe_net_iface_t d;
  MOE_CHECK(moe_sock_get_dev(dev, &d));
  moe_net_props_t p = {0};
  snprintf(p.name, sizeof(p.name), "%s", d.name);
  snprintf(p.pci_path, sizeof(p.pci_path), "%s", d.pci_path);
  p.guid = (uint64_t)dev;
  p.ptr_support = NCCL_PTR_HOST;  /* bytes go through the kernel's socket copy */
  p.reg_is_global = 1;            /* isend/irecv take any comm's handle: only write targets are per comm */
  p.force_flush = 0;
  p.speed_mbps = d.speed_mbps;
  p.port = 0;
  p.latency_us = 0.0f;
  p.max_comms = 65536;
  p.max_recvs = MOE_NET_MAX_RECVS;
  p.max_p2p_bytes = MOE_NET_MAX_MSG_BYTES;
  *props_p = p;
  return ncclSuccess;
}

/* ------------------------------------------------------------------------ */
/* listen / connect / accept */

typedef struct {
  int fd;
  uint8_t buf[MOE_SOCK_HELLO_BYTES];
  size_t got;
  uint64_t since_ns;
} moe_sock_incoming_t;

typedef struct {
  uint64_t conn_id;
  int nstreams;
  int have;
  int ctrl_fd;
  int data_fds[MOE_SOCK_MAX_STREAMS];
  uint64_t since_ns;
} moe_sock_group_t;

typedef struct {
  moe_net_comm_t base;
  pthread_mutex_t lock;
  int dev;
  int fd;
  uint64_t nonce;
  int nincoming;
  moe_sock_incoming_t incoming[MOE_SOCK_MAX_INCOMING];
  int ngroups;
  moe_sock_group_t groups[MOE_SOCK_MAX_GROUPS];
} moe_sock_listen_t;

static ncclResult_t moe_sock_listen(int dev, void* handle, moe_net_comm_t** listen_p) {
  ncclResult_t res = ncclSuccess;
  moe_net_iface_t d;
  MOE_CHECK(moe_sock_get_dev(dev, &d));
  moe_sock_listen_t* l = calloc(1, sizeof(*l));
  if (l == NULL) return MOE_ERROR(ncclSystemError, "socket: out of memory for a listen comm");
  l->fd = socket(d.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (l->fd < 0) {
    res = MOE_ERROR(ncclSystemError, "socket: socket() failed: %m");
    goto out_free;
  }
  struct sockaddr_storage addr = d.addr;
  socklen_t len = d.addr_len;
  char buf[96];
  if (bind(l->fd, (struct sockaddr*)&addr, len) != 0 || listen(l->fd, MOE_SOCK_LISTEN_BACKLOG) != 0 ||
      getsockname(l->fd, (struct sockaddr*)&addr, &len) != 0) {
    res = MOE_ERROR(ncclSystemError, "socket: cannot listen on %s (%s): %m", d.name,
                    moe_net_addr_str(&d.addr, buf, sizeof(buf)));
    goto out_close;
  }
  MOE_CHECK_GOTO(moe_sock_set_opts(l->fd, 0), res, out_close);
  l->nonce = moe_net_random_u64();
  moe_net_addr_handle_t h = {.addr = addr, .addr_len = len, .nonce = l->nonce};
  MOE_CHECK_GOTO(moe_sock_handle_encode(&h, handle, MOE_NET_HANDLE_BYTES), res, out_close);
  l->base = (moe_net_comm_t){.magic = MOE_NET_COMM_MAGIC, .type = MOE_NET_COMM_LISTEN, .transport = &moe_transport_socket};
  pthread_mutex_init(&l->lock, NULL);
  l->dev = dev;
  MOE_TRACE(NCCL_NET, "socket: listening on %s", moe_net_addr_str(&addr, buf, sizeof(buf)));
  *listen_p = &l->base;
  return ncclSuccess;
out_close:
  close(l->fd);
out_free:
  free(l);
  return res;
}

struct moe_sock_pending {
  uint64_t cookie;
  int slot;
  int dev;
  moe_net_addr_handle_t h;
  uint64_t conn_id;
  uint64_t deadline_ns;
  int nstreams;
  int fds[1 + MOE_SOCK_MAX_STREAMS];   /* [0]: control */
  int connected[1 + MOE_SOCK_MAX_STREAMS];
  size_t sent[1 + MOE_SOCK_MAX_STREAMS];
  uint8_t hello[1 + MOE_SOCK_MAX_STREAMS][MOE_SOCK_HELLO_BYTES];
};

static void moe_sock_pending_free(moe_sock_pending_t* p, int close_fds) {
  pthread_mutex_lock(&moe_sock_g.lock);
  if (moe_sock_g.pending[p->slot] == p) moe_sock_g.pending[p->slot] = NULL;
  pthread_mutex_unlock(&moe_sock_g.lock);
  if (close_fds)
    for (int i = 0; i < 1 + p->nstreams; i++)
      if (p->fds[i] >= 0) close(p->fds[i]);
  free(p);
}

/* The retry state lives in the caller's handle copy: a slot and a cookie
 * that must match our registry (the bytes came from a peer: never trust a
 * pointer in them). */
static ncclResult_t moe_sock_pending_lookup(const uint8_t* scratch, moe_sock_pending_t** p_p) {
  *p_p = NULL;
  if (moe_all_zero(scratch, MOE_NET_ADDR_HANDLE_SCRATCH_BYTES)) return ncclSuccess;
  uint32_t slot = moe_get_u32(scratch + 4);
  uint64_t cookie = moe_get_u64(scratch + 8);
  if (moe_get_u32(scratch) != MOE_SOCK_PENDING_MAGIC || slot >= MOE_SOCK_MAX_PENDING)
    return MOE_ERROR(ncclInvalidArgument, "socket connect: handle scratch area corrupted");
  pthread_mutex_lock(&moe_sock_g.lock);
  moe_sock_pending_t* p = moe_sock_g.pending[slot];
  if (p == NULL || p->cookie != cookie) p = NULL;
  pthread_mutex_unlock(&moe_sock_g.lock);
  if (p == NULL) return MOE_ERROR(ncclInvalidArgument, "socket connect: handle refers to no connection in progress");
  *p_p = p;
  return ncclSuccess;
}

static ncclResult_t moe_sock_pending_start(int dev, const moe_net_addr_handle_t* h, uint8_t* scratch,
                                           moe_sock_pending_t** p_p) {
  ncclResult_t res = ncclSuccess;
  moe_sock_pending_t* p = calloc(1, sizeof(*p));
  if (p == NULL) return MOE_ERROR(ncclSystemError, "socket: out of memory for a connection");
  int nstreams = moe_env()->socket_nthreads * moe_env()->socket_nsocks_per_thread;
  if (nstreams > MOE_SOCK_MAX_STREAMS) {
    MOE_WARN("socket: NCCL_SOCKET_NTHREADS x NCCL_NSOCKS_PERTHREAD = %d streams; using %d", nstreams,
             MOE_SOCK_MAX_STREAMS);
    nstreams = MOE_SOCK_MAX_STREAMS;
  }
  p->dev = dev;
  p->h = *h;
  p->nstreams = nstreams;
  p->conn_id = moe_net_random_u64();
  p->cookie = moe_net_random_u64();
  p->deadline_ns = moe_net_now_ns() + moe_sock_timeout_ns();
  for (int i = 0; i < 1 + nstreams; i++) p->fds[i] = -1;
  pthread_mutex_lock(&moe_sock_g.lock);
  p->slot = -1;
  for (int s = 0; s < MOE_SOCK_MAX_PENDING && p->slot < 0; s++)
    if (moe_sock_g.pending[s] == NULL) {
      moe_sock_g.pending[s] = p;
      p->slot = s;
    }
  pthread_mutex_unlock(&moe_sock_g.lock);
  if (p->slot < 0) {
    free(p);
    return MOE_ERROR(ncclSystemError, "socket: more than %d connections in progress", MOE_SOCK_MAX_PENDING);
  }
  char buf[96];
  for (int i = 0; i < 1 + nstreams; i++) {
    p->fds[i] = socket(h->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (p->fds[i] < 0) {
      res = MOE_ERROR(ncclSystemError, "socket: socket() failed: %m");
      goto out_free;
    }
    MOE_CHECK_GOTO(moe_sock_set_opts(p->fds[i], 1), res, out_free);
    if (connect(p->fds[i], (const struct sockaddr*)&h->addr, h->addr_len) != 0 && errno != EINPROGRESS) {
      res = MOE_ERROR(ncclRemoteError, "socket: connect to %s failed: %m",
                      moe_net_addr_str(&h->addr, buf, sizeof(buf)));
      goto out_free;
    }
    moe_sock_hello_t hello = {.nonce = h->nonce, .conn_id = p->conn_id, .index = i - 1, .nstreams = nstreams};
    moe_sock_hello_encode(&hello, p->hello[i]);
  }
  moe_put_u32(scratch, MOE_SOCK_PENDING_MAGIC);
  moe_put_u32(scratch + 4, (uint32_t)p->slot);
  moe_put_u64(scratch + 8, p->cookie);
  *p_p = p;
  return ncclSuccess;
out_free:
  moe_sock_pending_free(p, 1);
  return res;
}

/* Advances every socket of a pending connect; *done_p = 1 when all hellos are out. */
static ncclResult_t moe_sock_pending_progress(moe_sock_pending_t* p, int* done_p) {
  int done = 1;
  char buf[96];
  for (int i = 0; i < 1 + p->nstreams; i++) {
    if (!p->connected[i]) {
      struct pollfd pfd = {.fd = p->fds[i], .events = POLLOUT};
      if (poll(&pfd, 1, 0) <= 0) {
        done = 0;
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(p->fds[i], SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0)
        return MOE_ERROR(ncclRemoteError, "socket: connect to %s failed: %s",
                         moe_net_addr_str(&p->h.addr, buf, sizeof(buf)), strerror(err));
      p->connected[i] = 1;
    }
    size_t n = 0;
    MOE_CHECK(moe_sock_io(p->fds[i], 1, p->hello[i] + p->sent[i], MOE_SOCK_HELLO_BYTES - p->sent[i], &n));
    p->sent[i] += n;
    if (p->sent[i] < MOE_SOCK_HELLO_BYTES) done = 0;
  }
  *done_p = done;
  return ncclSuccess;
}

static ncclResult_t moe_sock_connect(int dev, const moe_net_conn_config_t* config, void* handle,
                                     moe_net_comm_t** send_p) {
  ncclResult_t res = ncclSuccess;
  uint8_t* scratch = (uint8_t*)handle + MOE_NET_ADDR_HANDLE_SCRATCH_OFF;
  moe_sock_pending_t* p = NULL;
  *send_p = NULL;
  MOE_CHECK(moe_sock_pending_lookup(scratch, &p));
  if (p == NULL) {
    moe_net_addr_handle_t h;
    moe_net_iface_t d;
    MOE_CHECK(moe_sock_get_dev(dev, &d));
    MOE_CHECK(moe_sock_handle_decode(handle, MOE_NET_HANDLE_BYTES, &h));
    MOE_CHECK(moe_sock_pending_start(dev, &h, scratch, &p));
  }
  int done = 0;
  MOE_CHECK_GOTO(moe_sock_pending_progress(p, &done), res, out_abandon);
  if (!done) {
    if (moe_net_now_ns() > p->deadline_ns) {
      char buf[96];
      res = MOE_ERROR(ncclRemoteError, "socket: connecting to %s timed out after %d ms",
                      moe_net_addr_str(&p->h.addr, buf, sizeof(buf)), moe_env()->timeout_ms);
      goto out_abandon;
    }
    return ncclSuccess;
  }
  moe_sock_comm_t* comm = NULL;
  memset(scratch, 0, MOE_NET_ADDR_HANDLE_SCRATCH_BYTES);
  int nstreams = p->nstreams;
  res = moe_sock_comm_create(MOE_NET_COMM_SEND, p->dev, p->fds[0], nstreams, p->fds + 1, &comm);
  moe_sock_pending_free(p, 0);
  if (res != ncclSuccess) return res;
  (void)config;  /* TCP has no traffic classes we could honour portably */
  *send_p = &comm->base;
  return ncclSuccess;
out_abandon:
  memset(scratch, 0, MOE_NET_ADDR_HANDLE_SCRATCH_BYTES);
  moe_sock_pending_free(p, 1);
  return res;
}

static void moe_sock_group_drop(moe_sock_listen_t* l, int g) {
  moe_sock_group_t* grp = &l->groups[g];
  if (grp->ctrl_fd >= 0) close(grp->ctrl_fd);
  for (int s = 0; s < grp->nstreams; s++)
    if (grp->data_fds[s] >= 0) close(grp->data_fds[s]);
  l->groups[g] = l->groups[--l->ngroups];
}

/* Files a socket whose hello arrived under its connection; 1 when consumed. */
static ncclResult_t moe_sock_group_add(moe_sock_listen_t* l, int fd, const moe_sock_hello_t* h, int* group_p) {
  *group_p = -1;
  if (h->nonce != l->nonce)
    return MOE_ERROR(ncclRemoteError, "socket accept: a connection for another listener (nonce mismatch)");
  int g = 0;
  while (g < l->ngroups && l->groups[g].conn_id != h->conn_id) g++;
  if (g == l->ngroups) {
    if (l->ngroups == MOE_SOCK_MAX_GROUPS)
      return MOE_ERROR(ncclSystemError, "socket accept: more than %d connections being set up", MOE_SOCK_MAX_GROUPS);
    moe_sock_group_t* grp = &l->groups[l->ngroups++];
    grp->conn_id = h->conn_id;
    grp->nstreams = h->nstreams;
    grp->have = 0;
    grp->ctrl_fd = -1;
    for (int s = 0; s < MOE_SOCK_MAX_STREAMS; s++) grp->data_fds[s] = -1;
    grp->since_ns = moe_net_now_ns();
  }
  moe_sock_group_t* grp = &l->groups[g];
  int* slot = h->index < 0 ? &grp->ctrl_fd : &grp->data_fds[h->index];
  if (grp->nstreams != h->nstreams || *slot >= 0)
    return MOE_ERROR(ncclRemoteError, "socket accept: inconsistent or duplicate socket in connection %llx",
                     (unsigned long long)h->conn_id);
  *slot = fd;
  grp->have++;
  if (grp->have == 1 + grp->nstreams) *group_p = g;
  return ncclSuccess;
}

static uint64_t moe_sock_hello_timeout_ns(void) {
  uint64_t ms = moe_env()->timeout_ms < MOE_SOCK_HELLO_TIMEOUT_MS ? (uint64_t)moe_env()->timeout_ms
                                                                   : (uint64_t)MOE_SOCK_HELLO_TIMEOUT_MS;
  return ms * 1000000ull;
}

static void moe_sock_incoming_drop(moe_sock_listen_t* l, int i) {
  close(l->incoming[i].fd);
  l->incoming[i] = l->incoming[--l->nincoming];
}

/* Reads the hello of incoming socket i; files it under its connection or
 * drops it (bad hello, or none in time). 1 when the entry left the list. */
static int moe_sock_incoming_progress(moe_sock_listen_t* l, int i, uint64_t now) {
  moe_sock_incoming_t* in = &l->incoming[i];
  size_t n = 0;
  ncclResult_t res = moe_sock_io(in->fd, 0, in->buf + in->got, MOE_SOCK_HELLO_BYTES - in->got, &n);
  in->got += n;
  if (res == ncclSuccess && in->got < MOE_SOCK_HELLO_BYTES) {
    if (now - in->since_ns <= moe_sock_hello_timeout_ns()) return 0;
    MOE_WARN("socket accept: a peer connected but sent no complete hello within %llu ms; dropped",
             (unsigned long long)(moe_sock_hello_timeout_ns() / 1000000ull));
    res = ncclRemoteError;
  }
  moe_sock_hello_t h;
  int group = -1;
  if (res == ncclSuccess && moe_sock_hello_decode(in->buf, in->got, &h) == ncclSuccess &&
      moe_sock_group_add(l, in->fd, &h, &group) == ncclSuccess) {
    l->incoming[i] = l->incoming[--l->nincoming]; /* the group owns the socket now */
    return 1;
  }
  moe_sock_incoming_drop(l, i);
  return 1;
}

/* Accepts new sockets and reads their hellos; bad ones are closed. */
static void moe_sock_accept_progress(moe_sock_listen_t* l, int* ready_p) {
  *ready_p = -1;
  uint64_t now = moe_net_now_ns();
  for (int i = 0; i < l->nincoming;)
    if (!moe_sock_incoming_progress(l, i, now)) i++;
  int evicted = 0;
  for (int k = 0; k < MOE_SOCK_ACCEPT_BURST; k++) {
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) break;
    if (moe_sock_set_opts(fd, 1) != ncclSuccess) {
      close(fd);
      continue;
    }
    if (l->nincoming == MOE_SOCK_MAX_INCOMING) {
      /* Full of sockets that said nothing yet: the oldest makes room. A real
       * connector sends its hello right after connecting, so it is never the
       * oldest for long. */
      int oldest = 0;
      for (int i = 1; i < l->nincoming; i++)
        if (l->incoming[i].since_ns < l->incoming[oldest].since_ns) oldest = i;
      moe_sock_incoming_drop(l, oldest);
      evicted++;
    }
    now = moe_net_now_ns();
    l->incoming[l->nincoming++] = (moe_sock_incoming_t){.fd = fd, .since_ns = now};
    moe_sock_incoming_progress(l, l->nincoming - 1, now); /* its hello may be here already */
  }
  if (evicted > 0)
    MOE_WARN("socket accept: more than %d connections sent no hello; dropped the %d oldest", MOE_SOCK_MAX_INCOMING,
             evicted);
  /* Groups opened above are younger than `now`: read the clock again, or the
   * unsigned age of a group just opened would wrap and drop it at once. */
  now = moe_net_now_ns();
  for (int g = 0; g < l->ngroups; g++) {
    const moe_sock_group_t* grp = &l->groups[g];
    if (grp->have == 1 + grp->nstreams || now - grp->since_ns <= moe_sock_timeout_ns()) continue;
    MOE_WARN("socket accept: connection %llx incomplete after %d ms; dropped", (unsigned long long)grp->conn_id,
             moe_env()->timeout_ms);
    moe_sock_group_drop(l, g);
    g--;
  }
  /* Several connections can complete in one call: each later call hands out
   * the next complete one. */
  for (int g = 0; g < l->ngroups && *ready_p < 0; g++)
    if (l->groups[g].have == 1 + l->groups[g].nstreams) *ready_p = g;
}

static ncclResult_t moe_sock_accept(moe_net_comm_t* listen, moe_net_comm_t** recv_p) {
  moe_sock_listen_t* l = (moe_sock_listen_t*)listen;
  *recv_p = NULL;
  pthread_mutex_lock(&l->lock);
  int ready = -1;
  moe_sock_accept_progress(l, &ready);
  if (ready < 0) {
    pthread_mutex_unlock(&l->lock);
    return ncclSuccess;
  }
  moe_sock_group_t grp = l->groups[ready];
  l->groups[ready] = l->groups[--l->ngroups];
  pthread_mutex_unlock(&l->lock);
  moe_sock_comm_t* comm = NULL;
  MOE_CHECK(moe_sock_comm_create(MOE_NET_COMM_RECV, l->dev, grp.ctrl_fd, grp.nstreams, grp.data_fds, &comm));
  *recv_p = &comm->base;
  return ncclSuccess;
}

static ncclResult_t moe_sock_close(moe_net_comm_t* c) {
  if (c->type == MOE_NET_COMM_LISTEN) {
    moe_sock_listen_t* l = (moe_sock_listen_t*)c;
    for (int i = 0; i < l->nincoming; i++) close(l->incoming[i].fd);
    while (l->ngroups > 0) moe_sock_group_drop(l, 0);
    close(l->fd);
    pthread_mutex_destroy(&l->lock);
    free(l);
    return ncclSuccess;
  }
  moe_sock_comm_destroy((moe_sock_comm_t*)c);
  return ncclSuccess;
}

/* ------------------------------------------------------------------------ */
/* Memory registration: bookkeeping only (the kernel copies), but a region
 * gets a key so that one-sided writes from the comm's peer can name it: the
 * slot in the comm's table in the low bits, random bits above, so a peer
 * cannot guess the key of a region it was not given, and a key given on one
 * connection is worth nothing on another. */

static int moe_sock_data_comm(const moe_net_comm_t* c) {
  return c != NULL && (c->type == MOE_NET_COMM_SEND || c->type == MOE_NET_COMM_RECV);
}

/* A free slot of the comm's table (grown on demand), -1 when full. Comm lock held. */
static int moe_sock_mr_slot(moe_sock_comm_t* comm) {
  for (int i = 0; i < comm->mr_slots; i++)
    if (comm->mrs[i] == NULL) return i;
  if (comm->mr_slots == MOE_SOCK_MAX_MRS) return -1;
  int slots = comm->mr_slots == 0 ? MOE_SOCK_MR_MIN_SLOTS : 2 * comm->mr_slots;
  moe_sock_mr_t** mrs = realloc(comm->mrs, (size_t)slots * sizeof(*mrs));
  if (mrs == NULL) return -1;
  memset(mrs + comm->mr_slots, 0, (size_t)(slots - comm->mr_slots) * sizeof(*mrs));
  int slot = comm->mr_slots;
  comm->mrs = mrs;
  comm->mr_slots = slots;
  return slot;
}

static ncclResult_t moe_sock_reg_mr(moe_net_comm_t* c, void* data, size_t size, int type, int dmabuf_fd,
                                    uint64_t dmabuf_offset, void** mr_p) {
  (void)dmabuf_offset;
  if (!moe_sock_data_comm(c)) return MOE_ERROR(ncclInvalidArgument, "socket: regMr needs a send or recv comm");
  if (type != NCCL_PTR_HOST || dmabuf_fd >= 0)
    return MOE_ERROR(ncclInvalidArgument, "socket: only host memory can be registered (type %d)", type);
  MOE_CHECK(moe_net_reg_check("socket regMr", data, size, type));
  moe_sock_comm_t* comm = (moe_sock_comm_t*)c;
  moe_sock_mr_t* mr = calloc(1, sizeof(*mr));
  if (mr == NULL) return MOE_ERROR(ncclSystemError, "socket: out of memory for a registration");
  pthread_mutex_lock(&comm->lock);
  int slot = moe_sock_mr_slot(comm);
  if (slot >= 0) {
    *mr = (moe_sock_mr_t){.magic = MOE_SOCK_MR_MAGIC, .base = data, .size = size,
                          .key = (moe_net_random_u64() << MOE_SOCK_MR_SLOT_BITS) | (uint64_t)slot};
    comm->mrs[slot] = mr;
  }
  pthread_mutex_unlock(&comm->lock);
  if (slot < 0) {
    free(mr);
    return MOE_ERROR(ncclSystemError, "socket: more than %d regions registered on one comm", MOE_SOCK_MAX_MRS);
  }
  *mr_p = mr;
  return ncclSuccess;
}

static ncclResult_t moe_sock_recv_progress(moe_sock_comm_t* comm);

/* 1 while a peer's write may be landing in `mr`: its inline payload on the
 * control stream, or chunks of a striped write filed for it. */
static int moe_sock_mr_busy(const moe_sock_comm_t* comm, const moe_sock_mr_t* mr) {
  return (comm->rmr == mr && comm->rleft > 0) || moe_sock_wq_targets(&comm->wq, mr);
}

/* A peer's write may be landing in `mr` right now (its header was read, its
 * payload is still arriving): let it finish before the region goes, bounded
 * by the timeout; a peer that stalls fails the comm, which stops the write.
 * The region is already out of the table, so no later write can start. Comm
 * lock held. */
static void moe_sock_mr_fence(moe_sock_comm_t* comm, const moe_sock_mr_t* mr) {
  uint64_t deadline = moe_net_now_ns() + moe_sock_timeout_ns();
  while (moe_sock_mr_busy(comm, mr) && comm->failed == ncclSuccess) {
    if (moe_sock_recv_progress(comm) != ncclSuccess || !moe_sock_mr_busy(comm, mr)) break;
    if (moe_net_now_ns() > deadline) {
      moe_sock_fail(comm, MOE_ERROR(ncclRemoteError, "socket: a write into a region being deregistered did not finish "
                                    "within %d ms", moe_env()->timeout_ms));
      break;
    }
    /* Inline bytes come on the control socket; chunks land through the
     * helper threads, which nothing here can wait on: check again soon. */
    struct pollfd pfd = {.fd = comm->ctrl_fd, .events = POLLIN};
    poll(&pfd, 1, moe_sock_wq_targets(&comm->wq, mr) ? 1 : MOE_SOCK_POLL_SLICE_MS);
  }
}

/* Finds the handle in the comm's table by value: a handle that was freed
 * already is never read. */
static ncclResult_t moe_sock_dereg_mr(moe_net_comm_t* c, void* handle) {
  if (!moe_sock_data_comm(c)) return MOE_ERROR(ncclInvalidArgument, "socket: deregMr needs a send or recv comm");
  moe_sock_comm_t* comm = (moe_sock_comm_t*)c;
  pthread_mutex_lock(&comm->lock);
  int slot = -1;
  for (int i = 0; i < comm->mr_slots && slot < 0; i++)
    if (handle != NULL && comm->mrs[i] == handle) slot = i;
  if (slot < 0) {
    pthread_mutex_unlock(&comm->lock);
    return MOE_ERROR(ncclInvalidArgument, "socket: deregMr of %p, which is not a registration of this comm "
                     "(deregistered twice, or registered on another comm)", handle);
  }
  moe_sock_mr_t* mr = comm->mrs[slot];
  comm->mrs[slot] = NULL;
  moe_sock_mr_fence(comm, mr);
  pthread_mutex_unlock(&comm->lock);
  free(mr);
  return ncclSuccess;
}

static ncclResult_t moe_sock_mr_key(void* handle, moe_net_rkey_t* key_p) {
  moe_sock_mr_t* mr = (moe_sock_mr_t*)handle;
  if (mr == NULL || mr->magic != MOE_SOCK_MR_MAGIC)
    return MOE_ERROR(ncclInvalidArgument, "socket: mr_key of something that is not a registration");
  *key_p = (moe_net_rkey_t){.addr = (uint64_t)(uintptr_t)mr->base, .size = mr->size, .key = mr->key};
  return ncclSuccess;
}

/* Resolves a peer's write target on this comm; every field came from the
 * network. Comm lock held. */
static ncclResult_t moe_sock_mr_target(moe_sock_comm_t* comm, const moe_sock_hdr_t* h, moe_sock_mr_t** mr_p) {
  if (comm->base.flags & MOE_NET_COMM_NO_WRITES)
    return MOE_ERROR(ncclRemoteError, "socket: the peer sent a one-sided write on a connection that accepts none "
                     "(NCCL plugin comms have no such operation)");
  const uint64_t slot = h->key & (MOE_SOCK_MAX_MRS - 1);
  moe_sock_mr_t* mr = slot < (uint64_t)comm->mr_slots ? comm->mrs[slot] : NULL;
  if (mr == NULL || mr->key != h->key)
    return MOE_ERROR(ncclRemoteError, "socket: the peer wrote with a key that names no region of this connection");
  if (h->offset > mr->size || h->size > mr->size - h->offset)
    return MOE_ERROR(ncclRemoteError, "socket: peer write [%llu, +%llu) outside its region of %zu bytes",
                     (unsigned long long)h->offset, (unsigned long long)h->size, mr->size);
  *mr_p = mr;
  return ncclSuccess;
}

/* ------------------------------------------------------------------------ */
/* Requests and the control-socket progress engine. */

static moe_sock_req_t* moe_sock_req_alloc(moe_sock_comm_t* comm) {
  if (comm->ctrlq_count == MOE_NET_MAX_REQUESTS) return NULL;
  for (int r = 0; r < MOE_NET_MAX_REQUESTS; r++) {
    moe_sock_req_t* req = &comm->reqs[r];
    if (req->state != MOE_SOCK_REQ_FREE) continue;
    req->base = (moe_net_request_t){.magic = MOE_NET_REQ_MAGIC, .nsizes = 1, .transport = &moe_transport_socket};
    req->is_write = 0;
    req->n = 0;
    req->nmatched = 0;
    req->ctrl_off = 0;
    req->striped = 0;
    req->after_writes = 0;
    moe_sock_track_reset(&req->track, 0);
    req->state = MOE_SOCK_REQ_CTRL;
    comm->ctrlq[(comm->ctrlq_head + comm->ctrlq_count++) % MOE_NET_MAX_REQUESTS] = req;
    return req;
  }
  return NULL;
}

static void moe_sock_ctrlq_pop(moe_sock_comm_t* comm) {
  comm->ctrlq_head = (comm->ctrlq_head + 1) % MOE_NET_MAX_REQUESTS;
  comm->ctrlq_count--;
}

/* A control transfer that stopped mid-message for longer than the timeout
 * means the peer is gone; an idle control socket is fine. */
static ncclResult_t moe_sock_ctrl_stall(moe_sock_comm_t* comm, int mid_message) {
  if (!mid_message) {
    comm->ctrl_stall_since_ns = 0;
    return ncclSuccess;
  }
  if (moe_sock_stalled(&comm->ctrl_stall_since_ns, moe_net_now_ns()))
    return moe_sock_fail(comm, MOE_ERROR(ncclRemoteError, "socket: control stream stalled mid-message for %d ms",
                                         moe_env()->timeout_ms));
  return ncclSuccess;
}

/* Sends headers and inline payloads of queued requests, in order. */
static ncclResult_t moe_sock_send_progress(moe_sock_comm_t* comm) {
  while (comm->ctrlq_count > 0) {
    moe_sock_req_t* req = comm->ctrlq[comm->ctrlq_head];
    moe_sock_slot_t* s = &req->slot[0];
    int inline_payload = req->is_write ? !req->striped : s->size <= MOE_SOCK_INLINE_MAX;
    size_t total = MOE_SOCK_HDR_BYTES + (inline_payload ? s->size : 0);
    while (req->ctrl_off < total) {
      struct iovec iov[2];
      int niov = 0;
      if (req->ctrl_off < MOE_SOCK_HDR_BYTES)
        iov[niov++] = (struct iovec){req->hdr + req->ctrl_off, MOE_SOCK_HDR_BYTES - req->ctrl_off};
      if (inline_payload && s->size > 0) {
        size_t poff = req->ctrl_off > MOE_SOCK_HDR_BYTES ? req->ctrl_off - MOE_SOCK_HDR_BYTES : 0;
        iov[niov++] = (struct iovec){s->buf + poff, s->size - poff};
      }
      struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
      ssize_t n = sendmsg(comm->ctrl_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return moe_sock_ctrl_stall(comm, 1);
      if (n < 0 && errno == EFAULT) /* our caller's buffer, not the peer */
        return moe_sock_fail(comm, MOE_ERROR(ncclInvalidArgument, "socket: isend/write: the local buffer [%p, +%zu "
                                             "bytes) is not accessible memory", s->buf, s->size));
      if (n <= 0)
        return moe_sock_fail(comm, MOE_ERROR(ncclRemoteError, "socket: sending on the control stream failed: %m"));
      req->ctrl_off += (size_t)n;
      comm->ctrl_stall_since_ns = 0;
    }
    if (req->striped) MOE_CHECK(moe_sock_dispatch_write(comm, &req->track, s->buf, s->size, &req->wchunk));
    else if (!inline_payload) MOE_CHECK(moe_sock_dispatch(comm, req, s->buf, s->size));
    req->state = MOE_SOCK_REQ_DATA;
    moe_sock_ctrlq_pop(comm);
  }
  return moe_sock_ctrl_stall(comm, 0);
}

/* Reads control bytes into [*dst, *dst + *left), advancing both, so a read
 * that stops part-way resumes where it stopped; 1 in *more_p while bytes
 * remain. */
static ncclResult_t moe_sock_ctrl_read(moe_sock_comm_t* comm, char** dst, size_t* left, int* more_p) {
  while (*left > 0) {
    size_t n = 0;
    int eof = 0;
    ncclResult_t res = moe_sock_io_eof(comm->ctrl_fd, 0, *dst, *left, &n, &eof);
    if (res != ncclSuccess) return moe_sock_fail(comm, res);
    if (eof && !moe_sock_wq_empty(&comm->wq)) {
      /* The peer closed after its last striped writes: their chunks may
       * still be on the data streams (each bounded by the stall timeout).
       * The end of the control stream is reported once they have landed. */
      *more_p = 1;
      return ncclSuccess;
    }
    if (eof) return moe_sock_fail(comm, MOE_ERROR(ncclRemoteError, "socket: the peer closed the connection"));
    if (n == 0) {
      *more_p = 1;
      return ncclSuccess;
    }
    *dst += n;
    *left -= n;
    comm->ctrl_stall_since_ns = 0;
  }
  *more_p = 0;
  return ncclSuccess;
}

/* Matches a decoded message header against the oldest posted irecv. */
static ncclResult_t moe_sock_match(moe_sock_comm_t* comm, moe_sock_req_t* req) {
  const moe_sock_hdr_t* h = &comm->rh;
  int slot = -1;
  for (int i = 0; i < req->n && slot < 0; i++)
    if (!req->slot[i].matched && req->slot[i].tag == h->tag) slot = i;
  if (slot < 0)
    return moe_sock_fail(comm, MOE_ERROR(ncclInvalidUsage, "socket: received a message with tag %d but the posted "
                                         "receive has no free buffer with that tag", h->tag));
  moe_sock_slot_t* s = &req->slot[slot];
  if (h->size > s->cap)
    return moe_sock_fail(comm, MOE_ERROR(ncclInvalidUsage, "socket: message truncated: the peer sent %llu bytes, "
                                         "the receive buffer (tag %d) holds %zu", (unsigned long long)h->size, h->tag,
                                         s->cap));
  s->matched = 1;
  s->size = h->size;
  req->nmatched++;
  req->after_writes = comm->wq.pushed; /* completes after the writes filed before it */
  if (h->size <= MOE_SOCK_INLINE_MAX) {
    comm->rdst = s->buf;
    comm->rleft = h->size;
    comm->rreq = req;
    comm->rslot = slot;
    return ncclSuccess;
  }
  return moe_sock_dispatch(comm, req, s->buf, h->size);
}

/* The immediate ring is full: back-pressure (the control stream waits) until
 * poll_imm() makes room, but a user that never polls gets an error after the
 * timeout, not a silent stop. */
static ncclResult_t moe_sock_imm_stall(moe_sock_comm_t* comm) {
  if (moe_sock_stalled(&comm->imm_full_since_ns, moe_net_now_ns()))
    return moe_sock_fail(comm, MOE_ERROR(ncclRemoteError, "socket: %d immediates of one-sided writes waited for "
                                         "poll_imm() for %d ms; the connection stops", MOE_IMM_RING,
                                         moe_env()->timeout_ms));
  return ncclSuccess;
}

/* The FIFO of striped writes is full: back-pressure on the control stream
 * until its head landed, bounded like the immediate ring's. */
static ncclResult_t moe_sock_wq_stall(moe_sock_comm_t* comm) {
  if (moe_sock_stalled(&comm->wq_full_since_ns, moe_net_now_ns()))
    return moe_sock_fail(comm, MOE_ERROR(ncclRemoteError, "socket: %d striped writes waited %d ms for their chunks "
                                         "or for poll_imm(); the connection stops", MOE_SOCK_MAX_RWRITES,
                                         moe_env()->timeout_ms));
  return ncclSuccess;
}

/* Delivers the immediates of striped writes whose chunks (and every earlier
 * write's) landed; a chunk that failed fails the comm. *blocked_p = 1 when
 * the immediate ring is full. */
static ncclResult_t moe_sock_retire_writes(moe_sock_comm_t* comm, int* blocked_p) {
  *blocked_p = 0;
  if (moe_sock_wq_empty(&comm->wq)) return ncclSuccess;
  ncclResult_t res = moe_sock_wq_retire(&comm->wq, &comm->imms, blocked_p);
  if (res != ncclSuccess) return moe_sock_fail(comm, res);
  if (!moe_sock_wq_full(&comm->wq)) comm->wq_full_since_ns = 0;
  return ncclSuccess;
}

/* A write's header from the peer (validated): an inline payload is read
 * next on the control stream; a striped one is queued on the data streams,
 * filed in the FIFO that orders the signals. */
static ncclResult_t moe_sock_recv_write(moe_sock_comm_t* comm, int* wait_p) {
  const moe_sock_hdr_t* h = &comm->rh;
  *wait_p = 0;
  moe_sock_mr_t* mr = NULL;
  ncclResult_t res = moe_sock_mr_target(comm, h, &mr);
  if (res != ncclSuccess) return moe_sock_fail(comm, res);
  int has_imm = (h->flags & MOE_SOCK_HDR_FLAG_IMM) != 0;
  if (h->flags & MOE_SOCK_HDR_FLAG_STRIPED) {
    if (moe_sock_wq_full(&comm->wq)) {
      *wait_p = 1;
      return moe_sock_wq_stall(comm);
    }
    moe_sock_rwrite_t* w = moe_sock_wq_push(&comm->wq, mr, has_imm, h->imm, 0);
    const moe_sock_chunk_t wc = {.wid = comm->rwid++, .key = h->key, .offset = h->offset};
    MOE_CHECK(moe_sock_dispatch_write(comm, &w->track, mr->base + h->offset, h->size, &wc));
    comm->rhdr_valid = 0;
    return ncclSuccess;
  }
  /* Until the payload landed, deregistration of mr waits for it. */
  comm->rmr = h->size > 0 ? mr : NULL;
  comm->rdst = h->size > 0 ? mr->base + h->offset : NULL;
  comm->rleft = h->size;
  comm->rimm_pending = has_imm;
  comm->rimm = h->imm;
  comm->rhdr_valid = 0;
  return ncclSuccess;
}

/* An inline write's immediate, once its bytes landed: behind striped writes
 * still moving it waits in their FIFO. *wait_p = 1: no room yet. */
static ncclResult_t moe_sock_deliver_imm(moe_sock_comm_t* comm, int* wait_p) {
  *wait_p = 0;
  if (!moe_sock_wq_empty(&comm->wq)) {
    if (moe_sock_wq_full(&comm->wq)) {
      *wait_p = 1;
      return moe_sock_wq_stall(comm);
    }
    moe_sock_wq_push(&comm->wq, NULL, 1, comm->rimm, 0);
  } else {
    if (moe_imm_ring_full(&comm->imms)) {
      *wait_p = 1;
      return moe_sock_imm_stall(comm);
    }
    comm->imm_full_since_ns = 0;
    moe_imm_ring_push(&comm->imms, comm->rimm);
  }
  comm->rimm_pending = 0;
  return ncclSuccess;
}

/* Reads headers and inline payloads; dispatches large payloads. */
static ncclResult_t moe_sock_recv_progress(moe_sock_comm_t* comm) {
  int blocked = 0;
  MOE_CHECK(moe_sock_retire_writes(comm, &blocked));
  if (blocked) MOE_CHECK(moe_sock_imm_stall(comm));
  else if (!moe_imm_ring_full(&comm->imms)) comm->imm_full_since_ns = 0;
  for (;;) {
    int more = 0;
    if (comm->rleft > 0 || comm->rimm_pending) {
      MOE_CHECK(moe_sock_ctrl_read(comm, &comm->rdst, &comm->rleft, &more));
      if (more) return moe_sock_ctrl_stall(comm, 1);
      comm->rreq = NULL; /* the payload landed */
      comm->rmr = NULL;
      if (comm->rimm_pending) {
        int wait = 0;
        MOE_CHECK(moe_sock_deliver_imm(comm, &wait));
        if (wait) return ncclSuccess;
      }
    }
    if (!comm->rhdr_valid) {
      size_t left = MOE_SOCK_HDR_BYTES - comm->rhdr_got;
      char* dst = (char*)comm->rhdr + comm->rhdr_got;
      MOE_CHECK(moe_sock_ctrl_read(comm, &dst, &left, &more));
      comm->rhdr_got = MOE_SOCK_HDR_BYTES - left;
      if (more) return moe_sock_ctrl_stall(comm, comm->rhdr_got > 0);
      ncclResult_t res = moe_sock_hdr_decode(comm->rhdr, MOE_SOCK_HDR_BYTES, &comm->rh);
      if (res != ncclSuccess) return moe_sock_fail(comm, res);
      comm->rhdr_valid = 1;
      comm->rhdr_got = 0;
    }
    if (comm->rh.op == MOE_SOCK_OP_WRITE) {
      int wait = 0;
      MOE_CHECK(moe_sock_recv_write(comm, &wait));
      if (wait) return ncclSuccess;
      continue;
    }
    /* A message: it belongs to the oldest irecv that still needs one. */
    if (comm->ctrlq_count == 0) return moe_sock_ctrl_stall(comm, 0);
    moe_sock_req_t* req = comm->ctrlq[comm->ctrlq_head];
    MOE_CHECK(moe_sock_match(comm, req));
    comm->rhdr_valid = 0;
    if (req->nmatched == req->n) {
      req->state = MOE_SOCK_REQ_DATA;
      moe_sock_ctrlq_pop(comm);
    }
  }
}

static ncclResult_t moe_sock_progress(moe_sock_comm_t* comm) {
  if (comm->failed != ncclSuccess) return comm->failed;
  return comm->base.type == MOE_NET_COMM_SEND ? moe_sock_send_progress(comm) : moe_sock_recv_progress(comm);
}

static ncclResult_t moe_sock_post_send(moe_sock_comm_t* comm, int is_write, void* data, size_t size, int tag,
                                       const moe_sock_hdr_t* hdr, moe_net_request_t** req_p) {
  ncclResult_t res = ncclSuccess;
  *req_p = NULL;
  pthread_mutex_lock(&comm->lock);
  if (comm->failed != ncclSuccess) {
    res = comm->failed;
    goto out_unlock;
  }
  moe_sock_req_t* req = moe_sock_req_alloc(comm);
  if (req == NULL) goto out_unlock;  /* all slots busy: NCCL retries */
  req->is_write = is_write;
  req->n = 1;
  req->slot[0] = (moe_sock_slot_t){.buf = data, .cap = size, .tag = tag, .size = size, .matched = 1};
  if (is_write) {
    req->wseq = comm->wseq++;
    req->striped = (hdr->flags & MOE_SOCK_HDR_FLAG_STRIPED) != 0;
    /* Its number: striped writes are counted in posting order, as the
     * receiver counts their headers. */
    if (req->striped) req->wchunk = (moe_sock_chunk_t){.wid = comm->swid++, .key = hdr->key, .offset = hdr->offset};
  }
  moe_sock_hdr_encode(hdr, req->hdr);
  /* Start right away: a small message leaves in this call. */
  res = moe_sock_send_progress(comm);
  if (res == ncclSuccess)
    *req_p = &req->base;
  else
    req->state = MOE_SOCK_REQ_FREE; /* the comm failed and stopped: the caller never sees the request */
out_unlock:
  pthread_mutex_unlock(&comm->lock);
  return res;
}

static ncclResult_t moe_sock_isend(moe_net_comm_t* c, void* data, size_t size, int tag, void* mr,
                                   moe_net_request_t** req_p) {
  (void)mr;
  if (size > MOE_NET_MAX_MSG_BYTES)
    return MOE_ERROR(ncclInvalidArgument, "socket: isend of %zu bytes exceeds the limit %zu", size,
                     MOE_NET_MAX_MSG_BYTES);
  if (data == NULL && size > 0) return MOE_ERROR(ncclInvalidArgument, "socket: isend of NULL with size %zu", size);
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_MSG, .tag = tag, .size = size};
  return moe_sock_post_send((moe_sock_comm_t*)c, 0, data, size, tag, &h, req_p);
}

static ncclResult_t moe_sock_write(moe_net_comm_t* c, void* local, size_t size, void* mr,
                                   const moe_net_rkey_t* remote, uint64_t offset, int with_imm, uint32_t imm,
                                   moe_net_request_t** req_p) {
  (void)mr;
  if (remote == NULL || size > MOE_NET_MAX_MSG_BYTES || (local == NULL && size > 0) || offset > remote->size ||
      size > remote->size - offset)
    return MOE_ERROR(ncclInvalidArgument, "socket: write of %zu bytes at offset %llu outside the remote region",
                     size, (unsigned long long)offset);
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_WRITE, .flags = with_imm ? MOE_SOCK_HDR_FLAG_IMM : 0, .size = size,
                      .offset = offset, .key = remote->key, .imm = with_imm ? imm : 0};
  const size_t stripe_min = (size_t)moe_env()->socket_stripe_kb << 10;
  if (stripe_min > 0 && size >= stripe_min) h.flags |= MOE_SOCK_HDR_FLAG_STRIPED;
  return moe_sock_post_send((moe_sock_comm_t*)c, 1, local, size, 0, &h, req_p);
}

static ncclResult_t moe_sock_irecv(moe_net_comm_t* c, int n, void** data, const size_t* sizes, const int* tags,
                                   void** mrs, moe_net_request_t** req_p) {
  (void)mrs;
  moe_sock_comm_t* comm = (moe_sock_comm_t*)c;
  ncclResult_t res = ncclSuccess;
  *req_p = NULL;
  if (n < 1 || n > MOE_NET_MAX_RECVS)
    return MOE_ERROR(ncclInvalidArgument, "socket: irecv of %d buffers (1..%d)", n, MOE_NET_MAX_RECVS);
  for (int i = 0; i < n; i++)
    if (data[i] == NULL && sizes[i] > 0)
      return MOE_ERROR(ncclInvalidArgument, "socket: irecv buffer %d is NULL with size %zu", i, sizes[i]);
  pthread_mutex_lock(&comm->lock);
  if (comm->failed != ncclSuccess) {
    res = comm->failed;
    goto out_unlock;
  }
  moe_sock_req_t* req = moe_sock_req_alloc(comm);
  if (req == NULL) goto out_unlock;
  req->n = n;
  req->base.nsizes = (uint32_t)n;
  for (int i = 0; i < n; i++)
    req->slot[i] = (moe_sock_slot_t){.buf = data[i], .cap = sizes[i], .tag = tags != NULL ? tags[i] : 0};
  /* Progress may already match messages to this request (and start moving
   * their payloads); on an error the comm stopped them all. */
  res = moe_sock_recv_progress(comm);
  if (res == ncclSuccess)
    *req_p = &req->base;
  else
    req->state = MOE_SOCK_REQ_FREE;
out_unlock:
  pthread_mutex_unlock(&comm->lock);
  return res;
}

static ncclResult_t moe_sock_iflush(moe_net_comm_t* c, int n, void** data, const int* sizes, void** mrs,
                                    moe_net_request_t** req_p) {
  (void)c, (void)n, (void)data, (void)sizes, (void)mrs;
  *req_p = NULL;  /* host memory only: nothing to flush */
  return ncclSuccess;
}

/* 1 while `req` must not complete yet to keep completions in order: a write
 * behind an earlier write whose chunks are still moving (send side), a
 * message behind writes the peer posted before it that have not landed
 * (receive side). Comm lock held. */
static int moe_sock_req_behind(const moe_sock_comm_t* comm, const moe_sock_req_t* req) {
  if (comm->base.type == MOE_NET_COMM_RECV) return !req->is_write && comm->wq.retired < req->after_writes;
  if (!req->is_write) return 0;
  for (int r = 0; r < MOE_NET_MAX_REQUESTS; r++) {
    const moe_sock_req_t* o = &comm->reqs[r];
    if (o->is_write && o->wseq < req->wseq &&
        (o->state == MOE_SOCK_REQ_CTRL ||
         (o->state == MOE_SOCK_REQ_DATA && atomic_load_explicit(&o->track.chunks_pending, memory_order_acquire) > 0)))
      return 1;
  }
  return 0;
}

static ncclResult_t moe_sock_test(moe_net_request_t* r, int* done_p, size_t* sizes_p) {
  moe_sock_req_t* req = (moe_sock_req_t*)r;
  moe_sock_comm_t* comm = req->comm;
  ncclResult_t res = ncclSuccess;
  *done_p = 0;
  pthread_mutex_lock(&comm->lock);
  if (req->state == MOE_SOCK_REQ_FREE) {
    res = MOE_ERROR(ncclInvalidArgument, "socket: test() of a request that already completed");
    goto out_unlock;
  }
  res = moe_sock_progress(comm);
  /* Chunks first: once none is pending, every error a helper thread recorded
   * for them is visible (it stores the error before it counts the chunk). */
  int pending = atomic_load_explicit(&req->track.chunks_pending, memory_order_acquire);
  if (res == ncclSuccess) {
    ncclResult_t err = moe_sock_track_result(&req->track);
    if (err != ncclSuccess) res = moe_sock_fail(comm, err);
  }
  if (res != ncclSuccess) {
    /* The comm is dead and its transfers stopped (moe_sock_fail): release the slot. */
    req->state = MOE_SOCK_REQ_FREE;
    goto out_unlock;
  }
  /* An inline payload still arriving belongs to this request until it landed. */
  int inline_busy = comm->rreq == req && comm->rleft > 0;
  if (req->state == MOE_SOCK_REQ_DATA && !inline_busy && pending == 0 && !moe_sock_req_behind(comm, req)) {
    if (sizes_p != NULL)
      for (int i = 0; i < req->n; i++) sizes_p[i] = req->slot[i].size;
    req->state = MOE_SOCK_REQ_FREE;
    *done_p = 1;
  }
out_unlock:
  pthread_mutex_unlock(&comm->lock);
  return res;
}

static ncclResult_t moe_sock_poll_imm(moe_net_comm_t* c, uint32_t* imm_p, int* got_p) {
  moe_sock_comm_t* comm = (moe_sock_comm_t*)c;
  ncclResult_t res = ncclSuccess;
  *got_p = 0;
  pthread_mutex_lock(&comm->lock);
  res = moe_sock_progress(comm);
  /* Writes that landed before the connection failed (a peer that wrote, then
   * closed) are delivered first; the error comes once none is left. */
  *got_p = moe_imm_ring_pop(&comm->imms, imm_p);
  if (*got_p) res = ncclSuccess;
  pthread_mutex_unlock(&comm->lock);
  return res;
}

const moe_transport_t moe_transport_socket = {
    .name = "socket",
    .kind = MOE_NET_KIND_SOCKET,
    .init = moe_sock_init,
    .fini = moe_sock_fini,
    .devices = moe_sock_devices,
    .get_properties = moe_sock_get_properties,
    .listen = moe_sock_listen,
    .connect = moe_sock_connect,
    .accept = moe_sock_accept,
    .close = moe_sock_close,
    .reg_mr = moe_sock_reg_mr,
    .dereg_mr = moe_sock_dereg_mr,
    .mr_key = moe_sock_mr_key,
    .isend = moe_sock_isend,
    .irecv = moe_sock_irecv,
    .iflush = moe_sock_iflush,
    .test = moe_sock_test,
    .write = moe_sock_write,
    .poll_imm = moe_sock_poll_imm,
};

__attribute__((constructor)) static void moe_transport_socket_register(void) { moe_transport_register(&moe_transport_socket); }
