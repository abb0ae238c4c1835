/* Where the net tools find libnccl-net-moe.so when --plugin is not given. */
#ifndef MOE_TOOLS_PLUGIN_PATH_H_
#define MOE_TOOLS_PLUGIN_PATH_H_

/* The library beside this program (the build root), else in ../lib from it
 * (a meson install: bindir and libdir), else the bare name for the loader
 * path. The string is static. */
const char* moe_tool_plugin_path(void);

#endif
