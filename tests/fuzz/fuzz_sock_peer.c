/* SPDX-License-Identifier: Apache-2.0 */
/* libFuzzer target: a malicious peer against the socket backend's listener
 * and receiver, over loopback TCP. The input is a script: the connection's
 * hellos (optionally corrupted, plus junk connections), then operations of
 * the peer (raw control bytes, well-formed or skewed message and write
 * headers with keys and offsets of its choice, payload bytes on any stream,
 * resets; a striped write header is followed by its chunks on the streams
 * the peer believes are due, behind chunk headers that are right as far as
 * the peer can tell, so skewed counts turn them into misplaced chunks) interleaved with what the receiving user does (post receives of
 * chosen sizes and tags, test, poll immediates, register and deregister
 * regions). Checked after every call and at the end:
 *   - no crash, no sanitizer report, every call returns within FZ_CALL_BOUND_NS;
 *   - a completed receive reports no more bytes than its buffer holds and
 *     leaves the bytes past what it reported untouched;
 *   - guard bytes around every buffer and registered region stay intact;
 *   - once a receive completed or failed, or a region was deregistered,
 *     nothing writes into that memory again (checked after the comm closed).
 *
 *   ./fuzz_sock_peer -max_total_time=600 corpus/ */
#include <sched.h>

#include "common/moe_env.h"
#include "common/moe_log.h"
#include "fuzz_common.h"
#include "net_socket/moe_sock.h"

#define FZ_MAX_OPS 256
#define FZ_MAX_JUNK 8
#define FZ_MAX_BUFS (MOE_NET_MAX_REQUESTS * MOE_NET_MAX_RECVS)
#define FZ_MAX_REGS 16
#define FZ_POISON 0xA5   /* posted, not yet filled */
#define FZ_RELEASED 0x5A /* the user's again: must never change */
/* Sizes stay small enough for many runs a second, yet a message above
 * MOE_SOCK_INLINE_MAX goes over the data streams, in two chunks when it is
 * larger than MOE_SOCK_MIN_CHUNK. */
#define FZ_BULK_MAX (MOE_SOCK_MIN_CHUNK + ((size_t)64 << 10))
#define FZ_POSTED_MAX ((size_t)16 << 20) /* receive buffers one input may post */

static const moe_transport_t* T = &moe_transport_socket;
static char pattern[FZ_BULK_MAX]; /* payload bytes the peer sends */

typedef struct {
  char* b;
  size_t cap;
  int released;
} fz_buf_t;

typedef struct {
  moe_net_request_t* req;
  int n;
  int buf[MOE_NET_MAX_RECVS];
} fz_req_t;

typedef struct {
  char* b;
  size_t size;
  void* mr;
  uint64_t key;
  int live;
} fz_reg_t;

typedef struct {
  moe_net_comm_t* listen;
  moe_net_comm_t* recv;
  uint8_t handle[MOE_NET_HANDLE_BYTES];
  moe_net_addr_handle_t addr;
  int ctrl, data[4], nstreams;
  uint64_t wid;    /* the peer's count of its striped writes */
  int next_stream; /* the stream it believes its next chunk goes to */
  int junk[FZ_MAX_JUNK], njunk;
  fz_buf_t bufs[FZ_MAX_BUFS];
  int nbufs;
  size_t posted; /* bytes of all receive buffers */
  fz_req_t reqs[MOE_NET_MAX_REQUESTS];
  int nreqs;
  fz_reg_t regs[FZ_MAX_REGS];
  int nregs;
  int failed;
  int completed; /* receives that completed (FUZZ_VERBOSE prints it) */
} fz_t;

int LLVMFuzzerInitialize(int* argc, char*** argv) {
  (void)argc, (void)argv;
  setenv("NCCL_MOE_DEBUG", "NONE", 1); /* every rejected input would log a warning */
  setenv("NCCL_SOCKET_IFNAME", "lo", 1);
  setenv("NCCL_MOE_TIMEOUT_MS", "200", 1);
  setenv("NCCL_SOCKET_NTHREADS", "2", 1);
  moe_env_reload();
  if (T->init() != ncclSuccess) abort();
  for (size_t i = 0; i < sizeof(pattern); i++) pattern[i] = (char)(i * 131 + (i >> 9));
  return 0;
}

static int fz_dial(const fz_t* f) {
  int fd = socket(f->addr.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (connect(fd, (const struct sockaddr*)&f->addr.addr, f->addr.addr_len) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* Releases buffer i to the user: it must never change again. */
static void fz_release(fz_t* f, int i) {
  fz_check_guards(f->bufs[i].b, f->bufs[i].cap, "a receive buffer");
  memset(f->bufs[i].b, FZ_RELEASED, f->bufs[i].cap);
  f->bufs[i].released = 1;
}

static void fz_req_drop(fz_t* f, int r) { f->reqs[r] = f->reqs[--f->nreqs]; }

static size_t fz_pick_size(fz_in_t* in) {
  uint8_t k = fz_u8(in);
  switch (k & 3) {
    case 0: return k >> 2;                                          /* tiny */
    case 1: return fz_u16(in);                                      /* inline */
    case 2: return MOE_SOCK_INLINE_MAX + 1 + fz_u16(in) * 8ull;     /* bulk, over the streams */
    default: return (size_t)fz_u32(in) % (FZ_BULK_MAX + 1);         /* anything up to FZ_BULK_MAX */
  }
}

static uint64_t fz_pick_key(fz_t* f, fz_in_t* in) {
  uint8_t k = fz_u8(in);
  const fz_reg_t* r = f->nregs > 0 ? &f->regs[(k >> 2) % f->nregs] : NULL;
  switch (k & 3) {
    case 0: return r != NULL ? r->key : 0;                          /* the right key */
    case 1: return r != NULL ? r->key ^ (1ull << (fz_u8(in) % 64)) : 1; /* one bit off */
    case 2: return fz_u16(in);                                      /* a small guess */
    default: return fz_u64(in);
  }
}

static void fz_send_header(fz_t* f, fz_in_t* in) {
  uint8_t k = fz_u8(in);
  moe_sock_hdr_t h = {.op = (k & 3) == 0 ? MOE_SOCK_OP_MSG : (k & 3) == 1 ? MOE_SOCK_OP_WRITE : k >> 2};
  h.flags = (k & 0x80) ? fz_u8(in) : ((k & 3) == 1 && (k & 0x40) ? MOE_SOCK_HDR_FLAG_IMM : 0);
  h.tag = (k & 3) == 1 ? 0 : (int8_t)fz_u8(in) % 4;
  h.size = fz_pick_size(in);
  if (h.op == MOE_SOCK_OP_WRITE) {
    h.key = fz_pick_key(f, in);
    h.offset = (k & 0x20) ? fz_u64(in) : fz_u16(in);
    if (h.flags & MOE_SOCK_HDR_FLAG_IMM) h.imm = fz_u32(in);
  }
  uint8_t buf[MOE_SOCK_HDR_BYTES];
  moe_sock_hdr_encode(&h, buf);
  fz_send(f->ctrl, buf, sizeof(buf));
  int nchunks = 0;
  size_t chunk = 0;
  if (h.op == MOE_SOCK_OP_MSG && h.size > MOE_SOCK_INLINE_MAX) { /* its chunks: the payload ops send them */
    moe_sock_split(h.size, f->nstreams, &nchunks, &chunk);
    f->next_stream = (f->next_stream + nchunks) % f->nstreams;
  }
  if (h.op != MOE_SOCK_OP_WRITE || (h.flags & MOE_SOCK_HDR_FLAG_STRIPED) == 0 || h.size == 0 ||
      h.size > sizeof(pattern))
    return;
  moe_sock_stripe_split(h.size, f->nstreams, &nchunks, &chunk);
  for (int c = 0; c < nchunks; c++) {
    const size_t off = (size_t)c * chunk, len = h.size - off < chunk ? h.size - off : chunk;
    moe_sock_chunk_t ch = {.wid = f->wid, .key = h.key, .offset = h.offset + off, .size = (uint32_t)len,
                           .index = (uint32_t)c};
    uint8_t cbuf[MOE_SOCK_CHUNK_BYTES];
    moe_sock_chunk_encode(&ch, cbuf);
    const int fd = f->data[(f->next_stream + c) % f->nstreams];
    fz_send(fd, cbuf, sizeof(cbuf));
    fz_send(fd, pattern + off, len);
  }
  f->wid++;
  f->next_stream = (f->next_stream + nchunks) % f->nstreams;
}

static void fz_post(fz_t* f, fz_in_t* in) {
  int n = 1 + fz_u8(in) % MOE_NET_MAX_RECVS;
  if (f->recv == NULL || f->nreqs == MOE_NET_MAX_REQUESTS || f->nbufs + n > FZ_MAX_BUFS) return;
  void* data[MOE_NET_MAX_RECVS];
  size_t sizes[MOE_NET_MAX_RECVS];
  int tags[MOE_NET_MAX_RECVS];
  fz_req_t* r = &f->reqs[f->nreqs];
  for (int i = 0; i < n; i++) {
    sizes[i] = fz_pick_size(in);
    tags[i] = fz_u8(in) % 4;
    if (f->posted + sizes[i] > FZ_POSTED_MAX) sizes[i] = 0;
    f->posted += sizes[i];
    r->buf[i] = f->nbufs;
    f->bufs[f->nbufs++] = (fz_buf_t){.b = fz_alloc(sizes[i], FZ_POISON), .cap = sizes[i]};
    data[i] = f->bufs[r->buf[i]].b;
  }
  r->n = n;
  r->req = NULL;
  ncclResult_t res = FZ_CALL(T->irecv(f->recv, n, data, sizes, tags, NULL, &r->req));
  if (res != ncclSuccess) {
    FZ_CHECK(r->req == NULL, "a failed irecv handed out a request");
    f->failed = 1;
  }
  if (r->req != NULL) {
    f->nreqs++;
    return;
  }
  for (int i = 0; i < n; i++) fz_release(f, r->buf[i]); /* not taken (slots full, or an error) */
}

static void fz_test(fz_t* f, int ri) {
  fz_req_t* r = &f->reqs[ri];
  int done = 0;
  size_t sizes[MOE_NET_MAX_RECVS];
  ncclResult_t res = FZ_CALL(T->test(r->req, &done, sizes));
  if (res != ncclSuccess) {
    f->failed = 1;
  } else if (done) {
    f->completed++;
    for (int i = 0; i < r->n; i++) {
      const fz_buf_t* b = &f->bufs[r->buf[i]];
      FZ_CHECK(sizes[i] <= b->cap, "test() reported %zu bytes in a buffer of %zu", sizes[i], b->cap);
      FZ_CHECK(fz_all(b->b + sizes[i], b->cap - sizes[i], FZ_POISON), "bytes past the reported %zu of %zu written",
               sizes[i], b->cap);
    }
  } else {
    return;
  }
  for (int i = 0; i < r->n; i++) fz_release(f, r->buf[i]);
  fz_req_drop(f, ri);
}

static void fz_reg(fz_t* f, fz_in_t* in) {
  size_t size = fz_u8(in) & 1 ? fz_u16(in) : fz_u8(in);
  if (f->recv == NULL || f->nregs == FZ_MAX_REGS) return;
  fz_reg_t* g = &f->regs[f->nregs];
  *g = (fz_reg_t){.b = fz_alloc(size, 0), .size = size};
  if (FZ_CALL(T->reg_mr(f->recv, g->b, size, NCCL_PTR_HOST, -1, 0, &g->mr)) != ncclSuccess) {
    fz_free(g->b);
    return;
  }
  moe_net_rkey_t key;
  FZ_CHECK(T->mr_key(g->mr, &key) == ncclSuccess && key.size == size, "mr_key of a fresh registration failed");
  g->key = key.key;
  g->live = 1;
  f->nregs++;
}

static void fz_dereg(fz_t* f, fz_in_t* in) {
  if (f->nregs == 0) return;
  fz_reg_t* g = &f->regs[fz_u8(in) % f->nregs];
  if (!g->live) return;
  FZ_CHECK(FZ_CALL(T->dereg_mr(f->recv, g->mr)) == ncclSuccess, "dereg of a live registration failed");
  g->live = 0;
  fz_check_guards(g->b, g->size, "a registered region");
  memset(g->b, FZ_RELEASED, g->size);
}

static void fz_connect(fz_t* f, fz_in_t* in) {
  uint8_t cfg = fz_u8(in);
  f->nstreams = 1 + cfg % 4;
  uint64_t conn_id = 1 + fz_u8(in);
  uint8_t hello[1 + 4][MOE_SOCK_HELLO_BYTES];
  for (int i = 0; i < 1 + f->nstreams; i++) {
    moe_sock_hello_t h = {.nonce = f->addr.nonce, .conn_id = conn_id, .index = i - 1, .nstreams = f->nstreams};
    moe_sock_hello_encode(&h, hello[i]);
  }
  if (cfg & 0x10) { /* corrupt one byte of one hello */
    uint8_t where = fz_u8(in);
    hello[(where >> 5) % (1 + f->nstreams)][where % MOE_SOCK_HELLO_BYTES] ^= fz_u8(in) | 1;
  }
  f->ctrl = fz_dial(f);
  fz_send(f->ctrl, hello[0], MOE_SOCK_HELLO_BYTES);
  for (int s = 0; s < f->nstreams; s++) {
    f->data[s] = fz_dial(f);
    /* Optionally the hello in two pieces, or cut short. */
    size_t cut = (cfg & 0x20) && s == 0 ? fz_u8(in) % MOE_SOCK_HELLO_BYTES : MOE_SOCK_HELLO_BYTES;
    fz_send(f->data[s], hello[1 + s], cut);
  }
  for (int i = 0; i < 5 && f->recv == NULL; i++) { /* loopback: the hellos are there already */
    FZ_CHECK(FZ_CALL(T->accept(f->listen, &f->recv)) == ncclSuccess, "accept failed");
    if (f->recv == NULL) fz_pause_us(20);
  }
}

static void fz_step(fz_t* f, fz_in_t* in) {
  uint8_t op = fz_u8(in);
  switch (op % 12) {
    case 0: { /* raw control bytes from the input */
      size_t len = fz_u8(in);
      if (len > in->n) len = in->n;
      fz_send(f->ctrl, in->p, len);
      in->p += len;
      in->n -= len;
      break;
    }
    case 1: fz_send_header(f, in); break;
    case 2: {
      size_t off = fz_u8(in);
      fz_send(f->ctrl, pattern + off, fz_u16(in));
      break;
    }
    case 3: {
      int s = fz_u8(in) % f->nstreams;
      size_t len = fz_pick_size(in);
      fz_send(f->data[s], pattern, len < sizeof(pattern) ? len : sizeof(pattern));
      break;
    }
    case 4: fz_post(f, in); break;
    case 5:
      if (f->nreqs > 0) fz_test(f, fz_u8(in) % f->nreqs);
      break;
    case 6:
      if (f->recv != NULL) {
        uint32_t imm;
        int got = 0;
        if (FZ_CALL(T->poll_imm(f->recv, &imm, &got)) != ncclSuccess) f->failed = 1;
      }
      break;
    case 7: fz_reg(f, in); break;
    case 8: fz_dereg(f, in); break;
    case 9: {
      uint8_t s = fz_u8(in) % (f->nstreams + 1);
      if (s == 0)
        fz_reset(&f->ctrl);
      else
        fz_reset(&f->data[s - 1]);
      break;
    }
    case 10: fz_pause_us(fz_u8(in) * 2u); break;
    default: { /* a stranger: junk or a half-valid hello on a new socket */
      if (f->njunk == FZ_MAX_JUNK) break;
      int fd = fz_dial(f);
      uint8_t hello[MOE_SOCK_HELLO_BYTES];
      moe_sock_hello_t h;
      h.nonce = fz_u8(in) & 1 ? f->addr.nonce : fz_u64(in);
      h.conn_id = 1 + fz_u8(in);
      h.index = (int)(fz_u8(in) % 5) - 1;
      h.nstreams = 1 + fz_u8(in) % 4;
      moe_sock_hello_encode(&h, hello);
      size_t len = fz_u8(in) % (MOE_SOCK_HELLO_BYTES + 1);
      fz_send(fd, hello, len);
      f->junk[f->njunk++] = fd;
      moe_net_comm_t* extra = NULL;
      FZ_CHECK(FZ_CALL(T->accept(f->listen, &extra)) == ncclSuccess, "accept failed");
      if (extra != NULL) FZ_CALL(T->close(extra)); /* a second connection made of strangers' sockets */
      break;
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fz_in_t in = {data, size};
  static fz_t f;
  memset(&f, 0, sizeof(f));
  f.ctrl = -1;
  for (int s = 0; s < 4; s++) f.data[s] = -1;
  memset(f.handle, 0, sizeof(f.handle));
  if (T->listen(0, f.handle, &f.listen) != ncclSuccess) abort();
  if (moe_sock_handle_decode(f.handle, sizeof(f.handle), &f.addr) != ncclSuccess) abort();
  fz_connect(&f, &in);
  for (int i = 0; i < FZ_MAX_OPS && in.n > 0 && f.recv != NULL; i++) fz_step(&f, &in);
  if (getenv("FUZZ_VERBOSE") != NULL)
    fprintf(stderr, "fuzz_sock_peer: connected %d, %d receives completed, %d pending, failed %d: %s\n",
            f.recv != NULL, f.completed, f.nreqs, f.failed, moe_last_error());
  /* Let whatever is in flight land, then the peer goes away. */
  for (int round = 0; round < 3 && f.recv != NULL; round++) {
    for (int r = f.nreqs - 1; r >= 0; r--) fz_test(&f, r);
    sched_yield();
  }
  fz_reset(&f.ctrl);
  for (int s = 0; s < 4; s++) fz_reset(&f.data[s]);
  for (int j = 0; j < f.njunk; j++) fz_reset(&f.junk[j]);
  for (int r = f.nreqs - 1; r >= 0; r--) fz_test(&f, r);
  if (f.recv != NULL) FZ_CHECK(FZ_CALL(T->close(f.recv)) == ncclSuccess, "close failed");
  FZ_CHECK(FZ_CALL(T->close(f.listen)) == ncclSuccess, "close of the listen comm failed");
  /* Closed: no helper thread is left. Released memory stayed the user's. */
  for (int i = 0; i < f.nbufs; i++) {
    fz_check_guards(f.bufs[i].b, f.bufs[i].cap, "a receive buffer");
    if (f.bufs[i].released)
      FZ_CHECK(fz_all(f.bufs[i].b, f.bufs[i].cap, FZ_RELEASED), "a buffer changed after its request finished");
    fz_free(f.bufs[i].b);
  }
  for (int i = 0; i < f.nregs; i++) {
    fz_check_guards(f.regs[i].b, f.regs[i].size, "a registered region");
    if (!f.regs[i].live)
      FZ_CHECK(fz_all(f.regs[i].b, f.regs[i].size, FZ_RELEASED), "a region changed after it was deregistered");
    fz_free(f.regs[i].b);
  }
  return 0;
}
