/* SPDX-License-Identifier: Apache-2.0 */
/* The network proxy of one rank (see moe_proxy.h and kernels/moe_internode.h).
 *
 * Set-up: every rank listens once; it connects to each of its peers and
 * sends a hello naming itself, so the peer can
 * tell its accepted connections apart; once a peer's hello arrived, the rank
 * registers its receive region on that connection and sends the peer the
 * region's key. Both messages travel on the connection pair of the two ranks
 * (my send comm carries what the peer's recv comm expects, in order).
 *
 * Steady state: one thread per rank polls the counters the GPU writes, posts
 * one write (with an immediate) per run of ready chunks of a slab, in order,
 * and polls immediates. Each (channel, peer) sends one slab at a time, with at
 * most MOE_PROXY_WRITES writes and one credit in flight, and a slab is
 * written only after the peer returned the credit of the previous one, so a
 * slow receiver is never overwritten. Every value that arrives from the
 * network is checked before it becomes a counter the GPU trusts. */
#include "core/moe_proxy.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/moe_check.h"
#include "kernels/moe_error.h"

#define MOE_PROXY_MSG_MAGIC 0x6d6f6550u /* "moeP" */
#define MOE_PROXY_TAG_HELLO 1
#define MOE_PROXY_TAG_KEY 2
#define MOE_PROXY_IDLE_SPINS 4096   /* empty polls before the thread naps */
#define MOE_PROXY_NAP_NS 20000
#define MOE_PROXY_ERR_MAX 256
#define MOE_PROXY_WRITES 4               /* data writes in flight per (channel, peer) */
#define MOE_PROXY_MIN_WRITE (256u << 10) /* a shorter run waits while a write is in flight */
#define MOE_PROXY_CH MOE_NET_MAX_CHANNELS
/* moe_proxy_t.stop: run, finish what is in flight then stop, stop now. */
#define MOE_PROXY_RUN 0
#define MOE_PROXY_STOP_DRAIN 1
#define MOE_PROXY_STOP_NOW 2

typedef struct {
  uint32_t magic, tag;
  int32_t rank, pad;
  uint64_t regionBytes;
  moe_net_rkey_t key;
} moe_proxy_msg_t;

/* An accepted connection whose peer has not said who it is yet. */
typedef struct {
  moe_net_comm_t* comm;
  void* mr;
  moe_net_request_t* req;
  moe_proxy_msg_t msg;
} moe_proxy_incoming_t;

typedef struct {
  char handle[MOE_NET_HANDLE_BYTES]; /* the peer's listen handle, connect()'s scratch */
  int handleCopied;
  moe_net_comm_t* send;
  moe_net_comm_t* recv;
  void* sendMr;       /* the send region on `send` */
  void* recvMr;       /* the receive region on `recv` */
  void* sendMsgMr;    /* the hello/key messages on `send` */
  void* recvMsgMr;    /* the key message (q->in) on `recv` */
  void* helloMr;      /* the hello message, registered when it was accepted */
  moe_net_rkey_t remote; /* the peer's receive region */
  moe_proxy_msg_t out[2], in;
  moe_net_request_t* sendReq;
  moe_net_request_t* recvReq;
  int helloSent, keyPosted, keySent, haveKey;
  /* steady state, sending: slab issued[c] is being sent while active[c] */
  unsigned long long issued[MOE_PROXY_CH], creditIn[MOE_PROXY_CH], creditOut[MOE_PROXY_CH];
  int active[MOE_PROXY_CH], nChunks[MOE_PROXY_CH], nextChunk[MOE_PROXY_CH];
  unsigned long long slabBytes[MOE_PROXY_CH], chunkBytes[MOE_PROXY_CH];
  moe_net_request_t* dataReq[MOE_PROXY_CH][MOE_PROXY_WRITES]; /* a ring, oldest at dataHead */
  int dataHead[MOE_PROXY_CH], dataCount[MOE_PROXY_CH];
  moe_net_request_t* creditReq[MOE_PROXY_CH];
  /* receiving: slabs landed whole, chunks of the next one, progress values */
  unsigned long long arrived[MOE_PROXY_CH];
  int chunksIn[MOE_PROXY_CH];
  unsigned long long landed[MOE_PROXY_CH], flushing[MOE_PROXY_CH], published[MOE_PROXY_CH];
  moe_net_request_t* flushReq[MOE_PROXY_CH]; /* GPU slabs: progress published once flushed */
} moe_proxy_peer_t;

