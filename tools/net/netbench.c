/* SPDX-License-Identifier: Apache-2.0 */
/* nccl-moe-netbench: bandwidth and latency of the net plugin on loopback,
 * driven through its exported ncclNetPlugin_v11 struct exactly as NCCL's
 * proxy drives it, beside a plain blocking TCP send/recv loop measured in the
 * same run (the limit of this host). Prints one row per size with the ratio
 * (with --json: one JSON object per size on stdout, the table on stderr).
 *
 *   nccl-moe-netbench [--plugin PATH] [--min BYTES] [--max BYTES] [--window N] [--json]
 *
 * The plugin defaults to libnccl-net-moe.so beside this program (the build
 * root), else in the install's libdir, else the library search path. NCCL_SOCKET_IFNAME
 * defaults to "lo" and NCCL_MOE_NET_BACKEND to "socket" here. */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "nccl_moe_version.h"
#include "nccl_net/net.h"
#include "tools/common/json.h"
#include "tools/common/opts.h"
#include "tools/common/plugin_path.h"

#define BENCH_MAX_WINDOW 32
#define BENCH_TARGET_BYTES ((size_t)128 << 20) /* per bandwidth measurement */
#define BENCH_MIN_ITERS 20
#define BENCH_MAX_ITERS 20000
#define BENCH_LAT_ITERS 2000
#define BENCH_REPEATS 5 /* best of: loopback on a shared host is noisy */
#define BENCH_MAX_SIZE ((size_t)1 << 30)
#define BENCH_DEFAULT_MIN 8
#define BENCH_DEFAULT_MAX ((size_t)64 << 20)
#define BENCH_DEFAULT_WINDOW 8

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define DIE(...)                      \
  do {                                \
    fprintf(stderr, "netbench: ");    \
    fprintf(stderr, __VA_ARGS__);     \
    fprintf(stderr, "\n");            \
    exit(1);                          \
  } while (0)

#define NCHECK(call)                                                          \
  do {                                                                        \
    ncclResult_t r_ = (call);                                                 \
    if (r_ != ncclSuccess) DIE("%s failed: %d (line %d)", #call, r_, __LINE__); \
  } while (0)

/* ---------------------------------------------------------------- plugin -- */
static ncclNet_v11_t* net;
static void* net_ctx;
static FILE* text_out; /* the table: stdout, or stderr with --json */

static void plugin_load(const char* path) {
  if (path == NULL) path = moe_tool_plugin_path();
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) DIE("dlopen(%s): %s", path, dlerror());
  net = (ncclNet_v11_t*)dlsym(lib, "ncclNetPlugin_v11");
  if (net == NULL) DIE("%s has no ncclNetPlugin_v11", path);
  NCHECK(net->init(&net_ctx, 1, NULL, NULL, NULL));
  fprintf(text_out, "# plugin %s (%s)\n", net->name, path);
}

static void plugin_pair(void** send, void** recv, void** listen) {
  char handle[NCCL_NET_HANDLE_MAXSIZE] = {0};
  NCHECK(net->listen(net_ctx, 0, handle, listen));
  *send = *recv = NULL;
  double deadline = now_s() + 30;
  while (*send == NULL || *recv == NULL) {
    if (*send == NULL) NCHECK(net->connect(net_ctx, 0, handle, send, NULL));
    if (*recv == NULL) NCHECK(net->accept(*listen, recv, NULL));
    if (now_s() > deadline) DIE("connect/accept did not complete");
  }
}

static void plugin_wait(void* req) {
  int done = 0;
  while (!done) {
    NCHECK(net->test(req, &done, NULL));
    /* Leave the cores to the helper threads while waiting (2-core hosts). */
    if (!done) sched_yield();
  }
}

typedef struct {
  void* comm;
  void* mh;
  char* buf;
  size_t size;
  int iters;
  int window;
  int is_send;
} stream_arg_t;

