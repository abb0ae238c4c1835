/* Kernels for tests and the benchmark (tests/support, never shipped). */
#ifndef MOE_TEST_KERNELS_H_
#define MOE_TEST_KERNELS_H_

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* BF16 [rows, hidden] -> FP8 e4m3 codes [rows, hidden] + fp32 scales
 * [rows, hidden / 128] with the library's codec (kernels/moe_fp8.cuh);
 * hidden a multiple of 128; 16-byte aligned pointers. */
cudaError_t moe_fp8_quantize_launch(const void* x, int rows, int hidden, int pow2, void* codes,
                                    float* scales, cudaStream_t stream);

/* One thread that spins until *flag (device view of host-mapped memory) is
 * non-zero, or timeoutNs passed. Streams that wait on an event recorded after
 * it start together when the host sets the flag. */
cudaError_t moe_test_gate_launch(const volatile int* flag, long long timeoutNs, cudaStream_t stream);

/* An empty kernel of `blocks` blocks of `threads` threads (what launching a
 * kernel costs, without its work). */
cudaError_t moe_test_noop_launch(int blocks, int threads, cudaStream_t stream);

/* Loads the kernels above now: a first launch while virtual ranks' kernels
 * wait for each other would stall (kernels/moe_kernels.h). */
cudaError_t moe_test_kernels_preload(void);

#ifdef __cplusplus
}
#endif
#endif
