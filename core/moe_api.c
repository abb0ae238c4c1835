/* SPDX-License-Identifier: Apache-2.0 */
/* Library-wide entry points: version and last error. */
#include "common/moe_log.h"
#include "nccl_moe.h"

NCCL_MOE_EXPORT ncclResult_t ncclMoeGetVersion(int* version) {
  if (version == NULL) return MOE_ERROR(ncclInvalidArgument, "ncclMoeGetVersion: version is NULL");
  *version = NCCL_MOE_VERSION_CODE;
  return ncclSuccess;
}

NCCL_MOE_EXPORT const char* ncclMoeGetLastError(void) { return moe_last_error(); }
