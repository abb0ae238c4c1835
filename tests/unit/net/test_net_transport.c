/* SPDX-License-Identifier: Apache-2.0 */
/* The internal transport interface directly (what the MoE internode path
 * uses): backend selection and one-sided writes with immediates,
 * interleaved with two-sided messages. Runs on the socket backend and on the
 * ib backend over the verbs emulator. */
#include <stdlib.h>
#include <string.h>

#include "common/moe_env.h"
#include "nccl_moe.h"
#include "net_test_util.h"
#include "test_common.h"
#include "transport/moe_transport.h"

static const moe_transport_t* t;

static void setup(void) {
  net_test_env();
  moe_env_reload();
  ck_assert_int_eq(moe_transport_select(&t), ncclSuccess);
  ck_assert_str_eq(t->name, net_test_ib() ? "ib" : "socket");
}

static void teardown(void) {
  if (t != NULL) t->fini();
}

static void pair(moe_net_comm_t** send, moe_net_comm_t** recv, moe_net_comm_t** listen) {
  uint8_t handle[MOE_NET_HANDLE_BYTES] = {0};
  ck_assert_int_eq(t->listen(0, handle, listen), ncclSuccess);
  *send = *recv = NULL;
  moe_net_conn_config_t cfg = {.traffic_class = NCCL_NET_TRAFFIC_CLASS_UNDEF};
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (*send == NULL || *recv == NULL) {
    if (*send == NULL) ck_assert_int_eq(t->connect(0, &cfg, handle, send), ncclSuccess);
    if (*recv == NULL) ck_assert_int_eq(t->accept(*listen, recv), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
}

static void wait_req(moe_net_request_t* req) {
  int done = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (!done) {
    ck_assert_int_eq(t->test(req, &done, NULL), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
}

START_TEST(test_write_with_imm) {
  moe_net_comm_t *send, *recv, *listen;
  pair(&send, &recv, &listen);
  enum { REGION = 3 << 20 };
  char* region = malloc(REGION);
  memset(region, 0, REGION);
  void* rmr = NULL;
  ck_assert_int_eq(t->reg_mr(recv, region, REGION, NCCL_PTR_HOST, -1, 0, &rmr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(rmr, &key), ncclSuccess);
  ck_assert_uint_eq(key.size, REGION);
  /* Three writes at different offsets (one large), then a message, then a write. */
  char* src = malloc(REGION);
  net_fill(src, REGION, 11);
  void* smr = NULL;
  ck_assert_int_eq(t->reg_mr(send, src, REGION, NCCL_PTR_HOST, -1, 0, &smr), ncclSuccess);
  const uint64_t off[3] = {0, 4096, 1 << 20};
  const size_t len[3] = {100, 4000, (2 << 20) - 4096}; /* clear of the last write, which may land first (ib) */
  moe_net_request_t* wreq[4];
  for (int i = 0; i < 3; i++)
    ck_assert_int_eq(t->write(send, src + off[i], len[i], smr, &key, off[i], 1, 0xA000 + i, &wreq[i]), ncclSuccess);
  /* The message: its receive is posted first (ib needs the clear-to-send). */
  char msg[64] = "interleaved message", got[64] = {0};
  void *msg_mr = NULL, *got_mr = NULL;
  ck_assert_int_eq(t->reg_mr(send, msg, sizeof(msg), NCCL_PTR_HOST, -1, 0, &msg_mr), ncclSuccess);
  ck_assert_int_eq(t->reg_mr(recv, got, sizeof(got), NCCL_PTR_HOST, -1, 0, &got_mr), ncclSuccess);
  moe_net_request_t *sreq = NULL, *rreq = NULL;
  void* data[1] = {got};
  size_t cap[1] = {sizeof(got)};
  int tag[1] = {5};
  ck_assert_int_eq(t->irecv(recv, 1, data, cap, tag, &got_mr, &rreq), ncclSuccess);
  ck_assert_ptr_nonnull(rreq);
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (sreq == NULL) {
    ck_assert_int_eq(t->isend(send, msg, sizeof(msg), 5, msg_mr, &sreq), ncclSuccess);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_int_eq(t->write(send, src, 8, smr, &key, REGION - 8, 0, 0, &wreq[3]), ncclSuccess);
  for (int i = 0; i < 4; i++) wait_req(wreq[i]);
  wait_req(sreq);
  /* The receiver sees immediates in order, each after its bytes landed. */
  uint32_t imms[3];
  int n = 0;
  deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (n < 3) {
    int got_imm = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imms[n], &got_imm), ncclSuccess);
    if (got_imm) {
      ck_assert_int_eq(memcmp(region + off[n], src + off[n], len[n]), 0);
      n++;
    }
    ck_assert(net_now_ms() < deadline);
  }
  for (int i = 0; i < 3; i++) ck_assert_uint_eq(imms[i], 0xA000 + (uint32_t)i);
  wait_req(rreq);
  ck_assert_str_eq(got, msg);
  /* The write without immediate landed too (it followed the message). */
  deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (memcmp(region + REGION - 8, src, 8) != 0) {
    uint32_t imm;
    int got_imm = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got_imm), ncclSuccess);
    ck_assert_int_eq(got_imm, 0);
    ck_assert(net_now_ms() < deadline);
  }
  /* Out-of-bounds writes are refused at the sender. */
  moe_net_request_t* bad = NULL;
  ck_assert_int_eq(t->write(send, src, 16, smr, &key, REGION - 8, 0, 0, &bad), ncclInvalidArgument);
  ck_assert_int_eq(t->write(send, src, 1, smr, &key, (uint64_t)-1, 0, 0, &bad), ncclInvalidArgument);
  ck_assert_int_eq(t->dereg_mr(recv, rmr), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(send, smr), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(send, msg_mr), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(recv, got_mr), ncclSuccess);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
  free(src);
  free(region);
}
END_TEST

/* Writes of random sizes, small (inline on sockets) and large (striped over
 * the data streams on sockets), with and without immediates, many in flight:
 * the sender's completions come in posting order (once a write reports done,
 * every earlier one does), the receiver's immediates come in posting order,
 * and when one arrives the bytes of that write and of every earlier one have
 * landed. Targets do not overlap (placement order is not promised). */
#define ORDER_WRITES 48
#define ORDER_REGION ((size_t)24 << 20)
START_TEST(test_writes_complete_and_signal_in_order) {
  moe_rng_t rng;
  const uint64_t seed = moe_test_seed();
  moe_rng_init(&rng, seed);
  moe_net_comm_t *send, *recv, *listen;
  pair(&send, &recv, &listen);
  char* region = malloc(ORDER_REGION);
  char* src = malloc(ORDER_REGION);
  memset(region, 0, ORDER_REGION);
  net_fill(src, ORDER_REGION, seed);
  void *rmr = NULL, *smr = NULL;
  ck_assert_int_eq(t->reg_mr(recv, region, ORDER_REGION, NCCL_PTR_HOST, -1, 0, &rmr), ncclSuccess);
  ck_assert_int_eq(t->reg_mr(send, src, ORDER_REGION, NCCL_PTR_HOST, -1, 0, &smr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(rmr, &key), ncclSuccess);
  uint64_t off[ORDER_WRITES + 1];
  int imm_of[ORDER_WRITES];
  off[0] = 0;
  for (int i = 0; i < ORDER_WRITES; i++) {
    const uint32_t kind = moe_rng_below(&rng, 3);
    size_t len = kind == 0 ? 1 + moe_rng_below(&rng, 4096)
                 : kind == 1 ? 4096 + moe_rng_below(&rng, 252 << 10)
                             : (256 << 10) + moe_rng_below(&rng, 3 << 20);
    if (off[i] + len > ORDER_REGION) len = ORDER_REGION - off[i];
    off[i + 1] = off[i] + len;
    imm_of[i] = moe_rng_below(&rng, 4) != 0; /* a quarter without an immediate */
  }
  moe_net_request_t* req[ORDER_WRITES] = {0};
  int posted = 0, done[ORDER_WRITES] = {0}, signalled = 0, next_imm = 0;
  size_t verified = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  int nimm = 0;
  for (int i = 0; i < ORDER_WRITES; i++) nimm += imm_of[i];
  for (int completed = 0; completed < ORDER_WRITES || signalled < nimm;) {
    while (posted < ORDER_WRITES && posted - completed < 12) {
      const int i = posted;
      ck_assert_int_eq(t->write(send, src + off[i], off[i + 1] - off[i], smr, &key, off[i], imm_of[i], (uint32_t)i,
                                &req[i]), ncclSuccess);
      if (req[i] == NULL) break;
      posted++;
    }
    /* Newest first: once one reports done, every older one must too. */
    int newer_done = 0;
    for (int i = posted - 1; i >= 0; i--) {
      if (done[i]) continue;
      int d = 0;
      ck_assert_int_eq(t->test(req[i], &d, NULL), ncclSuccess);
      ck_assert_msg(d || !newer_done, "write %d completed before write %d (seed %llu)", i + 1, i,
                    (unsigned long long)seed);
      if (d) {
        done[i] = 1;
        newer_done = 1;
        completed++;
      }
    }
    uint32_t imm;
    int got = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    if (got) {
      while (next_imm < ORDER_WRITES && !imm_of[next_imm]) next_imm++;
      ck_assert_msg(next_imm < ORDER_WRITES && imm == (uint32_t)next_imm, "immediate %u arrived, %d was due (seed %llu)",
                    imm, next_imm, (unsigned long long)seed);
      /* Its bytes and every earlier write's have landed. */
      const size_t end = off[next_imm + 1];
      ck_assert_msg(memcmp(region + verified, src + verified, end - verified) == 0,
                    "write %d signalled before the bytes up to it landed (seed %llu)", next_imm,
                    (unsigned long long)seed);
      verified = end;
      next_imm++;
      signalled++;
    }
    ck_assert_msg(net_now_ms() < deadline, "writes did not complete (seed %llu)", (unsigned long long)seed);
  }
  /* Writes without an immediate after the last signalled one land too. */
  deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (memcmp(region, src, off[ORDER_WRITES]) != 0) {
    uint32_t imm;
    int got = 0;
    ck_assert_int_eq(t->poll_imm(recv, &imm, &got), ncclSuccess);
    ck_assert_int_eq(got, 0);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_int_eq(t->dereg_mr(recv, rmr), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(send, smr), ncclSuccess);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
  free(src);
  free(region);
}
END_TEST

START_TEST(test_write_to_deregistered_region_is_error) {
  moe_net_comm_t *send, *recv, *listen;
  pair(&send, &recv, &listen);
  char* region = malloc(1 << 16);
  memset(region, 0x3C, 1 << 16);
  char src[8] = "staleKey";
  void *rmr = NULL, *smr = NULL;
  ck_assert_int_eq(t->reg_mr(send, src, sizeof(src), NCCL_PTR_HOST, -1, 0, &smr), ncclSuccess);
  ck_assert_int_eq(t->reg_mr(recv, region, 1 << 16, NCCL_PTR_HOST, -1, 0, &rmr), ncclSuccess);
  moe_net_rkey_t key;
  ck_assert_int_eq(t->mr_key(rmr, &key), ncclSuccess);
  ck_assert_int_eq(t->dereg_mr(recv, rmr), ncclSuccess);
  /* A stale key must not reach memory that is no longer registered: the
   * writer (ib: a remote access error) or the target (socket) fails, the
   * target's comm in any case, and not a byte lands. */
  moe_net_request_t* w = NULL;
  ck_assert_int_eq(t->write(send, src, 8, smr, &key, 0, 1, 1, &w), ncclSuccess);
  ncclResult_t wres = ncclSuccess;
  int done = 0;
  uint64_t deadline = net_now_ms() + NET_TEST_DEADLINE_MS;
  while (!done && wres == ncclSuccess) {
    wres = t->test(w, &done, NULL);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert(wres == ncclSuccess || wres == ncclRemoteError);
  ncclResult_t res = ncclSuccess;
  while (res == ncclSuccess) {
    uint32_t imm;
    int got = 0;
    res = t->poll_imm(recv, &imm, &got);
    ck_assert_int_eq(got, 0);
    ck_assert(net_now_ms() < deadline);
  }
  ck_assert_int_eq(res, ncclRemoteError);
  for (int i = 0; i < (1 << 16); i++) ck_assert_int_eq((unsigned char)region[i], 0x3C);
  free(region);
  ck_assert_int_eq(t->dereg_mr(send, smr), ncclSuccess);
  /* GPU memory on a device without GPUDirect is refused clearly. */
  moe_net_props_t props;
  ck_assert_int_eq(t->get_properties(0, &props), ncclSuccess);
  void* mr = NULL;
  if (!(props.ptr_support & NCCL_PTR_CUDA)) ck_assert_int_ne(t->reg_mr(send, src, 8, NCCL_PTR_CUDA, -1, 0, &mr), ncclSuccess);
  ck_assert_int_eq(t->close(send), ncclSuccess);
  ck_assert_int_eq(t->close(recv), ncclSuccess);
  ck_assert_int_eq(t->close(listen), ncclSuccess);
}
END_TEST

/* Forced ib that cannot run is an error naming the cause; auto falls back to
 * sockets. The causes: NCCL_IB_DISABLE, no device that NCCL_IB_HCA selects. */
START_TEST(test_forced_ib_without_device) {
  t->fini(); /* the fixture's backend: selection starts from nothing */
  t = NULL;
  const char* hcas[] = {NULL, "=nosuchhca"};
  for (int i = 0; i < 2; i++) {
    if (i == 0) setenv("NCCL_IB_DISABLE", "1", 1);
    else unsetenv("NCCL_IB_DISABLE");
    if (hcas[i] != NULL) setenv("NCCL_IB_HCA", hcas[i], 1);
    setenv("NCCL_MOE_NET_BACKEND", "ib", 1);
    moe_env_reload();
    const moe_transport_t* other = NULL;
    ck_assert_int_ne(moe_transport_select(&other), ncclSuccess);
    ck_assert_ptr_null(other);
    const char* why = ncclMoeGetLastError();
    ck_assert_msg(strstr(why, i == 0 ? "NCCL_IB_DISABLE" : "NCCL_IB_HCA") != NULL ||
                      (i == 1 && strstr(why, "cannot load") != NULL), /* a host without rdma-core */
                  "%s", why);
    setenv("NCCL_MOE_NET_BACKEND", "auto", 1);
    moe_env_reload();
    ck_assert_int_eq(moe_transport_select(&other), ncclSuccess);
    ck_assert_str_eq(other->name, "socket");
    other->fini();
  }
  unsetenv("NCCL_IB_HCA");
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_transport");
  net_test_env();
  setenv("NCCL_MOE_SOCKET_STRIPE_KB", "256", 0); /* the order test's large writes striped (off by default) */
  TCase* tc = tcase_create(net_test_ib() ? "ib_emulated" : "socket");
  tcase_add_checked_fixture(tc, setup, teardown);
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_write_with_imm);
  tcase_add_test(tc, test_writes_complete_and_signal_in_order);
  tcase_add_test(tc, test_write_to_deregistered_region_is_error);
  tcase_add_test(tc, test_forced_ib_without_device);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
