/* One token's routed experts in one call: y = sum_e w_e * down_e(silu(gate_e(x)) * up_e(x)), every product
 * through q8_linear.c's integer tiles (int16 or int8 x, as the experts' kernel was chosen).
 *
 * Why: at decode a layer's experts are a handful of products of one row. Called one by one from Python they
 * cost two kernel calls per expert (each an OpenMP fork and join, x's rounding, an output allocation), a
 * SwiGLU, a scaling and a sum in torch ops, and a dtype conversion each way: on a Mixtral-shaped model of
 * hidden 1024 that overhead is of the order of the products themselves (bench/results/decode_profile*.md).
 * Here one parallel region does it all, with a barrier between the stages:
 *   1. x rounded for each expert's gate and up (once where both have the same bits and group size);
 *   2. the row chunks of every gate and up product, one dynamic loop;
 *   3. per expert h = silu(gate) * up in fp32, rounded for its down projection;
 *   4. the row chunks of every down product;
 *   5. y[r] = sum_e w_e * down_e[r], experts summed in the order given (fp32).
 * Each product's outputs are computed exactly as a single q8 call computes them (same tiles, same rounding of
 * its input); stages 3 and 5 are fp32 where the Python path rounded each expert's output to the model's dtype.
 *
 * Arguments: hdr = {x, y, experts E, threads, wide (1: int16 x, 0: int8 x)}; x and y fp32 [H];
 * ops = 3E pointers to int64 args[13] as prism_int_linear_packed takes them (gate, up, down of each expert;
 * only the weight fields are read: K, qweight, scales, zeros, N, bits, group size); weights = E fp32.
 * Returns 0, -1 when out of memory, -2 for arguments the kernel does not take.
 *
 * prism_expert_rows is the same for B rows of a decode batch, E experts each: hdr = {x, y, B, E, threads, wide},
 * x and y fp32 [B, H], ops 3BE pointers (row after row, each row's experts in its route order), weights B*E.
 * An expert several rows route to is one product of those rows (its rows of x gathered), so its weights are read
 * once for the batch where one call a row would read them once a row, and the batch's experts cost one native
 * call instead of a dozen torch ops each. Every output of a row is computed as for that row alone (the tiles
 * compute each row of x as a single-row call does), so a batch row gets prism_expert_block's bits.
 *
 * A projection may be a composite (expert_block.h: the container's int+lowrank, y = base(x) + a(b(x)), or its
 * lowrank, y = a(b(x)), whose base is no problem at all): its base runs through the tiles as any projection, and its correction a(b(x)) is added before the output is used
 * (gate and up before stage 3, down before stage 5): t = b x from the projection's fp32 input (x, or h before
 * its rounding), then y += a t, each factor's product on the integer tiles where they take it (its input rounded
 * for it, as a single call of its kernel rounds it) and by the exact kernel elsewhere (int_linear.c, run by the
 * block's threads: prism_int_linear_team), each output summed by one thread in a fixed order. Why: such an
 * expert was no native block, so every step routed to it left the decode loop for Python (README, "Low-rank
 * corrections in the native block"). The factors are a small share of the projection's multiply-adds
 * (rank x (K + N) against K x N). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "expert_block.h"
#include "q8_linear.h"

#define EB_MAX_EXPERTS 64 /* routed experts of one row */
#define EB_MAX_ROWS 64    /* rows of one call (a decode batch) */

#define EB_ALIGN 64

static uint8_t *eb_align(uint8_t *p) { return (uint8_t *)(((uintptr_t)p + EB_ALIGN - 1) & ~(uintptr_t)(EB_ALIGN - 1)); }

static int same_rounding(const q8_problem *a, const q8_problem *b) { return a->bits == b->bits && a->g == b->g; }

static int eb_lowrank(const int64_t *op) { return op[0] == EB_LOWRANK || op[0] == EB_LOWRANK_ONLY; }