struct moe_proxy {
  moe_proxy_args_t a;
  int nActive;             /* indices with a peer */
  moe_net_comm_t* listen;
  moe_proxy_peer_t peer[MOE_MAX_NODES];
  moe_proxy_incoming_t incoming[MOE_MAX_NODES];
  int nIncoming, nIdentified;
  long long deadlineNs;
  pthread_t thread;
  int threadStarted;
  atomic_int stop;
  char err[MOE_PROXY_ERR_MAX];
};

static long long moe_proxy_now_ns(void) { return (long long)moe_net_now_ns(); }

static ncclResult_t moe_proxy_fail(moe_proxy_t* p, ncclResult_t res) {
  if (p->err[0] == '\0') snprintf(p->err, sizeof(p->err), "%s", ncclMoeGetLastError());
  /* The message first: recording the code releases it to whoever sees the code. */
  moe_error_record_host(p->a.error, MOE_KERR_NET);
  return res;
}

ncclResult_t moe_proxy_create(const moe_proxy_args_t* args, void* handle, moe_proxy_t** proxy_p) {
  MOE_ARG_CHECK(args != NULL && handle != NULL && proxy_p != NULL, "moe_proxy_create: NULL argument");
  MOE_ARG_CHECK(args->nPeers >= 1 && args->nPeers <= MOE_MAX_NODES && args->nChannels >= 1 &&
                    args->nChannels <= MOE_NET_MAX_CHANNELS,
                "proxy: %d peer indices, %d channels", args->nPeers, args->nChannels);
  int active = 0;
  for (int i = 0; i < args->nPeers; i++) {
    MOE_ARG_CHECK(args->peerRank[i] < 0 || (args->peerRank[i] != args->rank && args->remoteSlot[i] >= 0 &&
                                            args->remoteSlot[i] < MOE_MAX_NODES),
                  "proxy: peer index %d is rank %d, slot %d there", i, args->peerRank[i], args->remoteSlot[i]);
    active += args->peerRank[i] >= 0;
  }
  MOE_ARG_CHECK(active >= 1, "proxy: no peer");
  moe_proxy_t* p = calloc(1, sizeof(*p));
  if (p == NULL) return MOE_ERROR(ncclSystemError, "out of host memory for the network proxy");
  p->a = *args;
  p->nActive = active;
  ncclResult_t res = args->transport->listen(args->dev, handle, &p->listen);
  if (res != ncclSuccess) {
    free(p);
    return res;
  }
  *proxy_p = p;
  return ncclSuccess;
}

/* ------------------------------------------------------------------ set-up */
static ncclResult_t moe_proxy_test(const moe_transport_t* t, moe_net_request_t** req, int* done_p) {
  *done_p = 0;
  if (*req == NULL) return ncclSuccess;
  MOE_CHECK(t->test(*req, done_p, NULL));
  if (*done_p) *req = NULL;
  return ncclSuccess;
}

/* The peer index of `rank`, -1 if it is not a peer. */
static int moe_proxy_index_of(const moe_proxy_t* p, int rank) {
  for (int i = 0; i < p->a.nPeers; i++)
    if (p->a.peerRank[i] >= 0 && p->a.peerRank[i] == rank) return i;
  return -1;
}

static ncclResult_t moe_proxy_check_msg(const moe_proxy_t* p, const moe_proxy_msg_t* m, uint32_t tag) {
  if (m->magic != MOE_PROXY_MSG_MAGIC || m->tag != tag || moe_proxy_index_of(p, m->rank) < 0)
    return MOE_ERROR(ncclRemoteError, "rank %d: unexpected set-up message (magic 0x%x, tag %u, rank %d)",
                     p->a.rank, m->magic, m->tag, m->rank);
  if (tag == MOE_PROXY_TAG_KEY && (m->regionBytes != p->a.geom.total || m->key.size < p->a.geom.total))
    return MOE_ERROR(ncclRemoteError, "rank %d: rank %d's receive region has %llu bytes, expected %zu (configs differ?)",
                     p->a.rank, m->rank, (unsigned long long)m->regionBytes, p->a.geom.total);
  return ncclSuccess;
}

