/* The dispatch/combine test harness shared by the gpu suite: N virtual ranks
 * on one GPU (optionally split into virtual nodes), one host thread and
 * stream per rank, fresh random inputs, poisoned outputs, and a plain CPU
 * reference for every output. */
#ifndef MOE_CASE_H_
#define MOE_CASE_H_

#include <stdint.h>

#define MAXR 8

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
} case_t;

/* Runs one case (Check assertions) and compares every output with the CPU
 * reference. */
void run_case(const case_t* cs);

/* A case with T tokens on each of N ranks, weights on, everything else off. */
case_t base_case(int N, int T, int H, int K, int E);

#endif
