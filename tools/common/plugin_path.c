/* SPDX-License-Identifier: Apache-2.0 */
/* Default plugin path of the net tools (plugin_path.h). */
#include "plugin_path.h"

#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <unistd.h>

#define PLUGIN_NAME "libnccl-net-moe.so"

#ifndef MOE_INSTALL_LIBDIR
#define MOE_INSTALL_LIBDIR "/usr/local/lib"
#endif

const char* moe_tool_plugin_path(void) {
  static char path[PATH_MAX + 32];
  char exe[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0) {
    exe[n] = '\0';
    snprintf(path, sizeof(path), "%s/" PLUGIN_NAME, dirname(exe));
    if (access(path, R_OK) == 0) return path;
  }
  snprintf(path, sizeof(path), "%s/" PLUGIN_NAME, MOE_INSTALL_LIBDIR);
  if (access(path, R_OK) == 0) return path;
  return PLUGIN_NAME;
}
