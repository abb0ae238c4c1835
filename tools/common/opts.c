/* SPDX-License-Identifier: Apache-2.0 */
/* Strict command lines for the tools (opts.h). */
#include "opts.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#define OPTS_NAME_MAX 64     /* longest option name a suggestion is computed for */
#define OPTS_SUGGEST_EDITS 2 /* suggest a name at most this many edits away */

void moe_opts_fail(const moe_opts_t* p, const char* fmt, ...) {
  va_list ap;
  if (p->usage != NULL) p->usage(stderr);
  fprintf(stderr, "%s: ", p->prog);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n");
  exit(MOE_OPTS_EXIT_USAGE);
}

static const struct option* opts_find(const struct option* lo, const char* name, size_t len) {
  for (; lo->name != NULL; lo++)
    if (strlen(lo->name) == len && strncmp(lo->name, name, len) == 0) return lo;
  return NULL;
}

/* Edit distance between a[0..la) and b, or a large value for long names. */
static size_t opts_distance(const char* a, size_t la, const char* b) {
  const size_t lb = strlen(b);
  size_t row[OPTS_NAME_MAX + 1];
  if (la > OPTS_NAME_MAX || lb > OPTS_NAME_MAX) return SIZE_MAX;
  for (size_t j = 0; j <= lb; j++) row[j] = j;
  for (size_t i = 1; i <= la; i++) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= lb; j++) {
      const size_t up = row[j];
      size_t best = diag + (a[i - 1] != b[j - 1]);
      if (up + 1 < best) best = up + 1;
      if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
      row[j] = best;
      diag = up;
    }
  }
  return row[lb];
}

/* The option a misspelled or abbreviated name most likely meant, or NULL. */
static const char* opts_suggest(const struct option* lo, const char* name, size_t len) {
  const char* best = NULL;
  size_t bestDistance = OPTS_SUGGEST_EDITS + 1;
  for (; lo->name != NULL; lo++) {
    if (len > 0 && strncmp(lo->name, name, len) == 0) return lo->name; /* an abbreviation */
    const size_t d = opts_distance(name, len, lo->name);
    if (d < bestDistance) best = lo->name, bestDistance = d;
  }
  return best;
}

/* Every argument is a whole "--name", "--name=value" or the value that
 * follows a "--name" taking one. */
static void opts_check_names(const moe_opts_t* p, int argc, char** argv) {
  const struct option* previous = NULL; /* the option before argv[i], if any */
  for (int i = 1; i < argc; i++) {
    const char* a = argv[i];
    if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
      if (a[0] == '-' && a[1] != '\0' && a[1] != '-')
        moe_opts_fail(p, "unknown option '%s' (options have long names: --name)", a);
      if (previous != NULL && previous->has_arg == optional_argument)
        moe_opts_fail(p, "unexpected argument '%s' (an optional value attaches with '=': --%s=%s)", a,
                      previous->name, a);
      moe_opts_fail(p, "unexpected argument '%s'", a);
    }
    const char* name = a + 2;
    const char* eq = strchr(name, '=');
    const size_t len = eq != NULL ? (size_t)(eq - name) : strlen(name);
    const struct option* o = opts_find(p->longopts, name, len);
    if (o == NULL) {
      const char* guess = opts_suggest(p->longopts, name, len);
      if (guess != NULL) moe_opts_fail(p, "unknown option '--%.*s' (did you mean --%s?)", (int)len, name, guess);
      moe_opts_fail(p, "unknown option '--%.*s'", (int)len, name);
    }
    if (o->has_arg == no_argument && eq != NULL) moe_opts_fail(p, "--%s takes no value", o->name);
    if (o->has_arg == required_argument && eq == NULL) {
      if (i + 1 >= argc) moe_opts_fail(p, "--%s needs a value", o->name);
      i++;
    }
    previous = eq == NULL ? o : NULL;
  }
}

