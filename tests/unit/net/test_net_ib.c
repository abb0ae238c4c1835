/* SPDX-License-Identifier: Apache-2.0 */
/* The verbs backend's pieces that run without an HCA: NCCL_IB_HCA matching,
 * GID selection from a fixture sysfs tree, handle and connection-info
 * encoding (malformed rejected), FIFO arithmetic, the QP split, port speeds,
 * and discovery on a host without devices. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/moe_env.h"
#include "net_ib/moe_ib_devs.h"
#include "net_ib/moe_ib_wire.h"
#include "net_socket/moe_sock_wire.h"
#include "test_common.h"

START_TEST(test_hca_list) {
  moe_net_iflist_t l;
  ck_assert_int_eq(moe_net_iflist_parse("=mlx5_0:1,mlx5_1:1", &l), ncclSuccess);
  ck_assert(moe_net_iflist_match(&l, "mlx5_0", 1));
  ck_assert(!moe_net_iflist_match(&l, "mlx5_0", 2));
  ck_assert(!moe_net_iflist_match(&l, "mlx5_10", 1)); /* exact: no prefix match */
  ck_assert_int_eq(moe_net_iflist_parse("mlx5", &l), ncclSuccess);
  ck_assert(moe_net_iflist_match(&l, "mlx5_10", 2));
  ck_assert(!moe_net_iflist_match(&l, "bnxt_re0", 1));
  ck_assert_int_eq(moe_net_iflist_parse("^mlx5_2", &l), ncclSuccess);
  ck_assert(!moe_net_iflist_match(&l, "mlx5_2", 1));
  ck_assert(moe_net_iflist_match(&l, "mlx5_1", 1));
  ck_assert_int_eq(moe_net_iflist_parse("^=mlx5_0:2", &l), ncclSuccess);
  ck_assert(moe_net_iflist_match(&l, "mlx5_0", 1));
  ck_assert(!moe_net_iflist_match(&l, "mlx5_0", 2));
}
END_TEST

static char root[256];

static void write_file(const char* rel, const char* text) {
  char path[512];
  snprintf(path, sizeof(path), "%s/%s", root, rel);
  for (char* p = path + strlen(root) + 1; *p; p++)
    if (*p == '/') {
      *p = '\0';
      mkdir(path, 0755);
      *p = '/';
    }
  FILE* f = fopen(path, "w");
  ck_assert_ptr_nonnull(f);
  fputs(text, f);
  fclose(f);
}

static void make_fixture(void) {
  snprintf(root, sizeof(root), "/tmp/moe_ib_sysfs_XXXXXX");
  ck_assert_ptr_nonnull(mkdtemp(root));
  /* What an mlx5 RoCE port with one IPv4 and one IPv6 address shows. */
  const char* gids[] = {"fe80:0000:0000:0000:0a0b:0cff:fe0d:0e0f", "fe80:0000:0000:0000:0a0b:0cff:fe0d:0e0f",
                        "0000:0000:0000:0000:0000:ffff:c0a8:0105", "0000:0000:0000:0000:0000:ffff:c0a8:0105",
                        "fd00:0000:0000:0000:0000:0000:0000:0005", "fd00:0000:0000:0000:0000:0000:0000:0005",
                        "0000:0000:0000:0000:0000:0000:0000:0000"};
  const char* types[] = {"IB/RoCE v1", "RoCE v2", "IB/RoCE v1", "RoCE v2", "IB/RoCE v1", "RoCE v2", "RoCE v2"};
  for (int i = 0; i < 7; i++) {
    char rel[128], text[64];
    snprintf(rel, sizeof(rel), "mlx5_0/ports/1/gids/%d", i);
    snprintf(text, sizeof(text), "%s\n", gids[i]);
    write_file(rel, text);
    snprintf(rel, sizeof(rel), "mlx5_0/ports/1/gid_attrs/types/%d", i);
    snprintf(text, sizeof(text), "%s\n", types[i]);
    write_file(rel, text);
  }
  /* A port with only IPv6 GIDs and one whose type file is unreadable junk. */
  write_file("mlx5_1/ports/1/gids/0", "fd00:0000:0000:0000:0000:0000:0000:0009\n");
  write_file("mlx5_1/ports/1/gid_attrs/types/0", "RoCE v2\n");
  write_file("mlx5_1/ports/1/gids/1", "not a gid\n");
  write_file("mlx5_1/ports/1/gid_attrs/types/1", "RoCE v2\n");
  write_file("mlx5_1/ports/1/gids/2", "fd00:0000:0000:0000:0000:0000:0000:000a\n");
  write_file("mlx5_1/ports/1/gid_attrs/types/2", "???\n");
}