/* My side of the connection to peer index m: connect, hello, then (once the peer
 * has said hello on its connection) the key of my receive region. */
static ncclResult_t moe_proxy_progress_send(moe_proxy_t* p, int m, const char* handle) {
  const moe_transport_t* t = p->a.transport;
  moe_proxy_peer_t* q = &p->peer[m];
  int done = 0;
  if (q->send == NULL) {
    moe_net_conn_config_t cfg = {.traffic_class = NCCL_NET_TRAFFIC_CLASS_UNDEF};
    /* connect() keeps its progress in the handle: copy it once, then pass
     * the same copy on every call. */
    if (!q->handleCopied) {
      memcpy(q->handle, handle, sizeof(q->handle));
      q->handleCopied = 1;
    }
    MOE_CHECK(t->connect(p->a.dev, &cfg, q->handle, &q->send));
    if (q->send == NULL) return ncclSuccess;
    MOE_CHECK(t->reg_mr(q->send, p->a.sendBuf, p->a.geom.total, p->a.bufType, -1, 0, &q->sendMr));
    MOE_CHECK(t->reg_mr(q->send, q->out, sizeof(q->out), NCCL_PTR_HOST, -1, 0, &q->sendMsgMr));
  }
  MOE_CHECK(moe_proxy_test(t, &q->sendReq, &done));
  if (q->sendReq != NULL) return ncclSuccess;
  if (!q->helloSent) {
    q->out[0] = (moe_proxy_msg_t){.magic = MOE_PROXY_MSG_MAGIC, .tag = MOE_PROXY_TAG_HELLO, .rank = p->a.rank};
    MOE_CHECK(t->isend(q->send, &q->out[0], sizeof(q->out[0]), MOE_PROXY_TAG_HELLO, q->sendMsgMr, &q->sendReq));
    if (q->sendReq != NULL) q->helloSent = 1;
    return ncclSuccess;
  }
  if (!q->keyPosted && q->recv != NULL) {
    q->out[1] = (moe_proxy_msg_t){.magic = MOE_PROXY_MSG_MAGIC, .tag = MOE_PROXY_TAG_KEY, .rank = p->a.rank,
                                  .regionBytes = p->a.geom.total};
    MOE_CHECK(t->mr_key(q->recvMr, &q->out[1].key));
    MOE_CHECK(t->isend(q->send, &q->out[1], sizeof(q->out[1]), MOE_PROXY_TAG_KEY, q->sendMsgMr, &q->sendReq));
    if (q->sendReq != NULL) q->keyPosted = 1;
    return ncclSuccess;
  }
  if (q->keyPosted) q->keySent = 1;
  return ncclSuccess;
}

