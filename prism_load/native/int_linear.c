/* y[m, n] = sum_k x[m, k] * w[n, k] for group-quantised `int` weights read in their stored form:
 * qweight uint8 [N, ceil(K*bits/8)] (a little-endian bitstream per row), scales and zeros fp16 [N, G],
 * w[n, k] = (q[n, k] - zeros[n, k/g]) * scales[n, k/g]. x fp32 [M, K] (row stride ldx), y fp32 [M, N]
 * (row stride ldy). bits 2, 4 or 8. AVX2 + FMA + F16C; OpenMP over rows of N.
 *
 * Two paths, both with every output element computed by one thread in a fixed order (so the bits do not
 * depend on the thread count):
 * - direct (M <= DIRECT_UPTO_M, decode): codes are widened to fp32 in registers and multiplied into fp32
 *   accumulators per group; a group adds scale * sum(x * q) and, once per row, the zero term
 *   sum_g scale * zero * sum_group(x) is subtracted. A block of 8 bytes is widened once (vpmovzxbd) and
 *   split into 8/bits vectors by masks alone (bit prefixes of each byte; prepare_x gives x the matching
 *   coefficients, once per call). Four rows of N (or up to four rows of x) share each x load and keep eight
 *   accumulator chains busy. The loop is bound by vector instructions (6 per 16 int4 weights and row), not
 *   by memory, so int8 runs as fast per weight as int4 when the weights are in cache.
 * - gemm (larger M, prefill): six rows of W are dequantised into an L1/L2-resident fp32 buffer exactly as
 *   the reference decode does ((q - z) * s), then a 6x16 register tile of y^T = W x^T is accumulated by
 *   broadcasting one weight against 16 columns of a packed x^T (the BLIS micro-kernel shape); both are in
 *   the lane order of decode_codes, so the dequantisation needs no shuffles.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "expert_block.h"

#define INLINE static inline __attribute__((always_inline))
/* Decode reads four rows at once, 8 bytes of each per step: four short streams the hardware prefetcher does
 * not ramp up on, so weights coming from DRAM (an expert just fetched) arrived at 3.4 GB/s. Prefetching the
 * same bytes two tiles ahead (the rows are contiguous) brings cold calls within ~15% of warm ones. Into L2
 * (prefetcht1), not L1: on a Zen 4 the bf16 LM head of bench_decode_profile took 0.31-0.33 ms a token
 * against 0.43-0.53 with prefetcht0, alternating runs; q8_linear.c's tiles gained more the same way. */
#define AHEAD_TILES 2
#define PREFETCH_ROW(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#define UNROLL _Pragma("GCC unroll 16") /* loops over registers: unrolled, so arrays become registers */
#define DIRECT_MAX_M 4 /* x rows per direct tile */
#define DIRECT_UPTO_M 5 /* the direct path up to this many x rows (measured against gemm at 5632x1024) */
#define GEMM_ROWS 6 /* rows of W per gemm tile: 6 x 16 columns of x = 12 accumulators */
#define GROUP_CHUNK 64 /* groups whose scales are widened at once */
#define GEMM_CHUNK_K 1024 /* columns of K per gemm pass (whole groups): 64 x rows of it fill 256 KiB of L2 */
#define GEMM_BLOCK_ROWS 48 /* rows of N per gemm scheduling unit (a multiple of GEMM_ROWS) */
#define SERIAL_MACS 300000 /* below this many multiply-adds one thread beats waking a second */

typedef struct {
    const float *x;
    int64_t ldx, M, K;
    const uint8_t *q;
    int64_t ldq;
    const uint16_t *s, *z;
    int64_t G, g, N;
    float *y;
    int64_t ldy;
} problem;

INLINE float half(uint16_t h) { return _cvtsh_ss(h); }

INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

INLINE float code_at(const uint8_t *row, int64_t k, int bits) {
    int64_t bit = k * bits; /* 2, 4 and 8 bit codes never straddle a byte */
    return (float)((row[bit >> 3] >> (bit & 7)) & ((1u << bits) - 1));
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 8 bytes -> 8/bits vectors: vector i, lane j holds the low (i+1)*bits bits of byte j (the whole byte for the
 * last), as fp32. Prefixes cost a mask each, where separate codes would cost a shift and a mask; prepare_x
 * gives them telescoped coefficients so that the products still sum to x . q. */
INLINE void decode_block(const uint8_t *p, int bits, __m256 *v) {
    __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const int per = 8 / bits;
    UNROLL for (int i = 0; i < per - 1; i++)
        v[i] = _mm256_cvtepi32_ps(_mm256_and_si256(d, _mm256_set1_epi32((1 << (bits * (i + 1))) - 1)));
    v[per - 1] = _mm256_cvtepi32_ps(d);
}

/* 8 consecutive codes (bits bytes) as fp32, in order. */
INLINE __m256 decode8(const uint8_t *p, int bits) {
    if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    uint32_t w = 0;
    memcpy(&w, p, bits); /* 8 codes of `bits` bits fill `bits` bytes */
    const __m256i shift = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32((int)w), shift);
    return _mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32((1 << bits) - 1)));
}

