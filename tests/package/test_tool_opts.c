/* SPDX-License-Identifier: Apache-2.0 */
/* The tools' shared command-line parser and JSON writer (tools/common):
 * values parse strictly or the process exits 2 (Check runs each test in a
 * child, so exits are observable); names must be whole; JSON strings are
 * escaped and non-finite numbers become null. */
#include <check.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/common/json.h"
#include "tools/common/opts.h"

enum { O_COUNT = 1, O_SIZE, O_LIST, O_FLAG, O_HELP };
static const struct option LONGOPTS[] = {{"count", required_argument, 0, O_COUNT},
                                         {"size", required_argument, 0, O_SIZE},
                                         {"list", optional_argument, 0, O_LIST},
                                         {"flag", no_argument, 0, O_FLAG},
                                         {"help", no_argument, 0, O_HELP},
                                         {0, 0, 0, 0}};
static const char* const CHOICES[] = {"fp8", "bf16", "cast"};

static void usage(FILE* out) { fprintf(out, "usage: test [--count N] [--size B] [--list[=L]] [--flag]\n"); }

static moe_opts_t make(void) {
  moe_opts_t p = {.prog = "test", .usage = usage, .longopts = LONGOPTS, .name = "--count"};
  return p;
}

/* Parses argv[] (NULL-terminated) to the end; returns the options seen. */
static int parse_all(char** argv, int* seen) {
  int argc = 0;
  while (argv[argc] != NULL) argc++;
  optind = 1;
  moe_opts_t p = make();
  int n = 0, ch;
  while ((ch = moe_opts_next(&p, argc, argv)) != -1) seen[n++] = ch;
  return n;
}

START_TEST(test_int_values) {
  moe_opts_t p = make();
  ck_assert_int_eq(moe_opts_int(&p, "7", 1, 10), 7);
  ck_assert_int_eq(moe_opts_int(&p, "-3", -5, 10), -3);
  ck_assert_int_eq(moe_opts_int(&p, "10", 1, 10), 10);
  ck_assert(moe_opts_u64(&p, "18446744073709551615") == ULLONG_MAX);
  ck_assert_int_eq((int)moe_opts_bytes(&p, "4K", 1, 1ull << 30), 4096);
  ck_assert(moe_opts_bytes(&p, "64m", 1, 1ull << 30) == 64ull << 20);
  ck_assert(moe_opts_bytes(&p, "1G", 1, 1ull << 30) == 1ull << 30);
  ck_assert(moe_opts_bytes(&p, "100", 1, 1ull << 30) == 100);
  ck_assert_int_eq(moe_opts_choice(&p, "cast", CHOICES, 3), 2);
  int list[4];
  ck_assert_int_eq(moe_opts_int_list(&p, "1,20,300", 1, 1000, list, 4), 3);
  ck_assert_int_eq(list[0], 1);
  ck_assert_int_eq(list[1], 20);
  ck_assert_int_eq(list[2], 300);
  ck_assert_int_eq(moe_opts_int_list(&p, "5", 1, 1000, list, 4), 1);
}
END_TEST

/* Each of these must exit 2 (the test passes only on that exit status). */
static const char* const BAD_INTS[] = {"", "abc", "7x", " 7", "11", "0", "1e3", "99999999999999999999", "0x5", "+"};
START_TEST(test_bad_int_exits_2) { moe_opts_t p = make(); moe_opts_int(&p, BAD_INTS[_i], 1, 10); }
END_TEST

static const char* const BAD_BYTES[] = {"", "K", "4KB", "-1", "2G", "4T", "0", "18446744073709551615K", " 4"};
START_TEST(test_bad_bytes_exits_2) { moe_opts_t p = make(); moe_opts_bytes(&p, BAD_BYTES[_i], 1, 1ull << 30); }
END_TEST

static const char* const BAD_LISTS[] = {"", ",", "1,", ",1", "1,,2", "1,x", "1,2,3,4,5", "0", "1;2"};
START_TEST(test_bad_list_exits_2) {
  moe_opts_t p = make();
  int list[4];
  moe_opts_int_list(&p, BAD_LISTS[_i], 1, 1000, list, 4);
}
END_TEST

START_TEST(test_bad_choice_exits_2) { moe_opts_t p = make(); moe_opts_choice(&p, "fp16", CHOICES, 3); }
END_TEST

