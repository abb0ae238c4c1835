/* SPDX-License-Identifier: Apache-2.0 */
/* The dispatch/combine test harness shared by the gpu suite: N virtual ranks
 * on one GPU (optionally split into virtual nodes), one host thread and
 * stream per rank, fresh random inputs, poisoned outputs, and a plain CPU
 * reference for every output. */
#ifndef MOE_CASE_H_
#define MOE_CASE_H_

#include <stdint.h>

#include "nccl_moe.h"

#define MAXR 8
/* The comm timeout of a case unless it sets one. */
#define CASE_TIMEOUT_MS 5000

typedef enum { ROUTE_UNIFORM, ROUTE_ONE_RANK, ROUTE_SKEWED } route_kind_t;

typedef struct {
  int nRanks, hidden, topk, numExperts;
  int ranksPerNode;          /* 0: one node; else virtual nodes of this many ranks */
  int tokens[MAXR];          /* per rank; 0 allowed */
  int xFp8, sendFp8, pow2;   /* input FP8 / send FP8 / power-of-two scales */
  int capacity;              /* 0 exact, else capacity mode */
  int alignment;
  int weights;               /* pass topk weights */
  int reuse;                 /* second dispatch reuses the handle */
  int graphReplays;          /* capacity mode: capture and replay */
  int zeroCopy;              /* combine from the comm's combine buffer */
  int dropProb;              /* 1/dropProb of top-k entries are -1 (0: none) */
  route_kind_t route;
  int overflow;              /* capacity too small: every rank reports it */
  int timeoutMs;             /* 0: CASE_TIMEOUT_MS */
} case_t;

/* Runs one case with virtual ranks (Check assertions) and compares every
 * output with the CPU reference. */
void run_case(const case_t* cs);

/* The config every rank of a case passes to its init. */
ncclMoeConfig_t case_config(const case_t* cs);

/* Every rank's inputs, routing reference and combine inputs, drawn from the
 * run's seed (moe_test_seed): every process of a case draws the same, so
 * each can check its own rank. */
typedef struct case_data case_data_t;
case_data_t* case_data_new(const case_t* cs);
void case_data_free(case_data_t* cd);

/* Ranks in processes of their own: runs and checks rank `rank` of the case
 * in this process, on `comm` (made with case_config). barrier(arg) is
 * called by every rank at the same points: before the first collective
 * (every rank has allocated) and after the checks (no rank still touches a
 * peer's memory), so the caller may destroy the comm after it returns. */
void run_case_rank(const case_t* cs, int rank, ncclMoeComm_t comm, void (*barrier)(void*), void* arg);

/* A case with T tokens on each of N ranks, weights on, everything else off. */
case_t base_case(int N, int T, int H, int K, int E);

#endif
