/* SPDX-License-Identifier: Apache-2.0 */
/* Transport throughput for nccl-moe-bench --nodes (bench_net.c). */
#ifndef MOE_BENCH_NET_H_
#define MOE_BENCH_NET_H_

#include <stddef.h>

/* GB/s moved by `pairs` loopback connections at once, each writing `bytes`
 * per message (one in flight) for `seconds`; -1 on failure. */
double bench_transport_gbps(int pairs, size_t bytes, double seconds);

#endif