static void remove_fixture(void) {
  char cmd[300];
  snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
  ck_assert_int_eq(system(cmd), 0);
}

static int pick(const char* dev, int index, int family, int version, uint8_t gid[16]) {
  moe_ib_gid_rules_t rules = {.gid_index = index, .family = family, .roce_version = version};
  int out = -1;
  if (moe_ib_select_gid(root, dev, 1, &rules, &out, gid) != ncclSuccess) return -1;
  return out;
}

START_TEST(test_gid_selection) {
  make_fixture();
  uint8_t gid[16];
  /* NCCL's defaults: RoCE v2, IPv4-mapped first. */
  ck_assert_int_eq(pick("mlx5_0", -1, 0, 2, gid), 3);
  uint8_t want[16];
  inet_pton(AF_INET6, "::ffff:192.168.1.5", want);
  ck_assert_int_eq(memcmp(gid, want, 16), 0);
  ck_assert_int_eq(pick("mlx5_0", -1, AF_INET, 2, gid), 3);
  ck_assert_int_eq(pick("mlx5_0", -1, AF_INET, 1, gid), 2);
  /* IPv6: link-local entries are never chosen. */
  ck_assert_int_eq(pick("mlx5_0", -1, AF_INET6, 2, gid), 5);
  ck_assert_int_eq(pick("mlx5_0", -1, AF_INET6, 1, gid), 4);
  /* NCCL_IB_GID_INDEX wins over everything, but must exist and be set. */
  ck_assert_int_eq(pick("mlx5_0", 0, AF_INET, 2, gid), 0);
  ck_assert_int_eq(pick("mlx5_0", 6, 0, 2, gid), -1);  /* all-zero GID */
  ck_assert_int_eq(pick("mlx5_0", 42, 0, 2, gid), -1); /* no such entry */
  /* Only IPv6 there: the default falls back to it; forcing AF_INET fails. */
  ck_assert_int_eq(pick("mlx5_1", -1, 0, 2, gid), 0);
  ck_assert_int_eq(pick("mlx5_1", -1, AF_INET, 2, gid), -1);
  ck_assert_int_eq(pick("mlx5_1", -1, AF_INET6, 1, gid), -1);
  /* A device that is not there. */
  ck_assert_int_eq(pick("mlx5_9", -1, 0, 2, gid), -1);
  remove_fixture();
  int fam = -1;
  ck_assert_int_eq(moe_ib_parse_family("", &fam), ncclSuccess);
  ck_assert_int_eq(fam, 0);
  ck_assert_int_eq(moe_ib_parse_family("af_inet6", &fam), ncclSuccess);
  ck_assert_int_eq(fam, AF_INET6);
  ck_assert_int_eq(moe_ib_parse_family("AF_UNIX", &fam), ncclInvalidArgument);
}
END_TEST

