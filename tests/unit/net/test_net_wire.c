/* SPDX-License-Identifier: Apache-2.0 */
/* Parsers and encoders of the socket backend's wire format, NCCL's interface
 * list syntax, the message split, and interface discovery. Everything from
 * the network must be rejected when malformed. */
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include "net_socket/moe_sock.h"
#include "net_socket/moe_sock_wire.h"
#include "test_common.h"
#include "transport/moe_net_util.h"

START_TEST(test_iflist_parse_and_match) {
  moe_net_iflist_t l;
  ck_assert_int_eq(moe_net_iflist_parse("", &l), ncclSuccess);
  ck_assert_int_eq(l.count, 0);
  ck_assert(moe_net_iflist_match(&l, "anything", -1));

  ck_assert_int_eq(moe_net_iflist_parse("eth,ib", &l), ncclSuccess);
  ck_assert(!l.exclude && !l.exact && l.count == 2);
  ck_assert(moe_net_iflist_match(&l, "eth0", -1));
  ck_assert(moe_net_iflist_match(&l, "ib1", -1));
  ck_assert(!moe_net_iflist_match(&l, "lo", -1));

  ck_assert_int_eq(moe_net_iflist_parse("^docker,lo", &l), ncclSuccess);
  ck_assert(l.exclude);
  ck_assert(!moe_net_iflist_match(&l, "docker0", -1));
  ck_assert(!moe_net_iflist_match(&l, "lo", -1));
  ck_assert(moe_net_iflist_match(&l, "eth0", -1));

  ck_assert_int_eq(moe_net_iflist_parse("=eth0", &l), ncclSuccess);
  ck_assert(l.exact && !l.exclude);
  ck_assert(moe_net_iflist_match(&l, "eth0", -1));
  ck_assert(!moe_net_iflist_match(&l, "eth01", -1));

  ck_assert_int_eq(moe_net_iflist_parse("^=mlx5_0", &l), ncclSuccess);
  ck_assert(l.exact && l.exclude);
  ck_assert(!moe_net_iflist_match(&l, "mlx5_0", 1));
  ck_assert(moe_net_iflist_match(&l, "mlx5_01", 1));

  /* HCA syntax: dev:port. */
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:1,mlx5_1", &l), ncclSuccess);
  ck_assert_int_eq(l.ent[0].port, 1);
  ck_assert_int_eq(l.ent[1].port, -1);
  ck_assert(moe_net_iflist_match(&l, "mlx5_0", 1));
  ck_assert(!moe_net_iflist_match(&l, "mlx5_0", 2));
  ck_assert(moe_net_iflist_match(&l, "mlx5_1", 2));
  ck_assert(!moe_net_iflist_match(&l, "mlx4_0", 1));
  /* Empty entries are tolerated like NCCL does. */
  ck_assert_int_eq(moe_net_iflist_parse("a,,b,", &l), ncclSuccess);
  ck_assert_int_eq(l.count, 2);

  /* Malformed lists are errors, not silently "match all". */
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:", &l), ncclSuccess); /* NCCL: an empty port is any port */
  ck_assert_int_eq(l.ent[0].port, -1);
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:1:0:2", &l), ncclSuccess); /* rail and plane (newer NCCLs) */
  ck_assert_int_eq(l.ent[0].port, 1);
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:1:x", &l), ncclInvalidArgument);
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:1:0:0:9", &l), ncclInvalidArgument);
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:0", &l), ncclInvalidArgument);
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:x", &l), ncclInvalidArgument);
  ck_assert_int_eq(moe_net_iflist_parse("mlx5_0:999", &l), ncclInvalidArgument);
  ck_assert_int_eq(moe_net_iflist_parse(":1", &l), ncclInvalidArgument);
  char longname[200];
  memset(longname, 'a', sizeof(longname) - 1);
  longname[sizeof(longname) - 1] = '\0';
  ck_assert_int_eq(moe_net_iflist_parse(longname, &l), ncclInvalidArgument);
  char many[400] = "";
  for (int i = 0; i < 40; i++) strcat(many, "x,");
  ck_assert_int_eq(moe_net_iflist_parse(many, &l), ncclInvalidArgument);
}
END_TEST

static moe_net_addr_handle_t sample_handle(int family) {
  moe_net_addr_handle_t h;
  memset(&h, 0, sizeof(h));
  if (family == AF_INET) {
    struct sockaddr_in* a = (struct sockaddr_in*)&h.addr;
    a->sin_family = AF_INET;
    a->sin_port = htons(12345);
    inet_pton(AF_INET, "10.1.2.3", &a->sin_addr);
    h.addr_len = sizeof(*a);
  } else {
    struct sockaddr_in6* a = (struct sockaddr_in6*)&h.addr;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(4242);
    inet_pton(AF_INET6, "fd00::17", &a->sin6_addr);
    h.addr_len = sizeof(*a);
  }
  h.nonce = 0x1122334455667788ull;
  return h;
}

