/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: a malicious peer against the internode proxy
 * (core/moe_proxy.c), driven through its API as tests/unit/net/test_proxy.c
 * does, over the socket transport on loopback. The proxy is rank 0 with one
 * peer; the fuzz input plays rank 1: its set-up messages (hello and key, valid
 * or with fields of its choice), then one-sided writes into rank 0's receive
 * region with the offsets, sizes, keys and immediates it likes (data and
 * credit immediates shaped like real ones, or any 32 bits), interleaved with
 * what rank 0's GPU would do (hand slabs over with chunk geometry, mark chunks
 * ready, mark slabs consumed; also values a buggy kernel could write).
 * Checked after every step and at the end:
 *   - no crash, no sanitizer report, every call returns within FZ_CALL_BOUND_NS;
 *   - guard bytes around rank 0's send and receive regions and rank 1's
 *     receive region stay intact;
 *   - the counters the GPU trusts only move forward, an arrival is never
 *     published for a slab the peer did not finish, and the proxy's error
 *     record is either none or MOE_KERR_NET.
 *
 *   ./fuzz_proxy_peer -max_total_time=600 corpus/ */
#include <sched.h>

#include "common/moe_env.h"
#include "common/moe_log.h"
#include "core/moe_proxy.h"
#include "fuzz_common.h"
#include "net_socket/moe_sock.h"

/* The proxy's set-up message, as core/moe_proxy.c lays it out (its wire format). */
typedef struct {
  uint32_t magic, tag;
  int32_t rank, pad;
  uint64_t regionBytes;
  moe_net_rkey_t key;
} fz_proxy_msg_t;
#define FZ_PROXY_MSG_MAGIC 0x6d6f6550u /* "moeP" */
#define FZ_TAG_HELLO 1
#define FZ_TAG_KEY 2

#define FZ_PEERS 2 /* index 0: this rank (none), index 1: the fuzzing peer */
#define FZ_PEER 1
#define FZ_SLAB 4096
#define FZ_TIMEOUT_MS 200  /* the proxy's set-up bound and its drain at destroy */
#define FZ_SETUP_SPINS 20000
#define FZ_MAX_OPS 128
#define FZ_WRITES 16       /* writes the peer keeps in flight */

static const moe_transport_t* T = &moe_transport_socket;
static char pattern[1 << 16];
static moe_net_flags_t flags;

/* The proxy reports its failures through the public error string. */
const char* ncclMoeGetLastError(void) { return moe_last_error(); }

int LLVMFuzzerInitialize(int* argc, char*** argv) {
  (void)argc, (void)argv;
  setenv("NCCL_MOE_DEBUG", "NONE", 1);
  setenv("NCCL_SOCKET_IFNAME", "lo", 1);
  setenv("NCCL_MOE_TIMEOUT_MS", "200", 1);
  setenv("NCCL_SOCKET_NTHREADS", "1", 1);
  setenv("NCCL_NSOCKS_PERTHREAD", "1", 1);
  moe_env_reload();
  if (T->init() != ncclSuccess) abort();
  for (size_t i = 0; i < sizeof(pattern); i++) pattern[i] = (char)(i * 37 + 11);
  return 0;
}

typedef struct {
  moe_proxy_t* proxy;
  moe_net_geom_t geom;
  int nch;
  char *sendBuf, *recvBuf, *peerBuf;
  volatile int error[MOE_ERR_WORDS];
  /* rank 1 */
  uint8_t handle[MOE_NET_HANDLE_BYTES];
  int handleCopied;
  moe_net_comm_t *listen, *send, *recv;
  void *peerMr, *msgMr, *inMr;
  fz_proxy_msg_t out[2], in[2];
  moe_net_request_t *sreq, *rreq;
  int helloSent, keySent, gotHello, gotKey;
  moe_net_rkey_t proxyKey;
  moe_net_request_t* writes[FZ_WRITES];
  int nwrites;
  /* what the checks remember */
  unsigned long long lastArrived[MOE_NET_MAX_CHANNELS], lastProgress[MOE_NET_MAX_CHANNELS];
  unsigned long long slabsEnded[MOE_NET_MAX_CHANNELS]; /* data immediates with "last" the peer sent */
  unsigned long long maxReady[MOE_NET_MAX_CHANNELS];
} fz_t;

