/* y[m, n] ~= sum_k x[m, k] * w[n, k] with x rounded to int8 per weight group and the products summed in
 * integers (unsigned codes x signed int8): the `native-int8` kernel of prism_load/packed.py, decode and prefill
 * alike. The integer dot product is VNNI's vpdpbusd (four products per int32 lane) where the CPU has AVX-VNNI
 * or AVX512-VNNI, else AVX2's vpmaddubsw + vpmaddwd (prism_q8_instructions says which); the sums are equal.
 *
 * Why: int_linear.c computes exactly (every code widened to fp32, one FMA per code) and is bound by those
 * vector instructions, not by memory; llama.cpp's CPU kernels round activations to int8 the same way
 * (Q8_K / Q8_0) and multiply in integers, four to eight times the work per instruction. The price is
 * the rounding of x: this kernel is not exact, bench/results/packed.md measures what it costs the logits.
 *
 * Weights as in int_linear.c: qweight uint8 [N, K*bits/8], scales and zeros fp16 [N, G], w = (q - z) * s.
 * Per group g of one row of x: d = max|x| / 127, x8 = round(x / d) (ties to even), and
 *   sum_k x_k w_k ~= s * d * (sum_k x8_k q_k - z * sum_k x8_k)
 * (the zero term uses the rounded x too, so the error is that of x8 against the weights (q - z) * s, which
 * are centred, rather than against the codes). Integer sums are exact (|x8 q| <= 127 * 255, g <= 2^14).
 * Shapes: groups of whole 32-byte blocks (g * bits % 256 == 0), K whole blocks too (a last group shorter than g
 * is a group of its own, with its own scale, as the container stores it); any number of rows (tiles
 * of up to Q8_MAX_M rows of x share each weight load; prefill with more rows is still faster than the exact
 * gemm path, both being bound by instructions). The caller checks (native.q8_takes). Every output is computed by one thread in a fixed order.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q8_linear.h"

#define INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")
#define Q8_MAX_M 4
#define Q8_AHEAD_TILES 2 /* the rows two tiles on are prefetched into L2 (as in int_linear.c: rows are contiguous) */
#define Q8_GROUP_CHUNK 64 /* groups whose scale terms are prepared at once */
#define Q8_SERIAL_BYTES 65536 /* below this many weight bytes one thread beats waking a second */


INLINE float q8_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* x rounded per group and laid out for the tiles. A weight block is `lanes` bytes of one row (32 for int8 x, 16
 * for int16 x, whose codes are widened to 16-bit lanes) and holds lanes * 8 / bits codes; plane p is the vector
 * of bits p*bits .. p*bits+bits-1 of every byte (8-bit codes: one plane, the bytes), so lane j of plane p is
 * code (8 / bits) * j + p. d = max|x| / top per group (top 127 or 32767), x = round(x / d) (ties to even). */
