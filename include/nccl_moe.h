/*************************************************************************
 * nccl-moe: expert-parallel all-to-all (dispatch / combine) for
 * Mixture-of-Experts models, on top of an existing NCCL communicator.
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
 *   (only "exact" dispatch does, see ncclMoeDispatch).
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
#define NCCL_MOE_MINOR 1
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

/* ---------------------------------------------------------------- FP8 scales */
typedef enum {
  /* scale = amax / 448 as an fp32 value (DeepSeek-V3 / DeepEP style). */
  ncclMoeScaleFloat = 0,
  /* scale rounded up to a power of two (stored as fp32): decoding is exact
   * exponent arithmetic, as DeepGEMM's UE8M0 recipes expect. */
  ncclMoeScalePow2 = 1,
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
  /* SMs (thread blocks) the dispatch and combine kernels of this rank use.
   * 0 = automatic (NCCL_MOE_NUM_SMS overrides both). */
  int numSMs;
  /* Bound on every wait for a peer, in ms. 0 = NCCL_MOE_TIMEOUT_MS. */
  int timeoutMs;
} ncclMoeConfig_t;

#define NCCL_MOE_CONFIG_INITIALIZER \
  { sizeof(ncclMoeConfig_t), NCCL_MOE_CONFIG_MAGIC, NCCL_MOE_VERSION_CODE, 0, 0, 0, 0, 0, 0, 0 }

/* ------------------------------------------------------------ communicator */
typedef struct ncclMoeComm* ncclMoeComm_t;

/* Creates an MoE communicator over the ranks of `nccl` (collective: every rank
 * of `nccl` must call it, with equal config values). Reads rank, size and
 * device from `nccl`, allocates this rank's buffers on that device (size in
 * ncclMoeCommBufferBytes), exchanges CUDA IPC handles and host identity with
 * one ncclAllGather on `nccl` (which therefore must be usable: no other
 * operation pending on it from this thread), and maps the peers' buffers.
 * All ranks must be on one host (intranode); ranks on several hosts get
 * ncclInvalidUsage. The caller's current CUDA device is left unchanged.
 * `nccl` must outlive the MoE communicator. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInit(ncclComm_t nccl, const ncclMoeConfig_t* config,
                                             ncclMoeComm_t* comm_p);

/* Testing and single-GPU development: creates `nRanks` communicators of one
 * process on one `device` ("virtual ranks"), each with its own buffers,
 * running the same kernels through the same peer-table path as ranks of
 * separate processes. comms[r] is rank r. Drive each rank from its own host
 * thread and stream (exact-mode dispatch waits on its stream; ranks wait on
 * each other on the GPU). Destroy all of them together.
 * Set CUDA_DEVICE_MAX_CONNECTIONS=32 before the process first uses CUDA (and
 * use at most 32 streams): with fewer hardware queues than streams, a rank's
 * waiting kernel can sit in front of a peer's kernel in the same queue and
 * the two time out. Do not allocate or free device memory while the ranks'
 * kernels run (cudaMalloc/cudaFree serialize streams). */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommInitVirtual(int nRanks, int device,
                                                    const ncclMoeConfig_t* config,
                                                    ncclMoeComm_t* comms);

/* Frees every resource of `comm`. Waits for work enqueued by this library on
 * the comm's streams; callers must not destroy a comm with a dispatch or
 * combine still running on their stream. Not collective, but peers that still
 * use this rank's buffers will time out, so destroy all ranks together. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t comm);

/* Device memory this rank allocated for `comm`, in bytes. */
NCCL_MOE_EXPORT ncclResult_t ncclMoeCommBufferBytes(ncclMoeComm_t comm, size_t* bytes_p);

/* ncclSuccess, or the first error a kernel of this comm recorded (a timeout
 * waiting for a peer: ncclSystemError; an expert id out of range, a receive
 * capacity exceeded, or ranks disagreeing on hidden/sendType/topk:
 * ncclInvalidArgument). Does not synchronize: it reads host-mapped memory
 * the kernels write. Once set, the error stays. After a timeout the comm is
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
/* The handle must not be in use by enqueued work. */
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
  /* 0: exact mode: the call waits (one stream synchronization) for the number
   * of received tokens, returned in result->numRecv.
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
   * of `handle` (same order). May be the combine buffer (zero-copy). */
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
/* Decode-time dispatch/combine with fixed slots per (local expert, source
 * rank), no host synchronization, two buffer sets used in turn, and send and
 * receive halves callable separately. Declared here so the API is designed
 * as a whole; NCCL_MOE_HAS_LOW_LATENCY says whether this build provides it
 * (not yet: the functions below are not in the library until it is 1). */
#define NCCL_MOE_HAS_LOW_LATENCY 0
#if NCCL_MOE_HAS_LOW_LATENCY
typedef struct {
  const void* x;              /* device BF16 [numTokens, hidden] */
  int numTokens;              /* <= config.llMaxTokensPerRank */
  int hidden, topk;
  const int64_t* topkIdx;     /* device int64 [numTokens, topk] */
  ncclDataType_t sendType;    /* ncclFloat8e4m3 (cast in kernel) or ncclBfloat16 */
  ncclMoeScaleFormat_t scaleFormat;
  int sendOnly;               /* 1: return after sending; receive with ...Recv */
} ncclMoeLowLatencyDispatchArgs_t;

typedef struct {
  void* recvX;                /* device [localExperts, nRanks * llMaxTokens, hidden] */
  float* recvScales;          /* device fp32 [localExperts, nRanks * llMaxTokens, hidden/128] */
  int* recvCountPerExpert;    /* device int32 [localExperts] */
  int* recvSource;            /* device int32 [localExperts, nRanks * llMaxTokens]: src rank * T + token */
} ncclMoeLowLatencyDispatchResult_t;

NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyDispatch(ncclMoeComm_t comm,
    const ncclMoeLowLatencyDispatchArgs_t* args, ncclMoeHandle_t handle,
    ncclMoeLowLatencyDispatchResult_t* result_p, cudaStream_t stream);
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyDispatchRecv(ncclMoeComm_t comm,
    ncclMoeHandle_t handle, cudaStream_t stream);
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyCombine(ncclMoeComm_t comm, const void* expertOut,
    const float* topkWeights, void* out, int sendOnly, ncclMoeHandle_t handle,
    cudaStream_t stream);
NCCL_MOE_EXPORT ncclResult_t ncclMoeLowLatencyCombineRecv(ncclMoeComm_t comm,
    ncclMoeHandle_t handle, cudaStream_t stream);
#endif

#ifdef __cplusplus
}
#endif
#endif
