/* An expert cache's miss served inside the native decode loop (decode_layer.c), without a callback into Python.
 *
 * Why: on the reference model a miss's read was 24 us of the 141 it added to a token; the rest was a dozen Python
 * steps run from a callback (choosing the victim, evicting it, reserving the slab, building the block, publishing
 * it, counting), each cheap, together five times the read (bench/results/miss_profile_xeon.md, timers on). Here
 * the loop does the same steps itself and logs them; Python replays the log after the token (or before its next
 * callback), under the cache's lock, which the decoding thread holds for the whole token
 * (runtime/native_misses.py). A miss then adds 68 us (miss_profile_native_xeon.md). What is done here is what ExpertCache._serve_now does with the default eviction
 * (NextUse, runtime/eviction.py), step for step and in the same floating-point operations, so the cache makes the
 * same choices either way: tests/test_native_misses.py compares the two after every token. One thing may differ:
 * which free slab of another size goes first when a new size needs room (here the last exported, in
 * SlabPool.take the first size it lists): memory only, the pool within its budget either way.
 *
 * The state is an int64 array of NM_FIELDS (below), most of them addresses of arrays the Python side owns; the
 * log is NM_LOG, a sequence of records, each a kind and its fields:
 *   NM_EV_HIT   layer k e1..ek   a step run from the resident table (its routing observed, its experts touched)
 *   NM_EV_STEP  layer k e1..ek   a step with misses, served here: its routing observed; the events below follow
 *   NM_EV_SERVED e               a ready expert of that step (a hit, touched)
 *   NM_EV_EVICT layer e          a victim: out of the table, its room and slab freed (the slab to the free list)
 *   NM_EV_RELEASE addr size      a free slab of another size given up to make room for a new one
 *   NM_EV_ALLOC addr size        a new slab (prism_slab_alloc; Python takes it over: prism_slab_free frees it)
 *   NM_EV_LOAD  e addr ns        an expert read into the slab at addr and put in the table; ns: the stall
 * Layers in the log are the cache's layer indices. A step this cannot serve (an expert loading elsewhere, one
 * never loaded by Python yet, one that is no native block, a full log) is left untouched: the loop turns this off
 * and calls back into Python, which serves it as before and turns it on again where it can
 * (NativeMisses.resume). */
#define _XOPEN_SOURCE 700
#define _DEFAULT_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "expert_block.h"
#include "expert_miss.h"

int64_t prism_pread(int64_t fd, int64_t offset, int64_t length, void *dst, int64_t threads);
int prism_resident_set(int64_t *table, int64_t E, int64_t e, int64_t wide, const int64_t *ptrs);
int prism_resident_clear(int64_t *table, int64_t E, int64_t e);

#define NM_ARGS EB_ARGS      /* an int_linear argument array (native/__init__.py's _ARGS) */
#define NM_BLOCK_WORDS (3 * EB_PROJECTION_WORDS) /* an expert's block: three projections, each maybe a composite */
#define NM_HUGE_PAGE (2 << 20)

