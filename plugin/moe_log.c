#include "moe_log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "moe_env.h"

#define MOE_ERROR_MSG_MAX 1024

static _Thread_local char moe_last_error_msg[MOE_ERROR_MSG_MAX];

/* NCCL's logger; read and written from several proxy threads. */
static ncclDebugLogger_t moe_nccl_logger = NULL;
static pthread_mutex_t moe_stderr_lock = PTHREAD_MUTEX_INITIALIZER;

void moe_log_set_nccl_logger(ncclDebugLogger_t logger) {
  __atomic_store_n(&moe_nccl_logger, logger, __ATOMIC_RELEASE);
}

static ncclDebugLogLevel moe_to_nccl_level(moe_log_level_t level) {
  switch (level) {
    case MOE_LOG_WARN: return NCCL_LOG_WARN;
    case MOE_LOG_INFO: return NCCL_LOG_INFO;
    case MOE_LOG_TRACE: return NCCL_LOG_TRACE;
    default: return NCCL_LOG_NONE;
  }
}

static const char* moe_level_name(moe_log_level_t level) {
  switch (level) {
    case MOE_LOG_WARN: return "WARN";
    case MOE_LOG_INFO: return "INFO";
    case MOE_LOG_TRACE: return "TRACE";
    default: return "";
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
  if ((int)level > moe_env_debug_level()) return;
  char host[64] = "";
  gethostname(host, sizeof(host) - 1);
  pthread_mutex_lock(&moe_stderr_lock);
  fprintf(stderr, "%s:%d:%ld [nccl-moe] %s %s:%d %s\n", host, (int)getpid(),
          (long)syscall(SYS_gettid), moe_level_name(level), file, line, msg);
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

const char* moe_last_error(void) { return moe_last_error_msg; }

void moe_clear_last_error(void) { moe_last_error_msg[0] = '\0'; }
