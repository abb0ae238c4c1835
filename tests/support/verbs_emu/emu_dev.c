/* SPDX-License-Identifier: Apache-2.0 */
/* Devices, contexts, protection domains, memory regions, completion queues,
 * asynchronous events and the status strings of the verbs emulator. */
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "emu.h"

#define EMU_EXPORT __attribute__((visibility("default")))

emu_global_t emu = {.lock = PTHREAD_MUTEX_INITIALIZER, .engine_ctl = PTHREAD_MUTEX_INITIALIZER, .wake_fd = -1};

uint64_t emu_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: the emulator's random choices (seeded by VERBS_EMU_SEED). */
uint64_t emu_random(void) {
  uint64_t x = emu.rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  emu.rng = x;
  return x * 0x2545F4914F6CDD1Dull;
}

static uint64_t emu_env_u64(const char* name, uint64_t def) {
  const char* v = getenv(name);
  if (v == NULL || v[0] == '\0') return def;
  char* end = NULL;
  unsigned long long x = strtoull(v, &end, 0);
  if (end == v || *end != '\0') {
    fprintf(stderr, "verbs-emu: ignoring %s=\"%s\" (not a number)\n", name, v);
    return def;
  }
  return x;
}

/* The machine-wide device table: a function of the environment only, so
 * every process computes the same LIDs and GIDs. Caller holds the lock. */
static void emu_devs_init(void) {
  if (emu.devs_ready) return;
  uint64_t n = emu_env_u64("VERBS_EMU_DEVICES", 1);
  emu.ndevs = n < 1 ? 1 : n > EMU_MAX_DEVS ? EMU_MAX_DEVS : (int)n;
  const char* link = getenv("VERBS_EMU_LINK");
  int eth = link != NULL && strcasecmp(link, "eth") == 0;
  for (int i = 0; i < emu.ndevs; i++) {
    emu_dev_t* d = &emu.devs[i];
    memset(d, 0, sizeof(*d));
    d->index = i;
    d->eth = eth;
    d->dev.node_type = IBV_NODE_CA;
    d->dev.transport_type = IBV_TRANSPORT_IB;
    snprintf(d->dev.name, sizeof(d->dev.name), "emu%d", i);
    snprintf(d->dev.dev_name, sizeof(d->dev.dev_name), "uverbs-emu%d", i);
    d->guid = 0x0002c90300e0e000ull + (uint64_t)i;
    /* Link-local GID: fe80::<guid>. */
    union ibv_gid ll = {.raw = {0xfe, 0x80}};
    for (int b = 0; b < 8; b++) ll.raw[8 + b] = (uint8_t)(d->guid >> (56 - 8 * b));
    if (!eth) {
      d->lid = (uint16_t)(0x10 + i);
      d->gids[0] = ll;
      d->gid_types[0] = IBV_GID_TYPE_IB;
      d->ngids = 1;
    } else {
      /* What an mlx5 RoCE port with one IPv4 address shows: link-local v1/v2,
       * then the IPv4-mapped address (10.99.0.<i+1>) v1/v2. */
      union ibv_gid v4 = {.raw = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 99, 0, (uint8_t)(i + 1)}};
      d->gids[0] = d->gids[1] = ll;
      d->gids[2] = d->gids[3] = v4;
      d->gid_types[0] = d->gid_types[2] = IBV_GID_TYPE_ROCE_V1;
      d->gid_types[1] = d->gid_types[3] = IBV_GID_TYPE_ROCE_V2;
      d->ngids = EMU_GIDS_ETH;
    }
  }
  emu.dmabuf = emu_env_u64("VERBS_EMU_DMABUF", 0) != 0;
  emu.debug = emu_env_u64("VERBS_EMU_DEBUG", 0) != 0;
  const char* ns = getenv("VERBS_EMU_NAMESPACE");
  snprintf(emu.ns, sizeof(emu.ns), "%s", ns != NULL && ns[0] != '\0' ? ns : "default");
  uint64_t seed = emu_env_u64("VERBS_EMU_SEED", 0);
  if (seed == 0 && getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed)) seed = emu_now_ns();
  emu.rng = seed | 1;
  emu.devs_ready = 1;
}

