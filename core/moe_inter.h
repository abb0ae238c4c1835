/* SPDX-License-Identifier: Apache-2.0 */
/* Internode set-up of a comm (internal): topology, the network regions and
 * counters, the proxies and their connections; and the handle's forwarding
 * routes. The state types (moe_inter_comm_t) are in core/moe_comm.h. */
#ifndef MOE_INTER_H_
#define MOE_INTER_H_

#include "core/moe_comm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of listen handles each rank contributes to the exchange. */
#define MOE_INTER_HANDLE_BYTES (2 * MOE_NET_HANDLE_BYTES)

/* Allocates the network regions and counters of `comm` (whose config and
 * rank are set; with low-latency buffers, also those of the low-latency
 * proxy, and comm->ll.ctx.net is filled) and starts listening:
 * moe_inter_handles() is ready to exchange. */
ncclResult_t moe_inter_create(ncclMoeComm_t comm, const moe_topo_t* topo, moe_inter_comm_t** inter_p);

/* This rank's MOE_INTER_HANDLE_BYTES of listen handles into `out`. */
void moe_inter_handles(const moe_inter_comm_t* inter, char* out);

/* handles[r * MOE_INTER_HANDLE_BYTES]: the listen handles of every rank.
 * Connects the proxies to their peers (each side connects and accepts; the
 * thread backs off between attempts, and a peer that does not answer within
 * the comm's timeout is an error), then starts the proxy threads. */
ncclResult_t moe_inter_connect_start(moe_inter_comm_t* inter, const char* handles);

/* ncclMoeCommAbort: stops the proxy threads now (without finishing the
 * slabs and credits peers wait for) and closes their connections; the
 * memory stays for moe_inter_destroy. NULL is a no-op. */
void moe_inter_stop(moe_inter_comm_t* inter);

/* Stops the proxies, frees everything and releases the transport; NULL is a
 * no-op. */
void moe_inter_destroy(moe_inter_comm_t* inter);

/* Device ints a handle needs for its forwarding routes. */
size_t moe_inter_route_ints(const moe_inter_comm_t* inter);
/* Cuts `mem` (moe_inter_route_ints ints) into the routes. */
void moe_inter_route_init(const moe_inter_comm_t* inter, int* mem, moe_fwd_route_t* fwd);

#ifdef __cplusplus
}
#endif
#endif