/* Keeps `window` requests in flight for `iters` messages. */
static void* plugin_stream(void* argp) {
  stream_arg_t* a = (stream_arg_t*)argp;
  void* reqs[BENCH_MAX_WINDOW] = {0};
  int posted = 0, completed = 0;
  while (completed < a->iters) {
    while (posted < a->iters && posted - completed < a->window) {
      void** slot = &reqs[posted % a->window];
      if (a->is_send) {
        NCHECK(net->isend(a->comm, a->buf, a->size, 0, a->mh, NULL, slot));
      } else {
        void* data[1] = {a->buf};
        size_t sizes[1] = {a->size};
        int tags[1] = {0};
        NCHECK(net->irecv(a->comm, 1, data, sizes, tags, &a->mh, NULL, slot));
      }
      if (*slot == NULL) break;
      posted++;
    }
    if (completed == posted) { /* nothing in flight yet (ib: no clear-to-send yet) */
      sched_yield();
      continue;
    }
    int done = 0;
    NCHECK(net->test(reqs[completed % a->window], &done, NULL));
    if (done) completed++;
    else sched_yield();
  }
  return NULL;
}

typedef struct {
  void* send;
  void* recv;
  char* sbuf;
  char* rbuf;
  void* smh;
  void* rmh;
  size_t size;
  int iters;
  int initiator;
} pingpong_arg_t;

static void plugin_recv1(void* comm, char* buf, size_t size, void* mh) {
  void* data[1] = {buf};
  size_t sizes[1] = {size};
  int tags[1] = {0};
  void* req = NULL;
  while (req == NULL) NCHECK(net->irecv(comm, 1, data, sizes, tags, &mh, NULL, &req));
  plugin_wait(req);
}

static void plugin_send1(void* comm, char* buf, size_t size, void* mh) {
  void* req = NULL;
  while (req == NULL) NCHECK(net->isend(comm, buf, size, 0, mh, NULL, &req));
  plugin_wait(req);
}

static void* plugin_pingpong(void* argp) {
  pingpong_arg_t* a = (pingpong_arg_t*)argp;
  for (int i = 0; i < a->iters; i++) {
    if (a->initiator) {
      plugin_send1(a->send, a->sbuf, a->size, a->smh);
      plugin_recv1(a->recv, a->rbuf, a->size, a->rmh);
    } else {
      plugin_recv1(a->recv, a->rbuf, a->size, a->rmh);
      plugin_send1(a->send, a->sbuf, a->size, a->smh);
    }
  }
  return NULL;
}

/* ------------------------------------------------------------- plain TCP -- */
static void tcp_pair(int* a, int* b) {
  int l = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof(addr);
  if (l < 0 || bind(l, (struct sockaddr*)&addr, len) != 0 || listen(l, 1) != 0 ||
      getsockname(l, (struct sockaddr*)&addr, &len) != 0)
    DIE("tcp listen: %s", strerror(errno));
  *a = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(*a, (struct sockaddr*)&addr, len) != 0) DIE("tcp connect: %s", strerror(errno));
  *b = accept(l, NULL, NULL);
  close(l);
  int one = 1;
  setsockopt(*a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(*b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static void tcp_all(int fd, char* buf, size_t size, int is_send) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = is_send ? send(fd, buf + done, size - done, MSG_NOSIGNAL) : recv(fd, buf + done, size - done, 0);
    if (n <= 0) {
      if (n < 0 && errno == EINTR) continue;
      DIE("tcp %s: %s", is_send ? "send" : "recv", n == 0 ? "closed" : strerror(errno));
    }
    done += (size_t)n;
  }
}

typedef struct {
  int fd;
  char* buf;
  size_t size;
  int iters;
  int is_send;
  int pingpong;
} tcp_arg_t;

static void* tcp_worker(void* argp) {
  tcp_arg_t* a = (tcp_arg_t*)argp;
  for (int i = 0; i < a->iters; i++) {
    if (!a->pingpong) {
      tcp_all(a->fd, a->buf, a->size, a->is_send);
    } else if (a->is_send) { /* initiator */
      tcp_all(a->fd, a->buf, a->size, 1);
      tcp_all(a->fd, a->buf, a->size, 0);
    } else {
      tcp_all(a->fd, a->buf, a->size, 0);
      tcp_all(a->fd, a->buf, a->size, 1);
    }
  }
  return NULL;
}

/* ------------------------------------------------------------------ main -- */
static double run_pair(void* (*fn)(void*), void* a, void* b) {
  pthread_t ta, tb;
  double t0 = now_s();
  pthread_create(&ta, NULL, fn, a);
  pthread_create(&tb, NULL, fn, b);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  return now_s() - t0;
}

