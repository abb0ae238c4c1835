/* SPDX-License-Identifier: Apache-2.0 */
/* The multigpu tier's baseline: one process per GPU, NCCL unique id through a
 * file, an all-reduce checked on every rank. Skips with fewer than 2 GPUs. */
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>

#include "test_common.h"

#define COUNT (1 << 20)

static int allreduce_rank(int rank, int nranks, const char* uid_path) {
  ncclUniqueId id;
  if (rank == 0) {
    if (ncclGetUniqueId(&id) != ncclSuccess || moe_test_put_uid(uid_path, &id, sizeof(id)) != 0)
      return 1;
  } else if (moe_test_get_uid(uid_path, &id, sizeof(id), 60000) != 0) {
    return 1;
  }
  cudaSetDevice(rank);
  ncclComm_t comm;
  if (ncclCommInitRank(&comm, nranks, id, rank) != ncclSuccess) return 1;
  float* buf;
  float* host = malloc(COUNT * sizeof(float));
  for (int i = 0; i < COUNT; i++) host[i] = (float)(rank + 1) * (float)(i % 7);
  cudaMalloc((void**)&buf, COUNT * sizeof(float));
  cudaMemcpy(buf, host, COUNT * sizeof(float), cudaMemcpyHostToDevice);
  int bad = ncclAllReduce(buf, buf, COUNT, ncclFloat, ncclSum, comm, 0) != ncclSuccess;
  cudaDeviceSynchronize();
  cudaMemcpy(host, buf, COUNT * sizeof(float), cudaMemcpyDeviceToHost);
  float ranks_sum = (float)nranks * (float)(nranks + 1) / 2.0f;
  for (int i = 0; i < COUNT && !bad; i++) bad = host[i] != ranks_sum * (float)(i % 7);
  ncclCommDestroy(comm);
  cudaFree(buf);
  free(host);
  if (bad) fprintf(stderr, "rank %d: wrong all-reduce result\n", rank);
  return bad;
}

START_TEST(test_allreduce) {
  int n = moe_test_gpu_count();
  ck_assert_int_eq(moe_test_spawn_ranks(n, allreduce_rank), 0);
}
END_TEST

int main(void) {
  moe_test_require_gpus(2);
  Suite* s = suite_create("nccl_allreduce");
  TCase* tc = tcase_create("multigpu");
  tcase_set_timeout(tc, 300);
  tcase_add_test(tc, test_allreduce);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