static void quantize_x(const q8_problem *P, const float *x, int64_t ldx, int wide, uint8_t *xq, float *d,
                       int32_t *sxq) {
    const int lanes = wide ? 16 * (int)P->vec : 32;
    const float top = wide ? 32767.0f : 127.0f;
    const int64_t per = 8 / P->bits, blocks = P->K * P->bits / (8 * lanes), G = P->G, g = P->g, K = P->K;
    int32_t *nat = sxq + P->M * G; /* scratch after sxq: K codes in natural order */
    for (int64_t m = 0; m < P->M; m++) {
        const float *xr = x + m * ldx;
        for (int64_t gi = 0; gi < G; gi++) {
            const float *xg = xr + gi * g;
            int32_t *codes = nat + gi * g;
            const int64_t len = q8_min(g, K - gi * g); /* the last group may be partial (whole blocks) */
            __m256 vmax = _mm256_setzero_ps();
            const __m256 sign = _mm256_set1_ps(-0.0f);
            int64_t k = 0;
            for (; k + 8 <= len; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + k)));
            float buf[8], amax = 0.0f;
            _mm256_storeu_ps(buf, vmax);
            for (int i = 0; i < 8; i++) amax = fmaxf(amax, buf[i]);
            for (; k < len; k++) amax = fmaxf(amax, fabsf(xg[k]));
            const float step = amax / top;
            d[m * G + gi] = step;
            int32_t sum = 0;
            k = 0;
            if (step > 0.0f) {
                const __m256 sv = _mm256_set1_ps(step), lim = _mm256_set1_ps(top), nlim = _mm256_set1_ps(-top);
                for (; k + 8 <= len; k += 8) {
                    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xg + k), sv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    _mm256_storeu_si256((__m256i *)(codes + k), _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(v, lim), nlim)));
                    for (int i = 0; i < 8; i++) sum += codes[k + i];
                }
                for (; k < len; k++) {
                    float v = nearbyintf(xg[k] / step);
                    codes[k] = (int32_t)(v > top ? top : v < -top ? -top : v), sum += codes[k];
                }
            } else {
                memset(codes, 0, sizeof(int32_t) * (size_t)len);
            }
            sxq[m * G + gi] = sum;
        }
        int8_t *dst8 = (int8_t *)(xq + m * K * (wide ? 2 : 1));
        int16_t *dst16 = (int16_t *)dst8;
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t p = 0; p < per; p++)
                for (int64_t j = 0; j < lanes; j++) {
                    const int64_t at = (b * per + p) * lanes + j, code = nat[b * lanes * per + per * j + p];
                    if (wide) dst16[at] = (int16_t)code;
                    else dst8[at] = (int8_t)code;
                }
    }
}

/* For one weight row n and x rows m0.. m0+MT-1, groups gb .. gb+gn-1: sd[m][j] <- s * d (the group's step for
 * the integer sum) and zt[m] += s * z * d * sum(x8) (the zero term, eight groups a vector; F16C). */
INLINE void q8_group_terms(const q8_problem *P, int64_t n, int64_t m0, const int MT, int64_t gb, int64_t gn,
                           float sd[][Q8_GROUP_CHUNK], __m256 *zt) {
    const uint16_t *s = P->s + n * P->G + gb, *z = P->z + n * P->G + gb;
    int64_t j = 0;
    for (; j + 8 <= gn; j += 8) {
        __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + j)));
        __m256 zv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + j)));
        for (int m = 0; m < MT; m++) {
            const int64_t at = (m0 + m) * P->G + gb + j;
            __m256 v = _mm256_mul_ps(sv, _mm256_loadu_ps(P->d + at));
            _mm256_storeu_ps(sd[m] + j, v);
            __m256 sx = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(P->sxq + at)));
            zt[m] = _mm256_fmadd_ps(_mm256_mul_ps(v, zv), sx, zt[m]);
        }
    }
    for (; j < gn; j++) {
        float sj = _cvtsh_ss(s[j]), zj = _cvtsh_ss(z[j]);
        for (int m = 0; m < MT; m++) {
            const int64_t at = (m0 + m) * P->G + gb + j;
            sd[m][j] = sj * P->d[at];
            float term = sd[m][j] * zj * (float)P->sxq[at];
            zt[m] = _mm256_add_ps(zt[m], _mm256_setr_ps(term, 0, 0, 0, 0, 0, 0, 0));
        }
    }
}

/* Rows n0 .. n0+NR-1 for x rows m0 .. m0+MT-1. NR, MT, bits and WIDE are constants after inlining. Per group:
 * the integer sums, then one convert and one FMA by s * d; the zero terms are summed apart, a vector at a time.
 * WIDE 0: int8 x against 32-byte weight blocks; 1: int16 x against 16-byte blocks widened to 16-bit lanes
 * (vpmovzxbw), where the top plane needs no mask (the lanes' high bytes are zero) and one prefetch per 64
 * bytes suffices. Either way each plane of a block meets one 32-byte vector of x. */