/* Accepted connections: read each one's hello, then the key that follows. */
static ncclResult_t moe_proxy_progress_accept(moe_proxy_t* p) {
  const moe_transport_t* t = p->a.transport;
  if (p->nIncoming < p->nActive) {
    moe_net_comm_t* recv = NULL;
    MOE_CHECK(t->accept(p->listen, &recv));
    if (recv != NULL) {
      moe_proxy_incoming_t* in = &p->incoming[p->nIncoming++];
      in->comm = recv;
      MOE_CHECK(t->reg_mr(recv, &in->msg, sizeof(in->msg), NCCL_PTR_HOST, -1, 0, &in->mr));
    }
  }
  for (int i = 0; i < p->nIncoming; i++) {
    moe_proxy_incoming_t* in = &p->incoming[i];
    if (in->comm == NULL) continue; /* identified */
    int done = 0;
    if (in->req == NULL) {
      void* data = &in->msg;
      size_t size = sizeof(in->msg);
      int tag = MOE_PROXY_TAG_HELLO;
      MOE_CHECK(t->irecv(in->comm, 1, &data, &size, &tag, &in->mr, &in->req));
      continue;
    }
    MOE_CHECK(moe_proxy_test(t, &in->req, &done));
    if (!done) continue;
    MOE_CHECK(moe_proxy_check_msg(p, &in->msg, MOE_PROXY_TAG_HELLO));
    moe_proxy_peer_t* q = &p->peer[moe_proxy_index_of(p, in->msg.rank)];
    if (q->recv != NULL)
      return MOE_ERROR(ncclRemoteError, "rank %d: two connections claim to come from rank %d", p->a.rank, in->msg.rank);
    q->recv = in->comm;
    q->helloMr = in->mr;
    in->comm = NULL;
    p->nIdentified++;
    MOE_CHECK(t->reg_mr(q->recv, p->a.recvBuf, p->a.geom.total, p->a.bufType, -1, 0, &q->recvMr));
    /* The key message lands in q->in: its own registration (verbs write into
     * exactly the registered pages). */
    MOE_CHECK(t->reg_mr(q->recv, &q->in, sizeof(q->in), NCCL_PTR_HOST, -1, 0, &q->recvMsgMr));
  }
  for (int m = 0; m < p->a.nPeers; m++) {
    moe_proxy_peer_t* q = &p->peer[m];
    if (p->a.peerRank[m] < 0 || q->recv == NULL || q->haveKey) continue;
    int done = 0;
    if (q->recvReq == NULL) {
      void* data = &q->in;
      size_t size = sizeof(q->in);
      int tag = MOE_PROXY_TAG_KEY;
      MOE_CHECK(t->irecv(q->recv, 1, &data, &size, &tag, &q->recvMsgMr, &q->recvReq));
      continue;
    }
    MOE_CHECK(moe_proxy_test(t, &q->recvReq, &done));
    if (!done) continue;
    MOE_CHECK(moe_proxy_check_msg(p, &q->in, MOE_PROXY_TAG_KEY));
    if (q->in.rank != p->a.peerRank[m])
      return MOE_ERROR(ncclRemoteError, "rank %d: key message of rank %d on rank %d's connection", p->a.rank,
                       q->in.rank, p->a.peerRank[m]);
    q->remote = q->in.key;
    q->haveKey = 1;
  }
  return ncclSuccess;
}

ncclResult_t moe_proxy_connect(moe_proxy_t* p, const char* handles, int* done_p) {
  MOE_ARG_CHECK(p != NULL && handles != NULL && done_p != NULL, "moe_proxy_connect: NULL argument");
  *done_p = 0;
  if (p->deadlineNs == 0) p->deadlineNs = moe_proxy_now_ns() + (long long)p->a.timeoutMs * 1000000LL;
  int all = 1;
  for (int m = 0; m < p->a.nPeers; m++) {
    if (p->a.peerRank[m] < 0) continue;
    MOE_CHECK(moe_proxy_progress_send(p, m, handles + (size_t)m * MOE_NET_HANDLE_BYTES));
    if (!p->peer[m].keySent) all = 0;
  }
  MOE_CHECK(moe_proxy_progress_accept(p));
  for (int m = 0; m < p->a.nPeers; m++)
    if (p->a.peerRank[m] >= 0 && !p->peer[m].haveKey) all = 0;
  if (all) {
    *done_p = 1;
    return ncclSuccess;
  }
  if (moe_proxy_now_ns() > p->deadlineNs) {
    for (int m = 0; m < p->a.nPeers; m++)
      if (p->a.peerRank[m] >= 0 && (!p->peer[m].keySent || !p->peer[m].haveKey))
        return MOE_ERROR(ncclSystemError, "rank %d: rank %d (peer %d) did not connect within %d ms (NCCL_MOE_TIMEOUT_MS): "
                         "connected %d, hello sent %d, key sent %d, its connection identified %d, its key received %d "
                         "(%d of %d connections accepted, %d identified)",
                         p->a.rank, p->a.peerRank[m], m, p->a.timeoutMs, p->peer[m].send != NULL,
                         p->peer[m].helloSent, p->peer[m].keySent, p->peer[m].recv != NULL, p->peer[m].haveKey,
                         p->nIncoming, p->nActive, p->nIdentified);
  }
  return ncclSuccess;
}