/* VERBS_EMU_FAIL, read when the first context opens (calls count from there). */
static void emu_fail_init(void) {
  const char* fail = getenv("VERBS_EMU_FAIL");
  emu.fail_verb[0] = '\0';
  emu.fail_errno = EINVAL;
  emu.fail_nth = 1;
  emu.fail_calls = 0;
  if (fail != NULL && fail[0] != '\0') {
    char verb[32] = "";
    int err = EINVAL, nth = 1;
    if (sscanf(fail, "%31[a-z_]:%d:%d", verb, &err, &nth) >= 1) {
      snprintf(emu.fail_verb, sizeof(emu.fail_verb), "%s", verb);
      emu.fail_errno = err;
      emu.fail_nth = nth;
    }
  }
}

/* VERBS_EMU_FAIL: 1 (and the errno) when this call of `verb` must fail. */
int emu_fail_now(const char* verb, int* err_p) {
  if (emu.fail_verb[0] == '\0' || strcmp(verb, emu.fail_verb) != 0) return 0;
  if (++emu.fail_calls != emu.fail_nth) return 0;
  *err_p = emu.fail_errno;
  return 1;
}

void emu_log(const char* fmt, ...) {
  if (!emu.debug) return;
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "verbs-emu[%d]: ", (int)getpid());
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

void emu_wake(void) {
  if (emu.engine_polling && emu.wake_fd >= 0) {
    uint64_t one = 1;
    ssize_t unused = write(emu.wake_fd, &one, sizeof(one));
    (void)unused;
  }
}

/* ------------------------------------------------------------------------ */
/* Devices and contexts. */

