/* A decode token through a decoder layer's first half in one call: the input RMSNorm, the attention step
 * (attention_decode.c), the residual add, the post-attention RMSNorm and, where the layer's MLP has a softmax
 * top-k router, the routing (router_topk.c). What is left for the caller is the MLP itself: a layer's experts
 * come from the expert cache, which Python owns.
 *
 * Why: the same steps from Python are five native calls with their wrappers' checks, allocations and argument
 * arrays, a torch add and a RouterOutput, about 90 microseconds a layer on a Zen 4 core: on a Mixtral-shaped
 * model of hidden 1024 a sixth of a decode token (bench/results/decode_profile_zen4.md). Each step here is the
 * same function with the same arguments as its single call, so the outputs are the same bits.
 *
 * Arguments: a = {x, y, h, norm1 weight, norm2 weight, eps1 bits, eps2 bits, attention args, router W, E, k,
 * renormalise, logits, indices, weights, hidden}: x fp32 [H], the layer's input (read only); y fp32 [H] <- x +
 * attention(norm1(x)); h fp32 [H] <- norm2(y); the norm weights fp32 [H]; the attention's int64[19] arguments as
 * prism_attention_decode takes them, its x and out slots ignored (this call's scratch goes there); router W fp32
 * [E][H], or 0 for no routing (then E, k, renormalise and the three outputs are not read); logits fp32 [E],
 * indices int64 [k], weights fp32 [k] as prism_router_topk writes them.
 * Returns 0, -1 when out of memory, -2 for arguments it does not take. */
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "expert_miss.h"

int prism_rms_norm(const int64_t *a);
int prism_attention_decode(const int64_t *a);
int prism_router_topk(const int64_t *a);

#define DL_ATTENTION_ARGS 19

int prism_decode_layer(const int64_t *a) {
    const float *x = (const float *)(intptr_t)a[0];
    float *y = (float *)(intptr_t)a[1];
    const int64_t *attention = (const int64_t *)(intptr_t)a[7];
    const int64_t H = a[15];
    if (H < 1 || !x || !y || !a[2] || !a[3] || !a[4] || !attention) return -2;
    float *scratch = malloc(2 * sizeof(float) * (size_t)H);
    if (!scratch) return -1;
    float *normed = scratch, *attended = scratch + H;
    const int64_t norm1[9] = {a[0], H, 1, H, a[3], (int64_t)(intptr_t)normed, H, a[5], 0};
    int rc = prism_rms_norm(norm1);
    if (!rc) {
        int64_t step[DL_ATTENTION_ARGS];
        memcpy(step, attention, sizeof step);
        step[0] = (int64_t)(intptr_t)normed;
        step[3] = (int64_t)(intptr_t)attended;
        rc = prism_attention_decode(step);
    }
    if (!rc) {
        for (int64_t j = 0; j < H; j++) y[j] = x[j] + attended[j];
        const int64_t norm2[9] = {a[1], H, 1, H, a[4], a[2], H, a[6], 0};
        rc = prism_rms_norm(norm2);
    }
    if (!rc && a[8]) {
        const int64_t route[9] = {a[2], a[8], a[9], H, a[10], a[11], a[12], a[13], a[14]};
        rc = prism_router_topk(route);
    }
    free(scratch);
    return rc;
}

int prism_expert_block(const int64_t *hdr, const int64_t *const *ops, const float *weights);

#define DL_MAX_EXPERTS 4096 /* router_topk.c's RT_MAX_EXPERTS */
#define DL_MAX_TOP_K 64     /* expert_block.c's EB_MAX_EXPERTS */

typedef int64_t (*dl_layer_fn)(int64_t layer);

/* A resident table's handshake with whoever removes an expert from it (Dekker's, sequentially consistent): the
 * loop raises busy, then reads the routed experts' pointers; a remover clears an expert's pointers, then waits
 * while busy is up. busy counts the loops in (threads decoding with one model share its tables): a loop that
 * finishes leaves the others' marks up. Either the loop sees the cleared pointer (and calls route instead) or the remover waits until
 * the loop has run the layer's experts: an expert's memory is never reused under the loop. */

/* Whether every routed expert of the layer is in `table` (its rounding known): then ops holds their pointers, wide
 * their rounding, and busy stays up until the caller has run them; else busy is down again. */
