/* SPDX-License-Identifier: Apache-2.0 */
/* nccl-moe-netcheck: loads the net plugin into a real NCCL and runs an
 * all-reduce and an all-to-all (grouped send/recv) over every visible GPU
 * (one process, ncclCommInitAll), checking both results. With NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 and 2+ GPUs all
 * traffic crosses the plugin; with one GPU it proves NCCL loads the plugin
 * (run with NCCL_DEBUG=INFO and look for "Loaded net plugin MoE").
 * Before NCCL starts, it lists the plugin's devices through the v11 struct.
 *
 *   nccl-moe-netcheck [--plugin PATH] [--json]   exit 0 ok, 1 failure, 2 bad arguments, 77 no GPU */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nccl_moe_version.h"
#include "nccl_net/net.h"
#include "tools/common/json.h"
#include "tools/common/opts.h"
#include "tools/common/plugin_path.h"

#define CHECK_MAX_GPUS 16
#define CHECK_COUNT (1 << 20)

static FILE* text_out; /* the report: stdout, or stderr with --json */

static int list_devices(const char* path) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    fprintf(stderr, "netcheck: dlopen(%s): %s\n", path, dlerror());
    return 1;
  }
  ncclNet_v11_t* net = (ncclNet_v11_t*)dlsym(lib, "ncclNetPlugin_v11");
  void* ctx = NULL;
  int ndev = 0;
  if (net == NULL || net->init(&ctx, 0, NULL, NULL, NULL) != ncclSuccess || net->devices(&ndev) != ncclSuccess) {
    fprintf(stderr, "netcheck: the plugin did not start\n");
    return 1;
  }
  for (int d = 0; d < ndev; d++) {
    ncclNetProperties_v11_t p;
    if (net->getProperties(d, &p) != ncclSuccess) return 1;
    fprintf(text_out, "netcheck: plugin %s device %d: %s pci=%s ptrSupport=0x%x speed=%d Mbps port=%d maxRecvs=%d\n",
            net->name, d, p.name, p.pciPath ? p.pciPath : "-", p.ptrSupport, p.speed, p.port, p.maxRecvs);
  }
  net->finalize(ctx);
  dlclose(lib);
  return 0;
}

/* Block j of rank i's send buffer goes to rank j, as the all-to-all of MoE
 * dispatch does; every value names (source, destination, index). */
static float a2a_value(int src, int dst, int k) { return (float)(src * 1000 + dst * 10 + k % 7); }

static int all_to_all(ncclComm_t* comms, cudaStream_t* streams, int n) {
  const size_t block = CHECK_COUNT / CHECK_MAX_GPUS;
  float* send[CHECK_MAX_GPUS];
  float* recv[CHECK_MAX_GPUS];
  float* host = malloc(block * n * sizeof(float));
  for (int i = 0; i < n; i++) {
    cudaSetDevice(i);
    cudaMalloc((void**)&send[i], block * n * sizeof(float));
    cudaMalloc((void**)&recv[i], block * n * sizeof(float));
    for (int j = 0; j < n; j++)
      for (size_t k = 0; k < block; k++) host[j * block + k] = a2a_value(i, j, (int)k);
    cudaMemcpy(send[i], host, block * n * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemset(recv[i], 0xFF, block * n * sizeof(float));
  }
  ncclGroupStart();
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) {
      ncclSend(send[i] + j * block, block, ncclFloat, j, comms[i], streams[i]);
      ncclRecv(recv[i] + j * block, block, ncclFloat, j, comms[i], streams[i]);
    }
  int bad = ncclGroupEnd() != ncclSuccess;
  for (int i = 0; i < n && !bad; i++) {
    cudaSetDevice(i);
    bad = cudaStreamSynchronize(streams[i]) != cudaSuccess;
    cudaMemcpy(host, recv[i], block * n * sizeof(float), cudaMemcpyDeviceToHost);
    for (int j = 0; j < n && !bad; j++)
      for (size_t k = 0; k < block && !bad; k++) bad = host[j * block + k] != a2a_value(j, i, (int)k);
  }
  for (int i = 0; i < n; i++) {
    cudaSetDevice(i);
    cudaFree(send[i]);
    cudaFree(recv[i]);
  }
  free(host);
  return bad;
}

static void usage(FILE* out) {
  fprintf(out,
          "usage: nccl-moe-netcheck [--plugin PATH] [--json]\n"
          "  Runs an NCCL all-reduce and all-to-all over every visible GPU with the net plugin loaded\n"
          "  (--plugin: default libnccl-net-moe.so beside this program, else in the install's libdir, else\n"
          "  on the loader path) and checks both. --json: the outcome as one JSON object on stdout.\n"
          "  Exit status: 0 ok, 1 failure, 2 bad arguments, 77 no GPU.\n");
}

