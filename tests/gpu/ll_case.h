/* SPDX-License-Identifier: Apache-2.0 */
/* The low-latency test harness shared by the gpu suite (virtual ranks and
 * virtual nodes, tests/gpu/test_lowlatency.c) and the multiproc tier (one
 * rank per process, tests/multiproc/): fresh random inputs every step, a
 * plain CPU reference of every output, two steps (both buffer sets) per
 * round in one of three orders (split halves with work in between,
 * overlapped whole calls, one after the other). */
#ifndef LL_CASE_H_
#define LL_CASE_H_

#include "nccl_moe.h"

#define MAXR 8
/* The comm timeout of a case unless it sets one. */
#define LL_CASE_TIMEOUT_MS 10000

typedef enum { LL_TOK_RANDOM, LL_TOK_MAX, LL_TOK_ONE } ll_tok_t;
typedef enum { LL_ROUTE_UNIFORM, LL_ROUTE_ONE_EXPERT, LL_ROUTE_SKEWED } ll_route_t;
typedef enum { LL_ORDER_SPLIT, LL_ORDER_OVERLAP, LL_ORDER_SEQUENTIAL, LL_ORDERS } ll_order_t;

typedef struct {
  int nRanks, hidden, topk, numExperts, maxTokens;
  int fp8;
  ncclMoeScaleFormat_t scaleFormat;
  int dropProb;      /* 1 in dropProb entries is -1 (0: none) */
  int dupProb;       /* 1 in dupProb entries repeats an earlier expert of the token */
  int badProb;       /* 1 in badProb entries is out of range (an async error) */
  int weights;
  int rounds;
  int graph;         /* capture a step per slot and replay it `rounds` times */
  int cumulative;
  int combineRepeat; /* combine every dispatch this many times (default 1) */
  ll_tok_t tokens;
  ll_route_t route;
  int fixedOrder;    /* LL_ORDER_* + 1 to force one order; 0 = random per round */
  int ranksPerNode;  /* virtual nodes of this many ranks (through the socket transport); 0 = one node */
  int timeoutMs;     /* 0: LL_CASE_TIMEOUT_MS */
} ll_case_t;

typedef struct ll ll_t;

/* FP8, weights on, 2 rounds, everything else off. */
ll_case_t ll_base_case(int N, int M, int H, int K, int E);

/* The config every rank of a case passes to its init. */
ncclMoeConfig_t ll_case_config(const ll_case_t* cs);

/* Virtual ranks (or nodes): eager rounds, a random order each; or one graph
 * per (rank, slot) replayed with fresh inputs, then an eager round. */
void ll_run_eager(const ll_case_t* cs);
void ll_run_graph(const ll_case_t* cs);

/* Ranks in processes of their own: eager rounds of rank `rank` on `comm`
 * (made with ll_case_config), every rank drawing the same inputs;
 * barrier(arg) is called by every rank at the same points (around each
 * round's set-up and at the end, after which the caller may destroy the
 * comm). */
void ll_run_eager_rank(const ll_case_t* cs, int rank, ncclMoeComm_t comm, void (*barrier)(void*), void* arg);

#endif
