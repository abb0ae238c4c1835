/* SPDX-License-Identifier: Apache-2.0 */
/* Where the net tools find libnccl-net-moe.so when --plugin is not given. */
#ifndef MOE_TOOLS_PLUGIN_PATH_H_
#define MOE_TOOLS_PLUGIN_PATH_H_

/* The library beside this program (the build root), else in the libdir of
 * the meson install the tools were built for, else the bare name for the
 * loader path. The string is static. */
const char* moe_tool_plugin_path(void);

#endif