static int resident_take(int64_t *table, const int64_t *indices, int64_t k, int64_t E, const int64_t **ops,
                         int64_t *wide) {
    __atomic_add_fetch(&table[1], 1, __ATOMIC_SEQ_CST);
    const int64_t rounding = __atomic_load_n(&table[0], __ATOMIC_SEQ_CST);
    int ok = rounding >= 0;
    for (int64_t i = 0; i < k && ok; i++) {
        const int64_t e = indices[i];
        if (e < 0 || e >= E) {
            ok = 0;
            break;
        }
        for (int j = 0; j < 3 && ok; j++) {
            ops[3 * i + j] = (const int64_t *)(intptr_t)__atomic_load_n(&table[2 + 3 * e + j], __ATOMIC_SEQ_CST);
            ok = ops[3 * i + j] != NULL;
        }
    }
    if (!ok) {
        __atomic_sub_fetch(&table[1], 1, __ATOMIC_RELEASE);
        return 0;
    }
    *wide = rounding;
    return 1;
}

/* Put expert e's three operator argument arrays into a resident table of its rounding of x (the first expert
 * put sets the table's). Returns 0, or -2 for another rounding or an index outside 0..E-1. */
int prism_resident_set(int64_t *table, int64_t E, int64_t e, int64_t wide, const int64_t *ptrs) {
    if (e < 0 || e >= E || wide < 0) return -2;
    int64_t expected = -1;
    if (!__atomic_compare_exchange_n(&table[0], &expected, wide, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST) &&
        expected != wide)
        return -2;
    for (int j = 0; j < 3; j++) __atomic_store_n(&table[2 + 3 * e + j], ptrs[j], __ATOMIC_RELEASE);
    return 0;
}

/* Take expert e out of a resident table and return once no loop can still be running it (busy down after the
 * clear): its memory may be reused then. Called with the interpreter lock released (ctypes), so a loop waiting
 * in a callback is not what it waits for: the loop lowers busy before every callback. */
int prism_resident_clear(int64_t *table, int64_t E, int64_t e) {
    if (e < 0 || e >= E) return -2;
    for (int j = 0; j < 3; j++) __atomic_store_n(&table[2 + 3 * e + j], 0, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&table[1], __ATOMIC_SEQ_CST)) sched_yield();
    return 0;
}

/* Every decoder layer of one decode token in one call, for a model whose layers all take the step above with a
 * router: per layer, the step, then the routed experts through prism_expert_block and the residual add (y +
 * experts, in fp32 as torch adds them). The same functions as the per-layer calls, in the same order: the same
 * bits. The experts come from one of two places:
 *   - route 0: each layer's table of every expert's operators (all resident expert_block.c operators);
 *   - route given (experts the caller serves: an expert cache): after each layer's routing the loop calls
 *     route(l), which acquires the routed experts and returns the address of their 3k operator pointers (their
 *     rounding of x in ctl[0]), or 0 when it has written the experts' weighted sum into moe itself (a form
 *     expert_block.c does not take), or a negative number when it failed (this call then returns -3 at once).
 *     A served layer may also have a resident table (the cache's experts that are ready, kept by the caller
 *     under its own lock: prism_resident_set / prism_resident_clear below): where every routed expert is in it,
 *     the loop runs them from there without calling route, and logs the layer and its experts in the hit log
 *     for the caller to count (the cache's statistics and eviction order, as route would have).
 * After each layer's residual add, hook(l) (0: none) sees that layer's output in out; a negative return stops
 * the loop (-3). The callbacks run on this thread, outside every parallel region, between the layers: where the
 * Python path called them.
 *
 * Why: what is left between the per-layer calls (the expert lookup, the wrappers, the module calls) is still
 * about 60 microseconds of Python a layer on a Zen 4 core; none of it decides anything but the cache's work.
 *
 * With expert_miss.c's state (nm), a layer whose experts are not all in its resident table is served in the loop
 * where it can be (misses read, victims evicted, all logged for the caller to replay); a resident layer's hit is
 * logged there too, with its observation done. Where a layer cannot be served there, the loop turns nm off for
 * the rest of the token and calls route as above.
 *
 * Arguments: hdr = {x, out, layers L, hidden H, threads, route, hook, y, h, moe, logits, weights, indices, ctl,
 * hits, nm}:
 * x fp32 [H] the embedded token (read only), out fp32 [H] <- each layer's output in turn; y, h, moe fp32 [H],
 * logits fp32 [E], weights fp32 [k], indices int64 [k], ctl int64 [1]: the caller's scratch, which the callbacks
 * read and write; layers = L records {step, table, experts E, wide}: step the layer's int64[16] arguments of
 * prism_decode_layer with a router (its x, y, h and route output slots are this call's), table 3E pointers to
 * the operators' int64 arguments (gate, up and down of expert e at 3e; when served: 0, or the layer's resident
 * table, int64 [2 + 3E]: {rounding of x (-1: none yet), busy, the same 3E pointers with 0 where the expert is
 * not resident}), wide the experts' rounding of x as prism_expert_block takes it; hits 0 or the hit log, int64
 * {count, stride, then count records of stride: layer, k, the k experts}, which the caller empties. Returns 0,
 * -1 when out of memory, -2 for arguments it does not take (a routed index outside 0..E-1 among them, a full hit
 * log), -3 when a callback failed, -6 when a miss served in the loop found no victim, -7 when its read failed
 * (nm's NM_ERROR says why). nm: 0, or expert_miss.h's state. */