/* A set-up message: valid, or with one field of the input's choice. */
static void fz_msg(fz_in_t* in, fz_t* f, uint32_t tag, fz_proxy_msg_t* m) {
  *m = (fz_proxy_msg_t){.magic = FZ_PROXY_MSG_MAGIC, .tag = tag, .rank = FZ_PEER, .regionBytes = f->geom.total};
  if (tag == FZ_TAG_KEY) FZ_CHECK(T->mr_key(f->peerMr, &m->key) == ncclSuccess, "mr_key failed");
  uint8_t k = fz_u8(in);
  switch (k % 16) {
    case 1: m->magic = fz_u32(in); break;
    case 2: m->tag = fz_u32(in); break;
    case 3: m->rank = (int32_t)fz_u32(in); break;
    case 4: m->regionBytes = fz_u64(in); break;
    case 5: m->key.size = fz_u64(in); break;
    case 6: m->key.addr = fz_u64(in); break;
    case 7: m->key.key ^= fz_u64(in); break;
    default: break; /* mostly valid: the steady state is where the interesting bugs are */
  }
}

/* Rank 1's side of the set-up, one non-blocking step. */
static int fz_peer_setup(fz_in_t* in, fz_t* f, const uint8_t* proxyHandle) {
  int done = 0;
  if (f->send == NULL) {
    /* connect() keeps its progress in the handle: one copy for all calls. */
    if (!f->handleCopied) {
      memcpy(f->handle, proxyHandle, sizeof(f->handle));
      f->handleCopied = 1;
    }
    moe_net_conn_config_t cfg = {.traffic_class = NCCL_NET_TRAFFIC_CLASS_UNDEF};
    if (FZ_CALL(T->connect(0, &cfg, f->handle, &f->send)) != ncclSuccess) return -1;
    if (f->send == NULL) return 0;
    if (T->reg_mr(f->send, f->out, sizeof(f->out), NCCL_PTR_HOST, -1, 0, &f->msgMr) != ncclSuccess) return -1;
  }
  if (f->recv == NULL) {
    if (FZ_CALL(T->accept(f->listen, &f->recv)) != ncclSuccess) return -1;
    if (f->recv == NULL) return 0;
    if (T->reg_mr(f->recv, f->peerBuf, f->geom.total, NCCL_PTR_HOST, -1, 0, &f->peerMr) != ncclSuccess ||
        T->reg_mr(f->recv, f->in, sizeof(f->in), NCCL_PTR_HOST, -1, 0, &f->inMr) != ncclSuccess)
      return -1;
  }
  if (f->sreq != NULL) {
    if (FZ_CALL(T->test(f->sreq, &done, NULL)) != ncclSuccess) return -1;
    if (!done) return 0;
    f->sreq = NULL;
  }
  if (!f->helloSent) {
    fz_msg(in, f, FZ_TAG_HELLO, &f->out[0]);
    if (FZ_CALL(T->isend(f->send, &f->out[0], sizeof(f->out[0]), FZ_TAG_HELLO, f->msgMr, &f->sreq)) != ncclSuccess)
      return -1;
    f->helloSent = f->sreq != NULL;
    return 0;
  }
  if (f->rreq == NULL && !f->gotKey) {
    void* data = &f->in[f->gotHello];
    size_t size = sizeof(f->in[0]);
    int tag = f->gotHello ? FZ_TAG_KEY : FZ_TAG_HELLO;
    if (FZ_CALL(T->irecv(f->recv, 1, &data, &size, &tag, &f->inMr, &f->rreq)) != ncclSuccess) return -1;
  }
  if (f->rreq != NULL) {
    if (FZ_CALL(T->test(f->rreq, &done, NULL)) != ncclSuccess) return -1;
    if (done) {
      f->rreq = NULL;
      if (f->gotHello) {
        f->gotKey = 1;
        f->proxyKey = f->in[1].key;
      }
      f->gotHello = 1;
    }
  }
  if (f->gotHello && !f->keySent) {
    fz_msg(in, f, FZ_TAG_KEY, &f->out[1]);
    if (FZ_CALL(T->isend(f->send, &f->out[1], sizeof(f->out[1]), FZ_TAG_KEY, f->msgMr, &f->sreq)) != ncclSuccess)
      return -1;
    f->keySent = f->sreq != NULL;
  }
  return f->keySent && f->gotKey && f->sreq == NULL;
}

