/* The state of expert_miss.c: an int64 array of NM_FIELDS, laid out by runtime/native_misses.py (FIELDS there
 * names them in this order; prism_expert_miss_fields() lets it check the count). "[n][E]" arrays are per
 * expert, indexed by key = position * E + expert, position the expert's MoE layer in the eviction order's cycle. */
#ifndef PRISM_EXPERT_MISS_H
#define PRISM_EXPERT_MISS_H
#include <stdint.h>

#define NM_ON 0               /* 1: steps are served here; 0: every step calls back (set by the loop after one) */
#define NM_POSITIONS 1        /* n: the MoE layers */
#define NM_EXPERTS 2          /* E: experts per layer */
#define NM_ROOM 3             /* the cache's budget less the bytes its entries reserve */
#define NM_POOL_TOTAL 4       /* bytes of every slab, free or in use (SlabPool.total_bytes) */
#define NM_POOL_BUDGET 5
#define NM_FREE_COUNT 6       /* free slabs: their addresses and sizes */
#define NM_FREE_CAP 7
#define NM_FREE_ADDR 8        /* int64 [cap] */
#define NM_FREE_SIZE 9        /* int64 [cap] */
#define NM_LOG 10             /* int64 [cap]: the records of expert_miss.c's comment */
#define NM_LOG_COUNT 11
#define NM_LOG_CAP 12
#define NM_LEVEL 13           /* double [n][E]: NextUse.level */
#define NM_SCALE 14           /* double [n]: NextUse.scale */
#define NM_WEIGHT 15          /* double [n][E]: NextUse.weight */
#define NM_OFFSET 16          /* double [n][n]: NextUse.offset */
#define NM_CURRENT 17         /* NextUse.current */
#define NM_DECAY 18           /* double bits: NextUse.decay */
#define NM_MIN_ROUTING 19     /* double bits */
#define NM_RESCALE_BELOW 20   /* double bits */
#define NM_STATE 21           /* int8 [n][E]: NM_ABSENT / NM_READY / NM_LOADING, | NM_PERMANENT */
#define NM_SLAB 22            /* int64 [n][E]: a ready expert's slab address (0: none) */
#define NM_SLAB_SIZE 23       /* int64 [n][E] */
#define NM_FOOTPRINT 24       /* int64 [n][E]: the bytes its entry reserves (tiers.footprint) */
#define NM_LENGTH 25          /* int64 [n][E]: its stored bytes, its slab's size; 0: not served here */
#define NM_FILE_OFFSET 26     /* int64 [n][E] */
#define NM_FD 27              /* int64 [n][E]: its shard's descriptor (held open while served here) */
#define NM_TEMPLATE 28        /* int64 [n][E]: its layout's BlockTemplate arguments (3 x 39 int64) */
#define NM_WIDE 29            /* int64 [n][E]: its block's rounding of x */
#define NM_BLOCKS 30          /* int64 [n][E][3 x 39]: the block of an expert loaded here (expert_block.h) */
#define NM_TABLES 31          /* int64 [n]: each position's resident table (0: none) */
#define NM_POSITION_LAYER 32  /* int64 [n]: each position's layer index (the log's) */
#define NM_LOOP_POSITION 33   /* int64 [L]: each decode-loop layer's position (-1: not served here) */
#define NM_SCRATCH 34         /* double [n][E]: the victim's scores */
#define NM_HUGE 35            /* 1: slabs of 2 MiB and more in transparent huge pages */
#define NM_THREADS 36         /* the threads of a read of NM_SPLIT_BYTES or more */
#define NM_SPLIT_BYTES 37
#define NM_ERROR 38           /* errno of a failed read (the step returned -5) */
#define NM_ERROR_KEY 39       /* its key */
#define NM_DROP 40            /* 1: each read's pages leave the page cache after it (benchmarks of disk reads) */
#define NM_FIELDS 41

#define NM_ABSENT 0
#define NM_READY 1
#define NM_LOADING 2
#define NM_STATE_MASK 3
#define NM_PERMANENT 4

#define NM_EV_HIT 1
#define NM_EV_STEP 2
#define NM_EV_SERVED 3
#define NM_EV_EVICT 4
#define NM_EV_RELEASE 5
#define NM_EV_ALLOC 6
#define NM_EV_LOAD 7

#define NM_MAX_TOP_K 64 /* expert_block.c's EB_MAX_EXPERTS */

/* A step whose routed experts are all in the resident table: observed and touched here, logged (1); 0 where this
 * is off (the caller logs it the usual way). */
int prism_expert_miss_hit(int64_t *nm, int64_t l, const int64_t *ids, int64_t k);
/* A step with misses, served here: 1 with ops (3k operator arrays) and wide set; 0 where it cannot be (nothing
 * changed); -1 out of memory, -2 bad arguments, -4 no victim, -5 a failed read (NM_ERROR, NM_ERROR_KEY). */
int prism_expert_miss_step(int64_t *nm, int64_t l, const int64_t *ids, int64_t k, const int64_t **ops, int64_t *wide);
#endif