/* A projection's base problem: q8_make_bound's, or for a low-rank projection without a base, one of no rows of
 * the weight (its shape checked; nothing reads it, its output is the correction alone). */
static int eb_make(const int64_t *op, int64_t k, int64_t n, int64_t M, int wide, q8_problem *P) {
    if (op[0] != EB_LOWRANK_ONLY) return q8_make_bound(op, k, n, M, NULL, wide, P);
    if (op[3] != k || op[7] != n) return -2;
    memset(P, 0, sizeof *P);
    P->M = M, P->K = k;
    return 0;
}

/* Whether a packed int weight's fields are ones the exact kernel takes: k columns, n rows. */
static int eb_factor_ok(const int64_t *w, int64_t k, int64_t n) {
    return w[3] == k && w[7] == n && k > 0 && n > 0 && (w[8] == 2 || w[8] == 4 || w[8] == 8) && w[9] > 0 && w[4] &&
           w[5] && w[6];
}

/* A composite's factors: b [R, k] and a [n, R]; 0 where they fit a projection of k inputs and n outputs. */
static int eb_check_lowrank(const int64_t *op, int64_t k, int64_t n) {
    const int64_t *b = op + EB_ARGS, *a = op + 2 * EB_ARGS;
    return eb_factor_ok(b, k, b[7]) && eb_factor_ok(a, b[7], n) ? 0 : -2;
}

/* A composite projection of a call: its input and output rows, its t = b x [M, R] and u = a t [M, N] buffers,
 * and each factor's product: on the block's integer tiles where they take the factor (q8_make_bound accepts
 * it: its own rounding of its input, as a single call of its kernel rounds it), else the exact kernel. */
typedef struct {
    const int64_t *op; /* the composite's words */
    const float *x;
    int64_t ldx, M;
    float *y;
    int64_t ldy;
    float *t, *u;
    int tiles[2];       /* b, a: 1 on the integer tiles */
    q8_problem P[2];    /* b, a where on the tiles */
    uint8_t *xs[2];     /* their rounded inputs */
    int64_t first[2][2], step[2][1];
} eb_lowrank_part;

/* One factor's product w (x [M, K]) -> y [M, N] by the whole team (every thread of the region calls this). */
static void eb_factor_run(eb_lowrank_part *p, int f, const float *x, int64_t ldx, float *y, int64_t ldy, int wide,
                          int instructions, float *team) {
    if (!p->tiles[f]) {
        prism_int_linear_team(p->op + (f + 1) * EB_ARGS, x, ldx, p->M, y, ldy, team);
        return;
    }
#pragma omp single
    q8_prepare_x(&p->P[f], x, ldx, wide, p->xs[f]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < p->first[f][1]; c++) q8_chunk_run(&p->P[f], 1, p->first[f], p->step[f], c, wide, instructions);
}

/* The corrections of parts[0..count-1]: y += a (b x), the two products by the whole team, then the sum. */
static void eb_lowrank_run(eb_lowrank_part *parts, int count, int wide, int instructions, float *team) {
    for (int i = 0; i < count; i++) {
        eb_lowrank_part *p = &parts[i];
        const int64_t R = p->op[EB_ARGS + 7], N = p->op[2 * EB_ARGS + 7], M = p->M;
        eb_factor_run(p, 0, p->x, p->ldx, p->t, R, wide, instructions, team);
        eb_factor_run(p, 1, p->t, R, p->u, N, wide, instructions, team);
        if (p->op[0] == EB_LOWRANK_ONLY) { /* no base wrote y: the correction is the output */
#pragma omp for schedule(static)
            for (int64_t j = 0; j < M * N; j++) p->y[(j / N) * p->ldy + j % N] = p->u[j];
        } else {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < M * N; j++) p->y[(j / N) * p->ldy + j % N] += p->u[j];
        }
    }
}