int main(int argc, char** argv) {
  enum { O_PLUGIN = 1, O_JSON, O_HELP };
  static const struct option lo[] = {{"plugin", required_argument, 0, O_PLUGIN}, {"json", no_argument, 0, O_JSON},
                                     {"help", no_argument, 0, O_HELP},           {0, 0, 0, 0}};
  moe_opts_t p = {.prog = "nccl-moe-netcheck", .usage = usage, .longopts = lo};
  const char* plugin = NULL;
  int json = 0, ch;
  while ((ch = moe_opts_next(&p, argc, argv)) != -1) {
    if (ch == O_PLUGIN) plugin = optarg;
    if (ch == O_JSON) json = 1;
  }
  if (plugin == NULL) plugin = moe_tool_plugin_path();
  /* NCCL's INFO lines share stdout: line-buffer it, so a crash does not take
   * the report lines printed before it (a full buffer into a file or pipe). */
  setvbuf(stdout, NULL, _IOLBF, 0);
  text_out = json ? stderr : stdout;
  int ngpus = 0;
  if (cudaGetDeviceCount(&ngpus) != cudaSuccess || ngpus == 0) {
    fprintf(text_out, "netcheck: no GPU, skipped\n");
    return 77;
  }
  if (ngpus > CHECK_MAX_GPUS) ngpus = CHECK_MAX_GPUS;
  if (list_devices(plugin) != 0) return 1;
  setenv("NCCL_NET_PLUGIN", plugin, 0);
  int devs[CHECK_MAX_GPUS];
  ncclComm_t comms[CHECK_MAX_GPUS];
  float* bufs[CHECK_MAX_GPUS];
  cudaStream_t streams[CHECK_MAX_GPUS];
  for (int i = 0; i < ngpus; i++) devs[i] = i;
  ncclResult_t res = ncclCommInitAll(comms, ngpus, devs);
  if (res != ncclSuccess) {
    fprintf(stderr, "netcheck: ncclCommInitAll: %s\n", ncclGetErrorString(res));
    return 1;
  }
  float* host = malloc(CHECK_COUNT * sizeof(float));
  for (int i = 0; i < ngpus; i++) {
    cudaSetDevice(i);
    cudaStreamCreate(&streams[i]);
    cudaMalloc((void**)&bufs[i], CHECK_COUNT * sizeof(float));
    for (int k = 0; k < CHECK_COUNT; k++) host[k] = (float)((k % 97) + i);
    cudaMemcpy(bufs[i], host, CHECK_COUNT * sizeof(float), cudaMemcpyHostToDevice);
  }
  ncclGroupStart();
  for (int i = 0; i < ngpus; i++)
    ncclAllReduce(bufs[i], bufs[i], CHECK_COUNT, ncclFloat, ncclSum, comms[i], streams[i]);
  res = ncclGroupEnd();
  int bad = res != ncclSuccess;
  for (int i = 0; i < ngpus && !bad; i++) {
    cudaSetDevice(i);
    cudaStreamSynchronize(streams[i]);
    cudaMemcpy(host, bufs[i], CHECK_COUNT * sizeof(float), cudaMemcpyDeviceToHost);
    for (int k = 0; k < CHECK_COUNT && !bad; k++) {
      float want = (float)(ngpus * (k % 97) + ngpus * (ngpus - 1) / 2);
      bad = host[k] != want;
    }
  }
  fprintf(text_out, "netcheck: all-reduce over %d GPU(s): %s\n", ngpus, bad ? "WRONG" : "OK");
  const int a2aBad = all_to_all(comms, streams, ngpus);
  fprintf(text_out, "netcheck: all-to-all over %d GPU(s): %s\n", ngpus, a2aBad ? "WRONG" : "OK");
  for (int i = 0; i < ngpus; i++) {
    cudaSetDevice(i);
    cudaFree(bufs[i]);
    ncclCommDestroy(comms[i]);
  }
  free(host);
  if (json) {
    moe_json_t j;
    moe_json_begin(&j, stdout);
    moe_json_str(&j, "tool", "nccl-moe-netcheck");
    moe_json_str(&j, "version", NCCL_MOE_VERSION_STRING);
    moe_json_str(&j, "plugin", plugin);
    moe_json_int(&j, "gpus", ngpus);
    moe_json_str(&j, "allreduce", bad ? "wrong" : "ok");
    moe_json_str(&j, "alltoall", a2aBad ? "wrong" : "ok");
    moe_json_end(&j);
  }
  return bad || a2aBad;
}
