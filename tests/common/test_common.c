/* SPDX-License-Identifier: Apache-2.0 */
#include "test_common.h"

#include <cuda_runtime_api.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

uint64_t moe_test_seed(void) {
  static uint64_t seed = 0;
  static int printed = 0;
  if (!printed) {
    const char* env = getenv("MOE_TEST_SEED");
    if (env != NULL && env[0] != '\0') {
      seed = strtoull(env, NULL, 0);
    } else {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      seed = (uint64_t)ts.tv_sec * 1000003u ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32);
    }
    printf("seed: MOE_TEST_SEED=%" PRIu64 "\n", seed);
    fflush(stdout);
    printed = 1;
  }
  return seed;
}

void moe_rng_init(moe_rng_t* rng, uint64_t seed) {
  rng->s = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  if (rng->s == 0) rng->s = 1;
}

uint64_t moe_rng_next(moe_rng_t* rng) {
  uint64_t x = rng->s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  rng->s = x;
  return x * 0x2545F4914F6CDD1Dull;
}

uint32_t moe_rng_below(moe_rng_t* rng, uint32_t n) {
  return (uint32_t)((moe_rng_next(rng) >> 32) % n);
}

float moe_rng_uniform(moe_rng_t* rng, float lo, float hi) {
  float u = (float)(moe_rng_next(rng) >> 40) / (float)(1u << 24);
  return lo + (hi - lo) * u;
}

float moe_rng_normal(moe_rng_t* rng) {
  float u1 = moe_rng_uniform(rng, 1e-7f, 1.0f);
  float u2 = moe_rng_uniform(rng, 0.0f, 1.0f);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

int moe_test_gpu_count(void) {
  static int count = -1;
  if (count >= 0) return count;
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    _exit(n > 100 ? 100 : n);
  }
  int status = 0;
  count = 0;
  if (pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status)) count = WEXITSTATUS(status);
  return count;
}

void moe_test_virtual_env(void) {
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
}

void moe_test_require_gpus(int n) {
  int have = moe_test_gpu_count();
  if (have < n) {
    printf("SKIP: needs %d GPU(s), found %d\n", n, have);
    exit(MOE_TEST_SKIP);
  }
}

int moe_test_run(Suite* suite) {
  SRunner* sr = srunner_create(suite);
  srunner_set_fork_status(sr, CK_FORK);
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? 0 : 1;
}

int moe_test_put_uid(const char* path, const void* uid, size_t bytes) {
  char tmp[512];
  snprintf(tmp, sizeof(tmp), "%s.tmp", path);
  FILE* f = fopen(tmp, "wb");
  if (f == NULL) return -1;
  size_t w = fwrite(uid, 1, bytes, f);
  fclose(f);
  if (w != bytes) return -1;
  return rename(tmp, path); /* atomic: readers never see a partial id */
}

int moe_test_get_uid(const char* path, void* uid, size_t bytes, int timeout_ms) {
  for (int waited = 0; waited < timeout_ms; waited += 10) {
    FILE* f = fopen(path, "rb");
    if (f != NULL) {
      size_t r = fread(uid, 1, bytes, f);
      fclose(f);
      if (r == bytes) return 0;
    }
    usleep(10000);
  }
  return -1;
}

int moe_test_spawn_ranks(int nranks, moe_test_rank_fn fn) {
  char path[] = "/tmp/moe-uid-XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) return nranks;
  close(fd);
  unlink(path);
  fflush(stdout);
  fflush(stderr);
  pid_t pids[64];
  for (int r = 0; r < nranks; r++) {
    pids[r] = fork();
    if (pids[r] == 0) _exit(fn(r, nranks, path) == 0 ? 0 : 1);
  }
  int failed = 0;
  for (int r = 0; r < nranks; r++) {
    int status = 0;
    if (pids[r] < 0 || waitpid(pids[r], &status, 0) != pids[r] || !WIFEXITED(status) ||
        WEXITSTATUS(status) != 0)
      failed++;
  }
  unlink(path);
  return failed;
}