/* A group starts on a byte boundary when its first code does (always, unless g*bits % 8 != 0). */
INLINE int aligned(int64_t k, int bits) { return (k * bits) % 8 == 0; }

/* ---- direct path ------------------------------------------------------------------------------------ */

/* xp <- x rearranged for decode_block within each group's whole 8-byte blocks, and sx[gi] <- the group's sum
 * of x (for the zero term). Byte j of a block holds codes c_i (i < per) of x values x_i = x[per*j + i]; its
 * prefix t_i = sum_{l<=i} c_l 2^(bits*l) gets coefficient x_i / 2^(bits*i) - x_(i+1) / 2^(bits*(i+1)) (the last
 * prefix, the byte, x_last / 2^(bits*last)), so sum_i coefficient_i * t_i = sum_i x_i * c_i: exact in real
 * arithmetic, one rounding per coefficient in fp32 (scaling by a power of two is exact). */
static void prepare_x(const problem *P, int bits, int64_t m, int64_t gi, float *xp, float *sx) {
    const float *x = P->x + m * P->ldx;
    const int per = 8 / bits, block = 8 * per;
    int64_t k0 = gi * P->g, k1 = min64(k0 + P->g, P->K), k = k0;
    if (aligned(k0, bits))
        for (; k + block <= k1; k += block)
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < per; i++) {
                    float c = x[k + per * j + i] / (float)(1 << (bits * i));
                    if (i < per - 1) c -= x[k + per * j + i + 1] / (float)(1 << (bits * (i + 1)));
                    xp[k + 8 * i + j] = c;
                }
    for (; k < k1; k++) xp[k] = x[k];
    float sum = 0.0f;
    for (k = k0; k < k1; k++) sum += x[k];
    sx[gi] = sum;
}

/* sf[j] <- the scales of n groups of one row as fp32, sz[j] <- scale * zero (F16C, eight at a time). */
INLINE void widen_groups(const uint16_t *s, const uint16_t *z, int64_t n, float *sf, float *sz) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j)));
        _mm256_storeu_ps(sf + j, sv);
        _mm256_storeu_ps(sz + j, _mm256_mul_ps(sv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + j)))));
    }
    for (; j < n; j++) sf[j] = half(s[j]), sz[j] = sf[j] * half(z[j]);
}

INLINE float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    float sum = hsum(acc);
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

/* Rows n0..n0+NR-1 of y for x rows m0..m0+MT-1: y = sum_g s_g * sum(x * q) - sum_g s_g * z_g * sum_g(x).
 * NR (<= 4) and MT are constants after inlining, so the fixed-size arrays below become registers (sized by
 * their maxima: C has no constant-size parameters). Scales are widened a chunk of groups at a time. */
INLINE void direct_tile(const problem *P, const float *xp, const float *sx, int64_t n0, int64_t m0, const int NR,
                        const int MT, const int bits) {
    const int per = 8 / bits, block = 8 * per;
    const int64_t K = P->K, G = P->G, g = P->g, ahead = AHEAD_TILES * NR * P->ldq;
    const uint8_t *row[4];
    __m256 tot[4][DIRECT_MAX_M];
    float rest[4][DIRECT_MAX_M];
    UNROLL for (int r = 0; r < NR; r++) {
        row[r] = P->q + (n0 + r) * P->ldq;
        UNROLL for (int m = 0; m < MT; m++) tot[r][m] = _mm256_setzero_ps(), rest[r][m] = 0.0f;
    }
    for (int64_t gb = 0; gb < G; gb += GROUP_CHUNK) {
        const int64_t gn = min64(GROUP_CHUNK, G - gb);
        float sf[4][GROUP_CHUNK], sz[4][GROUP_CHUNK];
        UNROLL for (int r = 0; r < NR; r++) {
            widen_groups(P->s + (n0 + r) * G + gb, P->z + (n0 + r) * G + gb, gn, sf[r], sz[r]);
            UNROLL for (int m = 0; m < MT; m++) rest[r][m] -= dot(sz[r], sx + (m0 + m) * G + gb, gn);
        }
        for (int64_t gi = gb; gi < gb + gn; gi++) {
            const int64_t k0 = gi * g, k1 = min64(k0 + g, K);
            int64_t k = k0;
            __m256 acc[4][DIRECT_MAX_M][2];
            UNROLL for (int r = 0; r < NR; r++)
                UNROLL for (int m = 0; m < MT; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
            if (aligned(k0, bits)) {
                const uint8_t *p[4];
                UNROLL for (int r = 0; r < NR; r++) p[r] = row[r] + (uint64_t)(k0 * bits) / 8;
                for (; k + block <= k1; k += block) {
                    __m256 xv[DIRECT_MAX_M][4];
                    UNROLL for (int m = 0; m < MT; m++)
                        UNROLL for (int i = 0; i < per; i++) xv[m][i] = _mm256_loadu_ps(xp + (m0 + m) * K + k + 8 * i);
                    UNROLL for (int r = 0; r < NR; r++) {
                        __m256 v[4];
                        PREFETCH_ROW(p[r] + ahead);
                        decode_block(p[r], bits, v);
                        p[r] += 8;
                        UNROLL for (int m = 0; m < MT; m++)
                            UNROLL for (int i = 0; i < per; i++)
                                acc[r][m][i & 1] = _mm256_fmadd_ps(v[i], xv[m][i], acc[r][m][i & 1]);
                    }
                }
                for (; k + 8 <= k1; k += 8)
                    UNROLL for (int r = 0; r < NR; r++) {
                        __m256 v = decode8(p[r], bits);
                        p[r] += bits;
                        UNROLL for (int m = 0; m < MT; m++)
                            acc[r][m][0] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp + (m0 + m) * K + k), acc[r][m][0]);
                    }
            }
            if (k < k1) { /* a partial last group, or groups that do not start on a byte */
                float tail[4][DIRECT_MAX_M] = {{0.0f}};
                for (; k < k1; k++)
                    UNROLL for (int r = 0; r < NR; r++)
                        UNROLL for (int m = 0; m < MT; m++) tail[r][m] += code_at(row[r], k, bits) * xp[(m0 + m) * K + k];
                UNROLL for (int r = 0; r < NR; r++)
                    UNROLL for (int m = 0; m < MT; m++) rest[r][m] += sf[r][gi - gb] * tail[r][m];
            }
            UNROLL for (int r = 0; r < NR; r++) {
                __m256 sv = _mm256_broadcast_ss(&sf[r][gi - gb]);
                UNROLL for (int m = 0; m < MT; m++)
                    tot[r][m] = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[r][m][0], acc[r][m][1]), tot[r][m]);
            }
        }
    }
    UNROLL for (int r = 0; r < NR; r++)
        UNROLL for (int m = 0; m < MT; m++) P->y[(m0 + m) * P->ldy + n0 + r] = hsum(tot[r][m]) + rest[r][m];
}