#define INT_TILE(NAME, DOT, WIDE)                                                                                         \
INLINE void NAME(const q8_problem *P, int64_t n0, int64_t m0, const int NR, const int MT, const int bits) {               \
    const int per = 8 / bits, lanes = WIDE ? 16 : 32;                                                                     \
    const int64_t G = P->G, bpg = P->blocks_per_group, blocks = P->K * bits / (8 * lanes);                                \
    const int64_t ahead = Q8_AHEAD_TILES * NR * P->ldq;                                                                   \
    const __m256i mask = WIDE ? _mm256_set1_epi16((short)((1 << bits) - 1)) : _mm256_set1_epi8((char)((1 << bits) - 1)); \
    const uint8_t *row[4];                                                                                                \
    __m256 tot[4][Q8_MAX_M], zt[4][Q8_MAX_M];                                                                             \
    UNROLL for (int r = 0; r < NR; r++) {                                                                                 \
        row[r] = P->q + (n0 + r) * P->ldq;                                                                                \
        UNROLL for (int m = 0; m < MT; m++) tot[r][m] = zt[r][m] = _mm256_setzero_ps();                                   \
    }                                                                                                                     \
    for (int64_t gb = 0; gb < G; gb += Q8_GROUP_CHUNK) {                                                                  \
        const int64_t gn = q8_min(Q8_GROUP_CHUNK, G - gb);                                                                \
        float sd[4][Q8_MAX_M][Q8_GROUP_CHUNK];                                                                            \
        UNROLL for (int r = 0; r < NR; r++)                                                                               \
            q8_group_terms(P, n0 + r, m0, MT, gb, gn, sd[r], zt[r]);                                                      \
        for (int64_t gi = gb; gi < gb + gn; gi++) {                                                                       \
            __m256i acc[4][Q8_MAX_M];                                                                                     \
            UNROLL for (int r = 0; r < NR; r++) UNROLL for (int m = 0; m < MT; m++) acc[r][m] = _mm256_setzero_si256();   \
            for (int64_t b = gi * bpg, b1 = q8_min((gi + 1) * bpg, blocks); b < b1; b++) {                                \
                UNROLL for (int r = 0; r < NR; r++) {                                                                     \
                    const uint8_t *at = row[r] + lanes * b;                                                               \
                    if (!WIDE || !(b & 3)) _mm_prefetch((const char *)(at + ahead), _MM_HINT_T1);                         \
                    __m256i w = WIDE ? _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)at))                        \
                                     : _mm256_loadu_si256((const __m256i *)at);                                           \
                    UNROLL for (int p = 0; p < per; p++) {                                                                \
                        __m256i u = bits == 8 ? w : WIDE && p == per - 1 ? _mm256_srli_epi16(w, bits * p)                \
                                  : _mm256_and_si256(p ? _mm256_srli_epi16(w, bits * p) : w, mask);                       \
                        UNROLL for (int m = 0; m < MT; m++) {                                                             \
                            __m256i xv = _mm256_loadu_si256(                                                              \
                                (const __m256i *)(P->xq + (((m0 + m) * blocks + b) * per + p) * 32));                     \
                            acc[r][m] = DOT(acc[r][m], u, xv);                                                            \
                        }                                                                                                 \
                    }                                                                                                     \
                }                                                                                                         \
            }                                                                                                             \
            UNROLL for (int r = 0; r < NR; r++) UNROLL for (int m = 0; m < MT; m++)                                       \
                tot[r][m] = _mm256_fmadd_ps(_mm256_broadcast_ss(&sd[r][m][gi - gb]), _mm256_cvtepi32_ps(acc[r][m]),       \
                                            tot[r][m]);                                                                   \
        }                                                                                                                 \
    }                                                                                                                     \
    UNROLL for (int r = 0; r < NR; r++) UNROLL for (int m = 0; m < MT; m++)                                               \
        P->y[(m0 + m) * P->ldy + n0 + r] = q8_hsum(tot[r][m]) - q8_hsum(zt[r][m]);                                        \
}

