/* SPDX-License-Identifier: Apache-2.0 */
/* The plugin ABI declarations: prints every struct's size and the offsets
 * NCCL depends on (the headers pin them with static asserts too), and checks
 * them against the values derived from NCCL's own headers (LP64). */
#include <stddef.h>
#include <stdio.h>

#include "nccl_net/net.h"
#include "test_common.h"

#define SHOW(type) printf("%-28s size %3zu\n", #type, sizeof(type))
#define OFF(type, field) printf("  %-26s %3zu\n", #field, offsetof(type, field))

START_TEST(test_sizes_and_offsets) {
  SHOW(ncclNetDeviceHandle_v11_t);
  SHOW(ncclNetProperties_v8_t);
  SHOW(ncclNetProperties_v9_t);
  SHOW(ncclNetProperties_v10_t);
  SHOW(ncclNetProperties_v11_t);
  OFF(ncclNetProperties_v11_t, ptrSupport);
  OFF(ncclNetProperties_v11_t, forceFlush);
  OFF(ncclNetProperties_v11_t, latency);
  OFF(ncclNetProperties_v11_t, netDeviceType);
  OFF(ncclNetProperties_v11_t, vProps);
  OFF(ncclNetProperties_v11_t, maxP2pBytes);
  OFF(ncclNetProperties_v11_t, maxCollBytes);
  OFF(ncclNetProperties_v11_t, maxMultiRequestSize);
  SHOW(ncclNetCommConfig_v11_t);
  SHOW(ncclNetAttr_v11_t);
  SHOW(ncclNet_v8_t);
  SHOW(ncclNet_v9_t);
  SHOW(ncclNet_v10_t);
  SHOW(ncclNet_v11_t);
  OFF(ncclNet_v11_t, finalize);
  OFF(ncclNet_v11_t, setNetAttr);
  ck_assert_uint_eq(sizeof(ncclNetProperties_v8_t), 64);
  ck_assert_uint_eq(sizeof(ncclNetProperties_v9_t), 104);
  ck_assert_uint_eq(sizeof(ncclNetProperties_v10_t), 104);
  ck_assert_uint_eq(sizeof(ncclNetProperties_v11_t), 112);
  ck_assert_uint_eq(offsetof(ncclNetProperties_v11_t, maxMultiRequestSize), 104);
  ck_assert_uint_eq(sizeof(ncclNet_v8_t), 19 * sizeof(void*));
  ck_assert_uint_eq(sizeof(ncclNet_v9_t), 20 * sizeof(void*));
  ck_assert_uint_eq(sizeof(ncclNet_v10_t), 20 * sizeof(void*));
  ck_assert_uint_eq(sizeof(ncclNet_v11_t), 22 * sizeof(void*));
  ck_assert_uint_eq(sizeof(ncclNetDeviceHandle_v11_t), 32);
  ck_assert_int_eq(NCCL_NET_HANDLE_MAXSIZE, 128);
  ck_assert_int_eq(NCCL_PTR_HOST | NCCL_PTR_CUDA | NCCL_PTR_DMABUF, 7);
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_abi");
  TCase* tc = tcase_create("abi");
  tcase_add_test(tc, test_sizes_and_offsets);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
