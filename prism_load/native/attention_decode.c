/* One decode token's attention for one sequence, in one call: the fused q/k/v projection on the integer
 * tiles, rotary phases on q and k (half-split layout), k and v appended to the KV cache, scaled dot-product
 * attention of every query head over the cached keys of its kv head (grouped-query), and the output
 * projection. All in fp32, as the model computes on a CPU.
 *
 * Why: in torch this is about 25 small ops a layer (splits, views, transposes, the rotary's five, the cache's
 * slice copies, SDPA, reshapes) plus two kernel calls, each op a few microseconds of dispatch; on a
 * Mixtral-shaped model of hidden 1024 they cost more than the projections themselves move in weights.
 *
 * Numerics: the projections are the q8 kernels' (the same bits as their single calls); the rotary is
 * x * cos + rotate_half(x) * sin with the same fp32 roundings as torch's three ops; the attention is a
 * plain max-subtracted softmax in fp32 (torch's SDPA blocks it differently: equal to fp32 rounding).
 *
 * Arguments: a = {x, qkv op args, o op args, out, cos, sin, k cache, v cache, capacity, n, heads, kv heads,
 * head dim, scaling (float bits), threads, wide, qkv bias, o bias, window}: x fp32 [hidden]; the op args as
 * prism_int_linear_packed takes them (only the weight fields are read); out fp32 [hidden]; cos and sin fp32
 * [head dim]; the caches fp32 [kv heads][capacity][head dim], this token written at slot n and attending to
 * slots 0..n; the biases fp32 [(heads + 2 kv heads) head dim] and [hidden], or 0 for none (added to the
 * products' outputs, as torch adds them: Qwen2-MoE's q, k and v have one); window: a sliding window of that
 * many positions (the token sees slots n - window + 1 .. n, as layers.attention_mask allows), or 0 for none.
 * Returns 0, -1 when out of memory, -2 for arguments it does not take. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q8_linear.h"

static float ad_dot(const float *a, const float *b, int64_t d) { /* d a multiple of 8 */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out <- x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]); each product rounded, then the
 * sum, as torch's x * cos + rotate_half(x) * sin rounds. */
static void ad_rotary(const float *x, const float *cos, const float *sin, int64_t d, float *out) {
    const int64_t half = d / 2;
    for (int64_t j = 0; j < d; j++) {
        const float rot = j < half ? -x[j + half] : x[j - half];
        const float a = x[j] * cos[j], b = rot * sin[j];
        out[j] = a + b;
    }
}

/* The step for B rows (B = 1: prism_attention_decode): x and out [B][hidden], cos and sin [B][head dim], the caches
 * [B][kv heads][capacity][head dim], every row's token at slot n; first[b] (or none): row b's first real slot (its
 * left padding before it is not attended). The projections multiply all rows at once (weights read once); every
 * row's outputs are computed as a call for that row alone computes them. */