#define Q8_ROWS(NAME, TILE)                                                                                      \
    INLINE void NAME##_bits(const q8_problem *P, int64_t n0, int64_t n1, const int bits) {                       \
        for (int64_t m0 = 0; m0 < P->M; m0 += Q8_MAX_M) {                                                        \
            int64_t mt = q8_min(P->M - m0, Q8_MAX_M), n = n0;                                                    \
            if (mt == 1) {                                                                                       \
                for (; n + 4 <= n1; n += 4) TILE(P, n, m0, 4, 1, bits);                                          \
                for (; n < n1; n++) TILE(P, n, m0, 1, 1, bits);                                                  \
            } else if (mt == 2) {                                                                                \
                for (; n + 2 <= n1; n += 2) TILE(P, n, m0, 2, 2, bits);                                          \
                for (; n < n1; n++) TILE(P, n, m0, 1, 2, bits);                                                  \
            } else if (mt == 3) {                                                                                \
                for (; n < n1; n++) TILE(P, n, m0, 1, 3, bits);                                                  \
            } else {                                                                                             \
                for (; n < n1; n++) TILE(P, n, m0, 1, 4, bits);                                                  \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    static void NAME(const q8_problem *P, int64_t n0, int64_t n1) {                                              \
        if (P->bits == 4) NAME##_bits(P, n0, n1, 4);                                                             \
        else if (P->bits == 8) NAME##_bits(P, n0, n1, 8);                                                        \
        else NAME##_bits(P, n0, n1, 2);                                                                          \
    }

/* ---- int16 x ---------------------------------------------------------------------------------------------
 * The same scheme with x rounded to int16 per group (d = max|x| / 32767): the rounding error is 1/258 of int8's,
 * far below a bf16 rounding of x, and vpmaddwd (AVX2) / vpdpwssd (VNNI) still multiply 16 codes a
 * instruction where the exact kernel converts and multiplies 8 (int_linear.c). Codes are widened to 16-bit
 * lanes (vpmovzxbw, 16 bytes at a time); integer sums stay exact for groups up to Q16_MAX_GROUP codes
 * (|sum| <= g/16 * 2 * 255 * 32767 < 2^31). */
#define Q16_MAX_GROUP 2048

#define DOT16_AVX2(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(u, s))
INT_TILE(q16_tile_avx2, DOT16_AVX2, 1)
Q8_ROWS(q16_rows_avx2, q16_tile_avx2)

/* AVX2 (no VNNI), as llama.cpp's AVX2 path: vpmaddubsw sums pairs of unsigned x signed bytes into int16 lanes,
 * vpmaddwd pairs of those into int32. A pair stays below 2^15 for codes up to 4 bits (2 * 15 * 127); 8-bit
 * codes are split into nibbles, the high one weighted 16 in the int32 step: every sum stays exact. */
INLINE __m256i dot_avx2_nibbles(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
INLINE __m256i dot_avx2_bytes(__m256i acc, __m256i u, __m256i s) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(u, low), s);
    __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), low), s);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_set1_epi16(1)),
                                                  _mm256_madd_epi16(hi, _mm256_set1_epi16(16))));
}
#define DOT_AVX2(acc, u, s) (bits == 8 ? dot_avx2_bytes(acc, u, s) : dot_avx2_nibbles(acc, u, s))
INT_TILE(q8_tile_avx2, DOT_AVX2, 0)
Q8_ROWS(q8_rows_avx2, q8_tile_avx2)

/* VNNI: one vpdpbusd per 32 products, VEX-encoded (AVX-VNNI: Alder Lake, Sapphire Rapids, Zen 5) or
 * EVEX-encoded on 256-bit vectors (AVX512-VNNI: Cascade Lake, Ice Lake, Zen 4). Same sums, same order. */