int prism_decode_layers(const int64_t *hdr, const int64_t *layers) {
    const int64_t L = hdr[2], H = hdr[3];
    float *out = (float *)(intptr_t)hdr[1];
    const dl_layer_fn route = (dl_layer_fn)(intptr_t)hdr[5], hook = (dl_layer_fn)(intptr_t)hdr[6];
    float *y = (float *)(intptr_t)hdr[7], *h = (float *)(intptr_t)hdr[8], *moe = (float *)(intptr_t)hdr[9];
    const float *weights = (const float *)(intptr_t)hdr[11];
    const int64_t *indices = (const int64_t *)(intptr_t)hdr[12], *ctl = (const int64_t *)(intptr_t)hdr[13];
    int64_t *hits = (int64_t *)(intptr_t)hdr[14];
    int64_t *nm = (int64_t *)(intptr_t)hdr[15]; /* expert_miss.c's state, or 0 */
    const int64_t hits_capacity = hits ? 2 + L * hits[1] : 0;
    if (L < 1 || H < 1 || !hdr[0] || !out || !y || !h || !moe || !hdr[10] || !weights || !indices || !ctl)
        return -2;
    const int64_t *ops[3 * DL_MAX_TOP_K];
    const float *x = (const float *)(intptr_t)hdr[0];
    int rc = 0;
    for (int64_t l = 0; l < L && !rc; l++) {
        const int64_t *rec = layers + 4 * l;
        const int64_t *const *table = (const int64_t *const *)(intptr_t)rec[1];
        const int64_t E = rec[2];
        int64_t step[16];
        memcpy(step, (const int64_t *)(intptr_t)rec[0], sizeof step);
        const int64_t k = step[10];
        if (!step[8] || step[9] != E || E < 1 || E > DL_MAX_EXPERTS || k < 1 || k > DL_MAX_TOP_K || k > E ||
            step[15] != H || (!route && !table))
            return -2;
        step[0] = (int64_t)(intptr_t)x, step[1] = (int64_t)(intptr_t)y, step[2] = (int64_t)(intptr_t)h;
        step[12] = hdr[10], step[13] = hdr[12], step[14] = hdr[11];
        rc = prism_decode_layer(step);
        if (rc) break;
        const int64_t *const *chosen = ops;
        int64_t wide = rec[3];
        int64_t *resident = route && hits ? (int64_t *)(intptr_t)rec[1] : NULL;
        if (resident && !resident_take(resident, indices, k, E, ops, &wide)) resident = NULL;
        if (resident && nm && prism_expert_miss_hit(nm, l, indices, k)) {
            /* logged with the misses served here: replayed in order after the token */
        } else if (resident) {
            const int64_t at = 2 + hits[0] * hits[1];
            if (hits[1] < 2 + k || at + hits[1] > hits_capacity) {
                __atomic_sub_fetch(&resident[1], 1, __ATOMIC_RELEASE);
                return -2;
            }
            hits[at] = l, hits[at + 1] = k;
            for (int64_t i = 0; i < k; i++) hits[at + 2 + i] = indices[i];
            hits[0]++;
        } else if (route && nm && (rc = prism_expert_miss_step(nm, l, indices, k, (const int64_t **)ops, &wide))) {
            if (rc == -4) return -6;
            if (rc == -5) return -7;
            if (rc < 0) return rc;
            rc = 0;
        } else if (route) {
            if (nm) nm[NM_ON] = 0; /* the callback may change the cache: the rest of the token calls back */
            const int64_t served = route(l);
            if (served < 0) return -3;
            chosen = (const int64_t *const *)(intptr_t)served; /* 0: the caller summed them into moe */
            wide = ctl[0];
        } else {
            for (int64_t i = 0; i < k; i++) {
                if (indices[i] < 0 || indices[i] >= E) return -2;
                for (int j = 0; j < 3; j++) ops[3 * i + j] = table[3 * indices[i] + j];
            }
        }
        if (chosen) {
            const int64_t experts[5] = {(int64_t)(intptr_t)h, (int64_t)(intptr_t)moe, k, hdr[4], wide};
            rc = prism_expert_block(experts, chosen, weights);
            if (resident) __atomic_sub_fetch(&resident[1], 1, __ATOMIC_RELEASE); /* done with its experts */
            if (rc) break;
        }
        for (int64_t j = 0; j < H; j++) out[j] = y[j] + moe[j];
        x = out;
        if (hook && hook(l) < 0) return -3;
    }
    return rc;
}