START_TEST(test_handle_roundtrip_and_rejects) {
  for (int f = 0; f < 2; f++) {
    int family = f == 0 ? AF_INET : AF_INET6;
    moe_net_addr_handle_t h = sample_handle(family), out;
    uint8_t buf[128];
    ck_assert_int_eq(moe_sock_handle_encode(&h, buf, sizeof(buf)), ncclSuccess);
    ck_assert_int_eq(moe_sock_handle_decode(buf, sizeof(buf), &out), ncclSuccess);
    ck_assert_int_eq(out.addr_len, h.addr_len);
    ck_assert_int_eq(memcmp(&out.addr, &h.addr, h.addr_len), 0);
    ck_assert(out.nonce == h.nonce);
    /* Truncated. */
    for (size_t len = 0; len < MOE_NET_ADDR_HANDLE_WIRE_BYTES; len++)
      ck_assert_int_eq(moe_sock_handle_decode(buf, len, &out), ncclInvalidArgument);
    /* Any flipped bit outside the connector's scratch range. */
    for (int i = 0; i < 128; i++) {
      if (i >= MOE_NET_ADDR_HANDLE_SCRATCH_OFF && i < MOE_NET_ADDR_HANDLE_SCRATCH_OFF + MOE_NET_ADDR_HANDLE_SCRATCH_BYTES)
        continue;
      for (int bit = 0; bit < 8; bit++) {
        uint8_t bad[128];
        memcpy(bad, buf, sizeof(bad));
        bad[i] ^= (uint8_t)(1u << bit);
        ck_assert_msg(moe_sock_handle_decode(bad, sizeof(bad), &out) != ncclSuccess, "byte %d bit %d", i, bit);
      }
    }
  }
  ck_assert_int_eq(moe_sock_handle_decode(NULL, 128, NULL), ncclInvalidArgument);
}
END_TEST

START_TEST(test_hello_roundtrip_and_rejects) {
  moe_sock_hello_t h = {.nonce = 99, .conn_id = 7, .index = 3, .nstreams = 4}, out;
  uint8_t buf[MOE_SOCK_HELLO_BYTES];
  moe_sock_hello_encode(&h, buf);
  ck_assert_int_eq(moe_sock_hello_decode(buf, sizeof(buf), &out), ncclSuccess);
  ck_assert(out.nonce == 99 && out.conn_id == 7 && out.index == 3 && out.nstreams == 4);
  h.index = -1;
  moe_sock_hello_encode(&h, buf);
  ck_assert_int_eq(moe_sock_hello_decode(buf, sizeof(buf), &out), ncclSuccess);
  ck_assert_int_eq(out.index, -1);
  ck_assert_int_eq(moe_sock_hello_decode(buf, sizeof(buf) - 1, &out), ncclRemoteError);
  for (int i = 0; i < MOE_SOCK_HELLO_BYTES; i++) {
    uint8_t bad[MOE_SOCK_HELLO_BYTES];
    memcpy(bad, buf, sizeof(bad));
    bad[i] ^= 0x10;
    ck_assert_msg(moe_sock_hello_decode(bad, sizeof(bad), &out) != ncclSuccess, "byte %d", i);
  }
  /* Well-formed checksums over bad fields: index out of range, no streams, no id. */
  moe_sock_hello_t bads[] = {{.nonce = 1, .conn_id = 1, .index = 4, .nstreams = 4},
                             {.nonce = 1, .conn_id = 1, .index = 0, .nstreams = 0},
                             {.nonce = 1, .conn_id = 0, .index = 0, .nstreams = 1},
                             {.nonce = 1, .conn_id = 1, .index = 0, .nstreams = MOE_SOCK_MAX_STREAMS + 1}};
  for (size_t i = 0; i < sizeof(bads) / sizeof(bads[0]); i++) {
    moe_sock_hello_encode(&bads[i], buf);
    ck_assert_msg(moe_sock_hello_decode(buf, sizeof(buf), &out) != ncclSuccess, "bad hello %zu accepted", i);
  }
}
END_TEST

