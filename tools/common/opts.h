/* SPDX-License-Identifier: Apache-2.0 */
/* Command lines of the tools: getopt_long with whole option names and strict
 * values. Every mistake (an unknown or abbreviated option, a missing or
 * malformed value, a stray argument) prints the usage and the reason to
 * stderr and exits with status 2 before the tool touches CUDA; --help prints
 * the usage to stdout and exits 0. */
#ifndef MOE_TOOLS_OPTS_H_
#define MOE_TOOLS_OPTS_H_

#include <getopt.h>
#include <stdio.h>

#define MOE_OPTS_EXIT_USAGE 2

typedef struct {
  const char* prog;                 /* "nccl-moe-bench": prefixes every message */
  void (*usage)(FILE* out);         /* the tool's usage text */
  const struct option* longopts;    /* getopt_long's table, {0} terminated */
  const char* name;                 /* "--tokens": the option being parsed (for messages) */
  int checked;                      /* the command line was checked for whole names */
} moe_opts_t;

/* The next option's val (getopt_long's), -1 at the end. The first call
 * checks every "--name" of argv against the table: only whole names are
 * accepted (getopt_long alone would take --tok for --tokens, and a later
 * option named --token-list would change what --tok means). Options named
 * "help" print the usage and exit 0. */
int moe_opts_next(moe_opts_t* p, int argc, char** argv);

/* Prints "prog: <message>" after the usage to stderr and exits 2. */
void moe_opts_fail(const moe_opts_t* p, const char* fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

/* The current option's value as a base-10 integer in [min, max], the whole
 * text (no sign for unsigned, no trailing characters); else fails. */
long long moe_opts_int(const moe_opts_t* p, const char* text, long long min, long long max);
unsigned long long moe_opts_u64(const moe_opts_t* p, const char* text);

/* A byte count: an integer with an optional K, M or G suffix (powers of
 * 1024), in [min, max]; else fails. */
unsigned long long moe_opts_bytes(const moe_opts_t* p, const char* text, unsigned long long min,
                                  unsigned long long max);

/* The index of `text` among names[0..count-1] (exact match); else fails
 * listing the choices. */
int moe_opts_choice(const moe_opts_t* p, const char* text, const char* const* names, int count);

/* A comma-separated list of integers in [min, max] ("1,2,4"), at most `cap`
 * of them, stored in out[]; returns how many. Fails on anything else. */
int moe_opts_int_list(const moe_opts_t* p, const char* text, long long min, long long max, int* out, int cap);

#endif
