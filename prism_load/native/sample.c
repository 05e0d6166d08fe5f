/* The next token of one row of logits on a CPU: greedy (argmax), or a draw from the top-k distribution (with
 * temperature and, optionally, top-p), as prism_load/sampling.py defines them.
 *
 * Why: sampling.py's numpy path is a dozen numpy and torch calls a token. Called once between two decode steps,
 * after the layers have streamed their weights through the caches, each of those calls runs cold and costs
 * several times its warm price (bench/results/runtime_glue_*: with the rest of that change, the reference model's
 * resident token 1.3-1.4x faster). This is one call over the row.
 *
 * prism_sample_argmax(x, n): the index of the largest of x[0..n-1], the first among equals; a NaN counts as the
 * largest (the first NaN), as numpy's and torch's argmax.
 *
 * prism_sample_top_k(x, n, k, temperature, top_p, u): the distribution of sampling.distribution for top_k = k < n:
 * the k largest logits and every logit equal to the k-th, p_i = exp(x_i / T - max_j x_j / T) in float64 over
 * them; with 0 < top_p < 1 the nucleus of those: most likely first (equals: the later token first), a token is
 * kept while the mass before it is below top_p, the most likely always. The token is the inverse CDF of u in
 * [0, 1) over the kept tokens in that order (token order without top_p): the first i whose running sum exceeds
 * u times the total. Returns the token, -1 where the row has no distribution (a NaN, or no finite largest logit
 * after scaling), -2 for arguments it does not take, -3 out of memory. The float64 sums run in index order, so
 * the probabilities equal numpy's to rounding (numpy sums pairwise), and a draw differs from the numpy path's
 * only where u falls within that rounding of a boundary between two tokens.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

int64_t prism_sample_argmax(const float *x, int64_t n) {
    if (!x || n < 1) return -2;
    /* pass 1: the largest value and whether any NaN, four vectors at a time (vmaxps drops a NaN in its first
     * operand, so NaN is looked for apart) */
    __m256 m[4], nan[4];
    for (int j = 0; j < 4; j++) m[j] = _mm256_set1_ps(-INFINITY), nan[j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 4; j++) {
            const __m256 v = _mm256_loadu_ps(x + i + 8 * j);
            nan[j] = _mm256_or_ps(nan[j], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            m[j] = _mm256_max_ps(v, m[j]);
        }
    const __m256 mv = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
    const __m256 nv = _mm256_or_ps(_mm256_or_ps(nan[0], nan[1]), _mm256_or_ps(nan[2], nan[3]));
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, mv);
    for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
    int any_nan = _mm256_movemask_ps(nv) != 0;
    for (; i < n; i++) {
        if (x[i] != x[i]) any_nan = 1;
        else if (x[i] > top) top = x[i];
    }
    /* pass 2: the first index holding it (or the first NaN, as numpy and torch) */
    const __m256 t = _mm256_set1_ps(top);
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const int hit = _mm256_movemask_ps(any_nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, t, _CMP_EQ_OQ));
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
    for (; i < n; i++)
        if (any_nan ? x[i] != x[i] : x[i] == top) return i;
    return 0; /* every value -inf: the first */
}

/* A min-heap of the k largest values seen (values only: the k-th largest counts duplicates). */
static void heap_down(float *h, int64_t k, int64_t at) {
    const float v = h[at];
    for (;;) {
        int64_t c = 2 * at + 1;
        if (c >= k) break;
        if (c + 1 < k && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[at] = h[c];
        at = c;
    }
    h[at] = v;
}

/* The k-th largest of x (no NaN in x), k <= n. */
static int kth_largest(const float *x, int64_t n, int64_t k, float *out) {
    float *h = malloc(sizeof(float) * (size_t)k);
    if (!h) return -3;
    for (int64_t i = 0; i < k; i++) h[i] = x[i];
    for (int64_t i = k / 2 - 1; i >= 0; i--) heap_down(h, k, i);
    int64_t i = k;
    /* a block of 8 is looked at only where one of its values beats the heap's smallest */
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(h[0]), _CMP_GT_OQ));
        while (hit) {
            const int j = __builtin_ctz((unsigned)hit);
            hit &= hit - 1;
            if (x[i + j] > h[0]) {
                h[0] = x[i + j];
                heap_down(h, k, 0);
            }
        }
    }
    for (; i < n; i++)
        if (x[i] > h[0]) {
            h[0] = x[i];
            heap_down(h, k, 0);
        }
    *out = h[0];
    free(h);
    return 0;
}