/* ------------------------------------------------------------ steady state */
static unsigned long long moe_proxy_load(const volatile unsigned long long* v) {
  return __atomic_load_n((const unsigned long long*)v, __ATOMIC_ACQUIRE);
}

static void moe_proxy_store(volatile unsigned long long* v, unsigned long long x) {
  __atomic_store_n((unsigned long long*)v, x, __ATOMIC_RELEASE);
}

/* Full operation number from the low bits an immediate carries, given the
 * last one seen: the next value with those low bits. */
static unsigned long long moe_proxy_widen(unsigned long long last, uint32_t low) {
  return last + (((unsigned long long)low - last) & MOE_IMM_SEQ_MASK);
}

/* Takes slab issued + 1 of channel c to peer m from the GPU once its credit
 * is back: its size and chunk geometry, checked. */
static ncclResult_t moe_proxy_take_slab(moe_proxy_t* p, int m, int c, int* progress) {
  moe_proxy_peer_t* q = &p->peer[m];
  const moe_net_flags_t* f = p->a.flags;
  const unsigned long long ready = moe_proxy_load(&f->ready[c][m]);
  if (ready == q->issued[c]) return ncclSuccess;
  if (ready != q->issued[c] + 1)
    return MOE_ERROR(ncclInternalError, "rank %d: channel %d slab for peer %d jumped from %llu to %llu", p->a.rank, c,
                     m, q->issued[c], ready);
  if (q->creditIn[c] + 1 < ready) return ncclSuccess; /* the peer still reads the previous slab */
  const unsigned long long bytes = f->bytes[c][m], nChunks = f->nchunks[c][m], chunkBytes = f->chunkBytes[c][m];
  unsigned long long begin, end;
  moe_net_chunk_range(bytes, chunkBytes, (int)nChunks - 1, &begin, &end);
  if (bytes > p->a.geom.slab[c] || nChunks < 1 || nChunks > MOE_NET_MAX_CHUNKS || end != bytes ||
      (nChunks > 1 && begin >= end))
    return MOE_ERROR(ncclInternalError, "rank %d: channel %d slab of %llu bytes in %llu chunks of %llu (at most %zu "
                     "bytes, %d chunks, covering it)", p->a.rank, c, bytes, nChunks, chunkBytes, p->a.geom.slab[c],
                     MOE_NET_MAX_CHUNKS);
  q->issued[c] = ready;
  q->active[c] = 1;
  q->slabBytes[c] = bytes;
  q->chunkBytes[c] = chunkBytes;
  q->nChunks[c] = (int)nChunks;
  q->nextChunk[c] = 0;
  *progress = 1;
  return ncclSuccess;
}

/* Channel c to peer m: completes writes, marks the slab sent once all are
 * done, takes the next slab, and writes runs of its chunks the GPU marked
 * ready, in order. */