/* Rows [n0, n1) for all x rows: tiles of 4 rows of N (one x row), 2x2, or 1x4 (more x rows). */
INLINE void direct_rows(const problem *P, const float *xp, const float *sx, int64_t n0, int64_t n1, const int bits) {
    const int64_t M = P->M;
    for (int64_t m0 = 0; m0 < M; m0 += DIRECT_MAX_M) {
        int64_t mt = min64(M - m0, DIRECT_MAX_M), n = n0;
        if (mt == 1) {
            for (; n + 4 <= n1; n += 4) direct_tile(P, xp, sx, n, m0, 4, 1, bits);
            for (; n < n1; n++) direct_tile(P, xp, sx, n, m0, 1, 1, bits);
        } else if (mt == 2) {
            for (; n + 2 <= n1; n += 2) direct_tile(P, xp, sx, n, m0, 2, 2, bits);
            for (; n < n1; n++) direct_tile(P, xp, sx, n, m0, 1, 2, bits);
        } else if (mt == 3) {
            for (; n < n1; n++) direct_tile(P, xp, sx, n, m0, 1, 3, bits);
        } else {
            for (; n < n1; n++) direct_tile(P, xp, sx, n, m0, 1, 4, bits);
        }
    }
}

static void direct_rows_any(const problem *P, const float *xp, const float *sx, int64_t n0, int64_t n1, int bits) {
    if (bits == 4) direct_rows(P, xp, sx, n0, n1, 4);
    else if (bits == 8) direct_rows(P, xp, sx, n0, n1, 8);
    else direct_rows(P, xp, sx, n0, n1, 2);
}

/* Rows per scheduling chunk: a multiple of 4 that depends on N only, so every row meets the same tile
 * whatever the thread count (about 32 chunks: two threads on a shared machine balance dynamically, and the
 * last chunk leaves the other thread idle for ~3% of the call at most). */
static int64_t chunk_rows(int64_t N) {
    int64_t rows = (N / 32 + 3) & ~(int64_t)3;
    return rows < 4 ? 4 : rows;
}

/* The work of one thread of the team (or of the caller alone) for `count` products of the same x (1, or 2 for
 * an expert's gate and up, same bits and group size): x prepared once, then every product's row chunks in one
 * loop. The loops are orphaned worksharing constructs, so a one-thread call enters no parallel region. */
static void direct_team(const problem *P, int count, int bits, float *xp, float *sx) {
    const int64_t K = P->K, G = P->G;
    int64_t step[2], first[3] = {0};
    for (int i = 0; i < count; i++) step[i] = chunk_rows(P[i].N), first[i + 1] = first[i] + (P[i].N + step[i] - 1) / step[i];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < P->M * G; t++) prepare_x(P, bits, t / G, t % G, xp + (t / G) * K, sx + (t / G) * G);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < first[count]; c++) {
        const int i = c >= first[1];
        const int64_t n0 = (c - first[i]) * step[i];
        direct_rows_any(&P[i], xp, sx, n0, min64(n0 + step[i], P[i].N), bits);
    }
}

static int run_direct(const problem *P, int count, int bits, int threads) {
    float *xp = malloc(sizeof(float) * (size_t)(P->M * P->K + P->M * P->G));
    if (!xp) return -1;
    float *sx = xp + P->M * P->K;
    if (threads == 1) {
        direct_team(P, count, bits, xp, sx);
    } else {
#pragma omp parallel num_threads(threads)
        direct_team(P, count, bits, xp, sx);
    }
    free(xp);
    return 0;
}