START_TEST(test_header_roundtrip_and_rejects) {
  moe_sock_hdr_t h = {.op = MOE_SOCK_OP_MSG, .tag = -5, .size = 123456}, out;
  uint8_t buf[MOE_SOCK_HDR_BYTES];
  moe_sock_hdr_encode(&h, buf);
  ck_assert_int_eq(moe_sock_hdr_decode(buf, sizeof(buf), &out), ncclSuccess);
  ck_assert(out.op == MOE_SOCK_OP_MSG && out.tag == -5 && out.size == 123456);
  moe_sock_hdr_t w = {.op = MOE_SOCK_OP_WRITE, .flags = MOE_SOCK_HDR_FLAG_IMM, .size = 10, .offset = 64,
                      .key = 0x1003, .imm = 0xdeadbeef};
  moe_sock_hdr_encode(&w, buf);
  ck_assert_int_eq(moe_sock_hdr_decode(buf, sizeof(buf), &out), ncclSuccess);
  ck_assert(out.imm == 0xdeadbeef && out.offset == 64 && out.key == 0x1003);
  ck_assert_int_eq(moe_sock_hdr_decode(buf, 31, &out), ncclRemoteError);
  moe_sock_hdr_t bads[] = {
      {.op = 0, .size = 1},
      {.op = 3, .size = 1},
      {.op = MOE_SOCK_OP_MSG, .size = MOE_NET_MAX_MSG_BYTES + 1},
      {.op = MOE_SOCK_OP_MSG, .size = 1, .key = 1},
      {.op = MOE_SOCK_OP_MSG, .size = 1, .flags = 1},
      {.op = MOE_SOCK_OP_WRITE, .flags = 0x80, .size = 1},
      {.op = MOE_SOCK_OP_WRITE, .flags = 0, .imm = 5, .size = 1},
      {.op = MOE_SOCK_OP_WRITE, .tag = 1, .size = 1},
  };
  for (size_t i = 0; i < sizeof(bads) / sizeof(bads[0]); i++) {
    moe_sock_hdr_encode(&bads[i], buf);
    ck_assert_msg(moe_sock_hdr_decode(buf, sizeof(buf), &out) != ncclSuccess, "bad header %zu accepted", i);
  }
  moe_sock_hdr_encode(&h, buf);
  buf[0] ^= 1;
  ck_assert_int_eq(moe_sock_hdr_decode(buf, sizeof(buf), &out), ncclRemoteError);
}
END_TEST

START_TEST(test_split) {
  const size_t sizes[] = {MOE_SOCK_INLINE_MAX + 1, 1 << 20, (64 << 20) + 7, 300000};
  for (int ns = 1; ns <= 16; ns++)
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
      int n = 0;
      size_t chunk = 0;
      moe_sock_split(sizes[i], ns, &n, &chunk);
      ck_assert_int_ge(n, 1);
      ck_assert_int_le(n, ns);
      ck_assert_uint_ge(chunk, MOE_SOCK_MIN_CHUNK);
      ck_assert_uint_ge((size_t)n * chunk, sizes[i]);
      ck_assert_uint_lt((size_t)(n - 1) * chunk, sizes[i]);
    }
  int n = 5;
  size_t chunk = 0;
  moe_sock_split(0, 4, &n, &chunk);
  ck_assert_int_eq(n, 0);
}
END_TEST

START_TEST(test_find_devs) {
  moe_net_iface_t devs[MOE_NET_MAX_DEVS];
  int n = 0;
  ck_assert_int_eq(moe_net_find_ifaces("lo", "/sys/class/net", devs, MOE_NET_MAX_DEVS, &n), ncclSuccess);
  ck_assert_int_eq(n, 1);
  ck_assert_str_eq(devs[0].name, "lo");
  ck_assert_int_eq(devs[0].addr.ss_family, AF_INET);
  ck_assert_int_gt(devs[0].speed_mbps, 0);
  ck_assert_int_eq(moe_net_find_ifaces("=l", "/sys/class/net", devs, MOE_NET_MAX_DEVS, &n), ncclSuccess);
  ck_assert_int_eq(n, 0);
  ck_assert_int_eq(moe_net_find_ifaces("^lo", "/sys/class/net", devs, MOE_NET_MAX_DEVS, &n), ncclSuccess);
  for (int i = 0; i < n; i++) ck_assert_str_ne(devs[i].name, "lo");
  ck_assert_int_eq(moe_net_find_ifaces("lo:x", "/sys/class/net", devs, MOE_NET_MAX_DEVS, &n), ncclInvalidArgument);
  /* Default: never a docker/virbr bridge; loopback only when nothing else is up. */
  ck_assert_int_eq(moe_net_find_ifaces("", "/sys/class/net", devs, MOE_NET_MAX_DEVS, &n), ncclSuccess);
  ck_assert_int_ge(n, 1);
  int nonlo = 0;
  moe_net_iface_t others[MOE_NET_MAX_DEVS];
  ck_assert_int_eq(moe_net_find_ifaces("^docker,lo,virbr", "/sys/class/net", others, MOE_NET_MAX_DEVS, &nonlo),
                   ncclSuccess);
  for (int i = 0; i < n; i++) {
    ck_assert(strncmp(devs[i].name, "docker", 6) != 0 && strncmp(devs[i].name, "virbr", 5) != 0);
    if (nonlo > 0) ck_assert_str_ne(devs[i].name, "lo");
  }
}
END_TEST

int main(void) {
  Suite* s = suite_create("net_wire");
  TCase* tc = tcase_create("wire");
  tcase_set_timeout(tc, 60);
  tcase_add_test(tc, test_iflist_parse_and_match);
  tcase_add_test(tc, test_handle_roundtrip_and_rejects);
  tcase_add_test(tc, test_hello_roundtrip_and_rejects);
  tcase_add_test(tc, test_header_roundtrip_and_rejects);
  tcase_add_test(tc, test_split);
  tcase_add_test(tc, test_find_devs);
  suite_add_tcase(s, tc);
  return moe_test_run(s);
}