static ncclResult_t moe_proxy_send_data(moe_proxy_t* p, int m, int c, int* progress) {
  const moe_transport_t* t = p->a.transport;
  moe_proxy_peer_t* q = &p->peer[m];
  moe_net_flags_t* f = p->a.flags;
  while (q->dataCount[c] > 0) { /* writes on one connection complete in order */
    int done = 0;
    MOE_CHECK(moe_proxy_test(t, &q->dataReq[c][q->dataHead[c]], &done));
    if (!done) break;
    q->dataHead[c] = (q->dataHead[c] + 1) % MOE_PROXY_WRITES;
    q->dataCount[c]--;
    *progress = 1;
  }
  if (q->active[c] && q->nextChunk[c] == q->nChunks[c] && q->dataCount[c] == 0) {
    moe_proxy_store(&f->sent[c][m], q->issued[c]);
    q->active[c] = 0;
    *progress = 1;
  }
  if (!q->active[c]) MOE_CHECK(moe_proxy_take_slab(p, m, c, progress));
  while (q->active[c] && q->nextChunk[c] < q->nChunks[c] && q->dataCount[c] < MOE_PROXY_WRITES) {
    int end = q->nextChunk[c];
    while (end < q->nChunks[c] && moe_proxy_load(&f->chunkReady[c][m][end]) == q->issued[c]) end++;
    if (end == q->nextChunk[c]) break;
    unsigned long long b, e, unused;
    moe_net_chunk_range(q->slabBytes[c], q->chunkBytes[c], q->nextChunk[c], &b, &unused);
    moe_net_chunk_range(q->slabBytes[c], q->chunkBytes[c], end - 1, &unused, &e);
    /* While a write is in flight a short run waits for more chunks: fewer,
     * larger messages. */
    if (q->dataCount[c] > 0 && end < q->nChunks[c] && e - b < MOE_PROXY_MIN_WRITE) break;
    /* The peer's receive region holds one slab per source: ours is remoteSlot[m]. */
    const size_t off = moe_net_slab_offset(&p->a.geom, c, m) + b;
    const size_t remoteOff = moe_net_slab_offset(&p->a.geom, c, p->a.remoteSlot[m]) + b;
    moe_net_request_t* req = NULL;
    MOE_CHECK(t->write(q->send, p->a.sendBuf + off, e - b, q->sendMr, &q->remote, remoteOff, 1,
                       moe_imm_data(c, q->issued[c], end, end == q->nChunks[c]), &req));
    if (req == NULL) break; /* the connection's request slots are full: later */
    q->dataReq[c][(q->dataHead[c] + q->dataCount[c]) % MOE_PROXY_WRITES] = req;
    q->dataCount[c]++;
    q->nextChunk[c] = end;
    *progress = 1;
  }
  return ncclSuccess;
}

/* Returns the GPU's "slab read" of channel c from peer m as a credit. */
static ncclResult_t moe_proxy_send_credit(moe_proxy_t* p, int m, int c, int* progress) {
  const moe_transport_t* t = p->a.transport;
  moe_proxy_peer_t* q = &p->peer[m];
  int done = 0;
  if (q->creditReq[c] != NULL) {
    MOE_CHECK(moe_proxy_test(t, &q->creditReq[c], &done));
    if (done) *progress = 1;
    return ncclSuccess;
  }
  unsigned long long consumed = moe_proxy_load(&p->a.flags->consumed[c][m]);
  if (consumed <= q->creditOut[c]) return ncclSuccess;
  MOE_CHECK(t->write(q->send, p->a.sendBuf, 0, q->sendMr, &q->remote, 0, 1, moe_imm_encode(MOE_IMM_CREDIT + c, consumed),
                     &q->creditReq[c]));
  if (q->creditReq[c] != NULL) {
    q->creditOut[c] = consumed;
    *progress = 1;
  }
  return ncclSuccess;
}

/* Makes a progress value of channel c from peer m visible to the GPU. */
static void moe_proxy_publish(moe_proxy_t* p, int m, int c, unsigned long long v) {
  moe_proxy_peer_t* q = &p->peer[m];
  moe_proxy_store(&p->a.flags->progress[c][m], v);
  if (moe_net_progress_last(v)) moe_proxy_store(&p->a.flags->arrived[c][m], moe_net_progress_slab(v));
  q->published[c] = v;
}