#if defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11 /* compilers that know AVX-VNNI */
#define Q8_VNNI_COMPILED 1
#pragma GCC push_options
#pragma GCC target("avxvnni")
#define DOT_AVXVNNI(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
INT_TILE(q8_tile_avxvnni, DOT_AVXVNNI, 0)
Q8_ROWS(q8_rows_avxvnni, q8_tile_avxvnni)
#define DOT16_AVXVNNI(acc, u, s) _mm256_dpwssd_avx_epi32(acc, u, s)
INT_TILE(q16_tile_avxvnni, DOT16_AVXVNNI, 1)
Q8_ROWS(q16_rows_avxvnni, q16_tile_avxvnni)
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512vnni,avx512vl")
#define DOT_AVX512VNNI(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
INT_TILE(q8_tile_avx512vnni, DOT_AVX512VNNI, 0)
Q8_ROWS(q8_rows_avx512vnni, q8_tile_avx512vnni)
#define DOT16_AVX512VNNI(acc, u, s) _mm256_dpwssd_epi32(acc, u, s)
INT_TILE(q16_tile_avx512vnni, DOT16_AVX512VNNI, 1)
Q8_ROWS(q16_rows_avx512vnni, q16_tile_avx512vnni)
#pragma GCC pop_options

/* int16 x in 512-bit vectors (AVX512-VNNI with AVX512BW: Ice Lake, Sapphire Rapids, Zen 4, Zen 5): a block is 32
 * bytes of a row, two of the 256-bit tiles' 16-byte blocks side by side, and x's layout pairs their plane vectors
 * the same way (quantize_x with 32 lanes). One vpdpwssd then does the work of two; before the scaling the two
 * halves of the int32 sums are added (integers: exact), so every lane holds what the 256-bit tile's lane holds
 * and the outputs are the same bits. Used where a group is whole 32-byte blocks (g * bits % 256 == 0, K too). */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
INLINE void q16z_tile(const q8_problem *P, int64_t n0, int64_t m0, const int NR, const int MT, const int bits) {
    const int per = 8 / bits;
    const int64_t G = P->G, bpg = P->blocks_per_group, blocks = P->K * bits / 256;
    const int64_t ahead = Q8_AHEAD_TILES * NR * P->ldq;
    const __m512i mask = _mm512_set1_epi16((short)((1 << bits) - 1));
    const uint8_t *row[4];
    __m256 tot[4][Q8_MAX_M], zt[4][Q8_MAX_M];
    UNROLL for (int r = 0; r < NR; r++) {
        row[r] = P->q + (n0 + r) * P->ldq;
        UNROLL for (int m = 0; m < MT; m++) tot[r][m] = zt[r][m] = _mm256_setzero_ps();
    }
    for (int64_t gb = 0; gb < G; gb += Q8_GROUP_CHUNK) {
        const int64_t gn = q8_min(Q8_GROUP_CHUNK, G - gb);
        float sd[4][Q8_MAX_M][Q8_GROUP_CHUNK];
        UNROLL for (int r = 0; r < NR; r++) q8_group_terms(P, n0 + r, m0, MT, gb, gn, sd[r], zt[r]);
        for (int64_t gi = gb; gi < gb + gn; gi++) {
            __m512i acc[4][Q8_MAX_M];
            UNROLL for (int r = 0; r < NR; r++) UNROLL for (int m = 0; m < MT; m++) acc[r][m] = _mm512_setzero_si512();
            for (int64_t b = gi * bpg, b1 = q8_min((gi + 1) * bpg, blocks); b < b1; b++) {
                UNROLL for (int r = 0; r < NR; r++) {
                    const uint8_t *at = row[r] + 32 * b;
                    if (!(b & 1)) _mm_prefetch((const char *)(at + ahead), _MM_HINT_T1);
                    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)at));
                    UNROLL for (int p = 0; p < per; p++) {
                        const __m512i u = p == per - 1 ? _mm512_srli_epi16(w, bits * p)
                                                       : _mm512_and_si512(p ? _mm512_srli_epi16(w, bits * p) : w, mask);
                        UNROLL for (int m = 0; m < MT; m++) {
                            const __m512i xv = _mm512_loadu_si512(P->xq + (((m0 + m) * blocks + b) * per + p) * 64);
                            acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], u, xv);
                        }
                    }
                }
            }
            UNROLL for (int r = 0; r < NR; r++) UNROLL for (int m = 0; m < MT; m++) {
                const __m256i folded = _mm256_add_epi32(_mm512_castsi512_si256(acc[r][m]),
                                                        _mm512_extracti64x4_epi64(acc[r][m], 1));
                tot[r][m] = _mm256_fmadd_ps(_mm256_broadcast_ss(&sd[r][m][gi - gb]), _mm256_cvtepi32_ps(folded),
                                            tot[r][m]);
            }
        }
    }
    UNROLL for (int r = 0; r < NR; r++) UNROLL for (int m = 0; m < MT; m++)
        P->y[(m0 + m) * P->ldy + n0 + r] = q8_hsum(tot[r][m]) - q8_hsum(zt[r][m]);
}
/* As Q8_ROWS, but two weight rows per tile for 3 and 4 rows of x: 32 vector registers hold the 8 sums, and each
 * load of x then serves two products (prefill; a tile's outputs are computed as with one row, so the same bits). */
