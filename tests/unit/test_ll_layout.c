/* SPDX-License-Identifier: Apache-2.0 */
/* Host side without a GPU: config sizes from older headers, and the
 * low-latency buffer layout (every region
 * inside the low-latency bytes, aligned, disjoint, as large as the kernels
 * index), config checks, and NULL arguments of the entry points. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "core/moe_config.h"
#include "nccl_moe.h"
#include "test_common.h"

#define ALIGN 256

typedef struct {
  const char* name;
  size_t off, bytes;
} region_t;

static ncclMoeConfig_t config(int hidden, int experts, int topk, int llTokens) {
  ncclMoeConfig_t c = NCCL_MOE_CONFIG_INITIALIZER;
  c.maxTokensPerRank = 1;
  c.hidden = hidden;
  c.numExperts = experts;
  c.maxTopk = topk;
  c.llMaxTokensPerRank = llTokens;
  return c;
}

/* Checks one layout against the sizes the kernels assume. */
static void check_layout(int N, int H, int E, int K, int M) {
  const ncclMoeConfig_t c = config(H, E, K, M);
  const size_t start = 12345; /* an unaligned end of the normal regions */
  moe_ll_layout_t l;
  const size_t end = moe_ll_layout_compute(&c, N, start, &l);
  ck_assert_uint_eq(end - (start + ALIGN - 1) / ALIGN * ALIGN, l.bytes);
  const size_t L = (size_t)E / N, rows = L * N * M, nS = (H + 127) / 128, f = 8, F = (H + 511) / 512;
  const size_t S = ((size_t)N * M + 3) / 4 * 4; /* column-major scale rows per expert (16-byte columns) */
  ck_assert_int_eq(l.flagChunks, (int)F);
  ck_assert_int_ge(l.msgInts, E + MOE_LL_MSG_EXTRA);
  ck_assert_int_eq(l.msgInts % 4, 0);
  region_t r[64];
  int n = 0;
#define R(field, size) r[n++] = (region_t){#field, l.field, (size)}
  R(seq, f * MOE_LL_SETS * MOE_LL_OPS);
  R(done, 4 * MOE_LL_SETS * MOE_LL_OPS);
  R(cntFlag, f * MOE_LL_SETS * N);
  R(netDone, 4 * MOE_LL_NET_CHANNELS * N);
  R(recvDone, 4 * MOE_LL_SETS * MOE_LL_OPS);
  for (int b = 0; b < MOE_LL_SETS; b++) {
    R(rowFlag[b], f * rows * F);
    R(combFlag[b], f * 2 * (size_t)M * K * F);
  }
  for (int b = 0; b < MOE_LL_SETS; b++) {
    R(counts[b], 4 * (size_t)N * l.msgInts);
    R(recvX[b], rows * H * 2);           /* BF16 rows; FP8 uses half */
    R(recvScales[b], L * S * nS * 4);    /* either layout; UE8M0 rows: ceil(nS / 4) * 4 bytes <= nS * 4 */
    R(recvSrc[b], rows * 4);
    R(recvK[b], rows * 4);
    R(recvPos[b], rows * 4);
    R(combX[b], 2 * (size_t)M * K * H * 2); /* two halves */
    R(route[b], (size_t)M * K * 4);
    R(routePeer[b], (size_t)M * K * 4);
    R(localCount[b], L * 4);
    R(netRows[b], N * 4);
    R(recvCount[b], L * 4);
  }
#undef R
  for (int i = 0; i < n; i++) {
    ck_assert_msg(r[i].off % ALIGN == 0, "%s at %zu not aligned", r[i].name, r[i].off);
    ck_assert_msg(r[i].off >= start && r[i].off + r[i].bytes <= end, "%s outside the low-latency bytes", r[i].name);
    for (int j = 0; j < i; j++)
      ck_assert_msg(r[i].off >= r[j].off + r[j].bytes || r[j].off >= r[i].off + r[i].bytes, "%s overlaps %s",
                    r[i].name, r[j].name);
  }
  /* The zeroed state covers every flag and counter, nothing else. */
  ck_assert_uint_eq(l.state, l.seq);
  for (int b = 0; b < MOE_LL_SETS; b++)
    ck_assert_uint_ge(l.state + l.stateBytes, l.combFlag[b] + f * 2 * (size_t)M * K * F);
  ck_assert_uint_le(l.state + l.stateBytes, l.counts[0]);
  /* The documented size per set, within alignment slack. */
  const size_t perSet = rows * (2 * (size_t)H + 12 + 8 * F) + L * S * 4 * nS +
                        (size_t)M * K * (4 * (size_t)H + 8 + 16 * F) + (size_t)N * (4 * (size_t)E + 20);
  /* What ncclMoeLowLatencySizeHint answers without a comm. */
  size_t hint = 0;
  ck_assert_int_eq(ncclMoeLowLatencySizeHint(&c, N, &hint), ncclSuccess);
  ck_assert_uint_eq(hint, l.bytes);
  ck_assert_uint_ge(l.bytes, 2 * perSet - 64 * (size_t)N - 32 * 4);
  ck_assert_uint_le(l.bytes, 2 * perSet + 30 * ALIGN);
}

START_TEST(test_layouts) {
  check_layout(8, 7168, 256, 8, 128);
  check_layout(8, 4096, 288, 9, 64);
  check_layout(1, 1024, 8, 3, 40);
  check_layout(2, 2176, 32, 6, 200);
  check_layout(4, 2056, 8, 3, 33);
  check_layout(64, 8192, 1024, 16, 1);
  check_layout(3, 128, 3, 1, NCCL_MOE_LL_MAX_TOKENS);
  check_layout(3, 640, 6, 2, 7);  /* N * M = 21: column-major scale columns padded to 24 */
  check_layout(5, 1024, 10, 4, 1);
}
END_TEST

