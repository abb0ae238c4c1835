/* SPDX-License-Identifier: Apache-2.0 */
/* One JSON object per line ("JSON Lines") for the tools' --json output: keys
 * in the order written, numbers finite or null, strings escaped. */
#ifndef MOE_TOOLS_JSON_H_
#define MOE_TOOLS_JSON_H_

#include <stdio.h>

typedef struct {
  FILE* out;
  int fields; /* written so far in the current object */
} moe_json_t;

void moe_json_begin(moe_json_t* j, FILE* out);
void moe_json_str(moe_json_t* j, const char* key, const char* value);
void moe_json_int(moe_json_t* j, const char* key, long long value);
void moe_json_uint(moe_json_t* j, const char* key, unsigned long long value);
/* NaN and infinities (e.g. a ratio over a zero time) become null. */
void moe_json_num(moe_json_t* j, const char* key, double value);
/* Closes the object and the line, and flushes (a consumer reads line by line). */
void moe_json_end(moe_json_t* j);

#endif