INLINE void q16z_rows_bits(const q8_problem *P, int64_t n0, int64_t n1, const int bits) {
    for (int64_t m0 = 0; m0 < P->M; m0 += Q8_MAX_M) {
        int64_t mt = q8_min(P->M - m0, Q8_MAX_M), n = n0;
        if (mt == 1) {
            for (; n + 4 <= n1; n += 4) q16z_tile(P, n, m0, 4, 1, bits);
        } else if (mt == 2) {
            for (; n + 2 <= n1; n += 2) q16z_tile(P, n, m0, 2, 2, bits);
        } else if (mt == 3) {
            for (; n + 2 <= n1; n += 2) q16z_tile(P, n, m0, 2, 3, bits);
        } else {
            for (; n + 2 <= n1; n += 2) q16z_tile(P, n, m0, 2, 4, bits);
        }
        for (; n < n1; n++) q16z_tile(P, n, m0, 1, (int)mt, bits);
    }
}
static void q16z_rows(const q8_problem *P, int64_t n0, int64_t n1) {
    if (P->bits == 4) q16z_rows_bits(P, n0, n1, 4);
    else if (P->bits == 8) q16z_rows_bits(P, n0, n1, 8);
    else q16z_rows_bits(P, n0, n1, 2);
}
#pragma GCC pop_options
#else
#define Q8_VNNI_COMPILED 0
#endif

static int q8_forced; /* 0: what the CPU offers; else prism_q8_force's choice */
static int q8_zmm_off; /* prism_q8_force(1): the 256-bit tiles only */

/* Whether the int16 path may use 512-bit vectors: AVX512-VNNI and AVX512BW here, and no AVX2 forced. */
static int q16_zmm(void) {
#if Q8_VNNI_COMPILED
    static int have = -1;
    if (have < 0) {
        __builtin_cpu_init();
        have = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    }
    return have && !q8_zmm_off;
#else
    return 0;
#endif
}

int prism_q16_zmm(void) { return q16_zmm(); }

/* Which integer dot product this CPU runs: 3 AVX-VNNI, 2 AVX512-VNNI, 1 AVX2 (what the library needs anyway). */
static int q8_detected(void) {
    __builtin_cpu_init();
#if Q8_VNNI_COMPILED
    if (__builtin_cpu_supports("avxvnni")) return 3;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return 2;
#endif
    return 1;
}

int prism_q8_instructions(void) { return q8_forced ? q8_forced : q8_detected(); }

/* Run with the given instructions (1 AVX2, 2 AVX512-VNNI, 3 AVX-VNNI; 0: detect again), for tests that compare
 * them; -3 when this CPU lacks them. Not for concurrent use with running products. */
int prism_q8_force(int instructions) {
    if (instructions < 0 || instructions > 3) return -2;
    const int have = q8_detected();
    if (instructions && !(instructions == 1 || instructions == have)) return -3;
    q8_forced = instructions;
    q8_zmm_off = instructions == 1;
    return 0;
}

static void q16_rows(const q8_problem *P, int64_t n0, int64_t n1, int instructions) {
#if Q8_VNNI_COMPILED
    if (P->vec == 2) q16z_rows(P, n0, n1);
    else if (instructions == 3) q16_rows_avxvnni(P, n0, n1);
    else if (instructions == 2) q16_rows_avx512vnni(P, n0, n1);
    else q16_rows_avx2(P, n0, n1);
#else
    (void)instructions;
    q16_rows_avx2(P, n0, n1);
#endif
}

