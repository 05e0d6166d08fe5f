/* A softmax top-k router for one row, in fp32 as transformers computes it: logits = W x, p = softmax(logits),
 * the k largest p (their experts in descending order of p, the lower index first among equals), renormalised
 * to sum 1 where the family asks (Mixtral always; Qwen-MoE and OLMoE by norm_topk_prob).
 *
 * Why: in torch this is a matmul, a softmax, a top-k, a sum and a division, about 10 microseconds of dispatch
 * per MoE layer and decode token for a few thousand multiply-adds; this is one call of about 1. The logits'
 * sums are ordered unlike torch's matmul (equal to fp32 rounding).
 *
 * Arguments: a = {x, W, experts E, hidden H, k, renormalise, logits out, indices out, weights out}: x fp32 [H],
 * W fp32 [E][H] contiguous, logits fp32 [E], indices int64 [k], weights fp32 [k].
 * Returns 0, -2 for arguments it does not take. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define RT_MAX_EXPERTS 4096

int prism_router_topk(const int64_t *a) {
    const float *x = (const float *)(intptr_t)a[0], *w = (const float *)(intptr_t)a[1];
    const int64_t E = a[2], H = a[3], k = a[4], renorm = a[5];
    float *logits = (float *)(intptr_t)a[6], *weights = (float *)(intptr_t)a[8];
    int64_t *indices = (int64_t *)(intptr_t)a[7];
    if (E < 1 || E > RT_MAX_EXPERTS || H < 1 || k < 1 || k > E) return -2;
    float top = -INFINITY;
    for (int64_t e = 0; e < E; e++) {
        const float *row = w + e * H;
        __m256 acc = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= H; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(x + j), acc);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        float v = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        for (; j < H; j++) v += row[j] * x[j];
        logits[e] = v;
        top = v > top ? v : top;
    }
    float p[RT_MAX_EXPERTS], total = 0.0f;
    for (int64_t e = 0; e < E; e++) total += (p[e] = expf(logits[e] - top));
    for (int64_t e = 0; e < E; e++) p[e] = p[e] / total;
    float chosen = 0.0f;
    for (int64_t i = 0; i < k; i++) { /* k is small: repeated selection, the lower index first among equals */
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
        indices[i] = best;
        weights[i] = p[best];
        chosen += p[best];
        p[best] = -1.0f;
    }
    if (renorm)
        for (int64_t i = 0; i < k; i++) weights[i] = weights[i] / chosen;
    return 0;
}
