/* SPDX-License-Identifier: Apache-2.0 */
/* Internals of the TCP backend shared between its files and its tests. */
#ifndef MOE_SOCK_H_
#define MOE_SOCK_H_

#include <net/if.h>
#include <sys/socket.h>

#include "net_socket/moe_sock_wire.h"
#include "transport/moe_net_ifaces.h"
#include "transport/moe_net_util.h"
#include "transport/moe_transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The backend's table (registered with transport/ when the library loads). */
extern const moe_transport_t moe_transport_socket;

#ifdef __cplusplus
}
#endif
#endif