static int iters_for(size_t size) {
  size_t it = BENCH_TARGET_BYTES / (size > 0 ? size : 1);
  if (it < BENCH_MIN_ITERS) it = BENCH_MIN_ITERS;
  if (it > BENCH_MAX_ITERS) it = BENCH_MAX_ITERS;
  return (int)it;
}

static void usage(FILE* out) {
  fprintf(out,
          "usage: nccl-moe-netbench [--plugin PATH] [--min BYTES] [--max BYTES] [--window N] [--json]\n"
          "  Bandwidth and round trip of the net plugin on loopback (NCCL_SOCKET_IFNAME=lo,\n"
          "  NCCL_MOE_NET_BACKEND=socket unless set), beside plain TCP, for sizes doubling from --min\n"
          "  (default %d) to --max (default 64M; K, M, G suffixes; at most 1G), --window requests in\n"
          "  flight (1..%d, default %d). --plugin: default libnccl-net-moe.so beside this program, else in\n"
          "  the install's libdir, else on the loader path. --json: one JSON object per size on stdout,\n"
          "  the table on stderr.\n"
          "  Exit status: 0 ok, 1 failure, 2 bad arguments.\n",
          BENCH_DEFAULT_MIN, BENCH_MAX_WINDOW, BENCH_DEFAULT_WINDOW);
}

