/* SPDX-License-Identifier: Apache-2.0 */
/* A private CUDA MPS control daemon for ranks of several processes on one
 * GPU (test and benchmark support, never shipped). Without MPS the kernels
 * of different processes only take turns on the GPU (time slices), so ranks
 * that wait for each other on the GPU crawl; under MPS they run side by
 * side. The daemon gets its own pipe and log directories in a fresh
 * temporary directory (CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY,
 * exported into this process's environment so that the children it starts
 * connect to it), and is stopped at the end (`quit`), also when this
 * process dies: a janitor process, in a session of its own, stops it when
 * this process's end of a pipe closes. Nothing here changes the GPU's
 * compute mode, clocks or MIG settings. */
#ifndef MOE_MPS_H_
#define MOE_MPS_H_

#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_MPS_CONTROL "nvidia-cuda-mps-control"
/* The daemon's sockets live in the pipe directory: a short path (a Unix
 * socket's path has at most 107 bytes), so always under /tmp. */
#define MOE_MPS_DIR_MAX 64

typedef enum { MOE_MPS_OFF = 0, MOE_MPS_AUTO = 1 } moe_mps_mode_t;

typedef struct {
  int on;                 /* a daemon of ours runs and a CUDA client got through it */
  int own;                /* we started one (its directories and janitor exist) */
  char dir[MOE_MPS_DIR_MAX];     /* the temporary directory: pipe/ and log/ */
  char pipeDir[MOE_MPS_DIR_MAX + 8];
  char logDir[MOE_MPS_DIR_MAX + 8];
  pid_t janitor;
  int janitorFd;          /* our end of the janitor's pipe */
  long serverPid;         /* the MPS server the probe started, 0 if unknown */
  char why[512];          /* when off: why */
} moe_mps_t;

/* MOE_MPS_AUTO: start a private daemon when nvidia-cuda-mps-control is on
 * PATH and probe it with a CUDA client (a child process); keeps it when the
 * client got through, else stops it and says why in mps->why. Call before
 * this process initializes CUDA. Returns mps->on. */
int moe_mps_start(moe_mps_t* mps, moe_mps_mode_t mode);

/* One line: "MPS: on (private daemon, pipe dir ..., server pid N)" or
 * "MPS: off (why)". */
const char* moe_mps_describe(const moe_mps_t* mps, char* buf, size_t n);

/* MPS's own clean-up of a client process that died with work on the GPU
 * (`terminate_client`); best effort, no-op when off. */
void moe_mps_client_died(moe_mps_t* mps, pid_t pid);

/* After a client died with work on the GPU the server may refuse new
 * clients for a while (it recovers once every client it affected is gone):
 * probes with a new client until one gets through, at most timeoutMs.
 * 1 when one did (or MPS is off). */
int moe_mps_wait_ready(moe_mps_t* mps, int timeoutMs);

/* Stops the daemon (and its server), ends the janitor, removes the
 * directories, unsets the variables. Safe when off or stopped already. */
void moe_mps_stop(moe_mps_t* mps);

#ifdef __cplusplus
}
#endif
#endif
