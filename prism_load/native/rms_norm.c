/* RMSNorm of a few rows, as transformers computes it: in fp32, x * rsqrt(mean(x^2) + eps), rounded to the
 * input's dtype, then times the weight in that dtype (bf16: the product of the two bf16 values rounded to bf16,
 * as torch's bf16 multiply rounds). Only the order of the sum of squares differs from torch's (fp32 either way).
 *
 * Why: torch's CPU rms_norm is a chain of small ops (pow, mean, add, rsqrt, mul) plus two dtype conversions
 * and the weight's multiply, about 11 microseconds for a 1024-wide decode row on a Zen 5, twice per decoder
 * layer; this is one call of about 1.
 *
 * Arguments: args = {x, ldx, rows, cols, weight, out, ldout, eps as float bits, dtype (0 fp32, 1 bf16)}. */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch rounds; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

int prism_rms_norm(const int64_t *a) {
    const int64_t ldx = a[1], rows = a[2], cols = a[3], ldo = a[6], bf16 = a[8];
    float eps;
    const uint32_t eps_bits = (uint32_t)a[7];
    memcpy(&eps, &eps_bits, 4);
    if (rows < 0 || cols < 1 || ldx < cols || ldo < cols || (bf16 != 0 && bf16 != 1)) return -2;
    for (int64_t r = 0; r < rows; r++) {
        float acc[16] = {0};
        if (bf16) {
            const uint16_t *x = (const uint16_t *)(intptr_t)a[0] + r * ldx, *w = (const uint16_t *)(intptr_t)a[4];
            uint16_t *y = (uint16_t *)(intptr_t)a[5] + r * ldo;
            int64_t j = 0;
            for (; j + 16 <= cols; j += 16)
                for (int l = 0; l < 16; l++) {
                    const float v = bf16_to_f32(x[j + l]);
                    acc[l] += v * v;
                }
            for (; j < cols; j++) {
                const float v = bf16_to_f32(x[j]);
                acc[j & 15] += v * v;
            }
            float sum = 0.0f;
            for (int l = 0; l < 16; l++) sum += acc[l];
            const float scale = 1.0f / sqrtf(sum / (float)cols + eps);
            for (j = 0; j < cols; j++) {
                const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[j]) * scale));
                y[j] = f32_to_bf16(bf16_to_f32(w[j]) * normed);
            }
        } else {
            const float *x = (const float *)(intptr_t)a[0] + r * ldx, *w = (const float *)(intptr_t)a[4];
            float *y = (float *)(intptr_t)a[5] + r * ldo;
            int64_t j = 0;
            for (; j + 16 <= cols; j += 16)
                for (int l = 0; l < 16; l++) acc[l] += x[j + l] * x[j + l];
            for (; j < cols; j++) acc[j & 15] += x[j] * x[j];
            float sum = 0.0f;
            for (int l = 0; l < 16; l++) sum += acc[l];
            const float scale = 1.0f / sqrtf(sum / (float)cols + eps);
            for (j = 0; j < cols; j++) y[j] = w[j] * (x[j] * scale);
        }
    }
    return 0;
}