/* ---- gemm path -------------------------------------------------------------------------------------- */

/* 8 bytes -> 8/bits vectors of codes as fp32: vector i, lane j holds code (8/bits)*j + i of the block. */
INLINE void decode_codes(const uint8_t *p, int bits, __m256 *v) {
    __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const int per = 8 / bits;
    UNROLL for (int i = 0; i < per; i++) {
        __m256i c = i ? _mm256_srli_epi32(d, bits * i) : d;
        v[i] = _mm256_cvtepi32_ps(i == per - 1 ? c : _mm256_and_si256(c, mask));
    }
}

/* The column of x that position k of a dequantised row holds: decode_codes' lane order within each group's
 * whole 8-byte blocks, the natural order elsewhere (x^T is packed in the same order). */
static int64_t gemm_source(const problem *P, int bits, int64_t k) {
    const int per = 8 / bits, block = 8 * per;
    int64_t k0 = k / P->g * P->g, k1 = min64(k0 + P->g, P->K), off = k - k0;
    if (!aligned(k0, bits) || off >= (k1 - k0) / block * block) return k;
    int64_t start = k0 + off / block * block, i = (off % block) / 8, j = off % 8;
    return start + per * j + i;
}

/* w[k - k(ga)] <- (q - zero) * scale for groups [ga, gb) of one row in fp32, exactly as the reference decode
 * computes each weight, in gemm_source's order. */
INLINE void dequantize_row(const problem *P, int64_t n, int64_t ga, int64_t gb, float *w, const int bits) {
    const int per = 8 / bits, block = 8 * per;
    const uint8_t *row = P->q + n * P->ldq;
    w -= ga * P->g;
    for (int64_t gi = ga; gi < gb; gi++) {
        int64_t k0 = gi * P->g, k1 = min64(k0 + P->g, P->K), k = k0;
        float s = half(P->s[n * P->G + gi]), z = half(P->z[n * P->G + gi]);
        __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
        if (aligned(k0, bits)) {
            const uint8_t *p = row + (uint64_t)(k0 * bits) / 8;
            for (; k + block <= k1; k += block, p += 8) {
                __m256 v[4];
                decode_codes(p, bits, v);
                UNROLL for (int i = 0; i < per; i++)
                    _mm256_storeu_ps(w + k + 8 * i, _mm256_mul_ps(_mm256_sub_ps(v[i], zv), sv));
            }
            for (; k + 8 <= k1; k += 8, p += bits)
                _mm256_storeu_ps(w + k, _mm256_mul_ps(_mm256_sub_ps(decode8(p, bits), zv), sv));
        }
        for (; k < k1; k++) w[k] = (code_at(row, k, bits) - z) * s;
    }
}

/* acc[m][r] (+)= 8*MV columns of x^T (packed [K][Mp], from column m0) against NR dequantised rows (w, stride
 * ldw) over columns [ka, kb): stored when `first`, added after; acc's rows are lda apart. With one vector of
 * columns, even and odd k accumulate apart, for twice the independent FMA chains. */
INLINE void gemm_tile(const float *w, int64_t ldw, const float *xt, int64_t Mp, int64_t ka, int64_t kb, int first,
                      float *acc, int64_t lda, int64_t m0, const int NR, const int MV) {
    const int64_t kn = kb - ka;
    __m256 c[GEMM_ROWS][2];
    UNROLL for (int r = 0; r < NR; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    const float *b = xt + ka * Mp + m0;
    int64_t k = 0;
    if (MV == 1)
        for (; k + 2 <= kn; k += 2, b += 2 * Mp) {
            __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + Mp);
            UNROLL for (int r = 0; r < NR; r++) {
                c[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * ldw + k), b0, c[r][0]);
                c[r][1] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * ldw + k + 1), b1, c[r][1]);
            }
        }
    for (; k < kn; k++, b += Mp) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = MV > 1 ? _mm256_loadu_ps(b + 8) : b0;
        UNROLL for (int r = 0; r < NR; r++) {
            __m256 a = _mm256_broadcast_ss(w + r * ldw + k);
            c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);
            if (MV > 1) c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);
        }
    }
    if (MV == 1)
        UNROLL for (int r = 0; r < NR; r++) c[r][0] = _mm256_add_ps(c[r][0], c[r][1]);
    float out[8];
    UNROLL for (int r = 0; r < NR; r++)
        UNROLL for (int v = 0; v < MV; v++) {
            _mm256_storeu_ps(out, c[r][v]);
            UNROLL for (int j = 0; j < 8; j++) {
                float *a = acc + (m0 + 8 * v + j) * lda + r;
                *a = first ? out[j] : *a + out[j];
            }
        }
}