START_TEST(test_handle_encoding) {
  moe_ib_handle_t h;
  memset(&h, 0, sizeof(h));
  struct sockaddr_in* a = (struct sockaddr_in*)&h.addr;
  a->sin_family = AF_INET;
  a->sin_port = htons(5000);
  a->sin_addr.s_addr = htonl(0x0a000001);
  h.addr_len = sizeof(*a);
  h.nonce = 77;
  uint8_t buf[MOE_NET_HANDLE_BYTES];
  ck_assert_int_eq(moe_ib_handle_encode(&h, buf, sizeof(buf)), ncclSuccess);
  moe_ib_handle_t out;
  ck_assert_int_eq(moe_ib_handle_decode(buf, sizeof(buf), &out), ncclSuccess);
  ck_assert(out.nonce == 77);
  /* A socket handle is not an IB handle and the other way round. */
  moe_net_addr_handle_t s;
  ck_assert_int_eq(moe_sock_handle_decode(buf, sizeof(buf), &s), ncclInvalidArgument);
  ck_assert_int_eq(moe_sock_handle_encode(&h, buf, sizeof(buf)), ncclSuccess);
  ck_assert_int_eq(moe_ib_handle_decode(buf, sizeof(buf), &out), ncclInvalidArgument);
  ck_assert_int_eq(moe_ib_handle_decode(buf, 10, &out), ncclInvalidArgument);
}
END_TEST

START_TEST(test_conn_info_encoding) {
  moe_ib_conn_info_t c = {.nonce = 5, .link = MOE_IB_LINK_ETH, .nqps = 4, .mtu = 5, .lid = 0, .port = 1,
                          .fifo_addr = 0x7f0000001000ull, .fifo_rkey = 0x1234, .psn = 0xabcdef};
  for (int q = 0; q < 4; q++) c.qpn[q] = 0x100 + (uint32_t)q;
  c.gid[15] = 9;
  uint8_t buf[MOE_IB_CONN_INFO_BYTES];
  moe_ib_conn_info_encode(&c, buf);
  moe_ib_conn_info_t out;
  ck_assert_int_eq(moe_ib_conn_info_decode(buf, sizeof(buf), &out), ncclSuccess);
  ck_assert(out.nonce == 5 && out.nqps == 4 && out.qpn[3] == 0x103 && out.fifo_rkey == 0x1234 &&
            out.psn == 0xabcdef && out.gid[15] == 9 && out.fifo_addr == c.fifo_addr);
  for (size_t len = 0; len < sizeof(buf); len++)
    ck_assert_int_eq(moe_ib_conn_info_decode(buf, len, &out), ncclRemoteError);
  for (size_t i = 0; i < sizeof(buf); i++) {
    uint8_t bad[MOE_IB_CONN_INFO_BYTES];
    memcpy(bad, buf, sizeof(bad));
    bad[i] ^= 0x04;
    ck_assert_msg(moe_ib_conn_info_decode(bad, sizeof(bad), &out) != ncclSuccess, "byte %zu", i);
  }
  /* Checksummed but invalid: no QPs, too many, QPN 0, bad MTU, IB without a LID, PSN over 24 bits. */
  moe_ib_conn_info_t bads[6];
  for (int i = 0; i < 6; i++) bads[i] = c;
  bads[0].nqps = 0;
  bads[1].nqps = MOE_IB_MAX_QPS + 1;
  bads[2].qpn[1] = 0;
  bads[3].mtu = 7;
  bads[4].link = MOE_IB_LINK_IB;
  bads[5].psn = 1u << 24;
  for (int i = 0; i < 6; i++) {
    moe_ib_conn_info_encode(&bads[i], buf);
    ck_assert_msg(moe_ib_conn_info_decode(buf, sizeof(buf), &out) != ncclSuccess, "bad info %d accepted", i);
  }
}
END_TEST