/* The size hint checks the config as comm init does. */
START_TEST(test_size_hint_checks) {
  ncclMoeConfig_t c = config(1024, 8, 4, 16);
  size_t bytes = 0;
  ck_assert_int_eq(ncclMoeLowLatencySizeHint(NULL, 2, &bytes), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencySizeHint(&c, 2, NULL), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencySizeHint(&c, 3, &bytes), ncclInvalidArgument); /* 8 experts, 3 ranks */
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "numExperts"));
  c.llMaxTokensPerRank = NCCL_MOE_LL_MAX_TOKENS + 1;
  ck_assert_int_eq(ncclMoeLowLatencySizeHint(&c, 2, &bytes), ncclInvalidArgument);
  c.llMaxTokensPerRank = 0;
  ck_assert_int_eq(ncclMoeLowLatencySizeHint(&c, 2, &bytes), ncclSuccess);
  ck_assert_uint_eq(bytes, 0);
}
END_TEST

START_TEST(test_no_ll_buffers) {
  const ncclMoeConfig_t c = config(1024, 8, 4, 0);
  moe_ll_layout_t l;
  memset(&l, 0x5a, sizeof(l));
  ck_assert_uint_eq(moe_ll_layout_compute(&c, 2, 777, &l), 777);
  ck_assert_uint_eq(l.bytes, 0);
}
END_TEST

START_TEST(test_config) {
  ncclMoeConfig_t c = config(1024, 8, 4, 16), out;
  ck_assert_int_eq(moe_config_resolve(&c, 2, &out), ncclSuccess);
  ck_assert_int_eq(out.llMaxTokensPerRank, 16);
  c.llMaxTokensPerRank = NCCL_MOE_LL_MAX_TOKENS;
  ck_assert_int_eq(moe_config_resolve(&c, 2, &out), ncclSuccess);
  c.llMaxTokensPerRank = NCCL_MOE_LL_MAX_TOKENS + 1;
  ck_assert_int_eq(moe_config_resolve(&c, 2, &out), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "llMaxTokensPerRank"));
  c.llMaxTokensPerRank = -3;
  ck_assert_int_eq(moe_config_resolve(&c, 2, &out), ncclInvalidArgument);
  /* The initializer sets the new field to 0 (no low-latency mode). */
  ncclMoeConfig_t d = NCCL_MOE_CONFIG_INITIALIZER;
  ck_assert_int_eq(d.llMaxTokensPerRank, 0);
  ck_assert_uint_eq(d.size, sizeof(ncclMoeConfig_t));
}
END_TEST

START_TEST(test_null_arguments) {
  ncclMoeLowLatencyDispatchArgs_t a;
  memset(&a, 0, sizeof(a));
  ncclMoeLowLatencyDispatchResult_t r;
  ncclMoeLowLatencyCombineArgs_t c;
  memset(&c, 0, sizeof(c));
  size_t bytes;
  ck_assert_int_eq(ncclMoeLowLatencyDispatch(NULL, &a, NULL, &r, 0), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "comm is NULL"));
  ck_assert_int_eq(ncclMoeLowLatencyDispatchRecv(NULL, NULL, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencyCombine(NULL, &c, NULL, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencyCombineRecv(NULL, NULL, 0), ncclInvalidArgument);
  ck_assert_int_eq(ncclMoeLowLatencyBufferBytes(NULL, &bytes), ncclInvalidArgument);
  /* The split halves of normal mode. */
  ck_assert_int_eq(ncclMoeDispatchRecv(NULL, NULL, 0), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "comm is NULL"));
  ck_assert_int_eq(ncclMoeCombineRecv(NULL, NULL, 0), ncclInvalidArgument);
}
END_TEST

/* A config from an older, shorter header is accepted (new fields 0); a
 * size beyond this version's struct, or a wrong magic, is not. */
START_TEST(test_config_sizes) {
  ncclMoeConfig_t c = config(1024, 16, 4, 32), out;
  c.size = offsetof(ncclMoeConfig_t, llMaxTokensPerRank); /* a 0.1 caller */
  ck_assert_int_eq(moe_config_resolve(&c, 4, &out), ncclSuccess);
  ck_assert_int_eq(out.llMaxTokensPerRank, 0);
  ck_assert_uint_eq(out.size, sizeof(ncclMoeConfig_t));
  c.size = sizeof(ncclMoeConfig_t) + 4;
  ck_assert_int_eq(moe_config_resolve(&c, 4, &out), ncclInvalidArgument);
  c.size = offsetof(ncclMoeConfig_t, llMaxTokensPerRank) - 4;
  ck_assert_int_eq(moe_config_resolve(&c, 4, &out), ncclInvalidArgument);
  c = config(1024, 16, 4, 32);
  c.magic = 0;
  ck_assert_int_eq(moe_config_resolve(&c, 4, &out), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "NCCL_MOE_CONFIG_INITIALIZER"));
}
END_TEST

int main(void) {
  Suite* s = suite_create("ll_layout");
  TCase* tc = tcase_create("layout");
  tcase_add_test(tc, test_layouts);
  tcase_add_test(tc, test_size_hint_checks);
  tcase_add_test(tc, test_no_ll_buffers);
  tcase_add_test(tc, test_config);
  tcase_add_test(tc, test_config_sizes);
  tcase_add_test(tc, test_null_arguments);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
