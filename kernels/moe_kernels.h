/* Launch functions of the CUDA kernels: the only way host code reaches them.
 * Each returns the launch's cudaError_t; argument checks are the caller's. */
#ifndef MOE_KERNELS_H_
#define MOE_KERNELS_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* BF16 [rows, hidden] -> FP8 e4m3 codes [rows, hidden] + fp32 scales
 * [rows, hidden / 128]; hidden a multiple of 128; 16-byte aligned pointers. */
cudaError_t moe_fp8_quantize_launch(const void* x, int rows, int hidden, int pow2, void* codes,
                                    float* scales, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif
