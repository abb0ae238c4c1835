/*************************************************************************
 * nccl-moe: expert-parallel all-to-all (dispatch / combine) for
 * Mixture-of-Experts models, on top of an existing NCCL communicator or of
 * an all-gather the caller supplies (MPI, gloo, a store).
 *
 * Conventions for every function below
 * - Every function returns ncclResult_t. A bad argument returns
 *   ncclInvalidArgument and leaves no partial state; the reason is readable
 *   with ncclMoeGetLastError() on the same thread.
 * - "device" pointers are CUDA device memory on the communicator's device;
 *   "host" pointers are ordinary host memory.
 * - Tensors are dense and row-major; a shape [A, B] means A rows of B
 *   elements, the row stride being B elements.
 * - Functions that take a cudaStream_t enqueue their GPU work on it and
 *   return without waiting for it, unless their description says they wait
 *   (only "exact" dispatch does, for its receive counts, see ncclMoeDispatch).
 * - Peers that stop answering make a GPU wait time out after
 *   NCCL_MOE_TIMEOUT_MS (config field timeoutMs): the kernels end early,
 *   outputs are undefined, and ncclMoeCommGetAsyncError() reports the error.
 *   Nothing ever waits forever, and nothing traps the CUDA context.
 *
 * Environment variables
 *   NCCL_MOE_DEBUG=NONE|WARN|INFO|TRACE  log level on stderr (when NCCL did not
 *                                        load the library; otherwise NCCL_DEBUG)
 *   NCCL_MOE_TIMEOUT_MS=<ms>             bound on every wait for a peer (60000)
 *   NCCL_MOE_NUM_SMS=<n>                 SM budget override (0 = config/auto)
 *   NCCL_MOE_P2P_DISABLE=1               never map peers' memory directly
 *   NCCL_MOE_NET_BACKEND=auto|ib|socket  transport of the NCCL net plugin
 *************************************************************************/
#ifndef NCCL_MOE_H_
#define NCCL_MOE_H_

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>
#include <nccl.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NCCL_MOE_EXPORT __attribute__((visibility("default")))

/* ---------------------------------------------------------------- version */
#define NCCL_MOE_MAJOR 0
#define NCCL_MOE_MINOR 2
#define NCCL_MOE_PATCH 0
#define NCCL_MOE_VERSION(X, Y, Z) ((X) * 10000 + (Y) * 100 + (Z))
#define NCCL_MOE_VERSION_CODE NCCL_MOE_VERSION(NCCL_MOE_MAJOR, NCCL_MOE_MINOR, NCCL_MOE_PATCH)

/* Writes NCCL_MOE_VERSION_CODE of the loaded library into *version. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeGetVersion(int* version);

/* The message of the last failed call made by this thread ("" if none). The
 * string stays valid until this thread's next failing call. */
NCCL_MOE_EXPORT const char* ncclMoeGetLastError(void);

/* ----------------------------------------------------------------- limits */
/* FP8 scaling block: one float scale per 128 consecutive channels of a row. */
#define NCCL_MOE_FP8_BLOCK 128
/* Largest FP8 e4m3 magnitude; a block's scale is amax / NCCL_MOE_FP8_MAX. */
#define NCCL_MOE_FP8_MAX 448.0f
/* Largest top-k (experts per token). */
#define NCCL_MOE_MAX_TOPK 16
/* Largest number of ranks in one communicator. */
#define NCCL_MOE_MAX_RANKS 64
/* Largest number of experts (summed over all ranks). */
#define NCCL_MOE_MAX_EXPERTS 1024
/* Rows (hidden) are moved in 16-byte pieces: hidden * element size must be a
 * multiple of this, and every tensor pointer must be aligned to it. */
#define NCCL_MOE_ALIGN 16
/* Largest SM budget (config.numSMs, NCCL_MOE_NUM_SMS). */
#define NCCL_MOE_MAX_SMS 1024

/* ---------------------------------------------------------------- FP8 scales */
typedef enum {
  /* scale = amax / 448 as an fp32 value (DeepSeek-V3 / DeepEP style). */
  ncclMoeScaleFloat = 0,
  /* scale rounded up to a power of two (stored as fp32): decoding is exact
   * exponent arithmetic, as DeepGEMM's UE8M0 recipes expect. */
  ncclMoeScalePow2 = 1,
  /* Low-latency dispatch only: power-of-two scales delivered packed as UE8M0
   * bytes (the fp32 exponent field: scale = 2^(byte - 127)), four per 32-bit
   * word, block j in byte j % 4 (little-endian) of word j / 4; unused bytes of
   * a row's last word are 0. The layout DeepGEMM's UE8M0 kernels read. */
  ncclMoeScaleUE8M0 = 2,
} ncclMoeScaleFormat_t;

/* ----------------------------------------------------------------- config */
#define NCCL_MOE_CONFIG_MAGIC 0x4d6f4543u /* "MoEC" */

/* Sizes every buffer of a communicator. Initialize with
 * NCCL_MOE_CONFIG_INITIALIZER, then set the fields you need: the size, magic
 * and version fields let later versions grow the struct without breaking
 * callers built against this one. Fields left at 0 take their default. */
typedef struct {
  size_t size;          /* sizeof(ncclMoeConfig_t), set by the initializer */
  unsigned int magic;   /* NCCL_MOE_CONFIG_MAGIC, set by the initializer */
  unsigned int version; /* NCCL_MOE_VERSION_CODE, set by the initializer */
  /* Required: most tokens any rank passes to one dispatch (T <= this). */
  int maxTokensPerRank;
  /* Required: largest hidden size (channels per token) any call uses. */
  int hidden;
  /* Required: number of experts over all ranks; must be a multiple of the
   * number of ranks (each rank owns numExperts / nRanks consecutive experts:
   * rank r owns [r * L, (r + 1) * L), L = numExperts / nRanks). */
  int numExperts;
  /* Largest top-k any call uses (1..NCCL_MOE_MAX_TOPK). Default 8. */
  int maxTopk;
  /* Rows of the receive buffers: most tokens one rank can receive in one
   * dispatch. Default nRanks * maxTokensPerRank (never overflows). A smaller
   * value saves memory; a dispatch that would exceed it fails cleanly. */
  int maxRecvTokens;
  /* SMs (thread blocks) the dispatch and combine kernels of this rank use,
   * at most NCCL_MOE_MAX_SMS. 0 = automatic (NCCL_MOE_NUM_SMS overrides
   * both). */
  int numSMs;
  /* Bound on every wait for a peer, in ms. 0 = NCCL_MOE_TIMEOUT_MS. */
  int timeoutMs;
  /* Low-latency mode: most tokens any rank passes to one
   * ncclMoeLowLatencyDispatch (0 <= numTokens <= this), at most
   * NCCL_MOE_LL_MAX_TOKENS. 0 (the default): no low-latency buffers are
   * allocated and the ncclMoeLowLatency* calls fail. The buffers (two sets)
   * grow with this times numExperts times hidden: see
   * ncclMoeLowLatencyBufferBytes. A comm used only in low-latency mode may set
   * maxTokensPerRank to 1 to keep the normal-mode buffers small. Since 0.2:
   * a config from a 0.1 header (its size field ends before this) is accepted
   * and this field is 0. */
  int llMaxTokensPerRank;
} ncclMoeConfig_t;

#define NCCL_MOE_CONFIG_INITIALIZER \
  { sizeof(ncclMoeConfig_t), NCCL_MOE_CONFIG_MAGIC, NCCL_MOE_VERSION_CODE, 0, 0, 0, 0, 0, 0, 0, 0 }

/* ------------------------------------------------------------ communicator */
typedef struct ncclMoeComm* ncclMoeComm_t;

/* Creates an MoE communicator over the ranks of `nccl` (collective: every rank
 * of `nccl` must call it, with equal config values). Reads rank, size and
 * device from `nccl`, allocates this rank's buffers on that device (size in
 * ncclMoeCommBufferBytes), exchanges CUDA IPC handles and host identity with
 * one ncclAllGather on `nccl` (which therefore must be usable: no other
 * operation pending on it from this thread), and maps the peers' buffers.
 * Ranks are grouped into nodes: the ranks of one host whose GPUs can map each
 * other's memory (NVLink or PCIe peer access). Inside a node tokens move by
 * peer stores; between nodes through the network transport of the NCCL
 * plugin (NCCL_MOE_NET_BACKEND), once per destination node, to the rank with
 * the same local index there, which forwards them inside its node. With
 * NCCL_MOE_P2P_DISABLE=1, or on a host where some GPUs cannot map each other,
 * every rank is a node of its own. Every node must hold the same number of
 * ranks (at most 32); ranks need not be numbered node by node. Internode
 * comms also allocate network slabs, about
 * 4 x nodes x maxTokensPerRank x (2 x hidden + 256) bytes per rank: GPU
 * memory when the NIC can reach it (GPUDirect RDMA), else pinned host memory.
 * The caller's current CUDA device is left unchanged. Set-up is collective
 * to the end: a rank that fails (a bad config, out of memory, a peer it
 * cannot map) still takes part in the exchanges, and every rank returns an
 * error naming it rather than waiting for it.
 * `nccl` must outlive the MoE communicator. The library does not link NCCL:
 * it calls the NCCL already loaded in the process (a libnccl.so* it finds
 * among the loaded objects, else NCCL's functions in the global symbol
 * scope), which must be the one that created `nccl`; with none loaded this
 * returns ncclInvalidUsage. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInit(ncclComm_t nccl, const ncclMoeConfig_t* config,
                                             ncclMoeComm_t* comm_p);

/* An all-gather the caller supplies (the out-of-band bootstrap of UCC/UCX):
 * `send` holds `bytes` of this rank's data, `recv` receives nRanks * bytes,
 * rank r's at offset r * bytes (this rank's included). Collective: every
 * rank calls it with the same `bytes`. Returns 0 on success, anything else
 * on failure (the init call then fails with that code, or ncclSystemError
 * when it is not an ncclResult_t). It must not wait forever for a rank that
 * died: give it a timeout of its own. */
typedef int (*ncclMoeAllGatherFn_t)(const void* send, void* recv, size_t bytes, void* ctx);

/* Creates an MoE communicator without an NCCL communicator: rank `rank` of
 * `nRanks`, exchanging its set-up data through `allgather(..., ctx)` (over
 * MPI_Allgather, a gloo process group, a file or TCP store, ...). Collective:
 * every rank calls it, each with its own rank, the same nRanks and equal
 * config values. The comm uses the CUDA device current on the calling thread
 * (what cudaGetDevice returns: with CUDA 12 or later, a cudaSetDevice made
 * through any CUDA runtime of the process counts); ncclMoeCommQuery returns
 * it. Everything else is as ncclMoeCommInit: nodes and peer mapping (CUDA IPC
 * between processes of one host, the network transport between nodes),
 * buffer sizes, the caller's device left unchanged. ncclMoeCommInit is this
 * call with ncclAllGather on its communicator as the all-gather.
 * `allgather` is called synchronously on the calling thread, two to three
 * times (identity and buffers, network handles when there are several nodes,
 * then a final status), with at most a few KiB per rank. What it returns is
 * checked (every rank's place, rank numbering, nRanks, library version and
 * configs must agree) and a mismatch is an error on every rank. Bad
 * arguments (allgather or comm_p NULL, rank outside [0, nRanks), nRanks
 * outside [1, NCCL_MOE_MAX_RANKS]) return ncclInvalidArgument at once,
 * without calling allgather. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInitOob(int rank, int nRanks, ncclMoeAllGatherFn_t allgather, void* ctx,
                                                const ncclMoeConfig_t* config, ncclMoeComm_t* comm_p);

/* Testing and single-GPU development: creates `nRanks` communicators of one
 * process on one `device` ("virtual ranks"), each with its own buffers,
 * running the same kernels through the same peer-table path as ranks of
 * separate processes (the set-up runs one thread per rank and exchanges
 * between them as ranks of separate processes would). comms[r] is rank r.
 * Drive each rank from its own host thread and stream (exact-mode dispatch
 * waits on the host for its counts; ranks wait on each other on the GPU).
 * Destroy all of them together.
 * Set CUDA_DEVICE_MAX_CONNECTIONS=32 before the process first uses CUDA (and
 * use at most 32 streams): with fewer hardware queues than streams, a rank's
 * waiting kernel can sit in front of a peer's kernel in the same queue and
 * the two time out. Set CUDA_MODULE_LOADING=EAGER too: with lazy loading, the
 * first launch of a kernel (a memset, the caller's own kernels) in one rank's
 * thread can wait for the other ranks' kernels, which wait for that rank,
 * until they time out. Do not allocate or free device memory while the
 * ranks' kernels run (cudaMalloc/cudaFree serialize streams). */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInitVirtual(int nRanks, int device,
                                                    const ncclMoeConfig_t* config,
                                                    ncclMoeComm_t* comms);

/* Testing and single-GPU development of the internode path: like
 * ncclMoeCommInitVirtual, but the ranks form nRanks / ranksPerNode "virtual
 * nodes" of consecutive ranks. Ranks of one virtual node map each other's
 * buffers; ranks of different ones talk only through the network transport
 * (the socket backend on loopback unless NCCL_MOE_NET_BACKEND says
 * otherwise), with the same kernels, proxy and protocol as ranks on several
 * hosts. ranksPerNode == nRanks is ncclMoeCommInitVirtual. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInitVirtualNodes(int nRanks, int ranksPerNode, int device,
                                                         const ncclMoeConfig_t* config,
                                                         ncclMoeComm_t* comms);

/* Frees every resource of `comm`; NULL is a no-op. Waits first for the work
 * this comm enqueued on the callers' streams (not for work captured in a CUDA
 * graph: finish the graph's launches before destroying). Not collective, but
 * peers that still use this rank's buffers will time out, so destroy all
 * ranks together. Destroy the comm's handles first. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t comm);

/* Ends `comm` without waiting for any peer: after a peer died or stopped
 * answering (ncclMoeCommGetAsyncError reported an error, or the caller's own
 * failure detection says so), or to give up on a step. Marks the comm
 * aborted in its error record, so that every wait of its kernels (queued or
 * running) ends at its next look at it and later kernels of the comm do
 * nothing; stops its network proxies at once; then waits for the comm's work
 * on the callers' streams at most the comm's timeout plus one second, and
 * frees what ncclMoeCommDestroy frees. If that work has not ended by then
 * (a kernel of the caller's before ours on the stream, say), the comm's
 * memory is left allocated (freeing it under a running kernel would poison
 * the process's CUDA context) and a warning says so. Returns ncclSuccess
 * (NULL is a no-op); the comm is gone either way. Not collective. Destroy
 * the comm's handles first (ncclMoeHandleDestroy accepts a handle with a
 * pending low-latency receive half once the comm has an error), and do not
 * call it while another thread uses the comm. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommAbort(ncclMoeComm_t comm);

/* What `comm` was built with: this rank, the number of ranks, the CUDA
 * device, the number of nodes (1 when every rank maps every other; see
 * ncclMoeCommInit) and the config with defaults filled in. Any output may be
 * NULL. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommQuery(ncclMoeComm_t comm, int* rank_p, int* nRanks_p, int* device_p,
                                              int* nNodes_p, ncclMoeConfig_t* config_p);

/* Device memory this rank allocated for `comm`, in bytes. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommBufferBytes(ncclMoeComm_t comm, size_t* bytes_p);

/* ncclSuccess, or the first error a kernel of this comm recorded (a timeout
 * waiting for a peer: ncclSystemError; a network proxy that failed, e.g. a
 * peer process that died: ncclSystemError; an expert id out of range, a
 * receive capacity exceeded, or ranks disagreeing on hidden/sendType/topk:
 * ncclInvalidArgument). Does not synchronize: it reads host-mapped memory
 * the kernels write. Once set, the error stays. A peer that dies or stops
 * shows here within NCCL_MOE_TIMEOUT_MS of the step that waits for it (or
 * at once, across nodes, when its connections close); then end the comm
 * with ncclMoeCommAbort. After a timeout the comm is
 * unusable and every later call returns the error; after a bad batch the
 * calls go on (every rank must keep calling in step) and that batch's
 * outputs are partial: tokens over capacity and bad expert ids were dropped,
 * never written out of bounds. Check it after each step you care about. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommGetAsyncError(ncclMoeComm_t comm, ncclResult_t* error_p);

/* ------------------------------------------------------------------ layout */
/* Computes the routing summary of one batch on `stream`:
 *   topkIdx            device int64 [numTokens, topk]: expert ids in
 *                      [0, numExperts) or -1 (no expert).
 *   numTokensPerRank   device int32 [nRanks]: tokens that go to each rank
 *                      (a token counts once per rank, whatever number of that
 *                      rank's experts it chose).
 *   numTokensPerExpert device int32 [numExperts]: tokens per expert.
 *   isTokenInRank      device uint8 [numTokens, nRanks], 1 if the token goes
 *                      to that rank; may be NULL.
 * An id outside [-1, numExperts) is counted nowhere and recorded as an async
 * error (ncclMoeCommGetAsyncError); it is never used as an address.
 * numTokens may be 0. Outputs are caller-allocated. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeGetDispatchLayout(ncclMoeComm_t comm, const int64_t* topkIdx,
                                                      int numTokens, int topk,
                                                      int* numTokensPerRank,
                                                      int* numTokensPerExpert,
                                                      uint8_t* isTokenInRank, cudaStream_t stream);

/* ------------------------------------------------------------------ handle */
/* A handle keeps the routing of one dispatch: what combine needs to send each
 * row back, and what a later dispatch with the same routing reuses to skip
 * layout and notify. One handle belongs to one comm; it may be reused by any
 * number of dispatches (each overwrites it unless it reuses it). */
typedef struct ncclMoeHandle* ncclMoeHandle_t;

NCCL_MOE_EXPORT ncclResult_t ncclMoeHandleCreate(ncclMoeComm_t comm, ncclMoeHandle_t* handle_p);
/* The handle must not be in use by enqueued work, and its comm must still
 * exist (destroy handles before the comm). A handle whose low-latency send
 * half has no receive half yet is refused (peers would wait for it), unless
 * the comm has a fatal error (ncclMoeCommGetAsyncError). */
NCCL_MOE_EXPORT ncclResult_t ncclMoeHandleDestroy(ncclMoeHandle_t handle);

/* ---------------------------------------------------------------- dispatch */
typedef struct {
  /* Tokens of this rank: device [numTokens, hidden], of xType. */
  const void* x;
  /* ncclBfloat16, or ncclFloat8e4m3 (then xScales is required). */
  ncclDataType_t xType;
  /* With FP8 x: device fp32 [numTokens, hidden / 128], the scale of each
   * 128-channel block (value = fp8 * scale). NULL for BF16 x. */
  const float* xScales;
  /* Type sent and received: ncclBfloat16 or ncclFloat8e4m3. BF16 x with FP8
   * sendType is cast to FP8 inside the kernel (scales per scaleFormat).
   * FP8 x must be sent as FP8. */
  ncclDataType_t sendType;
  /* Scale format of the in-kernel cast (ignored otherwise). */
  ncclMoeScaleFormat_t scaleFormat;
  /* 0 <= numTokens <= config.maxTokensPerRank. */
  int numTokens;
  /* Channels per token, <= config.hidden; FP8 needs a multiple of 128;
   * BF16 needs a multiple of 8 (16 bytes). */
  int hidden;
  /* 1 <= topk <= config.maxTopk. */
  int topk;
  /* device int64 [numTokens, topk]: expert ids in [0, numExperts) or -1.
   * With reuseHandle, still read to produce recvTopkIdx. */
  const int64_t* topkIdx;
  /* device fp32 [numTokens, topk], or NULL (then no weights are received). */
  const float* topkWeights;
  /* 0: exact mode: the call waits on the host until the number of received
   * tokens is known (the notify step publishes it to host memory; the call
   * does not wait for the rest of the stream), returned in result->numRecv.
   * It cannot be captured in a CUDA graph (ncclInvalidUsage).
   * > 0: capacity mode: at most `capacity` rows are received (<= the comm's
   * maxRecvTokens); no host synchronization, so dispatch and combine can be
   * captured in a CUDA graph. Receiving more is an async error
   * (ncclInvalidArgument), the extra tokens are dropped, never written out of
   * bounds. */
  int capacity;
  /* >= 1: recvTokensPerExpert counts are rounded up to a multiple of this
   * (row counts for a grouped GEMM that wants aligned groups). 0 means 1. */
  int expertAlignment;
  /* 1: `handle` holds the routing of an earlier dispatch with the same
   * topkIdx, numTokens and capacity: skip layout and notify. */
  int reuseHandle;
} ncclMoeDispatchArgs_t;

/* What a dispatch produced. The received rows are VIEWS INTO COMM-OWNED
 * MEMORY: senders write straight into them, with no intermediate buffer.
 * They stay valid until this rank's next ncclMoeDispatch on the comm.
 * Rows are ordered by source rank, then by token index at the source. */
typedef struct {
  /* device [rows, hidden] of sendType. */
  void* recvX;
  /* device fp32 [rows, hidden / 128] for FP8; NULL for BF16. */
  float* recvScales;
  /* device int64 [rows, topk]: the token's expert ids, mapped to this rank's
   * local experts (0 .. numExperts/nRanks - 1), -1 where the expert belongs
   * to another rank or was -1. */
  int64_t* recvTopkIdx;
  /* device fp32 [rows, topk]: the token's weights, 0 where recvTopkIdx is -1;
   * NULL when no weights were given. */
  float* recvTopkWeights;
  /* device int32 [1]: number of rows received (capacity mode: before
   * clamping, so a value above capacity reveals the overflow). */
  int* recvCount;
  /* device int32 [numExperts / nRanks]: rows per local expert, rounded up to
   * expertAlignment. */
  int* recvTokensPerExpert;
  /* Exact mode: host copies of the two counts above (numRecv = rows, and a
   * comm-owned host array valid until the next dispatch). Capacity mode:
   * numRecv = -1 and hostRecvTokensPerExpert = NULL. */
  int numRecv;
  const int* hostRecvTokensPerExpert;
} ncclMoeDispatchResult_t;

/* Sends each token of this rank once to every rank owning one of its experts
 * (once per rank, not once per expert). Collective over the comm: every rank
 * calls it (numTokens may be 0), in the same order as its other dispatch and
 * combine calls. `handle` (from ncclMoeHandleCreate) receives the routing,
 * needed by the matching ncclMoeCombine. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeDispatch(ncclMoeComm_t comm, const ncclMoeDispatchArgs_t* args,
                                             ncclMoeHandle_t handle,
                                             ncclMoeDispatchResult_t* result_p,
                                             cudaStream_t stream);

/* ----------------------------------------------------------------- combine */
/* The comm-owned BF16 buffer combine reads from: device [maxRecvTokens,
 * config.hidden]. Experts that write their output rows here (row i = the
 * expert output for received row i, rows of `hidden` channels packed with
 * stride hidden) make combine zero-copy; any other pointer passed to
 * ncclMoeCombine is first copied into it. Valid for the comm's lifetime;
 * its content is overwritten by every combine that is not zero-copy. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeGetCombineBuffer(ncclMoeComm_t comm, void** buffer_p,
                                                     size_t* bytes_p);

typedef struct {
  /* device BF16 [numRecv, hidden]: one row per row received by the dispatch
   * of `handle` (same order). May be the combine buffer (zero-copy). When
   * that dispatch was exact and received no row, never read (may be NULL;
   * so is topkWeights then, whose being non-NULL still asks for
   * outTopkWeights). */
  const void* x;
  /* Channels per row; the dispatch's hidden. */
  int hidden;
  /* device fp32 [numRecv, topk], or NULL: summed per token like x. */
  const float* topkWeights;
  /* Output: device BF16 [numTokens, hidden] (numTokens of the dispatch),
   * caller-allocated. out[t] = sum over the ranks token t went to, in rank
   * order, accumulated in fp32 (bitwise repeatable). A token that went to no
   * rank gets zeros. */
  void* out;
  /* Output: device fp32 [numTokens, topk], or NULL. */
  float* outTopkWeights;
} ncclMoeCombineArgs_t;

/* Sends every received row back to the rank it came from and reduces there.
 * Collective over the comm, in the same order on every rank. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCombine(ncclMoeComm_t comm, const ncclMoeCombineArgs_t* args,
                                            ncclMoeHandle_t handle, cudaStream_t stream);

/* ------------------------------------------------------------ low latency */
/* Decode-time dispatch / combine (as DeepEP's low-latency mode): no host
 * synchronization, fixed buffers sized at init (config.llMaxTokensPerRank),
 * every call capturable in a CUDA graph.
 *
 * Buffer sets. A comm has two low-latency buffer sets. Each
 * ncclMoeLowLatencyDispatch call takes the next set in turn (set 0, 1, 0, ...
 * per comm, chosen on the host at call time, so a captured graph keeps the
 * set it was captured with) and records it in `handle`; the matching
 * ncclMoeLowLatencyCombine uses the same set. So two steps can be in flight
 * at once (e.g. two micro-batches: dispatch A, dispatch B, combine A, combine
 * B), and one step's receive overlaps the next step's send. Rules, per rank:
 *  - every rank makes the same sequence of low-latency calls (collective), in
 *    the same order relative to each other; numTokens may differ (and be 0);
 *  - a dispatch's outputs (the result's buffers) stay valid until the dispatch
 *    two calls later (the next one on the same set) starts on the GPU; work
 *    that reads them must be ordered before it on the GPU (same stream, or
 *    an event the dispatch's stream waits on);
 *  - the combine of a dispatch (both halves) must be ordered the same way
 *    before the dispatch two calls later;
 *  - the receive half of a call goes on the stream of its send half (or a
 *    stream ordered after it).
 * Breaking the last three gives wrong results (never out-of-bounds writes) or
 * a timeout. Steps on the same set are told apart by per-set sequence numbers
 * kept on the GPU, so graph replays and eager calls may be mixed freely as
 * long as every rank does the same.
 *
 * Split halves. With sendOnly = 1 a call enqueues only its send half (the
 * kernel that writes this rank's data into the peers' buffers); the receive
 * half (the kernel that waits for the peers' data and finishes the outputs)
 * is enqueued later by ncclMoeLowLatencyDispatchRecv / ...CombineRecv, so
 * compute can run in between. The send half of a dispatch also waits (on the
 * GPU) until every rank of its node has started the same dispatch; a receive half waits
 * until every row this rank receives has arrived. Without sendOnly both
 * halves run as one kernel.
 *
 * Virtual ranks sharing one GPU: run at most one low-latency call half per
 * rank at a time (one stream per rank), or the spinning kernels may not fit
 * on the GPU together.
 *
 * Nodes: ranks of this node are reached with peer stores (NVLink / PCIe),
 * ranks of other nodes directly (no forwarding) through a network proxy and
 * the transport; see docs/INTERNODE.md. The send half of a dispatch waits
 * for the ranks of its own node only. */
#define NCCL_MOE_HAS_LOW_LATENCY 1
/* Largest config.llMaxTokensPerRank. */
#define NCCL_MOE_LL_MAX_TOKENS 4096

typedef struct {
  /* Tokens of this rank: device BF16 [numTokens, hidden], 16-byte aligned. */
  const void* x;
  /* 0 <= numTokens <= config.llMaxTokensPerRank. With 0, x and topkIdx may
   * be NULL (the rank still takes part). */
  int numTokens;
  /* Channels per token, <= config.hidden: a multiple of 128 with FP8 sendType,
   * of 8 with BF16. Same value on every rank. */
  int hidden;
  /* Experts per token, 1 <= topk <= config.maxTopk. May differ per rank. */
  int topk;
  /* device int64 [numTokens, topk]: expert ids in [0, numExperts) or -1 (no
   * expert). An id repeated within one token's row is sent once (combine
   * still weights that expert's output once per occurrence). An id outside
   * [-1, numExperts) is treated as -1 and recorded as an async error
   * (ncclInvalidArgument from ncclMoeCommGetAsyncError); it is never used as
   * an address. */
  const int64_t* topkIdx;
  /* ncclFloat8e4m3 (x is cast to FP8 e4m3 inside the kernel, one scale per
   * 128 channels of a token, as NCCL_MOE_FP8_BLOCK) or ncclBfloat16 (sent as
   * is). Same value on every rank. */
  ncclDataType_t sendType;
  /* FP8 only (ignored for BF16): ncclMoeScaleFloat, ncclMoeScalePow2, or
   * ncclMoeScaleUE8M0. Same value on every rank. */
  ncclMoeScaleFormat_t scaleFormat;
  /* device int64 [numExperts / nRanks], or NULL. When given, the receive half
   * adds the number of rows each local expert received (atomically) to it:
   * a running per-expert load statistic, never reset by the library. */
  int64_t* cumulativeRecvCount;
  /* 0: enqueue the send and the receive half. 1: enqueue only the send half;
   * call ncclMoeLowLatencyDispatchRecv later for the receive half (the
   * result's buffers are filled only once the receive half has run). */
  int sendOnly;
} ncclMoeLowLatencyDispatchArgs_t;

/* What a low-latency dispatch produces, in the comm-owned buffers of its set
 * (views; see the rules above for how long they stay valid). The pointers are
 * fixed per set, so a graph captured once can use them on every replay.
 * Expert-major: local expert l (global expert rank * numLocalExperts + l) owns
 * rows [l * expertStride, (l + 1) * expertStride); its first
 * recvCountPerExpert[l] rows are valid, ordered by source rank, then by token
 * index at the source (the same order on every run). */
typedef struct {
  /* device [numLocalExperts, expertStride, hidden] of sendType (FP8 e4m3
   * codes or BF16), rows packed with stride hidden elements. */
  void* recvX;
  /* FP8 scales of each row's 128-channel blocks (value = code * scale):
   * ncclMoeScaleFloat / Pow2: fp32 [numLocalExperts, expertStride,
   * hidden / 128]; ncclMoeScaleUE8M0: uint32 [numLocalExperts, expertStride,
   * scaleStride], packed as described at ncclMoeScaleUE8M0. NULL for BF16. */
  void* recvScales;
  /* Elements (fp32 scales or uint32 words) per row of recvScales: hidden/128
   * or ceil(hidden / 512); 0 for BF16. */
  int scaleStride;
  /* device int32 [numLocalExperts]: rows received per local expert. The
   * rows of an expert come from the ranks of this node, then from those of
   * other nodes, each in source rank, then token order. */
  int* recvCountPerExpert;
  /* device int32 [numLocalExperts, expertStride]: where each valid row came
   * from: srcRank * config.llMaxTokensPerRank + token index at srcRank. */
  int* recvSource;
  /* Rows per local expert: nRanks * config.llMaxTokensPerRank. */
  int expertStride;
  /* numExperts / nRanks. */
  int numLocalExperts;
} ncclMoeLowLatencyDispatchResult_t;

/* Sends every (token, expert) pair of this rank to the expert's rank: each
 * token once per distinct expert in its topkIdx row, straight into the
 * receiver's output rows (NVLink/PCIe peer stores; no host synchronization).
 * Collective (see the rules above). `handle` (ncclMoeHandleCreate) records
 * the routing and the buffer set for the matching ncclMoeLowLatencyCombine;
 * it must not hold a call whose receive half is still pending. *result_p is
 * filled at once (the pointers of this call's set); the buffers hold the
 * received rows after the receive half. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyDispatch(ncclMoeComm_t comm,
    const ncclMoeLowLatencyDispatchArgs_t* args, ncclMoeHandle_t handle,
    ncclMoeLowLatencyDispatchResult_t* result_p, cudaStream_t stream);

/* The receive half of the dispatch `handle` holds (sent with sendOnly = 1):
 * waits on the GPU for every peer's rows, then completes the outputs. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyDispatchRecv(ncclMoeComm_t comm,
    ncclMoeHandle_t handle, cudaStream_t stream);

typedef struct {
  /* Expert outputs: device BF16 [numLocalExperts, expertStride, hidden]
   * (hidden of the dispatch), 16-byte aligned: row i of expert l is the
   * output for row i of the dispatch's recvX; rows at or beyond
   * recvCountPerExpert[l] are not read. Any device memory (the dispatch's
   * buffers too, once no longer needed); read by the send half. */
  const void* x;
  /* device fp32 [numTokens, topk] (this rank's dispatch shape), or NULL for
   * weight 1. Read by the receive half. */
  const float* topkWeights;
  /* Output: device BF16 [numTokens, hidden], 16-byte aligned,
   * caller-allocated, written by the receive half:
   *   out[t] = sum over k with topkIdx[t][k] valid, in k order, of
   *            topkWeights[t][k] * (expert topkIdx[t][k]'s output row for t),
   * accumulated in fp32 with fused multiply-adds and rounded to BF16 once
   * (bitwise repeatable). A token with no valid expert gets zeros. */
  void* out;
  /* 0: enqueue both halves. 1: only the send half; finish with
   * ncclMoeLowLatencyCombineRecv (topkWeights and out must stay valid until
   * then). */
  int sendOnly;
} ncclMoeLowLatencyCombineArgs_t;

/* Sends every expert-output row back to the rank and token it came from (one
 * BF16 row per received row) and reduces there. Collective. `handle` holds a
 * low-latency dispatch whose receive half was enqueued, and whose buffer set
 * no later dispatch has taken; a combine may be repeated on it. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyCombine(ncclMoeComm_t comm,
    const ncclMoeLowLatencyCombineArgs_t* args, ncclMoeHandle_t handle, cudaStream_t stream);

/* The receive half of the combine `handle` holds (sent with sendOnly = 1). */
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyCombineRecv(ncclMoeComm_t comm,
    ncclMoeHandle_t handle, cudaStream_t stream);

/* Device memory of this rank's low-latency buffers (both sets, peer-visible
 * regions and private state), in bytes; 0 when config.llMaxTokensPerRank is
 * 0. Per set, with L = numExperts / nRanks, M = llMaxTokensPerRank,
 * H = config.hidden, K = config.maxTopk, N = nRanks, E = numExperts,
 * F = ceil(H / 512):
 *   L*N*M * (2H + 4*ceil(H/128) + 12 + 8F)  received rows, scales, sources, arrival flags
 *   + M*K * (4H + 8 + 16F)                  combine rows (two halves), routing, flags
 *   + N * (4E + 20) + small                 counts and flags
 * (H=7168, M=128, E=256, N=8: about 0.5 GB per set). Also part of
 * ncclMoeCommBufferBytes. Across nodes, each rank also has a send and a
 * receive region for the R ranks of other nodes (both sets, dispatch and
 * combine slabs), pinned host memory (socket transport) or GPU memory
 * (GPUDirect RDMA), each of at most
 *   R * (M*min(K, L) * (8H + 32) + 8L + 64)   bytes. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyBufferBytes(ncclMoeComm_t comm, size_t* bytes_p);

#ifdef __cplusplus
}
#endif
#endif