int prism_expert_rows(const int64_t *hdr, const int64_t *const *ops, const float *weights) {
    const float *x = (const float *)(intptr_t)hdr[0];
    float *y = (float *)(intptr_t)hdr[1];
    const int B = (int)hdr[2], E = (int)hdr[3], wide = (int)hdr[5];
    int threads = (int)hdr[4];
    if (B < 1 || B > EB_MAX_ROWS || E < 1 || E > EB_MAX_EXPERTS || (wide != 0 && wide != 1)) return -2;
    const int S = B * E;
    const int64_t H = ops[0][3];
    /* the distinct experts (by their gate's argument array), each with the rows that route to it, in row order */
    int slot_u[EB_MAX_ROWS * EB_MAX_EXPERTS], slot_at[EB_MAX_ROWS * EB_MAX_EXPERTS];
    int first[EB_MAX_ROWS * EB_MAX_EXPERTS], rows[EB_MAX_ROWS * EB_MAX_EXPERTS], U = 0;
    for (int s = 0; s < S; s++) {
        int u = 0;
        while (u < U && ops[3 * first[u]] != ops[3 * s]) u++;
        if (u == U) {
            if (ops[3 * s + 1] == NULL || ops[3 * s + 2] == NULL || ops[3 * s] == NULL) return -2;
            first[U] = s, rows[U] = 0, U++;
        } else if (ops[3 * first[u] + 1] != ops[3 * s + 1] || ops[3 * first[u] + 2] != ops[3 * s + 2]) {
            return -2; /* one gate, two experts */
        }
        slot_u[s] = u, slot_at[s] = rows[u]++;
    }
    for (int s = 0; s < S; s++)
        for (int t = s - s % E; t < s; t++)
            if (slot_u[t] == slot_u[s]) return -2; /* an expert twice in one row */
    /* the problems and their bookkeeping, then (sized by them) the products' buffers */
    uint8_t *meta = malloc(sizeof(q8_problem) * 3 * (size_t)U + sizeof(int64_t) * (3 * (size_t)U + 2) * 2 +
                           sizeof(int) * (size_t)S + sizeof(uint8_t *) * 4 * (size_t)U + 8);
    if (!meta) return -1;
    q8_problem *gu = (q8_problem *)meta, *dn = gu + 2 * U;
    int64_t *first_gu = (int64_t *)(dn + U), *step_gu = first_gu + 2 * U + 1, *first_dn = step_gu + 2 * U,
            *step_dn = first_dn + U + 1;
    int *member = (int *)(step_dn + U); /* the rows of each expert, expert after expert */
    uint8_t **xs = (uint8_t **)(((uintptr_t)(member + S) + 7) & ~(uintptr_t)7), **hs = xs + 2 * U;
    const float **xin = (const float **)(hs + U);
    int64_t hidden[EB_MAX_ROWS * EB_MAX_EXPERTS], offset[EB_MAX_ROWS * EB_MAX_EXPERTS + 1];
    size_t bytes = EB_ALIGN;
    offset[0] = 0;
    for (int u = 0; u < U; u++) {
        const int64_t *g = ops[3 * first[u]], *up = ops[3 * first[u] + 1], *d = ops[3 * first[u] + 2];
        const int64_t I = hidden[u] = g[7], M = rows[u];
        offset[u + 1] = offset[u] + M;
        /* y fields are set below, once the buffers exist */
        if (eb_make(g, H, I, M, wide, &gu[2 * u]) || eb_make(up, H, I, M, wide, &gu[2 * u + 1]) ||
            eb_make(d, I, H, M, wide, &dn[u])) {
            free(meta);
            return -2;
        }
        bytes += sizeof(float) * (size_t)(M * (2 * I + H + (M > 1 ? H : 0))) + 7 * EB_ALIGN; /* each region aligned */
        bytes += q8_x_bytes(&gu[2 * u], wide) + q8_x_bytes(&gu[2 * u + 1], wide) + q8_x_bytes(&dn[u], wide);
    }
    /* composite projections (expert_block.h): their factors checked, their t buffers and the row buffers sized */
    int parts_gu = 0, parts_dn = 0;
    size_t lowrank_bytes = 0;
    int64_t team_floats = 0; /* the exact kernel's scratch: the most any factor needs */
    for (int u = 0; u < U; u++)
        for (int j = 0; j < 3; j++) {
            const int64_t *op = ops[3 * first[u] + j];
            if (!eb_lowrank(op)) continue;
            const int64_t k = j < 2 ? H : hidden[u], n = j < 2 ? hidden[u] : H;
            if (eb_check_lowrank(op, k, n)) {
                free(meta);
                return -2;
            }
            const int64_t M = rows[u], R = op[EB_ARGS + 7];
            q8_problem probe;
            lowrank_bytes += sizeof(float) * (size_t)(M * (R + n)) + 4 * EB_ALIGN;
            for (int f = 0; f < 2; f++) {
                const int64_t *w = op + (f + 1) * EB_ARGS, fk = f ? R : k, fn = f ? n : R;
                if (!q8_make_bound(w, fk, fn, M, NULL, wide, &probe)) lowrank_bytes += q8_x_bytes(&probe, wide);
                const int64_t team = prism_int_linear_team_floats(w, M);
                team_floats = team > team_floats ? team : team_floats;
            }
            if (j < 2) parts_gu++;
            else parts_dn++;
        }
    uint8_t *scratch = malloc(bytes);
    if (!scratch) {
        free(meta);
        return -1;
    }
    uint8_t *at = eb_align(scratch);
    for (int s = 0; s < S; s++) member[offset[slot_u[s]] + slot_at[s]] = s / E;
    for (int u = 0; u < U; u++) {
        const int64_t I = hidden[u], M = rows[u];
        gu[2 * u].y = (float *)at, at = eb_align(at + sizeof(float) * (size_t)(M * I));
        gu[2 * u + 1].y = (float *)at, at = eb_align(at + sizeof(float) * (size_t)(M * I));
        dn[u].y = (float *)at, at = eb_align(at + sizeof(float) * (size_t)(M * H));
        if (M > 1) { /* its rows of x gathered (below); one row is read where it is */
            xin[u] = (const float *)at, at = eb_align(at + sizeof(float) * (size_t)(M * H));
        } else {
            xin[u] = x + (int64_t)member[offset[u]] * H;
        }
        xs[2 * u] = at, at = eb_align(at + q8_x_bytes(&gu[2 * u], wide));
        xs[2 * u + 1] = at, at = eb_align(at + q8_x_bytes(&gu[2 * u + 1], wide));
        hs[u] = at, at = eb_align(at + q8_x_bytes(&dn[u], wide));
    }
    if (threads < 1) threads = 1;
    /* the composites' parts (gate and up ones first), their buffers and problems */
    const int parts = parts_gu + parts_dn;
    void *lowrank = NULL;
    eb_lowrank_part *part = NULL;
    float *lr_team = NULL;
    if (parts) {
        lowrank = malloc(sizeof(eb_lowrank_part) * (size_t)parts + sizeof(float) * (size_t)team_floats + lowrank_bytes +
                         EB_ALIGN);
        if (!lowrank) {
            free(scratch);
            free(meta);
            return -1;
        }
        part = lowrank;
        lr_team = (float *)(part + parts);
        uint8_t *lr_at = eb_align((uint8_t *)(lr_team + team_floats));
        int at_gu = 0, at_dn = parts_gu;
        for (int u = 0; u < U; u++)
            for (int j = 0; j < 3; j++) {
                const int64_t *op = ops[3 * first[u] + j];
                if (!eb_lowrank(op)) continue;
                eb_lowrank_part *p = &part[j < 2 ? at_gu++ : at_dn++];
                const int64_t M = rows[u], R = op[EB_ARGS + 7], k = j < 2 ? H : hidden[u], n = j < 2 ? hidden[u] : H;
                p->op = op, p->M = M;
                if (j < 2) {
                    p->x = xin[u], p->ldx = H, p->y = gu[2 * u + j].y, p->ldy = hidden[u];
                } else {
                    p->x = gu[2 * u].y, p->ldx = hidden[u], p->y = dn[u].y, p->ldy = H; /* h before its rounding */
                }
                p->t = (float *)lr_at, lr_at = eb_align(lr_at + sizeof(float) * (size_t)(M * R));
                p->u = (float *)lr_at, lr_at = eb_align(lr_at + sizeof(float) * (size_t)(M * n));
                for (int f = 0; f < 2; f++) {
                    const int64_t *w = op + (f + 1) * EB_ARGS, fk = f ? R : k, fn = f ? n : R;
                    p->tiles[f] = !q8_make_bound(w, fk, fn, M, f ? p->u : p->t, wide, &p->P[f]);
                    if (p->tiles[f]) {
                        p->xs[f] = lr_at, lr_at = eb_align(lr_at + q8_x_bytes(&p->P[f], wide));
                        q8_chunks(&p->P[f], 1, p->first[f], p->step[f]);
                    }
                }
            }
    }
    const int64_t chunks_gu = q8_chunks(gu, 2 * U, first_gu, step_gu);
    const int64_t chunks_dn = q8_chunks(dn, U, first_dn, step_dn);
    const int instructions = prism_q8_instructions();
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int u = 0; u < U; u++)
            if (rows[u] > 1)
                for (int64_t m = 0; m < rows[u]; m++)
                    memcpy((float *)xin[u] + m * H, x + (int64_t)member[offset[u] + m] * H, sizeof(float) * (size_t)H);
