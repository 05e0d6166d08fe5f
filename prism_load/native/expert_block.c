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
 * Returns 0, -1 when out of memory, -2 for arguments the kernel does not take. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "q8_linear.h"

#define EB_MAX_EXPERTS 64

static int same_rounding(const q8_problem *a, const q8_problem *b) { return a->bits == b->bits && a->g == b->g; }

int prism_expert_block(const int64_t *hdr, const int64_t *const *ops, const float *weights) {
    const float *x = (const float *)(intptr_t)hdr[0];
    float *y = (float *)(intptr_t)hdr[1];
    const int E = (int)hdr[2], wide = (int)hdr[4];
    int threads = (int)hdr[3];
    if (E < 1 || E > EB_MAX_EXPERTS || (wide != 0 && wide != 1)) return -2;
    const int64_t H = ops[0][3];
    int64_t hidden[EB_MAX_EXPERTS]; /* each expert's intermediate width */
    q8_problem gu[2 * EB_MAX_EXPERTS], dn[EB_MAX_EXPERTS];
    size_t bytes = 0;
    for (int e = 0; e < E; e++) {
        const int64_t *g = ops[3 * e], *u = ops[3 * e + 1], *d = ops[3 * e + 2];
        hidden[e] = g[7];
        /* y fields are set below, once the scratch exists */
        if (q8_make_bound(g, H, hidden[e], NULL, wide, &gu[2 * e]) ||
            q8_make_bound(u, H, hidden[e], NULL, wide, &gu[2 * e + 1]) ||
            q8_make_bound(d, hidden[e], H, NULL, wide, &dn[e]))
            return -2;
        bytes += 2 * sizeof(float) * (size_t)hidden[e] + sizeof(float) * (size_t)H;
        bytes += q8_x_bytes(&gu[2 * e], wide) + q8_x_bytes(&gu[2 * e + 1], wide) + q8_x_bytes(&dn[e], wide);
    }
    uint8_t *scratch = malloc(bytes), *at = scratch;
    if (!scratch) return -1;
    uint8_t *xs[2 * EB_MAX_EXPERTS], *hs[EB_MAX_EXPERTS];
    float *outs[EB_MAX_EXPERTS];
    for (int e = 0; e < E; e++) {
        gu[2 * e].y = (float *)at, at += sizeof(float) * (size_t)hidden[e];
        gu[2 * e + 1].y = (float *)at, at += sizeof(float) * (size_t)hidden[e];
        dn[e].y = outs[e] = (float *)at, at += sizeof(float) * (size_t)H;
        xs[2 * e] = at, at += q8_x_bytes(&gu[2 * e], wide);
        xs[2 * e + 1] = at, at += q8_x_bytes(&gu[2 * e + 1], wide);
        hs[e] = at, at += q8_x_bytes(&dn[e], wide);
    }
    int64_t first_gu[2 * EB_MAX_EXPERTS + 1], step_gu[2 * EB_MAX_EXPERTS], first_dn[EB_MAX_EXPERTS + 1],
        step_dn[EB_MAX_EXPERTS];
    const int64_t chunks_gu = q8_chunks(gu, 2 * E, first_gu, step_gu);
    const int64_t chunks_dn = q8_chunks(dn, E, first_dn, step_dn);
    const int instructions = prism_q8_instructions();
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < 2 * E; i++) /* an up projection rounded as its gate shares the gate's x */
            if (!(i & 1) || !same_rounding(&gu[i - 1], &gu[i])) q8_prepare_x(&gu[i], x, H, wide, xs[i]);
#pragma omp single
        for (int e = 0; e < E; e++)
            if (same_rounding(&gu[2 * e], &gu[2 * e + 1]))
                gu[2 * e + 1].xq = gu[2 * e].xq, gu[2 * e + 1].d = gu[2 * e].d, gu[2 * e + 1].sxq = gu[2 * e].sxq;
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks_gu; c++) q8_chunk_run(gu, 2 * E, first_gu, step_gu, c, wide, instructions);
#pragma omp for schedule(static)
        for (int e = 0; e < E; e++) {
            float *gate = gu[2 * e].y;
            const float *up = gu[2 * e + 1].y;
            for (int64_t j = 0; j < hidden[e]; j++) gate[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
            q8_prepare_x(&dn[e], gate, hidden[e], wide, hs[e]);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks_dn; c++) q8_chunk_run(dn, E, first_dn, step_dn, c, wide, instructions);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < H; r++) {
            float acc = 0.0f;
            for (int e = 0; e < E; e++) acc += weights[e] * outs[e][r];
            y[r] = acc;
        }
    }
    free(scratch);
    return 0;
}