/* An immediate shaped like the proxy's (see core/moe_proxy.h), or any bits. */
static uint32_t fz_imm(fz_in_t* in, fz_t* f) {
  uint8_t k = fz_u8(in);
  int c = (k >> 2) % f->nch;
  uint32_t seq = fz_u8(in);
  switch (k & 3) {
    case 0: {
      int chunks = fz_u8(in) % (MOE_NET_MAX_CHUNKS + 2);
      int last = fz_u8(in) & 1;
      if (last) f->slabsEnded[c]++;
      return moe_imm_data(c, seq, chunks, last);
    }
    case 1: return moe_imm_encode(MOE_IMM_CREDIT + c, seq);
    default: {
      uint32_t imm = fz_u32(in);
      /* Whatever its shape, count it as ending a slab if it claims to. */
      if ((imm & MOE_IMM_LAST) && (int)(imm >> MOE_IMM_KIND_SHIFT) < MOE_NET_MAX_CHANNELS)
        f->slabsEnded[imm >> MOE_IMM_KIND_SHIFT]++;
      return imm;
    }
  }
}

static void fz_peer_write(fz_in_t* in, fz_t* f) {
  uint8_t k = fz_u8(in);
  moe_net_rkey_t remote = f->proxyKey;
  if (k & 1) remote.key ^= 1ull << (fz_u8(in) % 64);
  if (k & 2) remote.size = UINT64_MAX; /* let the receiver, not our sender, judge the range */
  uint64_t offset = k & 4 ? fz_u64(in) : (uint64_t)fz_u16(in) % (f->geom.total + 1);
  size_t size = k & 8 ? fz_u16(in) : fz_u8(in);
  int with_imm = (k & 0x30) != 0;
  uint32_t imm = with_imm ? fz_imm(in, f) : 0;
  if (f->nwrites == FZ_WRITES || offset > remote.size || size > remote.size - offset) return;
  moe_net_request_t* req = NULL;
  if (FZ_CALL(T->write(f->send, pattern, size, NULL, &remote, offset, with_imm, imm, &req)) != ncclSuccess) return;
  if (req != NULL) f->writes[f->nwrites++] = req;
}

static void fz_peer_progress(fz_t* f) {
  for (int i = 0; i < f->nwrites;) {
    int done = 0;
    if (FZ_CALL(T->test(f->writes[i], &done, NULL)) != ncclSuccess || done) {
      f->writes[i] = f->writes[--f->nwrites];
      continue;
    }
    i++;
  }
  uint32_t imm;
  int got = 1;
  for (int i = 0; i < 64 && got; i++)
    if (FZ_CALL(T->poll_imm(f->recv, &imm, &got)) != ncclSuccess) break;
}

