/* SPDX-License-Identifier: Apache-2.0 */
/* The private MPS daemon's life cycle (tests/support/moe_mps.h) against a
 * stand-in control program (tests/unit/fake_mps/): no control program on
 * PATH, a daemon that will not start, and a daemon started, probed and
 * stopped again, with its directories gone and its process ended. Without
 * a GPU the probe's CUDA client fails, so the daemon is stopped at once;
 * with one (where CUDA ignores a pipe directory without a real daemon) the
 * probe passes and moe_mps_stop stops it. argv[1]: the stand-in's folder. */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_common.h"
#include "tests/support/moe_mps.h"

static char g_fake_dir[PATH_MAX];
static char g_record[PATH_MAX];

static void use_fake(void) {
  char path[2 * PATH_MAX];
  snprintf(path, sizeof(path), "%s:%s", g_fake_dir, getenv("PATH") != NULL ? getenv("PATH") : "/usr/bin:/bin");
  setenv("PATH", path, 1);
  snprintf(g_record, sizeof(g_record), "/tmp/moe-fake-mps-%d.txt", (int)getpid());
  unlink(g_record);
  setenv("FAKE_MPS_RECORD", g_record, 1);
  unsetenv("CUDA_MPS_PIPE_DIRECTORY");
  unsetenv("CUDA_MPS_LOG_DIRECTORY");
}

static char* read_record(void) {
  static char buf[8192];
  buf[0] = '\0';
  FILE* f = fopen(g_record, "r");
  if (f == NULL) return buf;
  const size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  buf[n] = '\0';
  fclose(f);
  return buf;
}

static int exists(const char* path) {
  struct stat st;
  return stat(path, &st) == 0;
}

static pid_t daemon_pid(const moe_mps_t* m) {
  char path[PATH_MAX];
  snprintf(path, sizeof(path), "%s/nvidia-cuda-mps-control.pid", m->pipeDir);
  FILE* f = fopen(path, "r");
  long v = 0;
  if (f != NULL) {
    if (fscanf(f, "%ld", &v) != 1) v = 0;
    fclose(f);
  }
  return (pid_t)v;
}

START_TEST(test_off_unless_asked_and_available) {
  moe_mps_t m;
  char line[1024];
  ck_assert_int_eq(moe_mps_start(&m, MOE_MPS_OFF), 0);
  ck_assert_ptr_nonnull(strstr(moe_mps_describe(&m, line, sizeof(line)), "MPS: off (not asked for)"));
  setenv("PATH", "/nonexistent", 1);
  unsetenv("CUDA_MPS_PIPE_DIRECTORY");
  ck_assert_int_eq(moe_mps_start(&m, MOE_MPS_AUTO), 0);
  ck_assert_ptr_nonnull(strstr(m.why, "not on PATH"));
  setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/somebody-elses", 1);
  ck_assert_int_eq(moe_mps_start(&m, MOE_MPS_AUTO), 0);
  ck_assert_ptr_nonnull(strstr(m.why, "is set"));
  moe_mps_stop(&m); /* nothing of ours: a no-op */
  ck_assert_str_eq(getenv("CUDA_MPS_PIPE_DIRECTORY"), "/tmp/somebody-elses");
}
END_TEST

START_TEST(test_daemon_that_fails_to_start) {
  use_fake();
  setenv("FAKE_MPS_FAIL_START", "1", 1);
  moe_mps_t m;
  ck_assert_int_eq(moe_mps_start(&m, MOE_MPS_AUTO), 0);
  ck_assert_msg(strstr(m.why, "-d failed") != NULL && strstr(m.why, "cannot start the daemon") != NULL, "%s", m.why);
  ck_assert(!exists(m.dir));
  ck_assert_ptr_null(getenv("CUDA_MPS_PIPE_DIRECTORY"));
  unsetenv("FAKE_MPS_FAIL_START");
  unlink(g_record);
}
END_TEST

START_TEST(test_daemon_started_probed_and_stopped) {
  use_fake();
  moe_mps_t m;
  const int on = moe_mps_start(&m, MOE_MPS_AUTO);
  char line[1024];
  printf("%s\n", moe_mps_describe(&m, line, sizeof(line)));
  const char* rec = read_record();
  ck_assert_msg(strstr(rec, "call -d pipe=/tmp/nccl-moe-mps-") != NULL, "%s", rec);
  if (on) {
    /* A GPU: the probe's client got through (CUDA runs without MPS when no
     * real daemon answers). Ours runs until stopped. */
    ck_assert_str_eq(getenv("CUDA_MPS_PIPE_DIRECTORY"), m.pipeDir);
    const pid_t d = daemon_pid(&m);
    ck_assert_int_gt(d, 1);
    ck_assert_int_eq(kill(d, 0), 0);
    moe_mps_stop(&m);
    ck_assert_msg(kill(d, 0) != 0 && errno == ESRCH, "the daemon (pid %d) still runs", (int)d);
  } else {
    ck_assert_msg(strstr(m.why, "could not start through the private daemon") != NULL, "%s", m.why);
  }
  rec = read_record();
  ck_assert_msg(strstr(rec, "command quit") != NULL, "%s", rec);
  ck_assert(!exists(m.dir));
  ck_assert_ptr_null(getenv("CUDA_MPS_PIPE_DIRECTORY"));
  ck_assert_ptr_null(getenv("CUDA_MPS_LOG_DIRECTORY"));
  moe_mps_stop(&m); /* twice: a no-op */
  unlink(g_record);
}
END_TEST

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s FAKE_MPS_DIR\n", argv[0]);
    return 1;
  }
  if (realpath(argv[1], g_fake_dir) == NULL) return 1;
  Suite* s = suite_create("mps");
  TCase* tc = tcase_create("life_cycle");
  tcase_set_timeout(tc, 120);
  tcase_add_test(tc, test_off_unless_asked_and_available);
  tcase_add_test(tc, test_daemon_that_fails_to_start);
  tcase_add_test(tc, test_daemon_started_probed_and_stopped);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