static ncclResult_t moe_proxy_receive(moe_proxy_t* p, int m, int* progress) {
  moe_proxy_peer_t* q = &p->peer[m];
  for (;;) {
    uint32_t imm = 0;
    int got = 0;
    MOE_CHECK(p->a.transport->poll_imm(q->recv, &imm, &got));
    if (!got) return ncclSuccess;
    *progress = 1;
    const int kind = (int)(imm >> MOE_IMM_KIND_SHIFT);
    const uint32_t low = imm & MOE_IMM_SEQ_MASK;
    if (kind < p->a.nChannels) {
      const unsigned long long k = q->arrived[kind] + 1;
      const int chunks = (int)((imm >> MOE_IMM_CHUNK_SHIFT) & MOE_IMM_CHUNK_MASK), last = (imm & MOE_IMM_LAST) != 0;
      if ((k & MOE_IMM_SEQ_MASK) != low || chunks <= q->chunksIn[kind] || chunks > MOE_NET_MAX_CHUNKS)
        return MOE_ERROR(ncclRemoteError, "rank %d: rank %d sent channel %d slab %u up to chunk %d, expected slab %llu "
                         "past chunk %d", p->a.rank, p->a.peerRank[m], kind, low, chunks, k, q->chunksIn[kind]);
      q->landed[kind] = moe_net_progress(k, last, chunks);
      q->chunksIn[kind] = chunks;
      if (last) {
        q->arrived[kind] = k;
        q->chunksIn[kind] = 0;
      }
      /* GPU slabs wait for a flush (moe_proxy_flushes) before the GPU may read them. */
      if (p->a.bufType != NCCL_PTR_CUDA) moe_proxy_publish(p, m, kind, q->landed[kind]);
    } else if (kind >= MOE_IMM_CREDIT && kind < MOE_IMM_CREDIT + p->a.nChannels &&
               (imm & ~(MOE_IMM_SEQ_MASK | MOE_IMM_KIND_MASK)) == 0) { /* credits carry no chunk bits */
      const int c = kind - MOE_IMM_CREDIT;
      const unsigned long long k = moe_proxy_widen(q->creditIn[c], low);
      if (k == q->creditIn[c] || k > q->issued[c])
        return MOE_ERROR(ncclRemoteError, "rank %d: rank %d returned credit %llu of channel %d, only %llu were sent",
                         p->a.rank, p->a.peerRank[m], k, c, q->issued[c]);
      q->creditIn[c] = k;
    } else {
      return MOE_ERROR(ncclRemoteError, "rank %d: rank %d sent an unknown immediate 0x%x", p->a.rank,
                       p->a.peerRank[m], imm);
    }
  }
}

/* GPU slabs: the NIC wrote GPU memory; a flush makes it visible to the GPU
 * before the progress that covers it is published (a no-op request when the
 * NIC needs none). One flush per channel at a time, covering all that landed
 * when it was posted. */
static ncclResult_t moe_proxy_flushes(moe_proxy_t* p, int m, int* progress) {
  moe_proxy_peer_t* q = &p->peer[m];
  if (p->a.bufType != NCCL_PTR_CUDA) return ncclSuccess;
  for (int c = 0; c < p->a.nChannels; c++) {
    if (q->flushReq[c] != NULL) {
      int done = 0;
      MOE_CHECK(moe_proxy_test(p->a.transport, &q->flushReq[c], &done));
      if (!done) continue;
      moe_proxy_publish(p, m, c, q->flushing[c]);
      *progress = 1;
    }
    if (q->landed[c] == q->published[c]) continue;
    void* slab = p->a.recvBuf + moe_net_slab_offset(&p->a.geom, c, m);
    const int size = (int)p->a.geom.slab[c];
    q->flushing[c] = q->landed[c];
    MOE_CHECK(p->a.transport->iflush(q->recv, 1, &slab, &size, &q->recvMr, &q->flushReq[c]));
    if (q->flushReq[c] == NULL) moe_proxy_publish(p, m, c, q->flushing[c]);
    *progress = 1;
  }
  return ncclSuccess;
}

static ncclResult_t moe_proxy_step(moe_proxy_t* p, int* progress) {
  for (int m = 0; m < p->a.nPeers; m++) {
    if (p->a.peerRank[m] < 0) continue;
    MOE_CHECK(moe_proxy_receive(p, m, progress));
    MOE_CHECK(moe_proxy_flushes(p, m, progress));
    for (int c = 0; c < p->a.nChannels; c++) {
      MOE_CHECK(moe_proxy_send_data(p, m, c, progress));
      MOE_CHECK(moe_proxy_send_credit(p, m, c, progress));
    }
  }
  return ncclSuccess;
}

/* Nothing of ours still in flight: every slab the GPU handed over went out
 * whole, and every slab it read was returned as credit. */
