/* The operators expert_block.c reads, shared with expert_miss.c (which moves them into cache slabs).
 *
 * A projection is a pointer to int_linear argument words (13, native/__init__.py's _ARGS; a block reads only
 * their weight fields: K [3], qweight [4], scales [5], zeros [6], N [7], bits [8], group size [9]). A projection
 * stored `int` + low-rank (the container's int+lowrank: y = base(x) + a(b(x))) is a composite of three such
 * arrays one after another, [base][b][a], whose base's first word (x, a slot no block reads) is EB_LOWRANK; one
 * stored low-rank alone (kind lowrank, y = a(b(x))) is the same with EB_LOWRANK_ONLY there and a base array of
 * only its shape (K at [3], N at [7], no weights); a plain projection's first word is whatever its last call
 * left there (an x address, never 1 or 2). */
#ifndef PRISM_EXPERT_BLOCK_H
#define PRISM_EXPERT_BLOCK_H

#define EB_ARGS 13                      /* an int_linear argument array */
#define EB_LOWRANK 1                    /* first word of a composite projection with a base */
#define EB_LOWRANK_ONLY 2               /* first word of one without (its base array: the shape only) */
#define EB_PROJECTION_WORDS (3 * EB_ARGS) /* a projection's words where it may be a composite */

#include <stdint.h>

/* int_linear.c's exact kernel (its direct path: fp32 x, codes widened in registers; any number of rows of x) for
 * a caller's parallel region: every thread of the team calls it with the same arguments, its loops being
 * orphaned worksharing constructs (each ends in a barrier). w: argument words of which the weight fields are
 * read (checked by the caller); y [M, N] (row stride ldy) = x [M, K] (row stride ldx) w^T; scratch: the
 * floats prism_int_linear_team_floats says, shared by the team. Each output is summed by one thread in a fixed
 * order. */
__attribute__((visibility("hidden"))) int64_t prism_int_linear_team_floats(const int64_t *w, int64_t M);
__attribute__((visibility("hidden"))) void prism_int_linear_team(const int64_t *w, const float *x, int64_t ldx,
                                                                 int64_t M, float *y, int64_t ldy, float *scratch);

#endif