int main(int argc, char** argv) {
  enum { O_PLUGIN = 1, O_MIN, O_MAX, O_WINDOW, O_JSON, O_HELP };
  static const struct option lo[] = {
      {"plugin", required_argument, 0, O_PLUGIN}, {"min", required_argument, 0, O_MIN},
      {"max", required_argument, 0, O_MAX},       {"window", required_argument, 0, O_WINDOW},
      {"json", no_argument, 0, O_JSON},           {"help", no_argument, 0, O_HELP},
      {0, 0, 0, 0}};
  moe_opts_t p = {.prog = "nccl-moe-netbench", .usage = usage, .longopts = lo};
  const char* plugin_path = NULL;
  size_t min_size = BENCH_DEFAULT_MIN, max_size = BENCH_DEFAULT_MAX;
  int window = BENCH_DEFAULT_WINDOW, json = 0, ch;
  while ((ch = moe_opts_next(&p, argc, argv)) != -1) {
    switch (ch) {
      case O_PLUGIN: plugin_path = optarg; break;
      case O_MIN: min_size = moe_opts_bytes(&p, optarg, 1, BENCH_MAX_SIZE); break;
      case O_MAX: max_size = moe_opts_bytes(&p, optarg, 1, BENCH_MAX_SIZE); break;
      case O_WINDOW: window = (int)moe_opts_int(&p, optarg, 1, BENCH_MAX_WINDOW); break;
      case O_JSON: json = 1; break;
    }
  }
  if (max_size < min_size) moe_opts_fail(&p, "--max %zu is below --min %zu", max_size, min_size);
  text_out = json ? stderr : stdout;
  setenv("NCCL_SOCKET_IFNAME", "lo", 0);
  setenv("NCCL_MOE_NET_BACKEND", "socket", 0);
  plugin_load(plugin_path);

  void *send, *recv, *listen, *send2, *recv2, *listen2;
  plugin_pair(&send, &recv, &listen);
  plugin_pair(&send2, &recv2, &listen2);
  int ta, tb;
  tcp_pair(&ta, &tb);

  char* sbuf = malloc(max_size);
  char* rbuf = malloc(max_size);
  char* sbuf2 = malloc(max_size);
  char* rbuf2 = malloc(max_size);
  memset(sbuf, 1, max_size);
  memset(rbuf, 2, max_size);
  memset(sbuf2, 3, max_size);
  memset(rbuf2, 4, max_size);
  void *smh, *rmh, *smh2, *rmh2;
  NCHECK(net->regMr(send, sbuf, max_size, NCCL_PTR_HOST, &smh));
  NCHECK(net->regMr(recv, rbuf, max_size, NCCL_PTR_HOST, &rmh));
  NCHECK(net->regMr(send2, sbuf2, max_size, NCCL_PTR_HOST, &smh2));
  NCHECK(net->regMr(recv2, rbuf2, max_size, NCCL_PTR_HOST, &rmh2));

  fprintf(text_out, "# window %d, best of %d; bandwidth in GB/s (1e9 B/s), round trip in us\n", window,
          BENCH_REPEATS);
  fprintf(text_out, "%10s %10s %10s %7s %11s %11s %7s\n", "bytes", "plugin_bw", "tcp_bw", "ratio", "plugin_rtt",
          "tcp_rtt", "ratio");
  for (size_t size = min_size; size <= max_size; size *= 2) {
    int iters = iters_for(size);
    double best_p = 1e30, best_t = 1e30, best_prtt = 1e30, best_trtt = 1e30;
    for (int rep = 0; rep < BENCH_REPEATS; rep++) {
      stream_arg_t s = {send, smh, sbuf, size, iters, window, 1};
      stream_arg_t r = {recv, rmh, rbuf, size, iters, window, 0};
      double tp = run_pair(plugin_stream, &s, &r);
      tcp_arg_t a = {ta, sbuf, size, iters, 1, 0};
      tcp_arg_t b = {tb, rbuf, size, iters, 0, 0};
      double tt = run_pair(tcp_worker, &a, &b);
      int lat_iters = size <= 65536 ? BENCH_LAT_ITERS : iters / 4 + 1;
      pingpong_arg_t pa = {send, recv2, sbuf, rbuf2, smh, rmh2, size, lat_iters, 1};
      pingpong_arg_t pb = {send2, recv, sbuf2, rbuf, smh2, rmh, size, lat_iters, 0};
      double tpl = run_pair(plugin_pingpong, &pa, &pb) / lat_iters;
      tcp_arg_t la = {ta, sbuf, size, lat_iters, 1, 1};
      tcp_arg_t lb = {tb, rbuf, size, lat_iters, 0, 1};
      double ttl = run_pair(tcp_worker, &la, &lb) / lat_iters;
      if (tp < best_p) best_p = tp;
      if (tt < best_t) best_t = tt;
      if (tpl < best_prtt) best_prtt = tpl;
      if (ttl < best_trtt) best_trtt = ttl;
    }
    double bp = (double)size * iters / best_p / 1e9;
    double bt = (double)size * iters / best_t / 1e9;
    fprintf(text_out, "%10zu %10.3f %10.3f %7.2f %11.1f %11.1f %7.2f\n", size, bp, bt, bp / bt, best_prtt * 1e6,
            best_trtt * 1e6, best_prtt / best_trtt);
    fflush(text_out);
    if (json) {
      moe_json_t j;
      moe_json_begin(&j, stdout);
      moe_json_str(&j, "tool", "nccl-moe-netbench");
      moe_json_str(&j, "version", NCCL_MOE_VERSION_STRING);
      moe_json_str(&j, "plugin", net->name);
      moe_json_int(&j, "window", window);
      moe_json_int(&j, "repeats", BENCH_REPEATS);
      moe_json_int(&j, "bytes", (long long)size);
      moe_json_int(&j, "iters", iters);
      moe_json_num(&j, "plugin_GBps", bp);
      moe_json_num(&j, "tcp_GBps", bt);
      moe_json_num(&j, "bw_ratio", bp / bt);
      moe_json_num(&j, "plugin_rtt_us", best_prtt * 1e6);
      moe_json_num(&j, "tcp_rtt_us", best_trtt * 1e6);
      moe_json_num(&j, "rtt_ratio", best_prtt / best_trtt);
      moe_json_end(&j);
    }
  }
  NCHECK(net->deregMr(send, smh));
  NCHECK(net->deregMr(recv, rmh));
  NCHECK(net->deregMr(send2, smh2));
  NCHECK(net->deregMr(recv2, rmh2));
  NCHECK(net->closeSend(send));
  NCHECK(net->closeRecv(recv));
  NCHECK(net->closeListen(listen));
  NCHECK(net->closeSend(send2));
  NCHECK(net->closeRecv(recv2));
  NCHECK(net->closeListen(listen2));
  NCHECK(net->finalize(net_ctx));
  close(ta);
  close(tb);
  free(sbuf);
  free(rbuf);
  free(sbuf2);
  free(rbuf2);
  return 0;
}