static int moe_proxy_quiet(moe_proxy_t* p) {
  for (int m = 0; m < p->a.nPeers; m++) {
    if (p->a.peerRank[m] < 0) continue;
    const moe_proxy_peer_t* q = &p->peer[m];
    for (int c = 0; c < p->a.nChannels; c++)
      if (q->active[c] || q->dataCount[c] > 0 || q->creditReq[c] != NULL ||
          moe_proxy_load(&p->a.flags->ready[c][m]) != q->issued[c] ||
          moe_proxy_load(&p->a.flags->consumed[c][m]) != q->creditOut[c])
        return 0;
  }
  return 1;
}

static void* moe_proxy_main(void* arg) {
  moe_proxy_t* p = arg;
  int idle = 0;
  long long drainUntil = 0;
  for (;;) {
    const int stop = atomic_load(&p->stop);
    if (stop == MOE_PROXY_STOP_NOW) break;
    /* Asked to stop: finish what the GPU handed over (a peer may still wait
     * for our last slab or credit), bounded by the timeout. */
    if (stop == MOE_PROXY_STOP_DRAIN) {
      if (drainUntil == 0) drainUntil = moe_proxy_now_ns() + (long long)p->a.timeoutMs * 1000000LL;
      if (moe_proxy_quiet(p) || moe_proxy_now_ns() > drainUntil) break;
    }
    int progress = 0;
    ncclResult_t res = moe_proxy_step(p, &progress);
    if (res != ncclSuccess) {
      if (atomic_load(&p->stop)) break; /* peers close too while we drain */
      moe_proxy_fail(p, res);
      MOE_WARN("rank %d: network proxy stopped: %s", p->a.rank, p->err);
      break;
    }
    if (progress) {
      idle = 0;
    } else if (++idle > MOE_PROXY_IDLE_SPINS) {
      struct timespec nap = {0, MOE_PROXY_NAP_NS};
      nanosleep(&nap, NULL);
    }
  }
  return NULL;
}

ncclResult_t moe_proxy_start(moe_proxy_t* p) {
  MOE_ARG_CHECK(p != NULL, "moe_proxy_start: proxy is NULL");
  if (pthread_create(&p->thread, NULL, moe_proxy_main, p) != 0)
    return MOE_ERROR(ncclSystemError, "rank %d: cannot start the network proxy thread", p->a.rank);
  p->threadStarted = 1;
  return ncclSuccess;
}

const char* moe_proxy_error(const moe_proxy_t* p) { return p == NULL ? "" : p->err; }

static void moe_proxy_join(moe_proxy_t* p, int how) {
  if (!p->threadStarted) return;
  atomic_store(&p->stop, how);
  pthread_join(p->thread, NULL);
  p->threadStarted = 0;
}

void moe_proxy_abort(moe_proxy_t* p) {
  if (p != NULL) moe_proxy_join(p, MOE_PROXY_STOP_NOW);
}

void moe_proxy_destroy(moe_proxy_t* p) {
  if (p == NULL) return;
  const moe_transport_t* t = p->a.transport;
  moe_proxy_join(p, MOE_PROXY_STOP_DRAIN);
  for (int i = 0; i < p->nIncoming; i++) {
    if (p->incoming[i].comm == NULL) continue;
    if (p->incoming[i].mr != NULL) t->dereg_mr(p->incoming[i].comm, p->incoming[i].mr);
    t->close(p->incoming[i].comm);
  }
  for (int m = 0; m < p->a.nPeers; m++) {
    moe_proxy_peer_t* q = &p->peer[m];
    if (q->send != NULL) {
      if (q->sendMr != NULL) t->dereg_mr(q->send, q->sendMr);
      if (q->sendMsgMr != NULL) t->dereg_mr(q->send, q->sendMsgMr);
      t->close(q->send);
    }
    if (q->recv != NULL) {
      if (q->recvMr != NULL) t->dereg_mr(q->recv, q->recvMr);
      if (q->recvMsgMr != NULL) t->dereg_mr(q->recv, q->recvMsgMr);
      if (q->helloMr != NULL) t->dereg_mr(q->recv, q->helloMr);
      t->close(q->recv);
    }
  }
  if (p->listen != NULL) t->close(p->listen);
  free(p);
}