#pragma omp for schedule(static)
        for (int i = 0; i < 2 * U; i++) /* an up projection rounded as its gate shares the gate's x (none: no base) */
            if (gu[i].N && (!(i & 1) || !gu[i - 1].N || !same_rounding(&gu[i - 1], &gu[i])))
                q8_prepare_x(&gu[i], xin[i / 2], H, wide, xs[i]);
#pragma omp single
        for (int u = 0; u < U; u++)
            if (gu[2 * u].N && gu[2 * u + 1].N && same_rounding(&gu[2 * u], &gu[2 * u + 1]))
                gu[2 * u + 1].xq = gu[2 * u].xq, gu[2 * u + 1].d = gu[2 * u].d, gu[2 * u + 1].sxq = gu[2 * u].sxq;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks_gu; c++) q8_chunk_run(gu, 2 * U, first_gu, step_gu, c, wide, instructions);
        if (parts_gu) eb_lowrank_run(part, parts_gu, wide, instructions, lr_team);
#pragma omp for schedule(static)
        for (int u = 0; u < U; u++) {
            float *gate = gu[2 * u].y;
            const float *up = gu[2 * u + 1].y;
            for (int64_t j = 0; j < rows[u] * hidden[u]; j++) gate[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
            if (dn[u].N) q8_prepare_x(&dn[u], gate, hidden[u], wide, hs[u]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks_dn; c++) q8_chunk_run(dn, U, first_dn, step_dn, c, wide, instructions);
        if (parts_dn) eb_lowrank_run(part + parts_gu, parts_dn, wide, instructions, lr_team);
#pragma omp for schedule(static)
        for (int64_t br = 0; br < B * H; br++) {
            const int64_t b = br / H, r = br % H;
            float acc = 0.0f;
            for (int e = 0; e < E; e++) {
                const int s = (int)b * E + e;
                acc += weights[s] * dn[slot_u[s]].y[slot_at[s] * H + r];
            }
            y[br] = acc;
        }
    }
    free(lowrank);
    free(scratch);
    free(meta);
    return 0;
}

int prism_expert_block(const int64_t *hdr, const int64_t *const *ops, const float *weights) {
    const int64_t rows[6] = {hdr[0], hdr[1], 1, hdr[2], hdr[3], hdr[4]};
    return prism_expert_rows(rows, ops, weights);
}