/* Rows n0..n0+NR-1, groups [ga, gb): dequantise them, then every tile of x rows into acc (columns from n0). */
INLINE void gemm_rows(const problem *P, float *w, int64_t ldw, const float *xt, int64_t Mp, int64_t ga, int64_t gb,
                      int64_t n0, float *acc, int64_t lda, const int NR, int bits) {
    for (int r = 0; r < NR; r++) {
        if (bits == 4) dequantize_row(P, n0 + r, ga, gb, w + r * ldw, 4);
        else if (bits == 8) dequantize_row(P, n0 + r, ga, gb, w + r * ldw, 8);
        else dequantize_row(P, n0 + r, ga, gb, w + r * ldw, 2);
    }
    const int64_t ka = ga * P->g, kb = min64(gb * P->g, P->K);
    int64_t m0 = 0;
    for (; m0 + 16 <= Mp; m0 += 16) gemm_tile(w, ldw, xt, Mp, ka, kb, ga == 0, acc, lda, m0, NR, 2);
    if (m0 < Mp) gemm_tile(w, ldw, xt, Mp, ka, kb, ga == 0, acc, lda, m0, NR, 1);
}

/* A block of rows [n0, n1) (a multiple of GEMM_ROWS but at the end) walks K in chunks of whole groups, all
 * its tiles per chunk, so the chunk of packed x^T stays in L2 across the block's tiles; the sums gather in
 * acc [Mp][GEMM_BLOCK_ROWS] and go to y once (y's rows are N apart: scattered partial sums would alias in L1).
 * Chunks and blocks depend on the shapes only, so the sums' order is fixed. */
static void gemm_block(const problem *P, float *w, int64_t ldw, const float *xt, int64_t Mp, int64_t gchunk,
                       float *acc, int64_t n0, int64_t n1, int bits) {
    const int64_t lda = GEMM_BLOCK_ROWS;
    for (int64_t ga = 0; ga < P->G; ga += gchunk) {
        int64_t gb = min64(ga + gchunk, P->G);
        for (int64_t n = n0; n < n1; n += GEMM_ROWS) {
            float *a = acc + (n - n0);
            switch (min64(n1 - n, GEMM_ROWS)) {
            case 6: gemm_rows(P, w, ldw, xt, Mp, ga, gb, n, a, lda, 6, bits); break;
            case 5: gemm_rows(P, w, ldw, xt, Mp, ga, gb, n, a, lda, 5, bits); break;
            case 4: gemm_rows(P, w, ldw, xt, Mp, ga, gb, n, a, lda, 4, bits); break;
            case 3: gemm_rows(P, w, ldw, xt, Mp, ga, gb, n, a, lda, 3, bits); break;
            case 2: gemm_rows(P, w, ldw, xt, Mp, ga, gb, n, a, lda, 2, bits); break;
            default: gemm_rows(P, w, ldw, xt, Mp, ga, gb, n, a, lda, 1, bits); break;
            }
        }
    }
    for (int64_t m = 0; m < P->M; m++) memcpy(P->y + m * P->ldy + n0, acc + m * lda, sizeof(float) * (size_t)(n1 - n0));
}

static void gemm_team(const problem *P, int bits, float *xt, int64_t Mp, int *failed) {
    const int64_t M = P->M, K = P->K, N = P->N, g = P->g;
    const int64_t gchunk = g >= GEMM_CHUNK_K ? 1 : GEMM_CHUNK_K / g, ldw = min64(gchunk * g, K);
    const int64_t step = GEMM_BLOCK_ROWS;
#pragma omp for schedule(static)
    for (int64_t k0 = 0; k0 < K; k0 += 16) { /* x^T in 16-column strips: each row of x read a line at a time */
        const int64_t kn = min64(16, K - k0);
        int64_t src[16];
        for (int64_t k = 0; k < kn; k++) src[k] = gemm_source(P, bits, k0 + k);
        for (int64_t m = 0; m < Mp; m++) {
            const float *x = P->x + m * P->ldx;
            for (int64_t k = 0; k < kn; k++) xt[(k0 + k) * Mp + m] = m < M ? x[src[k]] : 0.0f;
        }
    }
    float *w = malloc(sizeof(float) * (size_t)(GEMM_ROWS * ldw + Mp * GEMM_BLOCK_ROWS));
    if (!w) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t n0 = 0; n0 < N; n0 += step)
        if (w) gemm_block(P, w, ldw, xt, Mp, gchunk, w + GEMM_ROWS * ldw, n0, min64(n0 + step, N), bits);
    free(w);
}

static int run_gemm(const problem *P, int bits, int threads) {
    const int64_t Mp = (P->M + 7) & ~(int64_t)7;
    float *xt = malloc(sizeof(float) * (size_t)(P->K * Mp));
    if (!xt) return -1;
    int failed = 0;
    if (threads == 1) {
        gemm_team(P, bits, xt, Mp, &failed);
    } else {
#pragma omp parallel num_threads(threads)
        gemm_team(P, bits, xt, Mp, &failed);
    }
    free(xt);
    return failed ? -1 : 0;
}

/* ---- bf16 matrix-vector product ---------------------------------------------------------------------- */

/* y = x @ w.T (+ bias) for x [M <= GEMV_MAX_M, K] and a bf16 w [N, K]: x, bias and y bf16 (y rounded to bf16
 * as torch rounds, to nearest even), or with io_fp32 all three fp32 (a bf16-weight model that computes in
 * fp32). Why: torch's bf16 product of one row is compute-bound on CPUs without bf16 vector arithmetic and
 * reads bf16 weights no faster than fp32 ones, so a bf16 model lost the bandwidth it saves
 * (bench/results/kernels_*.md); and torch has no product of an fp32 x with a bf16 weight at all. Here a bf16
 * weight becomes fp32 by a 16-bit shift (exact) and meets x in fp32 FMAs: exact products, fp32 sums, as
 * torch's product of the widened weight (in another order). */