static void q8_rows(const q8_problem *P, int64_t n0, int64_t n1, int instructions) {
#if Q8_VNNI_COMPILED
    if (instructions == 3) q8_rows_avxvnni(P, n0, n1);
    else if (instructions == 2) q8_rows_avx512vnni(P, n0, n1);
    else q8_rows_avx2(P, n0, n1);
#else
    (void)instructions;
    q8_rows_avx2(P, n0, n1);
#endif
}

/* Rows per scheduling chunk: a multiple of 4 that depends on N only (about 32 chunks per call). */
static int64_t q8_chunk_rows(int64_t N) {
    int64_t rows = (N / 32 + 3) & ~(int64_t)3;
    return rows < 4 ? 4 : rows;
}

/* P <- the problem of these arguments; -2 for arguments the kernel does not take. wide: int16 x (groups of
 * whole 16-byte blocks, at most Q16_MAX_GROUP codes), else int8 x (groups of whole 32-byte blocks). */
int q8_make(int64_t ldx, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
           const uint16_t *zeros, int64_t N, int bits, int64_t g, float *y, int64_t ldy, int wide, q8_problem *P) {
    const int64_t block_bits = wide ? 128 : 256;
    if ((bits != 2 && bits != 4 && bits != 8) || M < 1 || K < 1 || N < 1 || g < 1 || g > (wide ? Q16_MAX_GROUP : 16384) ||
        ldx < K || ldy < N || (g * bits) % block_bits || (K * bits) % block_bits)
        return -2;
    const int64_t vec = wide && q16_zmm() && (g * bits) % 256 == 0 && (K * bits) % 256 == 0 ? 2 : 1;
    q8_problem Q = {M, K, N, bits, g, (K + g - 1) / g, K * bits / 8, g * bits / (block_bits * vec), 8 / bits, vec, qweight,
                    scales, zeros, NULL, NULL, NULL, y, ldy};
    *P = Q;
    return 0;
}

int q8_make_bound(const int64_t *a, int64_t k, int64_t n, int64_t M, float *y, int wide, q8_problem *P) {
    if (a[3] != k || a[7] != n) return -2;
    return q8_make(k, M, k, (const uint8_t *)(intptr_t)a[4], (const uint16_t *)(intptr_t)a[5],
                   (const uint16_t *)(intptr_t)a[6], n, (int)a[8], a[9], y, n, wide, P);
}

/* Bytes of x's rounded codes in q8_prepare_x's scratch (a multiple of 8: the steps after them are aligned). */
static size_t q8_xq_bytes(const q8_problem *P, int wide) {
    return ((size_t)(P->M * P->K) * (wide ? 2 : 1) + 7) & ~(size_t)7;
}

size_t q8_x_bytes(const q8_problem *P, int wide) {
    const size_t steps = sizeof(float) * (size_t)(P->M * P->G), sums = sizeof(int32_t) * (size_t)(P->M * P->G + P->K);
    return q8_xq_bytes(P, wide) + steps + sums + 8;
}

void q8_prepare_x(q8_problem *P, const float *x, int64_t ldx, int wide, uint8_t *scratch) {
    float *d = (float *)(scratch + q8_xq_bytes(P, wide));
    int32_t *sxq = (int32_t *)(d + P->M * P->G);
    quantize_x(P, x, ldx, wide, scratch, d, sxq);
    P->xq = scratch, P->d = d, P->sxq = sxq;
}

int64_t q8_chunks(const q8_problem *P, int count, int64_t *first, int64_t *step) {
    first[0] = 0;
    for (int i = 0; i < count; i++)
        step[i] = q8_chunk_rows(P[i].N), first[i + 1] = first[i] + (P[i].N + step[i] - 1) / step[i];
    return first[count];
}