START_TEST(test_bad_u64_exits_2) { moe_opts_t p = make(); moe_opts_u64(&p, "-1"); }
END_TEST

START_TEST(test_whole_names_parse) {
  char* argv[] = {"test", "--count", "3", "--size=4K", "--flag", "--list", "--list=1,2", NULL};
  int seen[8];
  const int n = parse_all(argv, seen);
  ck_assert_int_eq(n, 5);
  ck_assert_int_eq(seen[0], O_COUNT);
  ck_assert_int_eq(seen[1], O_SIZE);
  ck_assert_int_eq(seen[2], O_FLAG);
  ck_assert_int_eq(seen[3], O_LIST);
  ck_assert_int_eq(seen[4], O_LIST);
}
END_TEST

/* Command lines that must exit 2: abbreviated, unknown, misspelled,
 * valueless, stray. */
static char* BAD_LINES[][4] = {
    {"test", "--cou", "3", NULL},      /* getopt_long alone would take it for --count */
    {"test", "--counts", "3", NULL},   {"test", "--count", NULL, NULL},
    {"test", "--flag=1", NULL, NULL},  {"test", "-c", "3", NULL},
    {"test", "stray", NULL, NULL},     {"test", "--list", "1,2", NULL}, /* optional values need '=' */
    {"test", "--", "stray", NULL},     {"test", "--=3", NULL, NULL},
};
START_TEST(test_bad_line_exits_2) {
  int seen[8];
  parse_all(BAD_LINES[_i], seen);
}
END_TEST

START_TEST(test_help_exits_0) {
  char* argv[] = {"test", "--help", NULL};
  int seen[4];
  parse_all(argv, seen);
}
END_TEST

/* What moe_json_* wrote for one object. */
static char* json_text(void (*fill)(moe_json_t*)) {
  static char buf[1024];
  FILE* f = tmpfile();
  ck_assert_ptr_nonnull(f);
  moe_json_t j;
  moe_json_begin(&j, f);
  fill(&j);
  moe_json_end(&j);
  rewind(f);
  const size_t n = fread(buf, 1, sizeof(buf) - 1, f);
  buf[n] = '\0';
  fclose(f);
  return buf;
}

static void fill_all(moe_json_t* j) {
  moe_json_str(j, "name", "a \"quoted\"\\path\n\tx");
  moe_json_int(j, "n", -42);
  moe_json_uint(j, "seed", ULLONG_MAX);
  moe_json_num(j, "gbps", 1234.5);
  moe_json_num(j, "ratio", NAN);
  moe_json_num(j, "inf", INFINITY);
}

static void fill_none(moe_json_t* j) { (void)j; }

START_TEST(test_json_lines) {
  ck_assert_str_eq(json_text(fill_all),
                   "{\"name\": \"a \\\"quoted\\\"\\\\path\\u000a\\u0009x\", \"n\": -42, "
                   "\"seed\": 18446744073709551615, \"gbps\": 1234.5, \"ratio\": null, \"inf\": null}\n");
  ck_assert_str_eq(json_text(fill_none), "{}\n");
}
END_TEST

static Suite* opts_suite(void) {
  Suite* s = suite_create("tool_opts");
  TCase* tc = tcase_create("core");
  tcase_add_test(tc, test_int_values);
  tcase_add_loop_exit_test(tc, test_bad_int_exits_2, 2, 0, sizeof(BAD_INTS) / sizeof(BAD_INTS[0]));
  tcase_add_loop_exit_test(tc, test_bad_bytes_exits_2, 2, 0, sizeof(BAD_BYTES) / sizeof(BAD_BYTES[0]));
  tcase_add_loop_exit_test(tc, test_bad_list_exits_2, 2, 0, sizeof(BAD_LISTS) / sizeof(BAD_LISTS[0]));
  tcase_add_exit_test(tc, test_bad_choice_exits_2, 2);
  tcase_add_exit_test(tc, test_bad_u64_exits_2, 2);
  tcase_add_test(tc, test_whole_names_parse);
  tcase_add_loop_exit_test(tc, test_bad_line_exits_2, 2, 0, sizeof(BAD_LINES) / sizeof(BAD_LINES[0]));
  tcase_add_exit_test(tc, test_help_exits_0, 0);
  tcase_add_test(tc, test_json_lines);
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  SRunner* sr = srunner_create(opts_suite());
  srunner_run_all(sr, CK_NORMAL);
  const int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? 0 : 1;
}