#define GEMV_MAX_M 4

INLINE __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

INLINE float bf16_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Rows n0 .. n0+NR-1 of y for x rows m0 .. m0+MT-1 (x already widened to fp32, xf [M][K]). */
INLINE void gemv_tile(const float *xf, int64_t K, const uint16_t *w, int64_t ldw, const void *bias,
                      void *y, int64_t ldy, int io_fp32, int64_t n0, int64_t m0, const int NR, const int MT) {
    __m256 acc[4][GEMV_MAX_M][2];
    const int64_t ahead = AHEAD_TILES * NR * ldw; /* the rows two tiles on, as the direct path prefetches */
    const uint16_t *row[4];
    UNROLL for (int r = 0; r < NR; r++) {
        row[r] = w + (n0 + r) * ldw;
        UNROLL for (int m = 0; m < MT; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 xv[GEMV_MAX_M][2];
        UNROLL for (int m = 0; m < MT; m++)
            UNROLL for (int h = 0; h < 2; h++) xv[m][h] = _mm256_loadu_ps(xf + (m0 + m) * K + k + 8 * h);
        UNROLL for (int r = 0; r < NR; r++) {
            PREFETCH_ROW(row[r] + k + ahead);
            UNROLL for (int h = 0; h < 2; h++) {
                __m256 v = bf16x8(row[r] + k + 8 * h);
                UNROLL for (int m = 0; m < MT; m++) acc[r][m][h] = _mm256_fmadd_ps(v, xv[m][h], acc[r][m][h]);
            }
        }
    }
    UNROLL for (int r = 0; r < NR; r++)
        UNROLL for (int m = 0; m < MT; m++) {
            float v = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
            for (int64_t j = k; j < K; j++) v += bf16_float(row[r][j]) * xf[(m0 + m) * K + j];
            const int64_t at = (m0 + m) * ldy + n0 + r;
            if (io_fp32) {
                if (bias) v += ((const float *)bias)[n0 + r];
                ((float *)y)[at] = v;
            } else {
                if (bias) v += bf16_float(((const uint16_t *)bias)[n0 + r]);
                ((uint16_t *)y)[at] = bf16_round(v);
            }
        }
}

static void gemv_rows(const float *xf, int64_t M, int64_t K, const uint16_t *w, int64_t ldw, const void *bias,
                      void *y, int64_t ldy, int io_fp32, int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += GEMV_MAX_M) {
        int64_t mt = min64(M - m0, GEMV_MAX_M), n = n0;
        if (mt == 1) {
            for (; n + 4 <= n1; n += 4) gemv_tile(xf, K, w, ldw, bias, y, ldy, io_fp32, n, m0, 4, 1);
            for (; n < n1; n++) gemv_tile(xf, K, w, ldw, bias, y, ldy, io_fp32, n, m0, 1, 1);
        } else if (mt == 2) {
            for (; n + 2 <= n1; n += 2) gemv_tile(xf, K, w, ldw, bias, y, ldy, io_fp32, n, m0, 2, 2);
            for (; n < n1; n++) gemv_tile(xf, K, w, ldw, bias, y, ldy, io_fp32, n, m0, 1, 2);
        } else if (mt == 3) {
            for (; n < n1; n++) gemv_tile(xf, K, w, ldw, bias, y, ldy, io_fp32, n, m0, 1, 3);
        } else {
            for (; n < n1; n++) gemv_tile(xf, K, w, ldw, bias, y, ldy, io_fp32, n, m0, 1, 4);
        }
    }
}

/* Returns 0, -1 when out of memory, -2 for arguments the kernel does not take. */
int prism_bf16_gemv(const void *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *w, int64_t ldw, int64_t N,
                    const void *bias, void *y, int64_t ldy, int threads, int io_fp32) {
    if (M < 1 || M > GEMV_MAX_M || K < 1 || N < 1 || ldx < K || ldw < K || ldy < N) return -2;
    float *xf = malloc(sizeof(float) * (size_t)(M * K));
    if (!xf) return -1;
    for (int64_t m = 0; m < M; m++) {
        if (io_fp32) memcpy(xf + m * K, (const float *)x + m * ldx, sizeof(float) * (size_t)K);
        else for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_float(((const uint16_t *)x)[m * ldx + k]);
    }
    const int64_t step = chunk_rows(N);
    if (threads < 1 || (double)N * K * M < SERIAL_MACS) threads = 1;
    if (threads == 1) {
        gemv_rows(xf, M, K, w, ldw, bias, y, ldy, io_fp32, 0, N);
    } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t n0 = 0; n0 < N; n0 += step)
            gemv_rows(xf, M, K, w, ldw, bias, y, ldy, io_fp32, n0, min64(n0 + step, N));
    }
    free(xf);
    return 0;
}

/* ---- entry point ------------------------------------------------------------------------------------ */