/* What rank 0's GPU writes: a slab handed over, chunks marked, a slab read. */
static void fz_gpu(fz_in_t* in, fz_t* f) {
  uint8_t k = fz_u8(in);
  int c = (k >> 3) % f->nch;
  switch (k & 7) {
    case 0: {
      unsigned long long bytes = k & 0x80 ? fz_u16(in) : fz_u16(in) % (FZ_SLAB + 1);
      unsigned long long n = 1 + fz_u8(in) % MOE_NET_MAX_CHUNKS;
      flags.bytes[c][FZ_PEER] = bytes;
      flags.nchunks[c][FZ_PEER] = k & 0x40 ? fz_u8(in) : n;
      flags.chunkBytes[c][FZ_PEER] = k & 0x40 ? fz_u16(in) : (bytes + n - 1) / n;
      unsigned long long ready = flags.ready[c][FZ_PEER] + (fz_u8(in) % 3 == 0 ? 2 : 1);
      if (ready > f->maxReady[c]) f->maxReady[c] = ready;
      __atomic_store_n((unsigned long long*)&flags.ready[c][FZ_PEER], ready, __ATOMIC_RELEASE);
      break;
    }
    case 1:
    case 2: {
      int i = fz_u8(in) % MOE_NET_MAX_CHUNKS;
      __atomic_store_n((unsigned long long*)&flags.chunkReady[c][FZ_PEER][i], flags.ready[c][FZ_PEER], __ATOMIC_RELEASE);
      break;
    }
    case 3: /* every chunk of the current slab */
      for (int i = 0; i < MOE_NET_MAX_CHUNKS; i++)
        __atomic_store_n((unsigned long long*)&flags.chunkReady[c][FZ_PEER][i], flags.ready[c][FZ_PEER],
                         __ATOMIC_RELEASE);
      break;
    case 4:
      __atomic_store_n((unsigned long long*)&flags.consumed[c][FZ_PEER],
                       __atomic_load_n((unsigned long long*)&flags.arrived[c][FZ_PEER], __ATOMIC_ACQUIRE),
                       __ATOMIC_RELEASE);
      break;
    case 5:
      __atomic_store_n((unsigned long long*)&flags.consumed[c][FZ_PEER], fz_u8(in), __ATOMIC_RELEASE);
      break;
    default: fz_pause_us(fz_u8(in) * 4u); break;
  }
}