START_TEST(test_fifo_arithmetic) {
  ck_assert_uint_eq(moe_ib_fifo_slot(0), 0);
  ck_assert_uint_eq(moe_ib_fifo_slot(MOE_IB_FIFO_DEPTH - 1), MOE_IB_FIFO_DEPTH - 1);
  ck_assert_uint_eq(moe_ib_fifo_slot(MOE_IB_FIFO_DEPTH), 0);
  ck_assert_uint_eq(moe_ib_fifo_slot(((uint64_t)1 << 40) + 5), 5);
  ck_assert(moe_ib_fifo_can_post(0, 0));
  ck_assert(moe_ib_fifo_can_post(MOE_IB_FIFO_DEPTH - 1, 0));
  ck_assert(!moe_ib_fifo_can_post(MOE_IB_FIFO_DEPTH, 0));
  ck_assert(moe_ib_fifo_can_post(MOE_IB_FIFO_DEPTH, 1));
  ck_assert(!moe_ib_fifo_can_post(1000 + MOE_IB_FIFO_DEPTH, 1000));
  moe_ib_cts_t cts, copy;
  memset(&cts, 0, sizeof(cts));
  ck_assert_int_eq(moe_ib_cts_take(&cts, 0, &copy), 0); /* zeroed memory is never valid */
  cts.idx = 1;
  cts.n = 2;
  cts.elem[0].size = 100;
  cts.elem[1].size = 200;
  ck_assert_int_eq(moe_ib_cts_take(&cts, 0, &copy), 1);
  ck_assert_int_eq(moe_ib_cts_take(&cts, 1, &copy), 0);  /* an old entry for the next message */
  ck_assert_int_eq(moe_ib_cts_take(&cts, MOE_IB_FIFO_DEPTH, &copy), 0);
  cts.n = 0;
  ck_assert_int_eq(moe_ib_cts_take(&cts, 0, &copy), -1);
  cts.n = MOE_NET_MAX_RECVS + 1;
  ck_assert_int_eq(moe_ib_cts_take(&cts, 0, &copy), -1);
  cts.n = 2;
  cts.elem[1].size = (uint32_t)MOE_NET_MAX_MSG_BYTES + 1;
  ck_assert_int_eq(moe_ib_cts_take(&cts, 0, &copy), -1);
}
END_TEST

/* Issue 15 item 8: the peer may rewrite its clear-to-send entry at any time
 * (it is RDMA-writable memory). The sender copies it once; everything after
 * (matching tags, sizes, addresses) uses the copy, so a count or size changed
 * after the check cannot index past the entry or grow a buffer. */
START_TEST(test_cts_copy_is_what_counts) {
  moe_ib_cts_t slot, copy;
  memset(&slot, 0, sizeof(slot));
  slot.idx = 8;
  slot.n = 2;
  slot.elem[0] = (moe_ib_cts_elem_t){.addr = 0x1000, .size = 64, .rkey = 5, .tag = 10};
  slot.elem[1] = (moe_ib_cts_elem_t){.addr = 0x2000, .size = 128, .rkey = 6, .tag = 11};
  ck_assert_int_eq(moe_ib_cts_take(&slot, 7, &copy), 1);
  /* The hostile rewrite, after the check. */
  slot.n = 200;
  slot.elem[0].size = 1u << 30;
  slot.elem[2] = (moe_ib_cts_elem_t){.addr = 0x3000, .size = 4096, .rkey = 7, .tag = 12};
  ck_assert_uint_eq(copy.n, 2);
  ck_assert_int_eq(moe_ib_cts_match(&copy, 0, 10, 64), 0);
  ck_assert_int_eq(moe_ib_cts_match(&copy, 0, 10, 65), MOE_IB_CTS_TOO_BIG); /* the old size still rules */
  ck_assert_int_eq(moe_ib_cts_match(&copy, 0, 11, 128), 1);
  ck_assert_int_eq(moe_ib_cts_match(&copy, 0, 12, 1), MOE_IB_CTS_NO_TAG);  /* element 2 is past n */
  ck_assert_int_eq(moe_ib_cts_match(&copy, 1u << 0, 10, 1), MOE_IB_CTS_NO_TAG); /* already taken */
  /* A copy taken while the slot was being rewritten is checked as a whole. */
  ck_assert_int_eq(moe_ib_cts_take(&slot, 7, &copy), -1);
  /* Duplicate tags: the first free element with the tag. */
  slot.n = 3;
  slot.elem[0].size = 10;
  slot.elem[1].tag = 10;
  slot.elem[2].tag = 10;
  ck_assert_int_eq(moe_ib_cts_take(&slot, 7, &copy), 1);
  ck_assert_int_eq(moe_ib_cts_match(&copy, 1u << 0, 10, 5), 1);
  ck_assert_int_eq(moe_ib_cts_match(&copy, (1u << 0) | (1u << 1), 10, 5), 2);
}
END_TEST