/* P <- the problem of these arguments; -2 for arguments the kernel does not take. */
static int make_problem(const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *qweight,
                        const uint16_t *scales, const uint16_t *zeros, int64_t N, int bits, int64_t group_size,
                        float *y, int64_t ldy, problem *P) {
    if ((bits != 2 && bits != 4 && bits != 8) || M < 1 || K < 1 || N < 1 || group_size < 1 || ldx < K || ldy < N)
        return -2;
    problem Q = {x, ldx, M, K, qweight, (K * bits + 7) / 8, scales, zeros, (K + group_size - 1) / group_size,
                 group_size, N, y, ldy};
    *P = Q;
    return 0;
}

/* For expert_block.c's low-rank factors (expert_block.h): the direct path inside the caller's parallel region. */
int64_t prism_int_linear_team_floats(const int64_t *w, int64_t M) {
    return M * w[3] + M * ((w[3] + w[9] - 1) / w[9]);
}

void prism_int_linear_team(const int64_t *w, const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy,
                           float *scratch) {
    problem P;
    if (make_problem(x, ldx, M, w[3], (const uint8_t *)(intptr_t)w[4], (const uint16_t *)(intptr_t)w[5],
                     (const uint16_t *)(intptr_t)w[6], w[7], (int)w[8], w[9], y, ldy, &P))
        return; /* the caller checked the fields (eb_check_lowrank) */
    direct_team(&P, 1, (int)w[8], scratch, scratch + M * w[3]);
}

/* Returns 0, -1 when out of memory, -2 for arguments the kernel does not take (the caller checks first). */
int prism_int_linear(const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *qweight,
                     const uint16_t *scales, const uint16_t *zeros, int64_t N, int bits, int64_t group_size,
                     float *y, int64_t ldy, int threads) {
    problem P;
    if (make_problem(x, ldx, M, K, qweight, scales, zeros, N, bits, group_size, y, ldy, &P)) return -2;
    if (threads < 1 || (double)M * N * K < SERIAL_MACS) threads = 1;
    return M <= DIRECT_UPTO_M ? run_direct(&P, 1, bits, threads) : run_gemm(&P, bits, threads);
}

/* The same call with its arguments in one array (in the order above; pointers as integers): one ctypes
 * argument to convert instead of thirteen, which is most of the cost of a small call from Python. */
int prism_int_linear_packed(const int64_t *a) {
    return prism_int_linear((const float *)(intptr_t)a[0], a[1], a[2], a[3], (const uint8_t *)(intptr_t)a[4],
                            (const uint16_t *)(intptr_t)a[5], (const uint16_t *)(intptr_t)a[6], a[7], (int)a[8],
                            a[9], (float *)(intptr_t)a[10], a[11], (int)a[12]);
}

int prism_bf16_gemv_packed(const int64_t *a) {
    return prism_bf16_gemv((const void *)(intptr_t)a[0], a[1], a[2], a[3], (const uint16_t *)(intptr_t)a[4], a[5],
                           a[6], (const void *)(intptr_t)a[7], (void *)(intptr_t)a[8], a[9], (int)a[10], (int)a[11]);
}

/* Two products of the same x (an expert's gate and up projections) in one call: with the same shape of x and
 * the same bits and group size, x is prepared once and both weights' row chunks share one parallel loop (one
 * fork and join instead of two); every output row is computed exactly as prism_int_linear computes it.
 * Otherwise (or for gemm-sized x) the two products run one after the other. Returns as prism_int_linear. */
int prism_int_linear_pair_packed(const int64_t *a, const int64_t *b) {
    const int same = a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[8] == b[8] && a[9] == b[9];
    if (!same || a[2] > DIRECT_UPTO_M) {
        int rc = prism_int_linear_packed(a);
        return rc ? rc : prism_int_linear_packed(b);
    }
    problem P[2];
    for (int i = 0; i < 2; i++) {
        const int64_t *v = i ? b : a;
        if (make_problem((const float *)(intptr_t)v[0], v[1], v[2], v[3], (const uint8_t *)(intptr_t)v[4],
                         (const uint16_t *)(intptr_t)v[5], (const uint16_t *)(intptr_t)v[6], v[7], (int)v[8], v[9],
                         (float *)(intptr_t)v[10], v[11], &P[i]))
            return -2;
    }
    int threads = (int)a[12];
    if (threads < 1 || (double)P[0].M * (P[0].N + P[1].N) * P[0].K < SERIAL_MACS) threads = 1;
    return run_direct(P, 2, (int)a[8], threads);
}

/* ---- widening stored codes to the kernel's widths ----------------------------------------------------- */

/* dst [rows, ceil(cols*to/8)] <- the codes of src [rows, ceil(cols*from/8)] (little-endian bitstreams per row,
 * code k at bits k*from .. k*from+from-1), rewritten `to` bits wide: 3 -> 4 and 5 or 6 -> 8 (the widths the
 * matmul kernels read; the values are unchanged). Why: a 3-, 5- or 6-bit expert is widened every time it is
 * loaded into the fast tier, and torch's bit arithmetic took ~0.5 ms per tensor of a small model's expert,
 * most of a cache miss. Eight codes fill `from` bytes and `to` bytes exactly: one BMI2 pdep scatters them
 * (where the CPU has BMI2; shifts and masks otherwise). Returns 0, or -2 for widths it does not take. */