EMU_EXPORT struct ibv_device** ibv_get_device_list(int* num) {
  pthread_mutex_lock(&emu.lock);
  emu_devs_init();
  int n = emu.ndevs;
  pthread_mutex_unlock(&emu.lock);
  struct ibv_device** list = calloc((size_t)n + 1, sizeof(*list));
  if (list == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  for (int i = 0; i < n; i++) list[i] = &emu.devs[i].dev;
  if (num != NULL) *num = n;
  return list;
}

EMU_EXPORT void ibv_free_device_list(struct ibv_device** list) { free(list); }

EMU_EXPORT const char* ibv_get_device_name(struct ibv_device* device) { return device->name; }

EMU_EXPORT __be64 ibv_get_device_guid(struct ibv_device* device) {
  emu_dev_t* d = (emu_dev_t*)device;
  return __builtin_bswap64(d->guid);
}

EMU_EXPORT struct ibv_context* ibv_open_device(struct ibv_device* device) {
  emu_dev_t* d = (emu_dev_t*)device;
  int err = 0;
  pthread_mutex_lock(&emu.engine_ctl);
  pthread_mutex_lock(&emu.lock);
  emu_devs_init();
  if (emu.nctx == 0) emu_fail_init();
  if (emu_fail_now("open_device", &err)) {
    pthread_mutex_unlock(&emu.lock);
    pthread_mutex_unlock(&emu.engine_ctl);
    errno = err;
    return NULL;
  }
  emu_ctx_t* c = calloc(1, sizeof(*c));
  if (c == NULL || pipe2(c->async_pipe, O_CLOEXEC) != 0) {
    free(c);
    pthread_mutex_unlock(&emu.lock);
    pthread_mutex_unlock(&emu.engine_ctl);
    errno = ENOMEM;
    return NULL;
  }
  c->dev = d;
  c->ctx.device = device;
  c->ctx.ops = emu_ops_template;
  c->ctx.cmd_fd = -1;
  c->ctx.async_fd = c->async_pipe[0];
  c->ctx.num_comp_vectors = 1;
  c->ctx.abi_compat = NULL; /* not a verbs_context: extended inline verbs use the exported functions */
  pthread_mutex_init(&c->ctx.mutex, NULL);
  c->faults.delay_ns = emu_env_u64("VERBS_EMU_DELAY_US", 0) * 1000ull;
  c->faults.qp_error_after = emu_env_u64("VERBS_EMU_QP_ERROR_AFTER", 0);
  c->faults.lose_after = emu_env_u64("VERBS_EMU_LOSE_AFTER", 0);
  c->faults.reorder = emu_env_u64("VERBS_EMU_REORDER", 0) != 0;
  if (emu.nctx++ == 0 && emu_engine_start() != 0) {
    emu.nctx--;
    close(c->async_pipe[0]);
    close(c->async_pipe[1]);
    free(c);
    pthread_mutex_unlock(&emu.lock);
    pthread_mutex_unlock(&emu.engine_ctl);
    errno = EAGAIN;
    return NULL;
  }
  pthread_mutex_unlock(&emu.lock);
  pthread_mutex_unlock(&emu.engine_ctl);
  return &c->ctx;
}

EMU_EXPORT int ibv_close_device(struct ibv_context* context) {
  emu_ctx_t* c = (emu_ctx_t*)context;
  pthread_mutex_lock(&emu.engine_ctl);
  pthread_mutex_lock(&emu.lock);
  if (c->nobjs > 0) {
    pthread_mutex_unlock(&emu.lock);
    pthread_mutex_unlock(&emu.engine_ctl);
    return EBUSY;
  }
  int last = --emu.nctx == 0;
  pthread_mutex_unlock(&emu.lock);
  if (last) emu_engine_stop();
  pthread_mutex_unlock(&emu.engine_ctl);
  close(c->async_pipe[0]);
  close(c->async_pipe[1]);
  pthread_mutex_destroy(&c->ctx.mutex);
  free(c);
  return 0;
}

EMU_EXPORT int ibv_query_device(struct ibv_context* context, struct ibv_device_attr* attr) {
  emu_ctx_t* c = (emu_ctx_t*)context;
  memset(attr, 0, sizeof(*attr));
  snprintf(attr->fw_ver, sizeof(attr->fw_ver), "emu-1.0");
  attr->node_guid = __builtin_bswap64(c->dev->guid);
  attr->sys_image_guid = attr->node_guid;
  attr->max_mr_size = (uint64_t)1 << 40;
  attr->page_size_cap = 0xfffff000;
  attr->vendor_id = 0x02c9;
  attr->max_qp = 1 << 17;
  attr->max_qp_wr = EMU_MAX_QP_WR;
  attr->max_sge = EMU_MAX_SGE;
  attr->max_cq = 1 << 16;
  attr->max_cqe = EMU_MAX_CQE;
  attr->max_mr = 1 << 20;
  attr->max_pd = 1 << 16;
  attr->max_qp_rd_atom = EMU_MAX_RD_ATOM;
  attr->max_qp_init_rd_atom = EMU_MAX_RD_ATOM;
  attr->phys_port_cnt = EMU_PORTS;
  attr->max_pkeys = 1;
  return 0;
}

/* The exported compat symbol: writes only the fields an old ibv_port_attr
 * has (callers of the inline ibv_query_port() zero the rest first). */
#undef ibv_query_port
EMU_EXPORT int ibv_query_port(struct ibv_context* context, uint8_t port_num, struct _compat_ibv_port_attr* out) {
  emu_ctx_t* c = (emu_ctx_t*)context;
  if (port_num < 1 || port_num > EMU_PORTS) return EINVAL;
  struct ibv_port_attr a;
  memset(&a, 0, sizeof(a));
  pthread_mutex_lock(&emu.lock);
  a.state = c->dark ? IBV_PORT_DOWN : IBV_PORT_ACTIVE;
  pthread_mutex_unlock(&emu.lock);
  a.max_mtu = IBV_MTU_4096;
  a.active_mtu = c->dev->eth ? IBV_MTU_1024 : IBV_MTU_4096;
  a.gid_tbl_len = c->dev->ngids;
  a.max_msg_sz = EMU_MAX_MSG;
  a.pkey_tbl_len = 1;
  a.lid = c->dev->lid;
  a.sm_lid = c->dev->eth ? 0 : 1;
  a.max_vl_num = 4;
  a.active_width = 2;  /* 4x */
  a.active_speed = 64; /* HDR */
  a.phys_state = 5;    /* LinkUp */
  a.link_layer = c->dev->eth ? IBV_LINK_LAYER_ETHERNET : IBV_LINK_LAYER_INFINIBAND;
  memcpy(out, &a, offsetof(struct ibv_port_attr, link_layer) + 1);
  return 0;
}

EMU_EXPORT int ibv_query_gid(struct ibv_context* context, uint8_t port_num, int index, union ibv_gid* gid) {
  emu_ctx_t* c = (emu_ctx_t*)context;
  if (port_num < 1 || port_num > EMU_PORTS || index < 0 || index >= c->dev->ngids) {
    errno = EINVAL;
    return -1;
  }
  *gid = c->dev->gids[index];
  return 0;
}

EMU_EXPORT int _ibv_query_gid_ex(struct ibv_context* context, uint32_t port_num, uint32_t gid_index,
                                 struct ibv_gid_entry* entry, uint32_t flags, size_t entry_size) {
  emu_ctx_t* c = (emu_ctx_t*)context;
  if (flags != 0 || entry_size < sizeof(*entry)) return EINVAL;
  if (port_num < 1 || port_num > EMU_PORTS || gid_index >= (uint32_t)c->dev->ngids) return EINVAL;
  memset(entry, 0, sizeof(*entry));
  entry->gid = c->dev->gids[gid_index];
  entry->gid_index = gid_index;
  entry->port_num = port_num;
  entry->gid_type = (uint32_t)c->dev->gid_types[gid_index];
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Asynchronous events: a queue per context and a pipe whose bytes count them,
 * so ctx->async_fd behaves like the real one (poll()able, O_NONBLOCK works). */

void emu_async_event(emu_ctx_t* c, enum ibv_event_type type, void* element) {
  if (c->ev_count == EMU_ASYNC_QUEUE) return; /* the application is not reading them */
  struct ibv_async_event* ev = &c->events[(c->ev_head + c->ev_count++) % EMU_ASYNC_QUEUE];
  memset(ev, 0, sizeof(*ev));
  ev->event_type = type;
  if (type == IBV_EVENT_PORT_ERR || type == IBV_EVENT_PORT_ACTIVE) ev->element.port_num = 1;
  else if (type == IBV_EVENT_CQ_ERR) ev->element.cq = element;
  else ev->element.qp = element;
  char one = 1;
  ssize_t unused = write(c->async_pipe[1], &one, 1);
  (void)unused;
}

EMU_EXPORT int ibv_get_async_event(struct ibv_context* context, struct ibv_async_event* event) {
  emu_ctx_t* c = (emu_ctx_t*)context;
  char byte;
  ssize_t n = read(c->async_pipe[0], &byte, 1); /* blocks unless the caller set O_NONBLOCK */
  if (n != 1) return -1;                         /* errno from read (EAGAIN) */
  pthread_mutex_lock(&emu.lock);
  int got = c->ev_count > 0;
  if (got) {
    *event = c->events[c->ev_head];
    c->ev_head = (c->ev_head + 1) % EMU_ASYNC_QUEUE;
    c->ev_count--;
  }
  pthread_mutex_unlock(&emu.lock);
  if (!got) {
    errno = EAGAIN;
    return -1;
  }
  return 0;
}

EMU_EXPORT void ibv_ack_async_event(struct ibv_async_event* event) { (void)event; }

/* ------------------------------------------------------------------------ */
/* Protection domains and memory regions. */

EMU_EXPORT struct ibv_pd* ibv_alloc_pd(struct ibv_context* context) {
  emu_ctx_t* c = (emu_ctx_t*)context;
  int err = 0;
  pthread_mutex_lock(&emu.lock);
  if (emu_fail_now("alloc_pd", &err)) {
    pthread_mutex_unlock(&emu.lock);
    errno = err;
    return NULL;
  }
  emu_pd_t* p = calloc(1, sizeof(*p));
  if (p != NULL) {
    p->pd.context = context;
    c->nobjs++;
  }
  pthread_mutex_unlock(&emu.lock);
  if (p == NULL) errno = ENOMEM;
  return p != NULL ? &p->pd : NULL;
}

EMU_EXPORT int ibv_dealloc_pd(struct ibv_pd* pd) {
  emu_pd_t* p = (emu_pd_t*)pd;
  pthread_mutex_lock(&emu.lock);
  if (p->refs > 0) {
    pthread_mutex_unlock(&emu.lock);
    return EBUSY;
  }
  ((emu_ctx_t*)pd->context)->nobjs--;
  pthread_mutex_unlock(&emu.lock);
  free(p);
  return 0;
}

emu_mr_t* emu_mr_find(uint32_t key) {
  for (emu_mr_t* m = emu.mrs[key % EMU_MR_BUCKETS]; m != NULL; m = m->next)
    if (m->mr.lkey == key) return m;
  return NULL;
}

uint8_t* emu_mr_translate(uint32_t key, struct ibv_pd* pd, uint64_t addr, uint64_t len, int access) {
  emu_mr_t* m = emu_mr_find(key);
  if (m == NULL || m->mr.pd != pd || (m->access & access) != access) return NULL;
  if (addr < m->iova || len > m->len || addr - m->iova > m->len - len) return NULL;
  return m->host + (addr - m->iova);
}

/* A real HCA pins the pages: memory the process cannot read (unmapped, or
 * PROT_NONE like device memory reserved in the address space) fails with
 * EFAULT. One byte per page is read through process_vm_readv on ourselves. */
static int emu_pages_readable(const void* addr, size_t len) {
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  uintptr_t p = (uintptr_t)addr & ~(page - 1), end = (uintptr_t)addr + len;
  char sink[64];
  while (p < end) {
    struct iovec remote[64], local = {.iov_base = sink, .iov_len = 0};
    int n = 0;
    for (; n < 64 && p < end; n++, p += page) remote[n] = (struct iovec){.iov_base = (void*)p, .iov_len = 1};
    local.iov_len = (size_t)n;
    ssize_t got = process_vm_readv(getpid(), &local, 1, remote, (unsigned long)n, 0);
    if (got < 0 && (errno == ENOSYS || errno == EPERM)) return 1; /* cannot tell: trust the caller */
    if (got != n) return 0;
  }
  return 1;
}

static int emu_access_ok(int access) {
  const int known = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                    IBV_ACCESS_REMOTE_ATOMIC | IBV_ACCESS_RELAXED_ORDERING;
  if (access & ~known) return 0;
  /* Remote write or atomic access needs local write (verbs rejects it otherwise). */
  if ((access & (IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC)) && !(access & IBV_ACCESS_LOCAL_WRITE)) return 0;
  return 1;
}

/* Caller holds the lock. */
static struct ibv_mr* emu_mr_add(struct ibv_pd* pd, uint8_t* host, uint64_t iova, size_t len, int access, void* map,
                                 size_t map_len) {
  emu_mr_t* m = calloc(1, sizeof(*m));
  if (m == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  /* Keys as an HCA makes them: an index in the upper 24 bits, a random
   * variant byte below, so a stale or guessed key rarely hits. */
  uint32_t key;
  do {
    key = ((++emu.mr_serial & 0xffffffu) << 8) | (uint32_t)(emu_random() & 0xff);
  } while (key == 0 || emu_mr_find(key) != NULL);
  m->mr.context = pd->context;
  m->mr.pd = pd;
  m->mr.addr = (void*)(uintptr_t)iova;
  m->mr.length = len;
  m->mr.lkey = m->mr.rkey = key;
  m->host = host;
  m->iova = iova;
  m->len = len;
  m->access = access;
  m->map = map;
  m->map_len = map_len;
  m->next = emu.mrs[key % EMU_MR_BUCKETS];
  emu.mrs[key % EMU_MR_BUCKETS] = m;
  ((emu_pd_t*)pd)->refs++;
  return &m->mr;
}

#undef ibv_reg_mr
EMU_EXPORT struct ibv_mr* ibv_reg_mr(struct ibv_pd* pd, void* addr, size_t length, int access) {
  int err = 0;
  if (!emu_access_ok(access) || length == 0 || addr == NULL) {
    errno = EINVAL;
    return NULL;
  }
  if (!emu_pages_readable(addr, length)) {
    errno = EFAULT;
    return NULL;
  }
  pthread_mutex_lock(&emu.lock);
  struct ibv_mr* mr = NULL;
  if (emu_fail_now("reg_mr", &err)) errno = err;
  else mr = emu_mr_add(pd, addr, (uint64_t)(uintptr_t)addr, length, access, NULL, 0);
  pthread_mutex_unlock(&emu.lock);
  return mr;
}

EMU_EXPORT struct ibv_mr* ibv_reg_mr_iova2(struct ibv_pd* pd, void* addr, size_t length, uint64_t iova,
                                           unsigned int access) {
  if (!emu_access_ok((int)access) || length == 0 || addr == NULL) {
    errno = EINVAL;
    return NULL;
  }
  if (!emu_pages_readable(addr, length)) {
    errno = EFAULT;
    return NULL;
  }
  pthread_mutex_lock(&emu.lock);
  struct ibv_mr* mr = emu_mr_add(pd, addr, iova, length, (int)access, NULL, 0);
  pthread_mutex_unlock(&emu.lock);
  return mr;
}

/* dma-buf: the fd is mapped into this process (a memfd stands in for GPU
 * memory). Like the kernel, the offset into the buffer and the iova must sit
 * at the same place within a page, and the range must lie inside the buffer. */
EMU_EXPORT struct ibv_mr* ibv_reg_dmabuf_mr(struct ibv_pd* pd, uint64_t offset, size_t length, uint64_t iova, int fd,
                                            int access) {
  int err = 0;
  pthread_mutex_lock(&emu.lock);
  emu_devs_init();
  int enabled = emu.dmabuf, fail = emu_fail_now("reg_dmabuf_mr", &err);
  emu.last_dmabuf_offset = offset;
  emu.last_dmabuf_len = length;
  emu.last_dmabuf_iova = iova;
  pthread_mutex_unlock(&emu.lock);
  if (!enabled) {
    errno = EOPNOTSUPP;
    return NULL;
  }
  if (fail) {
    errno = err;
    return NULL;
  }
  if (fd < 0) {
    errno = EBADF;
    return NULL;
  }
  const uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  off_t size = lseek(fd, 0, SEEK_END);
  if (size < 0) {
    errno = EBADF;
    return NULL;
  }
  if (!emu_access_ok(access) || length == 0 || offset + length < offset || offset + length > (uint64_t)size ||
      (offset % page) != (iova % page)) {
    errno = EINVAL;
    return NULL;
  }
  uint64_t map_off = offset & ~(page - 1);
  size_t map_len = (size_t)(offset + length - map_off);
  void* map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)map_off);
  if (map == MAP_FAILED) return NULL; /* errno from mmap: a GPU dma-buf cannot be mapped by the CPU */
  pthread_mutex_lock(&emu.lock);
  struct ibv_mr* mr = emu_mr_add(pd, (uint8_t*)map + (offset - map_off), iova, length, access, map, map_len);
  pthread_mutex_unlock(&emu.lock);
  if (mr == NULL) munmap(map, map_len);
  return mr;
}

EMU_EXPORT int ibv_dereg_mr(struct ibv_mr* mr) {
  emu_mr_t* m = (emu_mr_t*)mr;
  pthread_mutex_lock(&emu.lock);
  emu_mr_t** link = &emu.mrs[mr->lkey % EMU_MR_BUCKETS];
  while (*link != NULL && *link != m) link = &(*link)->next;
  if (*link == NULL) {
    pthread_mutex_unlock(&emu.lock);
    return EINVAL;
  }
  *link = m->next;
  ((emu_pd_t*)mr->pd)->refs--;
  pthread_mutex_unlock(&emu.lock);
  if (m->map != NULL) munmap(m->map, m->map_len);
  free(m);
  return 0;
}

/* ------------------------------------------------------------------------ */
/* Completion queues. */

EMU_EXPORT struct ibv_cq* ibv_create_cq(struct ibv_context* context, int cqe, void* cq_context,
                                        struct ibv_comp_channel* channel, int comp_vector) {
  int err = 0;
  if (cqe < 1 || cqe > EMU_MAX_CQE || channel != NULL || comp_vector != 0) {
    errno = EINVAL;
    return NULL;
  }
  pthread_mutex_lock(&emu.lock);
  if (emu_fail_now("create_cq", &err)) {
    pthread_mutex_unlock(&emu.lock);
    errno = err;
    return NULL;
  }
  emu_cq_t* q = calloc(1, sizeof(*q));
  if (q != NULL) q->ring = calloc((size_t)cqe, sizeof(*q->ring));
  if (q == NULL || q->ring == NULL) {
    if (q != NULL) free(q);
    pthread_mutex_unlock(&emu.lock);
    errno = ENOMEM;
    return NULL;
  }
  q->cq.context = context;
  q->cq.cq_context = cq_context;
  q->cq.cqe = cqe;
  pthread_mutex_init(&q->cq.mutex, NULL);
  pthread_cond_init(&q->cq.cond, NULL);
  q->cap = cqe;
  ((emu_ctx_t*)context)->nobjs++;
  pthread_mutex_unlock(&emu.lock);
  return &q->cq;
}

EMU_EXPORT int ibv_destroy_cq(struct ibv_cq* cq) {
  emu_cq_t* q = (emu_cq_t*)cq;
  pthread_mutex_lock(&emu.lock);
  if (q->refs > 0) {
    pthread_mutex_unlock(&emu.lock);
    return EBUSY;
  }
  ((emu_ctx_t*)cq->context)->nobjs--;
  pthread_mutex_unlock(&emu.lock);
  pthread_mutex_destroy(&q->cq.mutex);
  pthread_cond_destroy(&q->cq.cond);
  free(q->ring);
  free(q);
  return 0;
}

/* A CQ that overflows is broken, as on an HCA: an async CQ error and every
 * later poll fails. Completions keep their order; a delayed one holds back
 * those after it. Caller holds the lock. */
void emu_cq_push(emu_cq_t* cq, const emu_cqe_t* e, const emu_faults_t* f) {
  if (cq->overrun) return;
  if (cq->count == cq->cap) {
    cq->overrun = 1;
    emu_async_event((emu_ctx_t*)cq->cq.context, IBV_EVENT_CQ_ERR, &cq->cq);
    return;
  }
  emu_cqe_t* slot = &cq->ring[(cq->head + cq->count++) % cq->cap];
  *slot = *e;
  uint64_t visible = emu_now_ns();
  if (f != NULL && f->delay_ns > 0) visible += emu_random() % f->delay_ns;
  if (visible < cq->last_visible_ns) visible = cq->last_visible_ns;
  slot->visible_ns = cq->last_visible_ns = visible;
  __atomic_store_n(&cq->count_hint, cq->count, __ATOMIC_RELEASE);
}

static int emu_poll_cq(struct ibv_cq* cq, int num_entries, struct ibv_wc* wc) {
  emu_cq_t* q = (emu_cq_t*)cq;
  /* Spinning pollers of an empty CQ stay off the lock. */
  if (__atomic_load_n(&q->count_hint, __ATOMIC_ACQUIRE) == 0 && !q->overrun) return 0;
  pthread_mutex_lock(&emu.lock);
  if (q->overrun) {
    pthread_mutex_unlock(&emu.lock);
    return -EOVERFLOW;
  }
  uint64_t now = emu_now_ns();
  int n = 0;
  while (n < num_entries && q->count > 0 && q->ring[q->head].visible_ns <= now) {
    emu_cqe_t* e = &q->ring[q->head];
    wc[n++] = e->wc;
    if (e->is_send) {
      /* The send queue slots up to this WR are free again. */
      emu_qp_t* qp = emu_qp_by_num(e->qpn);
      if (qp != NULL && qp->sq_retired < e->sq_seq + 1) qp->sq_retired = e->sq_seq + 1;
    }
    q->head = (q->head + 1) % q->cap;
    q->count--;
  }
  __atomic_store_n(&q->count_hint, q->count, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&emu.lock);
  return n;
}

static int emu_req_notify_cq(struct ibv_cq* cq, int solicited_only) {
  (void)cq;
  (void)solicited_only;
  return EOPNOTSUPP; /* no completion channels */
}

/* ------------------------------------------------------------------------ */
/* Strings. */

EMU_EXPORT const char* ibv_wc_status_str(enum ibv_wc_status status) {
  static const char* const names[] = {
      [IBV_WC_SUCCESS] = "success",
      [IBV_WC_LOC_LEN_ERR] = "local length error",
      [IBV_WC_LOC_QP_OP_ERR] = "local QP operation error",
      [IBV_WC_LOC_EEC_OP_ERR] = "local EE context operation error",
      [IBV_WC_LOC_PROT_ERR] = "local protection error",
      [IBV_WC_WR_FLUSH_ERR] = "Work Request Flushed Error",
      [IBV_WC_MW_BIND_ERR] = "memory management operation error",
      [IBV_WC_BAD_RESP_ERR] = "bad response error",
      [IBV_WC_LOC_ACCESS_ERR] = "local access error",
      [IBV_WC_REM_INV_REQ_ERR] = "remote invalid request error",
      [IBV_WC_REM_ACCESS_ERR] = "remote access error",
      [IBV_WC_REM_OP_ERR] = "remote operation error",
      [IBV_WC_RETRY_EXC_ERR] = "transport retry counter exceeded",
      [IBV_WC_RNR_RETRY_EXC_ERR] = "RNR retry counter exceeded",
      [IBV_WC_LOC_RDD_VIOL_ERR] = "local RDD violation error",
      [IBV_WC_REM_INV_RD_REQ_ERR] = "remote invalid RD request",
      [IBV_WC_REM_ABORT_ERR] = "aborted error",
      [IBV_WC_INV_EECN_ERR] = "invalid EE context number",
      [IBV_WC_INV_EEC_STATE_ERR] = "invalid EE context state",
      [IBV_WC_FATAL_ERR] = "fatal error",
      [IBV_WC_RESP_TIMEOUT_ERR] = "response timeout error",
      [IBV_WC_GENERAL_ERR] = "general error",
  };
  if ((unsigned)status < sizeof(names) / sizeof(names[0]) && names[status] != NULL) return names[status];
  return "unknown";
}

EMU_EXPORT const char* ibv_event_type_str(enum ibv_event_type event) {
  switch (event) {
    case IBV_EVENT_CQ_ERR: return "CQ error";
    case IBV_EVENT_QP_FATAL: return "local work queue catastrophic error";
    case IBV_EVENT_QP_REQ_ERR: return "invalid request local work queue error";
    case IBV_EVENT_QP_ACCESS_ERR: return "local access violation work queue error";
    case IBV_EVENT_COMM_EST: return "communication established";
    case IBV_EVENT_PORT_ACTIVE: return "port active";
    case IBV_EVENT_PORT_ERR: return "port error";
    case IBV_EVENT_DEVICE_FATAL: return "local catastrophic error";
    default: return "unknown";
  }
}

/* Test hook: the arguments of the last ibv_reg_dmabuf_mr call. */
EMU_EXPORT void verbs_emu_last_dmabuf_reg(uint64_t* offset, uint64_t* length, uint64_t* iova) {
  pthread_mutex_lock(&emu.lock);
  *offset = emu.last_dmabuf_offset;
  *length = emu.last_dmabuf_len;
  *iova = emu.last_dmabuf_iova;
  pthread_mutex_unlock(&emu.lock);
}

/* The ops the inline verbs (ibv_post_send, ibv_post_recv, ibv_poll_cq) call. */
int emu_post_send(struct ibv_qp* qp, struct ibv_send_wr* wr, struct ibv_send_wr** bad_wr);
int emu_post_recv(struct ibv_qp* qp, struct ibv_recv_wr* wr, struct ibv_recv_wr** bad_wr);
struct ibv_context_ops emu_ops_template = {
    .poll_cq = emu_poll_cq,
    .req_notify_cq = emu_req_notify_cq,
    .post_send = emu_post_send,
    .post_recv = emu_post_recv,
};
