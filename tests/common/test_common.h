/* SPDX-License-Identifier: Apache-2.0 */
/* Helpers shared by the test suites: seeds, random numbers, GPU probing that
 * never touches CUDA in the parent process, and a Check runner. */
#ifndef MOE_TEST_COMMON_H_
#define MOE_TEST_COMMON_H_

#include <check.h>
#include <stdint.h>

#define MOE_TEST_SKIP 77

/* The run's seed: $MOE_TEST_SEED, else drawn from the clock; printed once. */
uint64_t moe_test_seed(void);

/* A small, fast PRNG (xorshift64*), one state per user. */
typedef struct { uint64_t s; } moe_rng_t;
void moe_rng_init(moe_rng_t* rng, uint64_t seed);
uint64_t moe_rng_next(moe_rng_t* rng);
/* Uniform in [0, n). */
uint32_t moe_rng_below(moe_rng_t* rng, uint32_t n);
/* Uniform in [lo, hi). */
float moe_rng_uniform(moe_rng_t* rng, float lo, float hi);
/* Roughly standard normal. */
float moe_rng_normal(moe_rng_t* rng);

/* Number of CUDA devices, probed in a forked child so this process never
 * initializes CUDA (Check forks every test; a CUDA context does not survive a
 * fork). 0 when there is no driver or no device. */
int moe_test_gpu_count(void);

/* Before CUDA starts, what virtual ranks need (unless the environment
 * already says otherwise): a hardware queue per stream
 * (CUDA_DEVICE_MAX_CONNECTIONS=32) and every kernel loaded at start
 * (CUDA_MODULE_LOADING=EAGER; see ncclMoeCommInitVirtual). */
void moe_test_virtual_env(void);

/* Exits with 77 (Meson's "skip") when fewer than `n` GPUs exist. */
void moe_test_require_gpus(int n);

/* Runs `suite` in fork mode and returns the process exit code (0 = all passed). */
int moe_test_run(Suite* suite);

#endif

/* Multi-GPU tests: runs fn(rank, nranks, uid_path) in `nranks` forked
 * processes (one per GPU); rank 0 writes an ncclUniqueId to uid_path with
 * moe_test_put_uid, the others wait for it with moe_test_get_uid. Returns the
 * number of ranks that failed (non-zero exit or signal). */
typedef int (*moe_test_rank_fn)(int rank, int nranks, const char* uid_path);
int moe_test_spawn_ranks(int nranks, moe_test_rank_fn fn);
int moe_test_put_uid(const char* path, const void* uid, size_t bytes);
int moe_test_get_uid(const char* path, void* uid, size_t bytes, int timeout_ms);