static double nm_double(int64_t bits) {
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

#define NM_PTR(nm, field, type) ((type *)(intptr_t)(nm)[field])

/* Memory for a slab: 64-byte aligned, or on a huge-page boundary with its whole huge pages advised
 * MADV_HUGEPAGE (as hugepages.huge_buffer), for nbytes of at least one huge page where huge is set. */
void *prism_slab_alloc(int64_t nbytes, int64_t huge) {
    void *p = NULL;
    if (nbytes <= 0) return NULL;
    if (huge && nbytes >= NM_HUGE_PAGE) {
        if (posix_memalign(&p, NM_HUGE_PAGE, (size_t)nbytes)) return NULL;
        madvise(p, (size_t)(nbytes / NM_HUGE_PAGE * NM_HUGE_PAGE), MADV_HUGEPAGE); /* advice: may do nothing */
        return p;
    }
    return posix_memalign(&p, 64, (size_t)nbytes) ? NULL : p;
}

void prism_slab_free(void *p) { free(p); }

int64_t prism_expert_miss_fields(void) { return NM_FIELDS; }

int64_t prism_expert_miss_args(void) { return NM_ARGS; }

/* NextUse.observe: p <- decay * p + (1 - decay) * routed, for position pos's experts. */
static void nm_observe(int64_t *nm, int64_t pos, const int64_t *ids, int64_t k) {
    const int64_t E = nm[NM_EXPERTS];
    double *level = NM_PTR(nm, NM_LEVEL, double) + pos * E, *scale = NM_PTR(nm, NM_SCALE, double);
    const double decay = nm_double(nm[NM_DECAY]);
    nm[NM_CURRENT] = pos;
    double s = scale[pos] * decay;
    if (s < nm_double(nm[NM_RESCALE_BELOW])) {
        for (int64_t e = 0; e < E; e++) level[e] *= s;
        s = 1.0;
    }
    scale[pos] = s;
    const double add = (1.0 - decay) / s;
    for (int64_t i = 0; i < k; i++) level[ids[i]] += add;
}

/* NextUse.touch: a candidate again, weighing its bytes (a permanent expert never is). */
static void nm_touch(int64_t *nm, int64_t key) {
    if (!(NM_PTR(nm, NM_STATE, int8_t)[key] & NM_PERMANENT))
        NM_PTR(nm, NM_WEIGHT, double)[key] = (double)NM_PTR(nm, NM_FOOTPRINT, int64_t)[key];
}

static int nm_in(const int64_t *keys, int64_t n, int64_t key) {
    for (int64_t i = 0; i < n; i++)
        if (keys[i] == key) return 1;
    return 0;
}

/* NextUse.victim(demand=True) while a step is served: its served experts are pinned, the rest of its routed
 * experts expected (ExpertCache._route_arrived), so both are passed over; an expected one is the victim only when
 * nothing else is free. The scores are the same operations on the same doubles as NextUse.expected_steps and
 * victim, taken largest first (the first of equals), each struck off when looked at; an expert that is not a
 * candidate (not ready, permanent) loses its candidacy (weight -1) as there. Returns its key, or -1. */
static int64_t nm_victim(int64_t *nm, const int64_t *step, int64_t k, const int64_t *served, int64_t n_served) {
    const int64_t n = nm[NM_POSITIONS], E = nm[NM_EXPERTS], total = n * E, current = nm[NM_CURRENT];
    const double *level = NM_PTR(nm, NM_LEVEL, double), *scale = NM_PTR(nm, NM_SCALE, double);
    const double *offset = NM_PTR(nm, NM_OFFSET, double) + current * n;
    const double min_routing = nm_double(nm[NM_MIN_ROUTING]), layers = (double)n;
    double *weight = NM_PTR(nm, NM_WEIGHT, double), *score = NM_PTR(nm, NM_SCRATCH, double);
    const int8_t *state = NM_PTR(nm, NM_STATE, int8_t);
    for (int64_t j = 0; j < n; j++) {
        const double s = scale[j], off = offset[j];
        for (int64_t e = 0; e < E; e++) {
            double steps = level[j * E + e] * s;
            steps = steps >= min_routing ? steps : min_routing; /* np.maximum */
            steps = layers / steps;
            steps += off;
            score[j * E + e] = steps * weight[j * E + e];
        }
    }
    int64_t expected = -1;
    for (;;) {
        int64_t best = 0;
        for (int64_t i = 1; i < total; i++)
            if (score[i] > score[best]) best = i;
        if (!(score[best] >= 0)) break; /* no candidate left */
        score[best] = -1.0;
        if ((state[best] & NM_STATE_MASK) != NM_READY || (state[best] & NM_PERMANENT)) {
            weight[best] = -1.0; /* gone, or not a candidate: a touch puts it back */
            continue;
        }
        if (nm_in(served, n_served, best)) continue; /* pinned */
        if (nm_in(step, k, best)) {                   /* expected */
            if (expected < 0) expected = best;
            continue;
        }
        return best;
    }
    return expected;
}

static int nm_log_room(const int64_t *nm, int64_t words) { return nm[NM_LOG_CAP] - nm[NM_LOG_COUNT] >= words; }

static void nm_log(int64_t *nm, int64_t n, const int64_t *words) {
    int64_t *log = NM_PTR(nm, NM_LOG, int64_t) + nm[NM_LOG_COUNT];
    memcpy(log, words, sizeof(int64_t) * (size_t)n);
    nm[NM_LOG_COUNT] += n;
}

static void nm_log_step(int64_t *nm, int64_t kind, int64_t layer, const int64_t *ids, int64_t k) {
    int64_t *log = NM_PTR(nm, NM_LOG, int64_t) + nm[NM_LOG_COUNT];
    log[0] = kind, log[1] = layer, log[2] = k;
    memcpy(log + 3, ids, sizeof(int64_t) * (size_t)k);
    nm[NM_LOG_COUNT] += 3 + k;
}

/* Evict the expert at key: out of its layer's table (once no loop runs it), its room back, its slab on the
 * free list, no longer a candidate (NextUse.evicted). */
static void nm_evict(int64_t *nm, int64_t key) {
    const int64_t E = nm[NM_EXPERTS], pos = key / E, e = key % E;
    int64_t *table = (int64_t *)(intptr_t)NM_PTR(nm, NM_TABLES, int64_t)[pos];
    if (table) prism_resident_clear(table, E, e);
    NM_PTR(nm, NM_STATE, int8_t)[key] = NM_ABSENT;
    NM_PTR(nm, NM_WEIGHT, double)[key] = -1.0;
    nm[NM_ROOM] += NM_PTR(nm, NM_FOOTPRINT, int64_t)[key];
    int64_t *slab = NM_PTR(nm, NM_SLAB, int64_t), *size = NM_PTR(nm, NM_SLAB_SIZE, int64_t);
    if (slab[key]) {
        const int64_t at = nm[NM_FREE_COUNT]++;
        NM_PTR(nm, NM_FREE_ADDR, int64_t)[at] = slab[key];
        NM_PTR(nm, NM_FREE_SIZE, int64_t)[at] = size[key];
        slab[key] = 0, size[key] = 0;
    }
    const int64_t words[3] = {NM_EV_EVICT, NM_PTR(nm, NM_POSITION_LAYER, int64_t)[pos], e};
    nm_log(nm, 3, words);
}

/* A slab of exactly nbytes (SlabPool.take): a free one of that size, else a new one, after giving up free slabs
 * of other sizes while the pool would exceed its budget. 0 when out of memory. */
static int64_t nm_take_slab(int64_t *nm, int64_t nbytes) {
    int64_t *addr = NM_PTR(nm, NM_FREE_ADDR, int64_t), *size = NM_PTR(nm, NM_FREE_SIZE, int64_t);
    int64_t count = nm[NM_FREE_COUNT];
    for (int64_t i = count - 1; i >= 0; i--)
        if (size[i] == nbytes) {
            const int64_t slab = addr[i];
            addr[i] = addr[count - 1], size[i] = size[count - 1];
            nm[NM_FREE_COUNT] = count - 1;
            return slab;
        }
    for (int64_t i = count - 1; i >= 0 && nm[NM_POOL_TOTAL] + nbytes > nm[NM_POOL_BUDGET]; i--) {
        const int64_t words[3] = {NM_EV_RELEASE, addr[i], size[i]};
        nm_log(nm, 3, words);
        nm[NM_POOL_TOTAL] -= size[i];
        addr[i] = addr[count - 1], size[i] = size[count - 1];
        count--;
    }
    nm[NM_FREE_COUNT] = count;
    void *p = prism_slab_alloc(nbytes, nm[NM_HUGE]);
    if (!p) return 0;
    nm[NM_POOL_TOTAL] += nbytes;
    const int64_t words[3] = {NM_EV_ALLOC, (int64_t)(intptr_t)p, nbytes};
    nm_log(nm, 3, words);
    return (int64_t)(intptr_t)p;
}

/* A miss that failed after its slab was taken: its room back, the slab given up (released, as Python replays it). */
static void nm_give_up(int64_t *nm, int64_t room, int64_t slab, int64_t bytes) {
    nm[NM_ROOM] += room;
    nm[NM_POOL_TOTAL] -= bytes;
    const int64_t words[3] = {NM_EV_RELEASE, slab, bytes};
    nm_log(nm, 3, words);
}

static int64_t nm_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

int prism_expert_miss_hit(int64_t *nm, int64_t l, const int64_t *ids, int64_t k) {
    if (!nm[NM_ON]) return 0; /* off: its loop positions may not be set */
    const int64_t pos = NM_PTR(nm, NM_LOOP_POSITION, int64_t)[l];
    if (pos < 0) return 0;
    if (!nm_log_room(nm, 3 + k)) {
        nm[NM_ON] = 0; /* the rest of the token is logged the usual way, after these */
        return 0;
    }
    nm_observe(nm, pos, ids, k);
    for (int64_t i = 0; i < k; i++) nm_touch(nm, pos * nm[NM_EXPERTS] + ids[i]);
    nm_log_step(nm, NM_EV_HIT, NM_PTR(nm, NM_POSITION_LAYER, int64_t)[pos], ids, k);
    return 1;
}

int prism_expert_miss_step(int64_t *nm, int64_t l, const int64_t *ids, int64_t k, const int64_t **ops, int64_t *wide) {
    if (!nm[NM_ON]) return 0;
    const int64_t pos = NM_PTR(nm, NM_LOOP_POSITION, int64_t)[l];
    if (pos < 0 || k > NM_MAX_TOP_K) return 0;
    const int64_t E = nm[NM_EXPERTS], n = nm[NM_POSITIONS];
    int64_t *table = (int64_t *)(intptr_t)NM_PTR(nm, NM_TABLES, int64_t)[pos];
    const int8_t *state = NM_PTR(nm, NM_STATE, int8_t);
    const int64_t *length = NM_PTR(nm, NM_LENGTH, int64_t), *wides = NM_PTR(nm, NM_WIDE, int64_t);
    if (!table) return 0;
    int64_t rounding = __atomic_load_n(&table[0], __ATOMIC_SEQ_CST); /* -1: the table's first expert sets it */
    int64_t keys[NM_MAX_TOP_K];
    /* everything checked before anything changes: a step served here is served whole */
    for (int64_t i = 0; i < k; i++) {
        if (ids[i] < 0 || ids[i] >= E) return -2;
        const int64_t key = keys[i] = pos * E + ids[i];
        const int8_t st = state[key] & NM_STATE_MASK;
        if (st == NM_READY) {
            if (!table[2 + 3 * ids[i]]) return 0; /* ready but no native block of the table's rounding */
        } else if (st != NM_ABSENT || !length[key] || (rounding >= 0 && wides[key] != rounding)) {
            return 0;
        } else {
            rounding = wides[key]; /* the step's experts run in one block: one rounding of x */
        }
    }
    /* the most this step can log: its record, per expert a load (with its slab made) or a hit, and at most every
     * expert evicted and every free slab (those evictions' too) released */
    const int64_t worst = 3 + k + k * (4 + 3 + 2) + 3 * n * E + 3 * (nm[NM_FREE_COUNT] + n * E);
    if (!nm_log_room(nm, worst) || nm[NM_FREE_CAP] - nm[NM_FREE_COUNT] < n * E) return 0;
    nm_observe(nm, pos, ids, k);
    const int64_t layer = NM_PTR(nm, NM_POSITION_LAYER, int64_t)[pos];
    nm_log_step(nm, NM_EV_STEP, layer, ids, k);
    int64_t *slabs = NM_PTR(nm, NM_SLAB, int64_t), *sizes = NM_PTR(nm, NM_SLAB_SIZE, int64_t);
    const int64_t *footprint = NM_PTR(nm, NM_FOOTPRINT, int64_t);
    int64_t served[NM_MAX_TOP_K];
    for (int64_t i = 0; i < k; i++) {
        const int64_t key = keys[i], e = ids[i];
        if ((state[key] & NM_STATE_MASK) == NM_READY) { /* a hit (unless a miss of this step evicted it) */
            nm_touch(nm, key);
            served[i] = key;
            const int64_t words[2] = {NM_EV_SERVED, e};
            nm_log(nm, 2, words);
            for (int j = 0; j < 3; j++) ops[3 * i + j] = (const int64_t *)(intptr_t)table[2 + 3 * e + j];
            continue;
        }
        const int64_t start = nm_now_ns();
        while (nm[NM_ROOM] < footprint[key]) { /* ExpertCache._make_room(demand=True) */
            const int64_t victim = nm_victim(nm, keys, k, served, i);
            if (victim < 0) return -4; /* every byte pinned: begin() does not turn this on where that can be */
            nm_evict(nm, victim);
        }
        nm[NM_ROOM] -= footprint[key];
        const int64_t bytes = length[key], slab = nm_take_slab(nm, bytes);
        if (!slab) return -1;
        const int64_t threads = bytes >= nm[NM_SPLIT_BYTES] ? nm[NM_THREADS] : 1;
        const int64_t got = prism_pread(NM_PTR(nm, NM_FD, int64_t)[key], NM_PTR(nm, NM_FILE_OFFSET, int64_t)[key],
                                        bytes, (void *)(intptr_t)slab, threads);
        if (got != bytes) { /* the log says what else happened */
            nm[NM_ERROR] = got < 0 ? -got : EIO;
            nm[NM_ERROR_KEY] = key;
            nm_give_up(nm, footprint[key], slab, bytes);
            return -5;
        }
        if (nm[NM_DROP])
            posix_fadvise((int)NM_PTR(nm, NM_FD, int64_t)[key], NM_PTR(nm, NM_FILE_OFFSET, int64_t)[key], bytes,
                          POSIX_FADV_DONTNEED);
        /* the block: its layout's template moved to this slab (BlockTemplate.at): the weight pointers of each
         * projection's arrays (three where it is a composite) */
        int64_t *args = NM_PTR(nm, NM_BLOCKS, int64_t) + key * NM_BLOCK_WORDS;
        memcpy(args, (const int64_t *)(intptr_t)NM_PTR(nm, NM_TEMPLATE, int64_t)[key], sizeof(int64_t) * NM_BLOCK_WORDS);
        for (int j = 0; j < 3; j++) {
            int64_t *projection = args + j * EB_PROJECTION_WORDS;
            const int kind = (int)projection[0], arrays = kind == EB_LOWRANK || kind == EB_LOWRANK_ONLY ? 3 : 1;
            for (int part = kind == EB_LOWRANK_ONLY; part < arrays; part++) /* a base of no weights stays 0 */
                for (int s = 4; s < 7; s++) projection[part * NM_ARGS + s] += slab;
        }
        const int64_t ptrs[3] = {(int64_t)(intptr_t)args, (int64_t)(intptr_t)(args + EB_PROJECTION_WORDS),
                                 (int64_t)(intptr_t)(args + 2 * EB_PROJECTION_WORDS)};
        if (prism_resident_set(table, E, e, wides[key], ptrs)) { /* the checks above exclude it */
            nm_give_up(nm, footprint[key], slab, bytes);
            return -2;
        }
        NM_PTR(nm, NM_STATE, int8_t)[key] = (int8_t)((state[key] & ~NM_STATE_MASK) | NM_READY);
        slabs[key] = slab, sizes[key] = bytes;
        nm_touch(nm, key);
        served[i] = key;
        for (int j = 0; j < 3; j++) ops[3 * i + j] = (const int64_t *)(intptr_t)ptrs[j];
        const int64_t words[4] = {NM_EV_LOAD, e, slab, nm_now_ns() - start};
        nm_log(nm, 4, words);
    }
    *wide = __atomic_load_n(&table[0], __ATOMIC_SEQ_CST);
    return 1;
}
