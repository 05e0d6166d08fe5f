/* The operators expert_block.c reads, shared with expert_miss.c (which moves them into cache slabs).
 *
 * A projection is a pointer to int_linear argument words (13, native/__init__.py's _ARGS; a block reads only
 * their weight fields: K [3], qweight [4], scales [5], zeros [6], N [7], bits [8], group size [9]). A projection
 * stored `int` + low-rank (the container's int+lowrank: y = base(x) + a(b(x))) is a composite of three such
 * arrays one after another, [base][b][a], whose base's first word (x, a slot no block reads) is EB_LOWRANK;
 * a plain projection's first word is whatever its last call left there (an x address, never EB_LOWRANK). */
#ifndef PRISM_EXPERT_BLOCK_H
#define PRISM_EXPERT_BLOCK_H

#define EB_ARGS 13                      /* an int_linear argument array */
#define EB_LOWRANK 1                    /* first word of a composite projection */
#define EB_PROJECTION_WORDS (3 * EB_ARGS) /* a projection's words where it may be a composite */

#endif