START_TEST(test_qp_split_and_speed) {
  const size_t sizes[] = {0, 1, 127, 128, 129, 4096, 1000003, 64 << 20};
  for (int nqps = 1; nqps <= MOE_IB_MAX_QPS; nqps++)
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
      size_t covered = 0;
      for (int q = 0; q < nqps; q++) {
        size_t off, len;
        moe_ib_split(sizes[s], nqps, q, &off, &len);
        ck_assert_uint_eq(off, covered < sizes[s] ? covered : sizes[s]);
        if (off + len < sizes[s]) ck_assert_uint_eq(len % 128, 0); /* only the tail is unaligned */
        covered += len;
      }
      ck_assert_uint_eq(covered, sizes[s]);
    }
  ck_assert_int_eq(moe_ib_port_speed_mbps(32, 2), 100000);  /* EDR 4x */
  ck_assert_int_eq(moe_ib_port_speed_mbps(64, 2), 200000);  /* HDR 4x */
  ck_assert_int_eq(moe_ib_port_speed_mbps(128, 2), 400000); /* NDR 4x */
  ck_assert_int_eq(moe_ib_port_speed_mbps(16, 1), 14000);
}
END_TEST

START_TEST(test_no_device_discovery) {
  /* This host has libibverbs but no RDMA device (or no rdma-core at all). */
  const moe_ib_verbs_t* v = NULL;
  if (moe_ib_verbs_load(&v) != ncclSuccess) return; /* no rdma-core: the fallback test covers it */
  moe_ib_gid_rules_t rules = {.gid_index = -1, .family = 0, .roce_version = 2};
  moe_ib_dev_t devs[MOE_NET_MAX_DEVS];
  int n = -1;
  ck_assert_int_eq(moe_ib_find_devs(v, "", &rules, devs, MOE_NET_MAX_DEVS, &n), ncclSuccess);
  if (access("/sys/class/infiniband", F_OK) != 0) ck_assert_int_eq(n, 0);
  moe_ib_close_devs(v, devs, n);
  ck_assert_int_eq(moe_ib_find_devs(v, "mlx5:x", &rules, devs, MOE_NET_MAX_DEVS, &n), ncclInvalidArgument);
  /* The backend itself: starts, reports no device; selection falls back. */
  ck_assert_int_eq(moe_transport_ib.init(), ncclSuccess);
  int ndev = -1;
  ck_assert_int_eq(moe_transport_ib.devices(&ndev), ncclSuccess);
  if (access("/sys/class/infiniband", F_OK) != 0) ck_assert_int_eq(ndev, 0);
  moe_transport_ib.fini();
}
END_TEST

int main(void) {
  setenv("NCCL_MOE_DEBUG", "NONE", 0);
  Suite* s = suite_create("net_ib");
  TCase* tc = tcase_create("ib_without_hca");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_hca_list);
  tcase_add_test(tc, test_gid_selection);
  tcase_add_test(tc, test_handle_encoding);
  tcase_add_test(tc, test_conn_info_encoding);
  tcase_add_test(tc, test_fifo_arithmetic);
  tcase_add_test(tc, test_cts_copy_is_what_counts);
  tcase_add_test(tc, test_qp_split_and_speed);
  tcase_add_test(tc, test_no_device_discovery);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