static int attention(const int64_t *a, int64_t B, const int64_t *firsts) {
    const float *x = (const float *)(intptr_t)a[0];
    const int64_t *qkv_args = (const int64_t *)(intptr_t)a[1], *o_args = (const int64_t *)(intptr_t)a[2];
    float *out = (float *)(intptr_t)a[3];
    const float *cos = (const float *)(intptr_t)a[4], *sin = (const float *)(intptr_t)a[5];
    float *kc = (float *)(intptr_t)a[6], *vc = (float *)(intptr_t)a[7];
    const int64_t cap = a[8], n = a[9], h = a[10], g = a[11], d = a[12];
    float scaling;
    const uint32_t scaling_bits = (uint32_t)a[13];
    memcpy(&scaling, &scaling_bits, 4);
    int threads = (int)a[14];
    const int wide = (int)a[15];
    const float *qkv_bias = (const float *)(intptr_t)a[16], *o_bias = (const float *)(intptr_t)a[17];
    const int64_t window = a[18], first = window > 0 && n + 1 > window ? n + 1 - window : 0;
    if (h < 1 || g < 1 || h % g || d < 8 || d % 8 || d > 1024 || n < 0 || cap <= n || window < 0 ||
        (wide != 0 && wide != 1) || B < 1)
        return -2;
    if (firsts)
        for (int64_t b = 0; b < B; b++)
            if (firsts[b] < 0 || firsts[b] > n) return -2;
    const int64_t hidden = qkv_args[3], width = (h + 2 * g) * d, keys = n + 1, row_cache = g * cap * d;
    q8_problem pq, po;
    /* scratch: the projection's output, the attention's output, scores per head (x's roundings: xs, below) */
    float *buf = malloc(sizeof(float) * (size_t)(B * (width + h * d + h * keys)));
    if (!buf) return -1;
    float *qkv = buf, *att = qkv + B * width, *scores = att + B * h * d;
    if (q8_make_bound(qkv_args, hidden, width, B, qkv, wide, &pq) ||
        q8_make_bound(o_args, h * d, hidden, B, out, wide, &po)) {
        free(buf);
        return -2;
    }
    uint8_t *xs = malloc(q8_x_bytes(&pq, wide) + q8_x_bytes(&po, wide));
    if (!xs) {
        free(buf);
        return -1;
    }
    int64_t first_q[2], step_q[1], first_o[2], step_o[1];
    const int64_t chunks_q = q8_chunks(&pq, 1, first_q, step_q), chunks_o = q8_chunks(&po, 1, first_o, step_o);
    const int instructions = prism_q8_instructions();
    const int64_t group = h / g;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp single
        q8_prepare_x(&pq, x, hidden, wide, xs);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks_q; c++) q8_chunk_run(&pq, 1, first_q, step_q, c, wide, instructions);
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * (h + 2 * g); bi++) { /* q heads roped in place; k roped into the cache; v copied */
            const int64_t b = bi / (h + 2 * g), i = bi % (h + 2 * g);
            float *src = qkv + b * width + i * d;
            const float *cb = cos + b * d, *sb = sin + b * d;
            if (qkv_bias)
                for (int64_t j = 0; j < d; j++) src[j] += qkv_bias[i * d + j];
            if (i < h) {
                float tmp[1024];
                ad_rotary(src, cb, sb, d, tmp);
                memcpy(src, tmp, sizeof(float) * (size_t)d);
            } else if (i < h + g) {
                ad_rotary(src, cb, sb, d, kc + b * row_cache + ((i - h) * cap + n) * d);
            } else {
                memcpy(vc + b * row_cache + ((i - h - g) * cap + n) * d, src, sizeof(float) * (size_t)d);
            }
        }
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * h; bi++) {
            const int64_t b = bi / h, i = bi % h, from = firsts && firsts[b] > first ? firsts[b] : first;
            const float *q = qkv + b * width + i * d, *kh = kc + b * row_cache + (i / group) * cap * d,
                        *vh = vc + b * row_cache + (i / group) * cap * d;
            float *s = scores + bi * keys, *o = att + bi * d;
            float top = -INFINITY;
            for (int64_t j = from; j < keys; j++) {
                s[j] = ad_dot(q, kh + j * d, d) * scaling;
                top = s[j] > top ? s[j] : top;
            }
            float total = 0.0f;
            for (int64_t j = from; j < keys; j++) total += (s[j] = expf(s[j] - top));
            const float inv = 1.0f / total;
            for (int64_t e = 0; e < d; e += 8) _mm256_storeu_ps(o + e, _mm256_setzero_ps());
            for (int64_t j = from; j < keys; j++) {
                const __m256 p = _mm256_set1_ps(s[j] * inv);
                const float *v = vh + j * d;
                for (int64_t e = 0; e < d; e += 8)
                    _mm256_storeu_ps(o + e, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + e), _mm256_loadu_ps(o + e)));
            }
        }
#pragma omp single
        q8_prepare_x(&po, att, h * d, wide, xs + q8_x_bytes(&pq, wide));
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks_o; c++) q8_chunk_run(&po, 1, first_o, step_o, c, wide, instructions);
        if (o_bias) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < B * hidden; j++) out[j] += o_bias[j % hidden];
        }
    }
    free(xs);
    free(buf);
    return 0;
}

int prism_attention_decode(const int64_t *a) { return attention(a, 1, NULL); }

/* a: prism_attention_decode's 19 arguments, then rows B and the address of int64 first[B] (0: none). */
int prism_attention_rows(const int64_t *a) {
    return attention(a, a[19], (const int64_t *)(intptr_t)a[20]);
}
