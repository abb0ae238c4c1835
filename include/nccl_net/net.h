/* SPDX-License-Identifier: Apache-2.0 */
/* Our own declarations of NCCL's network-plugin ABI, versions 8 to 11.
 *
 * NCCL (2.19 .. 2.28+) dlopen()s a net plugin and looks up the symbols
 * ncclNetPlugin_v11, _v10, ... in that order; each is a struct of function
 * pointers whose layout is fixed per version. Every struct here is pinned
 * with static asserts (sizes and field offsets, LP64), so a layout mistake is
 * a compile error, not a crash inside NCCL. Written from NCCL's public headers
 * (ext-net/example/nccl/net_v*.h, src/include/plugin/net/net_v11.h). */
#ifndef NCCL_MOE_NET_H_
#define NCCL_MOE_NET_H_

#include "nccl_net/net_base.h"
#include "nccl_net/net_v8.h"
#include "nccl_net/net_v9.h"
#include "nccl_net/net_v10.h"
#include "nccl_net/net_v11.h"

#endif
