/* SPDX-License-Identifier: Apache-2.0 */
/* Environment parsing, logging through NCCL's logger, the per-thread last
 * error, and the version entry point. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/moe_env.h"
#include "common/moe_log.h"
#include "nccl_moe.h"
#include "test_common.h"

START_TEST(test_parse_int) {
  ck_assert_int_eq(moe_env_parse_int("X", NULL, 5, 0, 10), 5);
  ck_assert_int_eq(moe_env_parse_int("X", "", 5, 0, 10), 5);
  ck_assert_int_eq(moe_env_parse_int("X", "7", 5, 0, 10), 7);
  ck_assert_int_eq(moe_env_parse_int("X", "-1", 5, -1, 10), -1);
  ck_assert_int_eq(moe_env_parse_int("X", "11", 5, 0, 10), 5);
  ck_assert_int_eq(moe_env_parse_int("X", "7x", 5, 0, 10), 5);
  ck_assert_int_eq(moe_env_parse_int("X", "abc", 5, 0, 10), 5);
  ck_assert_int_eq(moe_env_parse_int("X", "99999999999999999999", 5, 0, 10), 5);
}
END_TEST

START_TEST(test_env_values_and_bad_values) {
  setenv("NCCL_MOE_TIMEOUT_MS", "1234", 1);
  setenv("NCCL_MOE_NET_BACKEND", "SOCKET", 1);
  setenv("NCCL_IB_HCA", "^mlx5_0:1", 1);
  setenv("NCCL_NET_GDR_LEVEL", "PHB", 1);
  moe_env_reload();
  ck_assert_int_eq(moe_env()->timeout_ms, 1234);
  ck_assert_int_eq(moe_env()->net_backend, MOE_NET_BACKEND_SOCKET);
  ck_assert_str_eq(moe_env()->ib_hca, "^mlx5_0:1");
  ck_assert_int_eq(moe_env()->net_gdr_level, 3);
  setenv("NCCL_MOE_TIMEOUT_MS", "-5", 1);
  setenv("NCCL_MOE_NET_BACKEND", "carrier-pigeon", 1);
  setenv("NCCL_IB_TIMEOUT", "99", 1);
  setenv("NCCL_MOE_DEBUG", "LOUD", 1);
  moe_env_reload();
  ck_assert_int_eq(moe_env()->timeout_ms, 60000);
  ck_assert_int_eq(moe_env()->net_backend, MOE_NET_BACKEND_AUTO);
  ck_assert_int_eq(moe_env()->ib_timeout, 20);
  ck_assert_int_eq(moe_env()->debug_level, MOE_LOG_WARN);
}
END_TEST

static int logged_level = -1;
static char logged_msg[512];

static void fake_logger(ncclDebugLogLevel level, unsigned long flags, const char* file, int line,
                        const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  logged_level = level;
  vsnprintf(logged_msg, sizeof(logged_msg), fmt, ap);
  va_end(ap);
}

START_TEST(test_nccl_logger_routing) {
  moe_log_set_nccl_logger(fake_logger);
  MOE_INFO(NCCL_NET, "hello %d", 42);
  ck_assert_int_eq(logged_level, NCCL_LOG_INFO);
  ck_assert_ptr_nonnull(strstr(logged_msg, "hello 42"));
  ck_assert_int_eq(MOE_ERROR(ncclInvalidArgument, "bad thing %s", "x"), ncclInvalidArgument);
  ck_assert_int_eq(logged_level, NCCL_LOG_WARN);
  ck_assert_ptr_nonnull(strstr(logged_msg, "bad thing x"));
  moe_log_set_nccl_logger(NULL);
}
END_TEST

static void* other_thread(void* arg) {
  (void)arg;
  return (void*)(strcmp(ncclMoeGetLastError(), "") == 0 ? (void*)1 : NULL);
}

START_TEST(test_last_error_per_thread) {
  ck_assert_str_eq(ncclMoeGetLastError(), "");
  ck_assert_int_eq(ncclMoeGetVersion(NULL), ncclInvalidArgument);
  ck_assert_ptr_nonnull(strstr(ncclMoeGetLastError(), "version is NULL"));
  pthread_t t;
  void* ok = NULL;
  pthread_create(&t, NULL, other_thread, NULL);
  pthread_join(t, &ok);
  ck_assert_ptr_nonnull(ok);
}
END_TEST

START_TEST(test_version) {
  int v = 0;
  ck_assert_int_eq(ncclMoeGetVersion(&v), ncclSuccess);
  ck_assert_int_eq(v, NCCL_MOE_VERSION_CODE);
}
END_TEST

static Suite* env_log_suite(void) {
  Suite* s = suite_create("env_log");
  TCase* tc = tcase_create("core");
  tcase_add_test(tc, test_parse_int);
  tcase_add_test(tc, test_env_values_and_bad_values);
  tcase_add_test(tc, test_nccl_logger_routing);
  tcase_add_test(tc, test_last_error_per_thread);
  tcase_add_test(tc, test_version);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) { return moe_test_run(env_log_suite()); }
