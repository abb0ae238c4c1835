/* SPDX-License-Identifier: Apache-2.0 */
/* Logging and the per-thread last-error message.
 *
 * When NCCL loads the library as a net plugin, messages go through the logger
 * NCCL passed to init() (so they honour NCCL_DEBUG / NCCL_DEBUG_SUBSYS).
 * Otherwise they go to stderr, filtered by NCCL_MOE_DEBUG=WARN|INFO|TRACE. */
#ifndef MOE_LOG_H_
#define MOE_LOG_H_

#include <nccl.h>

#include "nccl_net/nccl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  MOE_LOG_NONE = 0,
  MOE_LOG_WARN = 1,
  MOE_LOG_INFO = 2,
  MOE_LOG_TRACE = 3
} moe_log_level_t;

/* NCCL_MOE_DEBUG (moe_log_level_t), parsed on the first call; reload: parse again (tests). */
int moe_log_level(void);
void moe_log_reload(void);

/* Routes all later messages through NCCL's logger (NULL: back to stderr). */
void moe_log_set_nccl_logger(ncclDebugLogger_t logger);

void moe_log(moe_log_level_t level, unsigned long subsys, const char* file, int line,
             const char* fmt, ...) __attribute__((format(printf, 5, 6)));

/* Records a failure: the message becomes this thread's last error (see
 * ncclMoeGetLastError()), is logged as a warning, and `res` is returned so a
 * caller can write `return MOE_ERROR(ncclInvalidArgument, "...", ...)`. */
ncclResult_t moe_error(ncclResult_t res, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The name of a result code (what ncclGetErrorString says, without calling NCCL). */
const char* moe_result_str(ncclResult_t res);

/* This thread's last error message ("" when none). */
const char* moe_last_error(void);
void moe_clear_last_error(void);
/* Makes `msg` this thread's last error without logging it again (an error
 * another thread detected and logged, handed to the caller's thread). */
void moe_set_last_error(const char* msg);

#define MOE_WARN(...) moe_log(MOE_LOG_WARN, NCCL_ALL, __FILE__, __LINE__, __VA_ARGS__)
#define MOE_INFO(subsys, ...) moe_log(MOE_LOG_INFO, (subsys), __FILE__, __LINE__, __VA_ARGS__)
#define MOE_TRACE(subsys, ...) moe_log(MOE_LOG_TRACE, (subsys), __FILE__, __LINE__, __VA_ARGS__)
#define MOE_ERROR(res, ...) moe_error((res), __FILE__, __LINE__, __VA_ARGS__)

#ifdef __cplusplus
}
#endif
#endif
