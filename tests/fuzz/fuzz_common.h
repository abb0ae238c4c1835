/* SPDX-License-Identifier: Apache-2.0 */
/* What the peer fuzz targets share: a reader that turns fuzz input into
 * choices (zeros once the input is used up, so every input is a complete
 * script), guarded buffers, non-blocking raw sends, and a bound on calls. */
#ifndef FUZZ_COMMON_H_
#define FUZZ_COMMON_H_

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "transport/moe_transport.h"

typedef struct {
  const uint8_t* p;
  size_t n;
} fz_in_t;

static inline uint8_t fz_u8(fz_in_t* in) {
  if (in->n == 0) return 0;
  in->n--;
  return *in->p++;
}
/* (Each byte read in its own statement: the order of calls within one
 * expression is unspecified, and a script must replay the same way.) */
static inline uint16_t fz_u16(fz_in_t* in) {
  uint16_t lo = fz_u8(in);
  return (uint16_t)(lo | (fz_u8(in) << 8));
}
static inline uint32_t fz_u32(fz_in_t* in) {
  uint32_t lo = fz_u16(in);
  return lo | ((uint32_t)fz_u16(in) << 16);
}
static inline uint64_t fz_u64(fz_in_t* in) {
  uint64_t lo = fz_u32(in);
  return lo | ((uint64_t)fz_u32(in) << 32);
}

/* A bound on any single call into the code under test: everything is
 * non-blocking or bounded by NCCL_MOE_TIMEOUT_MS (set small by the targets). */
#define FZ_CALL_BOUND_NS (10ull * 1000000000ull)
#define FZ_CALL(expr)                                                                                   \
  ({                                                                                                    \
    uint64_t fz_t0_ = moe_net_now_ns();                                                                 \
    __typeof__(expr) fz_r_ = (expr);                                                                    \
    if (moe_net_now_ns() - fz_t0_ > FZ_CALL_BOUND_NS) {                                                 \
      fprintf(stderr, "fuzz: %s took %.1f s\n", #expr, (double)(moe_net_now_ns() - fz_t0_) / 1e9);     \
      abort();                                                                                          \
    }                                                                                                   \
    fz_r_;                                                                                              \
  })

#define FZ_CHECK(cond, ...)                 \
  do {                                      \
    if (!(cond)) {                          \
      fprintf(stderr, "fuzz invariant: "); \
      fprintf(stderr, __VA_ARGS__);         \
      fprintf(stderr, "\n");                \
      abort();                              \
    }                                       \
  } while (0)

/* A buffer between two guard areas. */
#define FZ_GUARD 64
#define FZ_GUARD_BYTE 0xE7

static inline char* fz_alloc(size_t size, int fill) {
  char* p = malloc(size + 2 * FZ_GUARD);
  if (p == NULL) abort();
  memset(p, FZ_GUARD_BYTE, FZ_GUARD);
  memset(p + FZ_GUARD, fill, size);
  memset(p + FZ_GUARD + size, FZ_GUARD_BYTE, FZ_GUARD);
  return p + FZ_GUARD;
}

static inline int fz_all(const char* p, size_t n, int v) {
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] != (unsigned char)v) return 0;
  return 1;
}

static inline void fz_check_guards(const char* b, size_t size, const char* what) {
  FZ_CHECK(fz_all(b - FZ_GUARD, FZ_GUARD, FZ_GUARD_BYTE) && fz_all(b + size, FZ_GUARD, FZ_GUARD_BYTE),
           "a guard of %s (%zu bytes) was overwritten", what, size);
}

static inline void fz_free(char* b) {
  if (b != NULL) free(b - FZ_GUARD);
}

/* Sends what the socket takes now (a malicious peer may desync itself). */
static inline void fz_send(int fd, const void* buf, size_t len) {
  if (fd < 0 || len == 0) return;
  (void)send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* Closes with a reset: no TIME_WAIT left behind by millions of runs. */
static inline void fz_reset(int* fd) {
  if (*fd < 0) return;
  struct linger lg = {.l_onoff = 1, .l_linger = 0};
  setsockopt(*fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
  close(*fd);
  *fd = -1;
}

static inline void fz_pause_us(unsigned us) {
  struct timespec ts = {0, (long)us * 1000};
  nanosleep(&ts, NULL);
}

#endif
