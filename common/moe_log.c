/* SPDX-License-Identifier: Apache-2.0 */
#include "common/moe_log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MOE_ERROR_MSG_MAX 1024

static _Thread_local char moe_last_error_msg[MOE_ERROR_MSG_MAX];

/* NCCL's logger; read and written from several proxy threads. */
static ncclDebugLogger_t moe_nccl_logger = NULL;
static pthread_mutex_t moe_stderr_lock = PTHREAD_MUTEX_INITIALIZER;

void moe_log_set_nccl_logger(ncclDebugLogger_t logger) {
  __atomic_store_n(&moe_nccl_logger, logger, __ATOMIC_RELEASE);
}

/* NCCL_MOE_DEBUG, parsed once (the logger is below the environment module,
 * which reports its own bad values through it). */
static const char* const moe_level_names[] = {"NONE", "WARN", "INFO", "TRACE"};
static int moe_level = MOE_LOG_WARN;
static int moe_level_bad = 0; /* an unknown value, not yet warned about */
static pthread_once_t moe_level_once = PTHREAD_ONCE_INIT;

static void moe_level_parse(void) {
  const char* v = getenv("NCCL_MOE_DEBUG");
  moe_level = MOE_LOG_WARN;
  if (v == NULL || v[0] == '\0') return;
  for (int i = 0; i <= MOE_LOG_TRACE; i++)
    if (strcasecmp(v, moe_level_names[i]) == 0) {
      moe_level = i;
      return;
    }
  __atomic_store_n(&moe_level_bad, 1, __ATOMIC_RELEASE);
}

int moe_log_level(void) {
  pthread_once(&moe_level_once, moe_level_parse);
  /* Warned here, outside the once: the warning itself asks for the level. */
  if (__atomic_exchange_n(&moe_level_bad, 0, __ATOMIC_ACQ_REL))
    MOE_WARN("ignoring NCCL_MOE_DEBUG=\"%s\": expected NONE, WARN, INFO or TRACE", getenv("NCCL_MOE_DEBUG"));
  return moe_level;
}

void moe_log_reload(void) {
  pthread_once(&moe_level_once, moe_level_parse);
  moe_level_parse();
}

static ncclDebugLogLevel moe_to_nccl_level(moe_log_level_t level) {
  switch (level) {
    case MOE_LOG_WARN: return NCCL_LOG_WARN;
    case MOE_LOG_INFO: return NCCL_LOG_INFO;
    case MOE_LOG_TRACE: return NCCL_LOG_TRACE;
    default: return NCCL_LOG_NONE;
  }
}

static void moe_vlog(moe_log_level_t level, unsigned long subsys, const char* file, int line,
                     const char* fmt, va_list ap) {
  char msg[MOE_ERROR_MSG_MAX];
  vsnprintf(msg, sizeof(msg), fmt, ap);
  ncclDebugLogger_t logger = __atomic_load_n(&moe_nccl_logger, __ATOMIC_ACQUIRE);
  if (logger != NULL) {
    logger(moe_to_nccl_level(level), subsys, file, line, "NET/MOE : %s", msg);
    return;
  }
  if ((int)level > moe_log_level()) return;
  char host[64] = "";
  gethostname(host, sizeof(host) - 1);
  pthread_mutex_lock(&moe_stderr_lock);
  fprintf(stderr, "%s:%d:%ld [nccl-moe] %s %s:%d %s\n", host, (int)getpid(),
          (long)syscall(SYS_gettid), moe_level_names[level], file, line, msg);
  pthread_mutex_unlock(&moe_stderr_lock);
}

void moe_log(moe_log_level_t level, unsigned long subsys, const char* file, int line,
             const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  moe_vlog(level, subsys, file, line, fmt, ap);
  va_end(ap);
}

ncclResult_t moe_error(ncclResult_t res, const char* file, int line, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(moe_last_error_msg, sizeof(moe_last_error_msg), fmt, ap);
  va_end(ap);
  moe_log(MOE_LOG_WARN, NCCL_ALL, file, line, "%s", moe_last_error_msg);
  return res;
}

const char* moe_result_str(ncclResult_t res) {
  switch (res) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* moe_last_error(void) { return moe_last_error_msg; }

void moe_clear_last_error(void) { moe_last_error_msg[0] = '\0'; }

void moe_set_last_error(const char* msg) { snprintf(moe_last_error_msg, sizeof(moe_last_error_msg), "%s", msg); }
