/* SPDX-License-Identifier: Apache-2.0 */
/* JSON Lines writer of the tools (json.h). */
#include "json.h"

#include <math.h>

static void json_string(FILE* out, const char* s) {
  fputc('"', out);
  for (const unsigned char* c = (const unsigned char*)(s != NULL ? s : ""); *c != '\0'; c++) {
    if (*c == '"' || *c == '\\') fprintf(out, "\\%c", *c);
    else if (*c < 0x20) fprintf(out, "\\u%04x", *c);
    else fputc(*c, out);
  }
  fputc('"', out);
}

static void json_key(moe_json_t* j, const char* key) {
  fputs(j->fields++ > 0 ? ", " : "", j->out);
  json_string(j->out, key);
  fputs(": ", j->out);
}

void moe_json_begin(moe_json_t* j, FILE* out) {
  j->out = out;
  j->fields = 0;
  fputc('{', out);
}

void moe_json_str(moe_json_t* j, const char* key, const char* value) {
  json_key(j, key);
  json_string(j->out, value);
}

void moe_json_int(moe_json_t* j, const char* key, long long value) {
  json_key(j, key);
  fprintf(j->out, "%lld", value);
}

void moe_json_uint(moe_json_t* j, const char* key, unsigned long long value) {
  json_key(j, key);
  fprintf(j->out, "%llu", value);
}

void moe_json_num(moe_json_t* j, const char* key, double value) {
  json_key(j, key);
  if (isfinite(value)) fprintf(j->out, "%.6g", value);
  else fputs("null", j->out);
}

void moe_json_end(moe_json_t* j) {
  fputs("}\n", j->out);
  fflush(j->out);
}
