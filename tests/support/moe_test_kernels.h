/* SPDX-License-Identifier: Apache-2.0 */
/* Kernels for tests and the benchmark (tests/support, never shipped). */
#ifndef MOE_TEST_KERNELS_H_
#define MOE_TEST_KERNELS_H_

#include <cuda_runtime_api.h>

#include "kernels/moe_intranode.h"

#ifdef __cplusplus
extern "C" {
#endif

/* BF16 [rows, hidden] -> FP8 e4m3 codes [rows, hidden] + fp32 scales
 * [rows, hidden / 128] with the library's codec (kernels/moe_fp8.cuh);
 * hidden a multiple of 128; 16-byte aligned pointers. */
cudaError_t moe_fp8_quantize_launch(const void* x, int rows, int hidden, int pow2, void* codes,
                                    float* scales, cudaStream_t stream);

/* One thread that spins until *flag (device view of host-mapped memory) is
 * at least `value`, or timeoutNs passed. Streams that wait on an event
 * recorded after it start together when the host raises the flag; a flag
 * that only grows lets gates of successive rounds (and of other processes
 * mapping the same page) be open and closed without a reset race. */
cudaError_t moe_test_gate_launch(const volatile int* flag, int value, long long timeoutNs, cudaStream_t stream);

/* An empty kernel of `blocks` blocks of `threads` threads (what launching a
 * kernel costs, without its work). */
cudaError_t moe_test_noop_launch(int blocks, int threads, cudaStream_t stream);

/* The details writer `id` records into record k in the error-record tests
 * (both words of the 64-bit fields used). */
static inline MOE_HD moe_error_details_t moe_test_error_details(int id, int k) {
  moe_error_details_t d;
  d.wait = id % (MOE_WAIT_NET_CHUNK + 1);
  d.peer = id;
  d.want = ((unsigned long long)(id + 1) << 40) | (unsigned long long)k;
  d.seen = ~d.want;
  return d;
}

/* The error record's device half (error_kernels.cu): blocks x 32 threads;
 * thread 0 of block b waits for *go (host-mapped; at most timeoutNs), then
 * records codes[k * blocks + b], with moe_test_error_details(b, k),
 * into every record k of recs (host-mapped, nRecords x MOE_ERR_WORDS) with
 * claim word claims[k] (device memory), and stores whether it won in
 * won[k * blocks + b]. */
cudaError_t moe_test_error_race_launch(volatile int* recs, int* claims, int nRecords, const int* codes, int* won,
                                       int blocks,
                                       const volatile int* go, long long timeoutNs, cudaStream_t stream);

/* The one wait (moe_wait_geq) with ctx's error record: block 0 waits for
 * flags[0] >= 7 with ctx->timeoutNs (it should time out), block 1 for
 * flags[1] >= 5 (the host writes it), blocks 2.. for flags[2] >= 1 with
 * longTimeoutNs (they should end once block 0 broke the comm); per block the
 * result, the value seen (when it arrived) and the wait's duration. */
cudaError_t moe_test_wait_launch(const moe_rank_ctx_t* ctx, unsigned long long* flags, long long longTimeoutNs,
                                 int blocks, int* ok, unsigned long long* seen, long long* elapsedNs,
                                 cudaStream_t stream);

/* Loads the kernels above now: a first launch while virtual ranks' kernels
 * wait for each other would stall (kernels/moe_kernels.h). */
cudaError_t moe_test_kernels_preload(void);

#ifdef __cplusplus
}
#endif
#endif
