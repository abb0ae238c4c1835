/* SPDX-License-Identifier: Apache-2.0 */
/* libibverbs, resolved at run time through a function table: the library
 * must load on hosts without rdma-core, and NCCL_MOE_IBVERBS_LIBRARY can name
 * another library with libibverbs' API (the test verbs emulator).
 *
 * Only exported functions are looked up. The data-path calls (ibv_post_send,
 * ibv_post_recv, ibv_poll_cq) are static inline in verbs.h and jump through
 * the ops table of the context a provider (or the emulator) filled, so they
 * need no symbol. ibv_query_port is a macro in verbs.h; the table holds the
 * exported compat function, which every rdma-core still provides. */
#ifndef MOE_IB_VERBS_H_
#define MOE_IB_VERBS_H_

#include <infiniband/verbs.h>
#include <nccl.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_IB_VERBS_DEFAULT_LIBRARY "libibverbs.so.1"

typedef struct {
  struct ibv_device** (*get_device_list)(int* num);
  void (*free_device_list)(struct ibv_device** list);
  const char* (*get_device_name)(struct ibv_device* dev);
  struct ibv_context* (*open_device)(struct ibv_device* dev);
  int (*close_device)(struct ibv_context* ctx);
  int (*query_device)(struct ibv_context* ctx, struct ibv_device_attr* attr);
  int (*query_port)(struct ibv_context* ctx, uint8_t port, struct ibv_port_attr* attr);
  int (*query_gid)(struct ibv_context* ctx, uint8_t port, int index, union ibv_gid* gid);
  /* NULL before rdma-core v32; GID and RoCE type without sysfs. */
  int (*query_gid_ex)(struct ibv_context* ctx, uint32_t port, uint32_t index, struct ibv_gid_entry* entry,
                      uint32_t flags, size_t entry_size);
  struct ibv_pd* (*alloc_pd)(struct ibv_context* ctx);
  int (*dealloc_pd)(struct ibv_pd* pd);
  struct ibv_mr* (*reg_mr)(struct ibv_pd* pd, void* addr, size_t len, int access);
  /* NULL when rdma-core predates dma-buf (< v34). */
  struct ibv_mr* (*reg_dmabuf_mr)(struct ibv_pd* pd, uint64_t offset, size_t len, uint64_t iova, int fd, int access);
  int (*dereg_mr)(struct ibv_mr* mr);
  struct ibv_cq* (*create_cq)(struct ibv_context* ctx, int cqe, void* cq_context, struct ibv_comp_channel* ch,
                              int comp_vector);
  int (*destroy_cq)(struct ibv_cq* cq);
  struct ibv_qp* (*create_qp)(struct ibv_pd* pd, struct ibv_qp_init_attr* attr);
  int (*modify_qp)(struct ibv_qp* qp, struct ibv_qp_attr* attr, int mask);
  int (*destroy_qp)(struct ibv_qp* qp);
  int (*get_async_event)(struct ibv_context* ctx, struct ibv_async_event* event);
  void (*ack_async_event)(struct ibv_async_event* event);
  const char* (*wc_status_str)(enum ibv_wc_status status);
  const char* (*event_type_str)(enum ibv_event_type event);
} moe_ib_verbs_t;

/* Loads the verbs library once per load of this library (NCCL_MOE_IBVERBS_LIBRARY,
 * else libibverbs.so.1). ncclSystemError when it is missing or lacks a
 * required symbol: an INFO line for the default library (most hosts simply
 * have no rdma-core), a warning for one the user named; the reason is
 * available from moe_ib_verbs_error(). */
ncclResult_t moe_ib_verbs_load(const moe_ib_verbs_t** verbs_p);
/* Why the load failed ("" when it did not). */
const char* moe_ib_verbs_error(void);

#ifdef __cplusplus
}
#endif
#endif