void q8_chunk_run(const q8_problem *P, int count, const int64_t *first, const int64_t *step, int64_t c, int wide,
                  int instructions) {
    int i = 0;
    while (i + 1 < count && c >= first[i + 1]) i++;
    const int64_t n0 = (c - first[i]) * step[i], n1 = q8_min(n0 + step[i], P[i].N);
    if (wide) q16_rows(&P[i], n0, n1, instructions);
    else q8_rows(&P[i], n0, n1, instructions);
}

/* `count` products of the same x (1, or 2 for an expert's gate and up, same bits and group size): x quantised
 * once, then every product's row chunks in one parallel loop. */
static int q8_run(q8_problem *P, int count, const float *x, int64_t ldx, int threads, int wide) {
    uint8_t *scratch = malloc(q8_x_bytes(P, wide));
    if (!scratch) return -1;
    q8_prepare_x(P, x, ldx, wide, scratch);
    int64_t step[2], first[3], bytes = 0;
    const int64_t chunks = q8_chunks(P, count, first, step);
    for (int i = 0; i < count; i++) {
        P[i].xq = P->xq, P[i].d = P->d, P[i].sxq = P->sxq;
        bytes += P[i].N * P[i].ldq;
    }
    if (threads < 1 || bytes < Q8_SERIAL_BYTES) threads = 1;
    const int instructions = prism_q8_instructions();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t c = 0; c < chunks; c++) q8_chunk_run(P, count, first, step, c, wide, instructions);
    free(scratch);
    return 0;
}

/* Returns 0, -1 when out of memory, -2 for arguments the kernel does not take. */
static int q8_linear(const float *x, int64_t ldx, int64_t M, int64_t K, const uint8_t *qweight, const uint16_t *scales,
                     const uint16_t *zeros, int64_t N, int bits, int64_t g, float *y, int64_t ldy, int threads, int wide) {
    q8_problem P;
    if (q8_make(ldx, M, K, qweight, scales, zeros, N, bits, g, y, ldy, wide, &P)) return -2;
    return q8_run(&P, 1, x, ldx, threads, wide);
}

static int q8_linear_args(const int64_t *a, int wide) {
    return q8_linear((const float *)(intptr_t)a[0], a[1], a[2], a[3], (const uint8_t *)(intptr_t)a[4],
                     (const uint16_t *)(intptr_t)a[5], (const uint16_t *)(intptr_t)a[6], a[7], (int)a[8], a[9],
                     (float *)(intptr_t)a[10], a[11], (int)a[12], wide);
}

/* Two products of the same x (an expert's gate and up projections): with the same shape of x and the same bits
 * and group size, x is quantised once and both weights' row chunks share one parallel loop; every output row
 * is computed as the single call computes it. Otherwise the two run one after the other. */
static int q8_linear_pair_args(const int64_t *a, const int64_t *b, int wide) {
    const int same = a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[8] == b[8] && a[9] == b[9];
    if (!same) {
        int rc = q8_linear_args(a, wide);
        return rc ? rc : q8_linear_args(b, wide);
    }
    q8_problem P[2];
    for (int i = 0; i < 2; i++) {
        const int64_t *v = i ? b : a;
        if (q8_make(v[1], v[2], v[3], (const uint8_t *)(intptr_t)v[4], (const uint16_t *)(intptr_t)v[5],
                    (const uint16_t *)(intptr_t)v[6], v[7], (int)v[8], v[9], (float *)(intptr_t)v[10], v[11], wide,
                    &P[i]))
            return -2;
    }
    return q8_run(P, 2, (const float *)(intptr_t)a[0], a[1], (int)a[12], wide);
}

/* The entry points: arguments as prism_int_linear_packed's (int_linear.c), int8 or int16 x. */
int prism_q8_linear_packed(const int64_t *a) { return q8_linear_args(a, 0); }
int prism_q8_linear_pair_packed(const int64_t *a, const int64_t *b) { return q8_linear_pair_args(a, b, 0); }
int prism_q16_linear_packed(const int64_t *a) { return q8_linear_args(a, 1); }
int prism_q16_linear_pair_packed(const int64_t *a, const int64_t *b) { return q8_linear_pair_args(a, b, 1); }