int moe_opts_next(moe_opts_t* p, int argc, char** argv) {
  static char name[OPTS_NAME_MAX + 3];
  if (!p->checked) {
    opts_check_names(p, argc, argv);
    p->checked = 1;
    opterr = 0;
  }
  int index = -1;
  const int ch = getopt_long(argc, argv, ":", p->longopts, &index);
  if (ch == -1) return -1;
  if (ch == '?' || ch == ':' || index < 0) moe_opts_fail(p, "cannot parse '%s'", argv[optind - 1]);
  snprintf(name, sizeof(name), "--%s", p->longopts[index].name);
  p->name = name;
  if (strcmp(p->longopts[index].name, "help") == 0) {
    if (p->usage != NULL) p->usage(stdout);
    exit(0);
  }
  return ch;
}

/* Whole text, base 10, no leading space (strtoll would skip it). */
static int opts_parse_ll(const char* text, long long* v) {
  if (text == NULL || text[0] == '\0' || isspace((unsigned char)text[0])) return -1;
  errno = 0;
  char* end = NULL;
  *v = strtoll(text, &end, 10);
  return errno != 0 || *end != '\0' ? -1 : 0;
}

long long moe_opts_int(const moe_opts_t* p, const char* text, long long min, long long max) {
  long long v = 0;
  if (opts_parse_ll(text, &v) != 0 || v < min || v > max)
    moe_opts_fail(p, "%s '%s': expected an integer in [%lld, %lld]", p->name, text ? text : "", min, max);
  return v;
}

unsigned long long moe_opts_u64(const moe_opts_t* p, const char* text) {
  errno = 0;
  char* end = NULL;
  const unsigned long long v = text != NULL && isdigit((unsigned char)text[0]) ? strtoull(text, &end, 10) : 0;
  if (end == NULL || errno != 0 || *end != '\0')
    moe_opts_fail(p, "%s '%s': expected an integer in [0, %llu]", p->name, text ? text : "", ULLONG_MAX);
  return v;
}

unsigned long long moe_opts_bytes(const moe_opts_t* p, const char* text, unsigned long long min,
                                  unsigned long long max) {
  errno = 0;
  char* end = NULL;
  unsigned long long v = text != NULL && isdigit((unsigned char)text[0]) ? strtoull(text, &end, 10) : 0;
  int shift = 0, ok = end != NULL && errno == 0;
  if (ok && *end != '\0') {
    const char s = (char)toupper((unsigned char)*end);
    shift = s == 'K' ? 10 : s == 'M' ? 20 : s == 'G' ? 30 : -1;
    ok = shift > 0 && end[1] == '\0' && v <= (ULLONG_MAX >> shift);
  }
  if (ok) v <<= shift;
  if (!ok || v < min || v > max)
    moe_opts_fail(p, "%s '%s': expected a byte count in [%llu, %llu] (suffixes K, M, G: powers of 1024)", p->name,
                  text ? text : "", min, max);
  return v;
}

int moe_opts_choice(const moe_opts_t* p, const char* text, const char* const* names, int count) {
  char list[256] = "";
  for (int i = 0; i < count; i++) {
    if (text != NULL && strcmp(text, names[i]) == 0) return i;
    strncat(list, i == 0 ? "" : ", ", sizeof(list) - strlen(list) - 1);
    strncat(list, names[i], sizeof(list) - strlen(list) - 1);
  }
  moe_opts_fail(p, "%s '%s': expected one of %s", p->name, text ? text : "", list);
}

int moe_opts_int_list(const moe_opts_t* p, const char* text, long long min, long long max, int* out, int cap) {
  char item[32];
  int n = 0;
  const char* s = text != NULL ? text : "";
  for (;;) {
    const size_t len = strcspn(s, ",");
    if (len == 0 || len >= sizeof(item) || n == cap)
      moe_opts_fail(p, "%s '%s': expected up to %d comma-separated integers in [%lld, %lld]", p->name,
                    text ? text : "", cap, min, max);
    memcpy(item, s, len);
    item[len] = '\0';
    long long v = 0;
    if (opts_parse_ll(item, &v) != 0 || v < min || v > max)
      moe_opts_fail(p, "%s '%s': '%s' is not an integer in [%lld, %lld]", p->name, text, item, min, max);
    out[n++] = (int)v;
    if (s[len] == '\0') return n;
    s += len + 1;
  }
}
