/* Default plugin path of the net tools (plugin_path.h). */
#include "plugin_path.h"

#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <unistd.h>

#define PLUGIN_NAME "libnccl-net-moe.so"

const char* moe_tool_plugin_path(void) {
  static char path[PATH_MAX + 32];
  static const char* const relative[] = {"", "../lib/"};
  char exe[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return PLUGIN_NAME;
  exe[n] = '\0';
  const char* dir = dirname(exe);
  for (size_t i = 0; i < sizeof(relative) / sizeof(relative[0]); i++) {
    snprintf(path, sizeof(path), "%s/%s" PLUGIN_NAME, dir, relative[i]);
    if (access(path, R_OK) == 0) return path;
  }
  return PLUGIN_NAME;
}