#define WIDEN_FIELDS(x, from, to, out)                                                     \
    do {                                                                                   \
        out = 0;                                                                           \
        for (int f_ = 0; f_ < 8; f_++) out |= ((x >> (from * f_)) & ((1ull << from) - 1)) << (to * f_); \
    } while (0)

/* FROM and TO are constants after inlining (the callers below), so the 3-6 byte copies are moves, not calls. */
#define WIDEN_ROWS(NAME, ATTR, SCATTER)                                                                         \
    ATTR INLINE void NAME(const uint8_t *src, int64_t lds, uint8_t *dst, int64_t ldd, int64_t rows,            \
                          int64_t cols, const int FROM, const int TO) {                                         \
        const uint64_t mask = widen_mask(FROM, TO);                                                              \
        const int64_t whole = cols / 8;                                                                          \
        const uint8_t *end = src + (rows - 1) * lds + (cols * FROM + 7) / 8; /* the last byte read, + 1 */       \
        for (int64_t r = 0; r < rows; r++) {                                                                     \
            const uint8_t *s = src + r * lds;                                                                    \
            uint8_t *d = dst + r * ldd;                                                                          \
            for (int64_t w = 0; w < whole; w++) {                                                                \
                /* one 8-byte load (the bits past FROM bytes are ignored) where it stays inside the buffer: */  \
                /* FROM-byte copies went through the stack and stalled on store forwarding */                    \
                const uint8_t *p = s + w * FROM;                                                                 \
                uint64_t x = 0, out;                                                                             \
                if (p + 8 <= end) memcpy(&x, p, 8);                                                              \
                else for (int b = 0; b < FROM; b++) x |= (uint64_t)p[b] << (8 * b);                              \
                SCATTER;                                                                                         \
                memcpy(d + w * TO, &out, TO);                                                                    \
            }                                                                                                    \
        }                                                                                                        \
    }

INLINE uint64_t widen_mask(int from, int to) {
    uint64_t mask = 0;
    for (int f = 0; f < 8; f++) mask |= ((1ull << from) - 1) << (to * f);
    return mask;
}

WIDEN_ROWS(widen_rows_pdep, __attribute__((target("bmi2"))), out = _pdep_u64(x, mask))
WIDEN_ROWS(widen_rows_shift, , (void)mask; WIDEN_FIELDS(x, FROM, TO, out))

__attribute__((target("bmi2"))) static void widen_pdep(const uint8_t *src, int64_t lds, uint8_t *dst, int64_t ldd,
                                                      int64_t rows, int64_t cols, int from) {
    if (from == 3) widen_rows_pdep(src, lds, dst, ldd, rows, cols, 3, 4);
    else if (from == 5) widen_rows_pdep(src, lds, dst, ldd, rows, cols, 5, 8);
    else widen_rows_pdep(src, lds, dst, ldd, rows, cols, 6, 8);
}

static void widen_shift(const uint8_t *src, int64_t lds, uint8_t *dst, int64_t ldd, int64_t rows, int64_t cols,
                        int from) {
    if (from == 3) widen_rows_shift(src, lds, dst, ldd, rows, cols, 3, 4);
    else if (from == 5) widen_rows_shift(src, lds, dst, ldd, rows, cols, 5, 8);
    else widen_rows_shift(src, lds, dst, ldd, rows, cols, 6, 8);
}

int prism_widen_codes(const uint8_t *src, int64_t lds, uint8_t *dst, int64_t ldd, int64_t rows, int64_t cols,
                      int from, int to) {
    if (!((from == 3 && to == 4) || ((from == 5 || from == 6) && to == 8)) || rows < 0 || cols < 0 ||
        lds < (cols * from + 7) / 8 || ldd < (cols * to + 7) / 8)
        return -2;
    __builtin_cpu_init();
    /* pdep is microcoded (slow) on AMD before Zen 3; shifts are never slower than that */
    const int fast_pdep = __builtin_cpu_supports("bmi2") && !__builtin_cpu_is("amd");
    if (fast_pdep) widen_pdep(src, lds, dst, ldd, rows, cols, from);
    else widen_shift(src, lds, dst, ldd, rows, cols, from);
    const int64_t tail0 = cols / 8 * 8; /* the last cols % 8 codes, one at a time */
    for (int64_t r = 0; r < rows && tail0 < cols; r++) {
        const uint8_t *s = src + r * lds;
        uint8_t *d = dst + r * ldd;
        memset(d + tail0 * to / 8, 0, (size_t)(ldd - tail0 * to / 8));
        for (int64_t k = tail0; k < cols; k++) {
            int64_t bit = k * from;
            unsigned v = (unsigned)(s[bit >> 3] | (bit / 8 + 1 < lds ? s[(bit >> 3) + 1] << 8 : 0));
            v = (v >> (bit & 7)) & ((1u << from) - 1);
            int64_t out = k * to;
            d[out >> 3] |= (uint8_t)(v << (out & 7));
        }
    }
    return 0;
}
