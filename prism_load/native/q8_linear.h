/* q8_linear.c's pieces that expert_block.c reuses: a product's description, x's quantisation into a scratch
 * buffer, and the row tiles. Hidden from the library's exported symbols (only the prism_* entry points are API). */
#ifndef PRISM_Q8_LINEAR_H
#define PRISM_Q8_LINEAR_H

#include <stddef.h>
#include <stdint.h>

#define Q8_HIDDEN __attribute__((visibility("hidden")))

typedef struct {
    int64_t M, K, N, bits, g, G, ldq, blocks_per_group, planes;
    int64_t vec; /* 2: int16 x in 512-bit vectors (q16z tiles: blocks of 32 bytes), else 1 */
    const uint8_t *q;
    const uint16_t *s, *z;
    /* [M][blocks][planes] 32-byte vectors: 32 x8 (int8 x) or 16 x16 (int16 x) in the order of each plane's codes */
    const uint8_t *xq;
    const float *d;     /* [M][G] the groups' steps */
    const int32_t *sxq; /* [M][G] the groups' sums of x8 */
    float *y;
    int64_t ldy;
} q8_problem;

static inline int64_t q8_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* P <- the product of these arguments (y = x @ w.T, M rows); -2 where the kernel does not take them. wide: int16 x. */
Q8_HIDDEN int q8_make(int64_t ldx, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                      const uint16_t *zeros, int64_t N, int bits, int64_t g, float *y, int64_t ldy, int wide,
                      q8_problem *P);
/* q8_make for M rows of x (contiguous, k apart; y [M][n]) from an int64 args[13] array as prism_int_linear_packed
 * takes it (only the weight fields: K, qweight, scales, zeros, N, bits, group size), which must have K = k and
 * N = n. */
Q8_HIDDEN int q8_make_bound(const int64_t *a, int64_t k, int64_t n, int64_t M, float *y, int wide, q8_problem *P);
/* Bytes of scratch that q8_prepare_x needs for P's x (its rounded codes, steps and sums), a multiple of 8. */
Q8_HIDDEN size_t q8_x_bytes(const q8_problem *P, int wide);
/* x rounded for P into `scratch` (q8_x_bytes of it, 8-byte aligned), and P's x fields pointed at it. */
Q8_HIDDEN void q8_prepare_x(q8_problem *P, const float *x, int64_t ldx, int wide, uint8_t *scratch);
/* The row chunks of products P[0..count-1] as one dynamic loop: step[i] rows a chunk of product i (about 32
 * chunks a product), first[i] its first chunk, first[count] (returned) the loop's length. */
Q8_HIDDEN int64_t q8_chunks(const q8_problem *P, int count, int64_t *first, int64_t *step);
/* Chunk c of that loop: its rows of the product it falls in, with the integer dot product `instructions`
 * (prism_q8_instructions()). */
Q8_HIDDEN void q8_chunk_run(const q8_problem *P, int count, const int64_t *first, const int64_t *step, int64_t c,
                            int wide, int instructions);

int prism_q8_instructions(void);

#endif