typedef struct {
    double p;
    int64_t id;
} candidate;

/* most likely first; equals: the later token first (sampling._nucleus) */
static int by_probability(const void *a, const void *b) {
    const candidate *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id > y->id ? -1 : x->id < y->id;
}

/* Whether x holds a NaN. */
static int has_nan(const float *x, int64_t n) {
    __m256 nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    int any = _mm256_movemask_ps(nan) != 0;
    for (; i < n; i++) any |= x[i] != x[i];
    return any;
}

/* The tokens i of x with x[i] >= t, in order, into out[].id (NULL: counted only); returns their count. */
static int64_t at_least(const float *x, int64_t n, float t, candidate *out) {
    const __m256 tv = _mm256_set1_ps(t);
    int64_t count = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), tv, _CMP_GE_OQ));
        if (!out) {
            count += __builtin_popcount((unsigned)hit);
            continue;
        }
        while (hit) {
            out[count++].id = i + __builtin_ctz((unsigned)hit);
            hit &= hit - 1;
        }
    }
    for (; i < n; i++)
        if (x[i] >= t) {
            if (out) out[count].id = i;
            count++;
        }
    return count;
}

int64_t prism_sample_top_k(const float *x, int64_t n, int64_t k, double temperature, double top_p, double u) {
    if (!x || n < 1 || k < 1 || k >= n || !(temperature > 0) || !(u >= 0 && u < 1)) return -2;
    if (has_nan(x, n)) return -1; /* no distribution (sampling.py says so on every path) */
    float kth;
    if (kth_largest(x, n, k, &kth)) return -3;
    candidate *c = malloc(sizeof(candidate) * (size_t)at_least(x, n, kth, NULL));
    if (!c) return -3;
    int64_t m = at_least(x, n, kth, c);
    double top = -INFINITY;
    for (int64_t i = 0; i < m; i++) {
        c[i].p = (double)x[c[i].id] / temperature;
        if (c[i].p > top) top = c[i].p;
    }
    if (!isfinite(top)) { /* all -inf, or +inf */
        free(c);
        return -1;
    }
    double total = 0;
    for (int64_t i = 0; i < m; i++) {
        c[i].p = exp(c[i].p - top);
        total += c[i].p;
    }
    for (int64_t i = 0; i < m; i++) c[i].p /= total;
    if (top_p > 0 && top_p < 1) { /* the nucleus, as sampling._nucleus: kept where the mass before is below top_p */
        qsort(c, (size_t)m, sizeof(candidate), by_probability);
        double running = 0;
        int64_t kept = 0;
        for (int64_t i = 0; i < m; i++) {
            running += c[i].p;
            if (running - c[i].p < top_p) c[kept++] = c[i];
        }
        m = kept ? kept : 1; /* none: the most likely (still c[0]: a kept one is written at or before its place) */
    }
    total = 0;
    for (int64_t i = 0; i < m; i++) total += c[i].p;
    const double target = u * total;
    double running = 0;
    int64_t chosen = -1;
    for (int64_t i = 0; i < m; i++) {
        running += c[i].p;
        if (running > target) {
            chosen = c[i].id;
            break;
        }
    }
    for (int64_t i = m - 1; chosen < 0 && i >= 0; i--) /* rounding left u past the sum: the last token with any */
        if (c[i].p > 0) chosen = c[i].id;
    free(c);
    return chosen;
}