static void fz_check(fz_t* f) {
  int code = f->error[MOE_ERR_HOST];
  FZ_CHECK(code == MOE_KERR_NONE || code == MOE_KERR_NET, "proxy error code %d", code);
  for (int c = 0; c < f->nch; c++) {
    unsigned long long a = __atomic_load_n((unsigned long long*)&flags.arrived[c][FZ_PEER], __ATOMIC_ACQUIRE);
    unsigned long long p = __atomic_load_n((unsigned long long*)&flags.progress[c][FZ_PEER], __ATOMIC_ACQUIRE);
    unsigned long long s = __atomic_load_n((unsigned long long*)&flags.sent[c][FZ_PEER], __ATOMIC_ACQUIRE);
    FZ_CHECK(a >= f->lastArrived[c] && p >= f->lastProgress[c], "channel %d: counters went back", c);
    FZ_CHECK(a <= f->slabsEnded[c], "channel %d: %llu slabs arrived, the peer ended %llu", c, a, f->slabsEnded[c]);
    FZ_CHECK(s <= f->maxReady[c], "channel %d: slab %llu sent, only %llu handed over", c, s, f->maxReady[c]);
    f->lastArrived[c] = a;
    f->lastProgress[c] = p;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz_in_t in = {data, size};
  static fz_t f;
  memset(&f, 0, sizeof(f));
  memset(&flags, 0, sizeof(flags));
  f.nch = 1 + fz_u8(&in) % MOE_NET_MAX_CHANNELS;
  size_t off = 0;
  for (int c = 0; c < f.nch; c++) {
    f.geom.slab[c] = FZ_SLAB;
    f.geom.off[c] = off;
    off += (size_t)FZ_SLAB * FZ_PEERS;
  }
  f.geom.total = off;
  f.sendBuf = fz_alloc(off, 0);
  f.recvBuf = fz_alloc(off, 0);
  f.peerBuf = fz_alloc(off, 0);
  moe_proxy_args_t a = {.transport = T, .dev = 0, .rank = 0, .nPeers = FZ_PEERS, .nChannels = f.nch,
                        .sendBuf = f.sendBuf, .recvBuf = f.recvBuf, .bufType = NCCL_PTR_HOST, .geom = f.geom,
                        .flags = &flags, .error = f.error, .timeoutMs = FZ_TIMEOUT_MS};
  a.peerRank[0] = -1;
  a.peerRank[FZ_PEER] = FZ_PEER;
  a.remoteSlot[FZ_PEER] = 0;
  uint8_t proxyHandle[MOE_NET_HANDLE_BYTES] = {0};
  static uint8_t handles[FZ_PEERS * MOE_NET_HANDLE_BYTES];
  memset(handles, 0, sizeof(handles));
  if (moe_proxy_create(&a, proxyHandle, &f.proxy) != ncclSuccess) abort();
  if (T->listen(0, handles + FZ_PEER * MOE_NET_HANDLE_BYTES, &f.listen) != ncclSuccess) abort();
  int proxyDone = 0, peerDone = 0, ok = 1;
  for (int i = 0; i < FZ_SETUP_SPINS && ok && !(proxyDone && peerDone == 1); i++) {
    if (!proxyDone) ok = FZ_CALL(moe_proxy_connect(f.proxy, (const char*)handles, &proxyDone)) == ncclSuccess;
    if (ok && peerDone != 1) peerDone = fz_peer_setup(&in, &f, proxyHandle);
    ok = ok && peerDone >= 0;
  }
  const int steady = ok && proxyDone && peerDone == 1;
  if (getenv("FUZZ_VERBOSE") != NULL)
    fprintf(stderr, "fuzz_proxy_peer: set-up %s (proxy %d, peer %d): %s\n", steady ? "done" : "failed", proxyDone,
            peerDone, moe_last_error());
  if (steady && moe_proxy_start(f.proxy) == ncclSuccess) {
    for (int i = 0; i < FZ_MAX_OPS && in.n > 0; i++) {
      uint8_t op = fz_u8(&in);
      if (op % 3 == 0)
        fz_peer_write(&in, &f);
      else if (op % 3 == 1)
        fz_gpu(&in, &f);
      else
        fz_peer_progress(&f);
      fz_check(&f);
      sched_yield(); /* the proxy thread's turn */
    }
    for (int i = 0; i < 20; i++) { /* what is in flight lands */
      fz_peer_progress(&f);
      fz_check(&f);
      fz_pause_us(100);
    }
  }
  if (getenv("FUZZ_VERBOSE") != NULL)
    fprintf(stderr, "fuzz_proxy_peer: channel 0 sent %llu arrived %llu; proxy error code %d: %s\n",
            flags.sent[0][FZ_PEER], flags.arrived[0][FZ_PEER], f.error[MOE_ERR_HOST], moe_proxy_error(f.proxy));
  /* Rank 1 leaves first: the proxy's drain at destroy ends at the closed
   * connection instead of waiting out its timeout for a quiet peer. */
  if (f.send != NULL) {
    if (f.msgMr != NULL) T->dereg_mr(f.send, f.msgMr);
    FZ_CALL(T->close(f.send));
  }
  if (f.recv != NULL) {
    if (f.peerMr != NULL) T->dereg_mr(f.recv, f.peerMr);
    if (f.inMr != NULL) T->dereg_mr(f.recv, f.inMr);
    FZ_CALL(T->close(f.recv));
  }
  FZ_CALL(T->close(f.listen));
  FZ_CALL((moe_proxy_destroy(f.proxy), 0));
  fz_check(&f);
  fz_check_guards(f.sendBuf, off, "rank 0's send region");
  fz_check_guards(f.recvBuf, off, "rank 0's receive region");
  fz_check_guards(f.peerBuf, off, "rank 1's receive region");
  fz_free(f.sendBuf);
  fz_free(f.recvBuf);
  fz_free(f.peerBuf);
  return 0;
}
