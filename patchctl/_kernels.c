/*
 * patchctl._kernels: the compression hot loops in C (optional).
 *
 * Plain C functions called through ctypes (patchctl/native.py), which
 * releases the GIL around each call, so Python threads run them in parallel
 * on disjoint ranges. Each function does exactly what the numpy path it
 * replaces does (patches/compress.py, patches/codec.py), with the same
 * output bytes; tests run both paths and compare. When this file could not
 * be compiled (no C compiler at install time), patchctl uses the numpy path.
 *
 * The module init function exists only so that `import patchctl._kernels`
 * works; it defines no Python functions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define PC_EXPORT __attribute__((visibility("default")))

/* Loops that vectorize: an AVX2 clone chosen at load time where the CPU has it (GCC, x86-64). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PC_TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define PC_TARGETS
#endif

/* Version of this ABI: native.py refuses a library whose version differs. */
PC_EXPORT int pc_abi_version(void) { return 7; }

/*
 * hist16: add to hist[0..65535] the count of each raw 16-bit pattern in
 * x[0..n). Four uint32 sub-histograms (1 MiB, in L2) break the dependency
 * between equal neighbours; they are flushed before a count could overflow.
 * Returns 0, or -1 when the scratch memory could not be allocated.
 */
PC_EXPORT int pc_hist16(const uint16_t *x, int64_t n, int64_t *hist) {
    uint32_t *h = (uint32_t *)calloc(4 * 65536, sizeof(uint32_t));
    if (!h) return -1;
    uint32_t *h0 = h, *h1 = h + 65536, *h2 = h + 2 * 65536, *h3 = h + 3 * 65536;
    const int64_t block = (int64_t)1 << 30; /* each sub-histogram gets < 2**28 per block */
    for (int64_t s = 0; s < n; s += block) {
        int64_t e = n - s < block ? n : s + block;
        int64_t i = s;
        for (; i + 4 <= e; i += 4) {
            h0[x[i]]++;
            h1[x[i + 1]]++;
            h2[x[i + 2]]++;
            h3[x[i + 3]]++;
        }
        for (; i < e; i++) h0[x[i]]++;
        for (int j = 0; j < 65536; j++) {
            hist[j] += (int64_t)h0[j] + h1[j] + h2[j] + h3[j];
            h0[j] = h1[j] = h2[j] = h3[j] = 0;
        }
    }
    free(h);
    return 0;
}

/* Bit i of the result is 1 iff (x[i] & 0x7fff) >= u, for i in 0..63. */
static inline uint64_t mask64(const uint16_t *x, uint16_t u) {
#if defined(__SSE2__)
    /* |x| bits and u are <= 0x7fff: a signed 16-bit compare is exact */
    const __m128i absmask = _mm_set1_epi16(0x7fff);
    const __m128i lim = _mm_set1_epi16((int16_t)(u - 1));
    uint64_t m = 0;
    for (int j = 0; j < 64; j += 16) {
        __m128i a = _mm_and_si128(_mm_loadu_si128((const __m128i *)(x + j)), absmask);
        __m128i b = _mm_and_si128(_mm_loadu_si128((const __m128i *)(x + j + 8)), absmask);
        __m128i ga = _mm_cmpgt_epi16(a, lim);
        __m128i gb = _mm_cmpgt_epi16(b, lim);
        uint32_t bits = (uint32_t)_mm_movemask_epi8(_mm_packs_epi16(ga, gb)) & 0xffffu;
        m |= (uint64_t)bits << j;
    }
    return m;
#else
    uint64_t m = 0;
    for (int j = 0; j < 64; j++) m |= (uint64_t)((x[j] & 0x7fff) >= u) << j;
    return m;
#endif
}

/* count16: how many i in [0, n) have (x[i] & 0x7fff) >= u (u >= 1). */
PC_EXPORT int64_t pc_count16(const uint16_t *x, int64_t n, uint16_t u) {
    int64_t c = 0, i = 0;
    for (; i + 64 <= n; i += 64) c += __builtin_popcountll(mask64(x + i, u));
    for (; i < n; i++) c += (x[i] & 0x7fff) >= u;
    return c;
}

/*
 * select16: for i in [0, n) with (x[i] & 0x7fff) >= u (u >= 1), write
 * base + i to idx[c] and, if signs is not NULL, x[i] >> 15 to signs[c], c
 * counting up from 0. Writes at most cap entries. Returns c, or -1 when more
 * than cap entries qualify (the caller's count is stale).
 */
PC_EXPORT int64_t pc_select16(const uint16_t *x, int64_t n, uint16_t u, int64_t base, int64_t *idx,
                              uint8_t *signs, int64_t cap) {
    int64_t c = 0, i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t m = mask64(x + i, u);
        if (!m) continue;
        if (c + __builtin_popcountll(m) > cap) return -1;
        if (signs) {
            while (m) {
                int j = __builtin_ctzll(m);
                idx[c] = base + i + j;
                signs[c] = (uint8_t)(x[i + j] >> 15);
                c++;
                m &= m - 1;
            }
        } else {
            while (m) {
                int j = __builtin_ctzll(m);
                idx[c++] = base + i + j;
                m &= m - 1;
            }
        }
    }
    for (; i < n; i++) {
        if ((x[i] & 0x7fff) >= u) {
            if (c >= cap) return -1;
            idx[c] = base + i;
            if (signs) signs[c] = (uint8_t)(x[i] >> 15);
            c++;
        }
    }
    return c;
}

/*
 * gap_sums: for the gaps of idx[s..e) (gap[0] = idx[0], gap[i] = idx[i] -
 * idx[i-1] - 1), per chunk of `chunk` gaps (s a multiple of chunk, sums
 * row 0 = chunk s / chunk): sums[row * nk + j] = sum(gap >> (k0 + j)),
 * nk <= 3. With check, every idx[i] (and idx[s-1]) must lie in [0, numel)
 * and gaps be >= 0. *gmax gets the largest gap. Returns 0, or -1 on a bad
 * index. The loop has no branches on the data: errors are OR-ed into a flag
 * (every value is range-checked, so no difference can overflow unnoticed).
 */
PC_TARGETS PC_EXPORT int pc_gap_sums(const int64_t *idx, int64_t s, int64_t e, int64_t numel, int k0, int nk,
                                     int64_t chunk, int64_t *sums, int64_t *gmax, int check) {
    if (nk < 0 || nk > 3 || k0 < 0 || s >= e) {
        *gmax = 0;
        return (nk < 0 || nk > 3 || k0 < 0) ? -1 : 0;
    }
    const uint64_t lim = (uint64_t)numel;
    const int ka = k0 < 63 ? k0 : 63, kb = k0 + 1 < 63 ? k0 + 1 : 63, kc = k0 + 2 < 63 ? k0 + 2 : 63;
    uint64_t bad = 0;
    int64_t gm = 0;
    if (s > 0) bad |= (uint64_t)idx[s - 1] >= lim;
    for (int64_t cs = s, row = 0; cs < e; cs += chunk, row++) {
        int64_t ce = e - cs < chunk ? e : cs + chunk;
        uint64_t a0 = 0, a1 = 0, a2 = 0;
        int64_t i = cs;
        if (i == 0) { /* the first gap is idx[0] itself */
            int64_t g = idx[0];
            bad |= (uint64_t)g >= lim;
            gm = g > gm ? g : gm;
            a0 += (uint64_t)g >> ka;
            a1 += (uint64_t)g >> kb;
            a2 += (uint64_t)g >> kc;
            i = 1;
        }
        for (; i < ce; i++) {
            int64_t v = idx[i];
            int64_t g = (int64_t)((uint64_t)v - (uint64_t)idx[i - 1] - 1u);
            bad |= ((uint64_t)v >= lim) | ((uint64_t)g >> 63);
            gm = g > gm ? g : gm;
            a0 += (uint64_t)g >> ka;
            a1 += (uint64_t)g >> kb;
            a2 += (uint64_t)g >> kc;
        }
        int64_t *out = sums + row * nk;
        if (nk > 0) out[0] = (int64_t)a0;
        if (nk > 1) out[1] = (int64_t)a1;
        if (nk > 2) out[2] = (int64_t)a2;
    }
    *gmax = gm;
    return check && bad ? -1 : 0;
}

/* the bit 7 - t of the result is bit 0 of byte t of y, t = 0..7 */
static inline uint8_t gather_lsb(uint64_t y) {
    y &= 0x0101010101010101ull;
    return (uint8_t)((y * 0x8040201008040201ull) >> 56);
}

/*
 * rice_encode: Golomb-Rice code, parameter k, of the gaps of idx[s..e)
 * (idx already checked by gap_sums). The unary codes go to P1 from absolute
 * bit `bitoff` on, MSB first. The byte holding bit `bitoff` may be shared
 * with the range before: it goes to *head instead (the caller ORs it in
 * after all ranges are done); every later byte the range touches is written
 * whole (its last byte zero-padded). The remainders go to the k bit planes
 * of P2 (plane p = bit k-1-p of every remainder, `plane` bytes each, MSB
 * first); s must be a multiple of 8.
 *
 * The unary bits collect in a 64-bit accumulator; every full 32-bit word is
 * stored, without a branch, into a small stack buffer (a store at the next
 * free slot that only counts when the word is full), which is copied out
 * every ~1000 words: no branch depends on the code lengths.
 */
#define PC_STAGE 1024

typedef struct {
    uint8_t *out;  /* where the next byte of P1 goes */
    uint8_t *head; /* the first byte goes here instead, while first */
    int first;
    uint32_t stage[PC_STAGE + 8];
    int ns; /* words staged */
} pc_sink;

static inline void pc_drain(pc_sink *k) {
    for (int w = 0; w < k->ns; w++) {
        uint32_t v = k->stage[w];
        if (k->first) {
            *k->head = (uint8_t)(v >> 24);
            k->first = 0;
        } else {
            k->out[0] = (uint8_t)(v >> 24);
        }
        k->out[1] = (uint8_t)(v >> 16);
        k->out[2] = (uint8_t)(v >> 8);
        k->out[3] = (uint8_t)v;
        k->out += 4;
    }
    k->ns = 0;
}

/* one unary code: q zero bits then a one bit; nb <= 31 before and after */
static inline void pc_unary(pc_sink *k, uint64_t *acc, int *nb, uint64_t q) {
    while (q >= 32) { /* a long run of zeros, 32 at a time */
        *acc <<= 32;
        k->stage[k->ns++] = (uint32_t)(*acc >> *nb);
        if (k->ns >= PC_STAGE) pc_drain(k);
        q -= 32;
    }
    *acc = (*acc << (q + 1)) | 1u; /* nb + q + 1 <= 63 */
    *nb += (int)q + 1;
    int full = *nb >= 32;
    *nb -= 32 & -full;
    k->stage[k->ns] = (uint32_t)(*acc >> *nb); /* kept only if full */
    k->ns += full;
}

PC_EXPORT void pc_rice_encode(const int64_t *idx, int64_t s, int64_t e, int k, uint8_t *p1, int64_t bitoff,
                              uint8_t *p2, int64_t plane, uint8_t *head) {
    pc_sink sink;
    sink.out = p1 + (bitoff >> 3);
    sink.head = head;
    sink.first = 1;
    sink.ns = 0;
    uint64_t acc = 0;           /* pending bits, the oldest at bit nb - 1 */
    int nb = (int)(bitoff & 7); /* the shared byte's earlier bits: zeros here */
    int64_t prev = s > 0 ? idx[s - 1] : -1;
    const uint64_t rmask = k >= 64 ? ~0ull : ((1ull << k) - 1);
    int64_t i = s;
    if (k <= 8) { /* whole groups of 8: the 8 remainders are the 8 bytes of y */
        for (; i + 8 <= e; i += 8) {
            uint64_t y = 0;
            for (int t = 0; t < 8; t++) {
                uint64_t g = (uint64_t)(idx[i + t] - prev - 1);
                prev = idx[i + t];
                y |= (g & rmask) << (8 * t);
                pc_unary(&sink, &acc, &nb, g >> k);
            }
            if (sink.ns >= PC_STAGE - 8) pc_drain(&sink);
            uint8_t *out = p2 + (i >> 3);
            for (int b = 0; b < k; b++) out[(int64_t)(k - 1 - b) * plane] = gather_lsb(y >> b);
        }
    }
    for (; i < e; i += 8) { /* k > 8, and the last partial group */
        int64_t m = e - i < 8 ? e - i : 8;
        uint64_t r[8] = {0};
        for (int64_t t = 0; t < m; t++) {
            uint64_t g = (uint64_t)(idx[i + t] - prev - 1);
            prev = idx[i + t];
            r[t] = g & rmask;
            pc_unary(&sink, &acc, &nb, g >> k);
            if (sink.ns >= PC_STAGE - 8) pc_drain(&sink);
        }
        if (k) {
            uint8_t *out = p2 + (i >> 3);
            for (int sl = 0; sl * 8 < k; sl++) { /* byte `sl` of each remainder */
                uint64_t y = 0;
                for (int t = 0; t < 8; t++) y |= ((r[t] >> (8 * sl)) & 0xffu) << (8 * t);
                int top = k - 8 * sl < 8 ? k - 8 * sl : 8;
                for (int b = 0; b < top; b++) {
                    int bit = 8 * sl + b; /* bit of the remainder; plane k - 1 - bit */
                    out[(int64_t)(k - 1 - bit) * plane] = gather_lsb(y >> b);
                }
            }
        }
    }
    pc_drain(&sink);
    /* the last bits, in whole bytes, the last one zero-padded */
    int nbytes = (nb + 7) / 8;
    uint64_t tail = nb ? acc << (8 * nbytes - nb) : 0;
    for (int j = 0; j < nbytes; j++) {
        uint8_t byte = (uint8_t)(tail >> (8 * (nbytes - 1 - j)));
        if (sink.first) {
            *head = byte;
            sink.first = 0;
        } else {
            sink.out[j] = byte;
        }
    }
    if (sink.first) *head = 0;
}

/* lanes1[b]: the 8 bits of byte b, MSB first, as the 8 bytes (lanes) of a uint64, lane 0 lowest */
static uint64_t lanes1[256];

__attribute__((constructor)) static void pc_init_tables(void) {
    for (int b = 0; b < 256; b++) {
        uint64_t v = 0;
        for (int t = 0; t < 8; t++) v |= (uint64_t)((b >> (7 - t)) & 1) << (8 * t);
        lanes1[b] = v;
    }
}

/*
 * rice_decode: the positions coded by the one bits in P1 bytes [b_lo, b_hi),
 * given i = the number of one bits before byte b_lo and carry = the sum of
 * the remainders of those i codes. The n-th code (0-based) whose one bit is
 * at absolute bit position P (MSB first) decodes to
 *     idx[n] = ((P - n) << k) + (r[0] + ... + r[n]) + n,
 * r[n] read from the k planes of P2 (`plane` bytes each, MSB plane first).
 * The caller has checked the sections (one count, padding, last index <
 * numel), so every value fits and every out[n] is within the output.
 */
PC_EXPORT void pc_rice_decode(const uint8_t *p1, int64_t b_lo, int64_t b_hi, const uint8_t *p2, int64_t plane,
                              int k, int64_t i, int64_t carry, int64_t *out) {
    uint64_t rv = 0; /* remainders of the group of 8 codes i >> 3, one per lane (k <= 8) */
    int64_t group = -1;
    for (int64_t b = b_lo; b < b_hi; b += 8) {
        uint64_t w = 0;
        if (b + 8 <= b_hi) {
            memcpy(&w, p1 + b, 8);
            w = __builtin_bswap64(w);
        } else {
            for (int64_t j = b; j < b_hi; j++) w = (w << 8) | p1[j];
            w <<= 8 * (8 - (b_hi - b));
        }
        while (w) {
            int z = __builtin_clzll(w);
            w &= ~(0x8000000000000000ull >> z);
            int64_t r = 0;
            if (k > 8) {
                for (int p = 0; p < k; p++) r = (r << 1) | ((p2[(int64_t)p * plane + (i >> 3)] >> (7 - (i & 7))) & 1);
            } else if (k) {
                if ((i >> 3) != group) {
                    group = i >> 3;
                    rv = 0;
                    for (int p = 0; p < k; p++) rv = (rv << 1) | lanes1[p2[(int64_t)p * plane + group]];
                }
                r = (int64_t)((rv >> (8 * (i & 7))) & 0xffu);
            }
            carry += r;
            out[i] = ((8 * b + z - i) << k) + carry + i;
            i++;
        }
    }
}

/*
 * Float arithmetic of apply and push without torch (patches/host.py).
 *
 * Dtype codes: 0 float32, 1 float16, 2 bfloat16. Every sum and difference is
 * computed in float32 and rounded once, to nearest even, into the stored
 * dtype: what torch's CPU kernels do for these dtypes (patches/apply.py), bit
 * for bit on every non-NaN value (tests/test_host_kernels.py compares them).
 * The conversions are the bit-exact ones of c10 (fp16_ieee_from_fp32_value,
 * fp16_ieee_to_fp32_value); setup.py compiles with -ffp-contract=off so that
 * no multiply-add is fused.
 */
static inline float pc_f32_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t pc_bits_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float pc_bf16_to_f32(uint16_t h) { return pc_f32_bits((uint32_t)h << 16); }

static inline uint16_t pc_f32_to_bf16(float f) {
    uint32_t u = pc_bits_f32(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = -(uint32_t)((u & 0x7fffffffu) > 0x7f800000u); /* NaN stays a quiet NaN; no branch */
    return (uint16_t)((rounded & ~nan) | (((u >> 16) | 0x40u) & nan));
}

static inline float pc_f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = pc_f32_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = pc_f32_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t small = -(uint32_t)(two_w < (1u << 27)); /* no branch: the loops vectorize */
    const uint32_t r = sign | (pc_bits_f32(denormalized) & small) | (pc_bits_f32(normalized) & ~small);
    return pc_f32_bits(r);
}

static inline uint16_t pc_f32_to_f16(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = pc_bits_f32(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    const uint32_t low = -(uint32_t)(bias < 0x71000000u); /* masks, not branches: the loops vectorize */
    bias = (bias & ~low) | (0x71000000u & low);
    base = pc_f32_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = pc_bits_f32(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t nan = -(uint32_t)(shl1_w > 0xFF000000u);
    return (uint16_t)((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan));
}

static inline float pc_load(const void *p, int code, int64_t i) {
    if (code == 0) return ((const float *)p)[i];
    if (code == 1) return pc_f16_to_f32(((const uint16_t *)p)[i]);
    return pc_bf16_to_f32(((const uint16_t *)p)[i]);
}

/* The stored bits of float32 x rounded to dtype `code` (float32: its own bits). */
static inline uint32_t pc_round_bits(float x, int code) {
    if (code == 0) return pc_bits_f32(x);
    if (code == 1) return pc_f32_to_f16(x);
    return pc_f32_to_bf16(x);
}

static inline void pc_store(void *p, int code, int64_t i, uint32_t bits) {
    if (code == 0) ((uint32_t *)p)[i] = bits;
    else ((uint16_t *)p)[i] = (uint16_t)bits;
}

static inline uint32_t pc_raw_bits(const void *p, int code, int64_t i) {
    return code == 0 ? ((const uint32_t *)p)[i] : ((const uint16_t *)p)[i];
}

/* Specialised loops for the common dtype pairs (the compiler vectorizes each), the generic one otherwise. */
#define PC_ADD_LOOP(BC, DC)                                                                                     \
    for (int64_t i = 0; i < n; i++)                                                                             \
        pc_store(out, BC, i, pc_round_bits(pc_load(base, BC, i) + pc_load(delta, DC, i), BC));

/*
 * add_cast: out[i] = round_bcode(f32(base[i]) + f32(delta[i])) for i in [0, n).
 * out has the base's dtype; it may be base itself. Returns 0, or -1 for an unknown code.
 */
PC_EXPORT PC_TARGETS int pc_add_cast(const void *base, int bcode, const void *delta, int dcode, void *out, int64_t n) {
    if (bcode < 0 || bcode > 2 || dcode < 0 || dcode > 2) return -1;
    if (bcode == 2 && dcode == 2) { PC_ADD_LOOP(2, 2) }
    else if (bcode == 1 && dcode == 1) { PC_ADD_LOOP(1, 1) }
    else if (bcode == 0 && dcode == 0) { PC_ADD_LOOP(0, 0) }
    else if (bcode == 2 && dcode == 0) { PC_ADD_LOOP(2, 0) }
    else if (bcode == 1 && dcode == 0) { PC_ADD_LOOP(1, 0) }
    else {
        for (int64_t i = 0; i < n; i++)
            pc_store(out, bcode, i, pc_round_bits(pc_load(base, bcode, i) + pc_load(delta, dcode, i), bcode));
    }
    return 0;
}

static inline float pc_widen(uint32_t bits, int code) {
    return code == 0 ? pc_f32_bits(bits) : code == 1 ? pc_f16_to_f32((uint16_t)bits) : pc_bf16_to_f32((uint16_t)bits);
}

#define PC_DIFF_BLOCK 512
/* One block of m <= PC_DIFF_BLOCK entries from s: deltas stored, raw[j] = a's bits, miss[j] where the sum
 * misses them. a's bits are loaded before d is stored: d may be a itself (same dtype, in place). */
#define PC_DIFF_LOOP(IC, OC)                                                                                    \
    for (int64_t j = 0; j < m; j++) {                                                                           \
        const uint32_t ra = pc_raw_bits(a, IC, s + j);                                                          \
        const float fa = pc_widen(ra, IC), fb = pc_load(b, IC, s + j);                                          \
        const uint32_t db = pc_round_bits(fa - fb, OC);                                                         \
        pc_store(d, OC, s + j, db);                                                                             \
        raw[j] = ra;                                                                                            \
        miss[j] = pc_round_bits(fb + pc_widen(db, OC), IC) != ra;                                               \
    }

/*
 * diff_pins: the delta of a fine-tune `a` over its base `b` (both dtype icode), stored as ocode, and
 * the positions where applying it does not give `a` back bit for bit:
 *     d[i]   = round_ocode(f32(a[i]) - f32(b[i]))
 *     got[i] = round_icode(f32(b[i]) + f32(d[i]))       (apply's arithmetic: pc_add_cast)
 *     hits += offset + i, vals += the bits of a[i]      where the bits of got[i] and a[i] differ
 * d may be a (when icode == ocode: the delta replaces the fine-tune in its buffer). hits and vals must
 * hold n entries. Returns the number of hits, or -1 for an unknown code.
 */
PC_EXPORT PC_TARGETS int64_t pc_diff_pins(const void *a, const void *b, int icode, void *d, int ocode, int64_t n,
                                          int64_t offset, int64_t *hits, uint32_t *vals) {
    if (icode < 0 || icode > 2 || ocode < 0 || ocode > 2) return -1;
    uint32_t miss[PC_DIFF_BLOCK], raw[PC_DIFF_BLOCK];
    int64_t k = 0;
    for (int64_t s = 0; s < n; s += PC_DIFF_BLOCK) {
        const int64_t m = n - s < PC_DIFF_BLOCK ? n - s : PC_DIFF_BLOCK;
        if (icode == 2 && ocode == 2) { PC_DIFF_LOOP(2, 2) }
        else if (icode == 1 && ocode == 1) { PC_DIFF_LOOP(1, 1) }
        else if (icode == 0 && ocode == 0) { PC_DIFF_LOOP(0, 0) }
        else if (icode == 2 && ocode == 0) { PC_DIFF_LOOP(2, 0) }
        else if (icode == 1 && ocode == 0) { PC_DIFF_LOOP(1, 0) }
        else { PC_DIFF_LOOP(icode, ocode) }
        uint32_t any = 0;
        for (int64_t j = 0; j < m; j++) any |= miss[j];
        if (any)
            for (int64_t j = 0; j < m; j++)
                if (miss[j]) {
                    hits[k] = offset + s + j;
                    vals[k++] = raw[j];
                }
    }
    return k;
}

/* x[s..s+m) (dtype code) widened to float32 into v. */
static inline void pc_widen_block(const void *x, int code, int64_t s, int64_t m, float *v) {
    if (code == 0) memcpy(v, (const float *)x + s, (size_t)m * sizeof(float));
    else if (code == 1) for (int64_t j = 0; j < m; j++) v[j] = pc_f16_to_f32(((const uint16_t *)x)[s + j]);
    else for (int64_t j = 0; j < m; j++) v[j] = pc_bf16_to_f32(((const uint16_t *)x)[s + j]);
}

/* DARE on v = entries [s, s+m) of one input: +0 where bit s+j of `drop` is set (torch's masked_fill_), else
 * v / density (div_), rounded to float32. */
static inline void pc_dare_block(float *v, const uint8_t *drop, float density, int64_t s, int64_t m) {
    if (s & 7 || m > 1024) { /* not on a byte of the mask (no caller here): entry by entry */
        for (int64_t j = 0; j < m; j++) {
            const int64_t i = s + j;
            const float kept = v[j] / density;
            v[j] = (drop[i >> 3] >> (i & 7)) & 1 ? 0.0f : kept;
        }
        return;
    }
    uint32_t keep[1024]; /* all ones where kept: the bits expanded, then an AND (the loops vectorize) */
    const uint8_t *d = drop + (s >> 3);
    for (int64_t t = 0; t < (m + 7) / 8; t++) {
        const uint32_t b = d[t];
        for (int k = 0; k < 8; k++) keep[8 * t + k] = ((b >> k) & 1u) - 1u;
    }
    for (int64_t j = 0; j < m; j++) v[j] = pc_f32_bits(pc_bits_f32(v[j] / density) & keep[j]);
}

/*
 * dare_drops: DARE's drop mask of one input, bit i (least significant first; pad bits 0) of bits[] set
 * where patches/merge.py's torch path drops entry i: `torch.rand(n, generator=g) >= density`, g a CPU
 * torch.Generator after manual_seed(seed). That generator is MT19937 seeded (init_genrand) with the low
 * 32 bits of the seed; each float32 draw takes one 32-bit output r, in order: (r & 0xffffff) * 2**-24
 * (exact), compared with density as a float32. bits holds (n + 7) / 8 bytes.
 */
#define PC_MT_N 624
#define PC_MT_M 397
static inline uint32_t pc_mt_twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((uint32_t)-(int32_t)(v & 1u) & 0x9908b0dfu);
}

PC_EXPORT PC_TARGETS void pc_dare_drops(uint64_t seed, int64_t n, float density, uint8_t *bits) {
    uint32_t mt[PC_MT_N];
    uint8_t d[PC_MT_N];
    mt[0] = (uint32_t)(seed & 0xffffffffu);
    for (int j = 1; j < PC_MT_N; j++) mt[j] = 1812433253u * (mt[j - 1] ^ (mt[j - 1] >> 30)) + (uint32_t)j;
    for (int64_t s = 0; s < n; s += PC_MT_N) { /* PC_MT_N = 78 bytes of bits: blocks start on a byte */
        int j = 0;
        for (; j < PC_MT_N - PC_MT_M; j++) mt[j] = mt[j + PC_MT_M] ^ pc_mt_twist(mt[j], mt[j + 1]);
        for (; j < PC_MT_N - 1; j++) mt[j] = mt[j + PC_MT_M - PC_MT_N] ^ pc_mt_twist(mt[j], mt[j + 1]);
        mt[PC_MT_N - 1] = mt[PC_MT_M - 1] ^ pc_mt_twist(mt[PC_MT_N - 1], mt[0]);
        const int64_t m = n - s < PC_MT_N ? n - s : PC_MT_N;
        for (j = 0; j < PC_MT_N; j++) {
            uint32_t y = mt[j];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            d[j] = (float)(y & 0xffffffu) * 5.9604644775390625e-08f >= density;
        }
        for (j = (int)m; j < PC_MT_N; j++) d[j] = 0;
        uint8_t *b = bits + s / 8;
        const int nb = (int)((m + 7) / 8);
        for (int t = 0; t < nb; t++) {
            const uint8_t *e = d + 8 * t;
            b[t] = (uint8_t)(e[0] | e[1] << 1 | e[2] << 2 | e[3] << 3 | e[4] << 4 | e[5] << 5 | e[6] << 6 | e[7] << 7);
        }
    }
}

/*
 * weighted_sum: task arithmetic's out[i] = round_ocode(lam * (((+0 + w0*x0[i]) + w1*x1[i]) + ...)) for i in
 * [lo, hi): the order of operations of patches/merge.py's torch path (each input widened to float32,
 * DARE's drop where drops (may be NULL) has drops[q] (+0 where bit i is set, else / density: dare_linear),
 * then multiplied by its float32 weight where mul[q] (the weight is not 1), summed in input order into a
 * zeroed accumulator, scaled by lam where `scale`, then by `post` where has_post: LiNeS's layer scale,
 * the torch path's mul_ of the float32 result), each step rounded to float32. codes[q] and ocode as
 * above. Returns 0, or -1 for an unknown code.
 */
#define PC_WS_BLOCK 1024
PC_EXPORT PC_TARGETS int pc_weighted_sum(const void *const *ins, const int *codes, const float *ws, const int *mul,
                                         const uint8_t *const *drops, float density, int k, float lam, int scale,
                                         float post, int has_post, void *out, int ocode, int64_t lo, int64_t hi) {
    for (int q = 0; q < k; q++)
        if (codes[q] < 0 || codes[q] > 2) return -1;
    if (ocode < 0 || ocode > 2) return -1;
    float acc[PC_WS_BLOCK];
    for (int64_t s = lo; s < hi; s += PC_WS_BLOCK) {
        const int64_t m = hi - s < PC_WS_BLOCK ? hi - s : PC_WS_BLOCK;
        for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
        for (int q = 0; q < k; q++) {
            const float w = ws[q];
            const void *x = ins[q];
            if (drops && drops[q]) { /* DARE: dropped -> +0, kept / density; then x w; then added */
                float v[PC_WS_BLOCK];
                pc_widen_block(x, codes[q], s, m, v);
                pc_dare_block(v, drops[q], density, s, m);
                if (mul[q])
                    for (int64_t j = 0; j < m; j++) acc[j] += v[j] * w;
                else
                    for (int64_t j = 0; j < m; j++) acc[j] += v[j];
                continue;
            }
            switch (codes[q] * 2 + (mul[q] != 0)) {
            case 0: for (int64_t j = 0; j < m; j++) acc[j] += ((const float *)x)[s + j]; break;
            case 1: for (int64_t j = 0; j < m; j++) acc[j] += ((const float *)x)[s + j] * w; break;
            case 2: for (int64_t j = 0; j < m; j++) acc[j] += pc_f16_to_f32(((const uint16_t *)x)[s + j]); break;
            case 3: for (int64_t j = 0; j < m; j++) acc[j] += pc_f16_to_f32(((const uint16_t *)x)[s + j]) * w; break;
            case 4: for (int64_t j = 0; j < m; j++) acc[j] += pc_bf16_to_f32(((const uint16_t *)x)[s + j]); break;
            default: for (int64_t j = 0; j < m; j++) acc[j] += pc_bf16_to_f32(((const uint16_t *)x)[s + j]) * w; break;
            }
        }
        if (scale)
            for (int64_t j = 0; j < m; j++) acc[j] *= lam;
        if (has_post)
            for (int64_t j = 0; j < m; j++) acc[j] *= post;
        if (ocode == 0) memcpy((float *)out + s, acc, (size_t)m * sizeof(float));
        else if (ocode == 1)
            for (int64_t j = 0; j < m; j++) ((uint16_t *)out)[s + j] = pc_f32_to_f16(acc[j]);
        else
            for (int64_t j = 0; j < m; j++) ((uint16_t *)out)[s + j] = pc_f32_to_bf16(acc[j]);
    }
    return 0;
}

/*
 * ties: TIES's step (patches/merge.py: _trim, _weigh, _disjoint_mean_into, _scale) for i in [lo, hi), in
 * the torch path's order of operations, each rounded to float32:
 *   p_q  = widen(x_q[i]), trimmed: mode 0 kept, 1 zeroed, 2 kept unless -thr <= p_q <= thr (thr =
 *          at_or_above[q] for i < cutoff[q], else above[q]: hardshrink, which keeps a NaN), 3 DARE's
 *          drop (+0 where bit i of drops[q] is set, else p_q / density: dare_ties), times ws[q] where mul[q];
 *   s    = copysign(1, ((+0 + p_0) + p_1) + ...);
 *   num  = (+0 + max(s·p_q, 0) + ...) over q with ws[q] != 0 (a NaN stays), den of ws[q]·[s·p_q > 0];
 *   out  = round_ocode((((num · s) / max(den, den_floor)) · lam (where scale)) · post (where has_post)).
 * Returns 0, -1 for an unknown code, -2 when the scratch could not be allocated.
 */
#define PC_TIES_BLOCK 256
PC_EXPORT PC_TARGETS int pc_ties(const void *const *ins, const int *codes, const float *ws, const int *mul,
                                 const int *mode, const int64_t *cutoff, const float *at_or_above, const float *above,
                                 const uint8_t *const *drops, float density, int k, float den_floor, float lam,
                                 int scale, float post, int has_post, void *out, int ocode, int64_t lo, int64_t hi) {
    for (int q = 0; q < k; q++)
        if (codes[q] < 0 || codes[q] > 2) return -1;
    if (ocode < 0 || ocode > 2) return -1;
    float *p = (float *)malloc((size_t)k * PC_TIES_BLOCK * sizeof(float));
    if (!p) return -2;
    float acc[PC_TIES_BLOCK], sgn[PC_TIES_BLOCK], den[PC_TIES_BLOCK];
    for (int64_t s = lo; s < hi; s += PC_TIES_BLOCK) {
        const int64_t m = hi - s < PC_TIES_BLOCK ? hi - s : PC_TIES_BLOCK;
        for (int q = 0; q < k; q++) {
            float *pq = p + (int64_t)q * PC_TIES_BLOCK;
            pc_widen_block(ins[q], codes[q], s, m, pq);
            if (mode[q] == 1) {
                for (int64_t j = 0; j < m; j++) pq[j] = 0.0f;
            } else if (mode[q] == 2) {
                const float a = at_or_above[q], b = above[q];
                const int64_t cut = cutoff[q];
                for (int64_t j = 0; j < m; j++) {
                    const float t = s + j < cut ? a : b;
                    pq[j] = (pq[j] >= -t && pq[j] <= t) ? 0.0f : pq[j]; /* hardshrink: a NaN is kept */
                }
            } else if (mode[q] == 3) {
                pc_dare_block(pq, drops[q], density, s, m);
            }
            if (mul[q]) {
                const float w = ws[q];
                for (int64_t j = 0; j < m; j++) pq[j] *= w;
            }
        }
        for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
        for (int q = 0; q < k; q++)
            for (int64_t j = 0; j < m; j++) acc[j] += p[(int64_t)q * PC_TIES_BLOCK + j];
        for (int64_t j = 0; j < m; j++) {
            sgn[j] = __builtin_copysignf(1.0f, acc[j]);
            acc[j] = 0.0f;
            den[j] = 0.0f;
        }
        for (int q = 0; q < k; q++) {
            if (ws[q] == 0.0f) continue;
            const float w = ws[q];
            const float *pq = p + (int64_t)q * PC_TIES_BLOCK;
            for (int64_t j = 0; j < m; j++) {
                const float t = pq[j] * sgn[j];
                /* masks, not branches: the loop vectorizes. clamp_min(t, 0) keeps a NaN, as torch's does */
                const uint32_t kept = -(uint32_t)(t > 0.0f || t != t), agrees = -(uint32_t)(t > 0.0f);
                acc[j] += pc_f32_bits(pc_bits_f32(t) & kept);       /* max(t, 0): t, or +0 */
                den[j] += pc_f32_bits(pc_bits_f32(w) & agrees);     /* w·[t > 0]: w, or +0 */
            }
        }
        for (int64_t j = 0; j < m; j++) {
            float r = (acc[j] * sgn[j]) / (den[j] > den_floor ? den[j] : den_floor);
            r = scale ? r * lam : r;
            acc[j] = has_post ? r * post : r;
        }
        if (ocode == 0) memcpy((float *)out + s, acc, (size_t)m * sizeof(float));
        else if (ocode == 1)
            for (int64_t j = 0; j < m; j++) ((uint16_t *)out)[s + j] = pc_f32_to_f16(acc[j]);
        else
            for (int64_t j = 0; j < m; j++) ((uint16_t *)out)[s + j] = pc_f32_to_bf16(acc[j]);
    }
    free(p);
    return 0;
}

/*
 * l1_sums: LiNeS's two L1 norms over [lo, hi) (lo a multiple of PC_L1_BLOCK): for each block b of
 * PC_L1_BLOCK entries, parts[2b] = sum |(+0 + x_0[i]) + x_1[i] + ...| (the inputs widened and summed in
 * float32 in input order, as patches/lines.py's torch path does) and parts[2b + 1] = sum |m[i]| (m
 * float32), each in float64 over 8 lanes combined in a fixed order: the same partial sums however a
 * tensor is split between threads. Returns 0, or -1 for an unknown code.
 */
#define PC_L1_BLOCK 65536
#define PC_L1_STEP 1024
PC_EXPORT PC_TARGETS int pc_l1_sums(const void *const *ins, const int *codes, int k, const float *m, int64_t lo,
                                    int64_t hi, double *parts) {
    for (int q = 0; q < k; q++)
        if (codes[q] < 0 || codes[q] > 2) return -1;
    float acc[PC_L1_STEP], v[PC_L1_STEP], mv[PC_L1_STEP];
    for (int64_t b0 = lo; b0 < hi; b0 += PC_L1_BLOCK) {
        const int64_t b1 = hi - b0 < PC_L1_BLOCK ? hi : b0 + PC_L1_BLOCK;
        double la[8] = {0}, lb[8] = {0};
        for (int64_t s = b0; s < b1; s += PC_L1_STEP) {
            const int64_t mm = b1 - s < PC_L1_STEP ? b1 - s : PC_L1_STEP;
            const int64_t padded = (mm + 7) & ~(int64_t)7;
            for (int64_t j = 0; j < padded; j++) acc[j] = 0.0f;
            for (int q = 0; q < k; q++) {
                pc_widen_block(ins[q], codes[q], s, mm, v);
                for (int64_t j = 0; j < mm; j++) acc[j] += v[j];
            }
            memcpy(mv, m + s, (size_t)mm * sizeof(float));
            for (int64_t j = mm; j < padded; j++) mv[j] = 0.0f;
            for (int64_t j = 0; j < padded; j += 8)
                for (int l = 0; l < 8; l++) {
                    la[l] += (double)__builtin_fabsf(acc[j + l]);
                    lb[l] += (double)__builtin_fabsf(mv[j + l]);
                }
        }
        const int64_t blk = b0 / PC_L1_BLOCK;
        parts[2 * blk] = ((la[0] + la[1]) + (la[2] + la[3])) + ((la[4] + la[5]) + (la[6] + la[7]));
        parts[2 * blk + 1] = ((lb[0] + lb[1]) + (lb[2] + lb[3])) + ((lb[4] + lb[5]) + (lb[6] + lb[7]));
    }
    return 0;
}

/*
 * nonfinite: whether x[0..n) (dtype code) holds a NaN or an infinity: 1 or 0 (-1 for an unknown code).
 * Exponent bits all ones, tested a block at a time (the loop vectorizes; it stops at the first bad block).
 */
PC_EXPORT PC_TARGETS int pc_nonfinite(const void *x, int code, int64_t n) {
    if (code < 0 || code > 2) return -1;
    const int64_t block = 1 << 14;
    for (int64_t s = 0; s < n; s += block) {
        int64_t e = n - s < block ? n : s + block;
        int bad = 0;
        if (code == 0) {
            const uint32_t *u = (const uint32_t *)x;
            for (int64_t i = s; i < e; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
        } else {
            const uint16_t *h = (const uint16_t *)x;
            const uint16_t m = code == 1 ? 0x7c00u : 0x7f80u;
            for (int64_t i = s; i < e; i++) bad |= (h[i] & m) == m;
        }
        if (bad) return 1;
    }
    return 0;
}

/* same: whether n bytes at a and b are equal (1) or not (0). */
PC_EXPORT int pc_same(const void *a, const void *b, int64_t n) {
    const int64_t block = (int64_t)1 << 30;
    for (int64_t s = 0; s < n; s += block) {
        size_t m = (size_t)(n - s < block ? n - s : block);
        if (memcmp((const char *)a + s, (const char *)b + s, m)) return 0;
    }
    return 1;
}

/*
 * sha256: two streams at once with the CPU's SHA instructions (x86-64 SHA-NI).
 *
 * One SHA-256 stream is a chain of dependent sha256rnds2 steps, so a core
 * hashing one buffer waits on their latency (OpenSSL's SHA-NI code: ~1.5 GB/s
 * here); two independent streams interleaved fill those waits (~2.1 GB/s:
 * bench/kernels.py). The merge's verifier hashes many blobs, so it hands them
 * over two at a time. Both functions return -1 where the CPU has no SHA-NI
 * (or this is not x86-64): callers then use hashlib, which gives the same
 * digests (tests compare them on every length around the block edges).
 */
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define PC_SHA_NI 1
#define PC_SHA_TARGET __attribute__((target("sha,sse4.1,ssse3")))

static const uint32_t sha_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
static const uint32_t sha_h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

static int sha_ni(void) {
    static int known = -1;
    if (known < 0) {
        unsigned a, b, c, d, ok = 0;
        if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 9)) && (c & (1u << 19)) &&  /* SSSE3, SSE4.1 */
            __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29)))              /* SHA */
            ok = 1;
        known = (int)ok;
    }
    return known;
}

/* The state as the instructions want it: ABEF and CDGH. */
PC_SHA_TARGET static inline void sha_pack(const uint32_t s[8], __m128i *abef, __m128i *cdgh) {
    __m128i t = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)s), 0xB1);
    __m128i u = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(s + 4)), 0x1B);
    *abef = _mm_alignr_epi8(t, u, 8);
    *cdgh = _mm_blend_epi16(u, t, 0xF0);
}

PC_SHA_TARGET static inline void sha_unpack(uint32_t s[8], __m128i abef, __m128i cdgh) {
    __m128i t = _mm_shuffle_epi32(abef, 0x1B);
    cdgh = _mm_shuffle_epi32(cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)s, _mm_blend_epi16(t, cdgh, 0xF0));
    _mm_storeu_si128((__m128i *)(s + 4), _mm_alignr_epi8(cdgh, t, 8));
}

/* The next four message words from the last sixteen (w: a ring of four quads). */
#define SHA_SCHEDULE(w, i)                                                                                    \
    w[(i) & 3] = _mm_sha256msg2_epu32(                                                                       \
        _mm_add_epi32(_mm_sha256msg1_epu32(w[(i) & 3], w[((i) - 3) & 3]),                                    \
                      _mm_alignr_epi8(w[((i) - 1) & 3], w[((i) - 2) & 3], 4)),                               \
        w[((i) - 1) & 3])

/* Compress n 64-byte blocks of p into s. */
PC_SHA_TARGET static void sha_blocks1(uint32_t s[8], const uint8_t *p, int64_t n) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A, B;
    sha_pack(s, &A, &B);
    for (int64_t b = 0; b < n; b++, p += 64) {
        __m128i a0 = A, b0 = B, w[4], m;
        #pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i < 4)
                w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * i)), bswap);
            else
                SHA_SCHEDULE(w, i);
            m = _mm_add_epi32(w[i & 3], _mm_loadu_si128((const __m128i *)(sha_k + 4 * i)));
            B = _mm_sha256rnds2_epu32(B, A, m);
            A = _mm_sha256rnds2_epu32(A, B, _mm_shuffle_epi32(m, 0x0E));
        }
        A = _mm_add_epi32(A, a0);
        B = _mm_add_epi32(B, b0);
    }
    sha_unpack(s, A, B);
}

/* Compress n blocks of p into s and n blocks of q into t, the two chains interleaved. */
PC_SHA_TARGET static void sha_blocks2(uint32_t s[8], const uint8_t *p, uint32_t t[8], const uint8_t *q, int64_t n) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A, B, C, D;
    sha_pack(s, &A, &B);
    sha_pack(t, &C, &D);
    for (int64_t b = 0; b < n; b++, p += 64, q += 64) {
        __m128i a0 = A, b0 = B, c0 = C, d0 = D, w[4], v[4], k, m, o;
        #pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i < 4) {
                w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * i)), bswap);
                v[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(q + 16 * i)), bswap);
            } else {
                SHA_SCHEDULE(w, i);
                SHA_SCHEDULE(v, i);
            }
            k = _mm_loadu_si128((const __m128i *)(sha_k + 4 * i));
            m = _mm_add_epi32(w[i & 3], k);
            o = _mm_add_epi32(v[i & 3], k);
            B = _mm_sha256rnds2_epu32(B, A, m);
            D = _mm_sha256rnds2_epu32(D, C, o);
            A = _mm_sha256rnds2_epu32(A, B, _mm_shuffle_epi32(m, 0x0E));
            C = _mm_sha256rnds2_epu32(C, D, _mm_shuffle_epi32(o, 0x0E));
        }
        A = _mm_add_epi32(A, a0);
        B = _mm_add_epi32(B, b0);
        C = _mm_add_epi32(C, c0);
        D = _mm_add_epi32(D, d0);
    }
    sha_unpack(s, A, B);
    sha_unpack(t, C, D);
}

/* The last r (< 64) bytes at p, the padding and the length (total bytes); the digest into out[0..32). */
static void sha_finish(uint32_t s[8], const uint8_t *p, size_t r, int64_t total, uint8_t out[32]) {
    uint8_t tail[128] = {0};
    size_t len = r < 56 ? 64 : 128;
    if (r) memcpy(tail, p, r);
    tail[r] = 0x80;
    uint64_t bits = (uint64_t)total * 8;
    for (int i = 0; i < 8; i++) tail[len - 1 - i] = (uint8_t)(bits >> (8 * i));
    sha_blocks1(s, tail, (int64_t)(len / 64));
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s[i] >> 8);
        out[4 * i + 3] = (uint8_t)s[i];
    }
}
#endif

/*
 * sha256_pair: the sha256 of p[0..n) into out[0..32) and, where q is not
 * NULL, of q[0..m) into out[32..64): the blocks the two have in common
 * interleaved, the rest one stream at a time. 0, or -1 without SHA-NI.
 */
PC_EXPORT int pc_sha256_pair(const void *p, int64_t n, const void *q, int64_t m, uint8_t *out) {
#ifdef PC_SHA_NI
    if (!sha_ni()) return -1;
    uint32_t s[8], t[8];
    memcpy(s, sha_h0, sizeof s);
    memcpy(t, sha_h0, sizeof t);
    const uint8_t *a = (const uint8_t *)p, *b = (const uint8_t *)q;
    int64_t both = 0;
    if (b) {
        both = (n < m ? n : m) / 64;
        sha_blocks2(s, a, t, b, both);
        sha_blocks1(t, b + 64 * both, m / 64 - both);
    }
    sha_blocks1(s, a + 64 * both, n / 64 - both);
    sha_finish(s, a + (n & ~(int64_t)63), (size_t)(n & 63), n, out);
    if (b) sha_finish(t, b + (m & ~(int64_t)63), (size_t)(m & 63), m, out + 32);
    return 0;
#else
    (void)p, (void)n, (void)q, (void)m, (void)out;
    return -1;
#endif
}

#if defined(PC_SHA_NI) && (defined(__unix__) || defined(__APPLE__))
#include <errno.h>
#include <unistd.h>
#define PC_SHA_FILES 1
/* Read up to want bytes of fd at off into buf (until the file ends); the bytes read, or -1. */
static int64_t sha_pread(int fd, uint8_t *buf, int64_t want, int64_t off) {
    int64_t got = 0;
    while (got < want) {
        ssize_t r = pread(fd, buf + got, (size_t)(want - got), (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += r;
    }
    return got;
}
#endif

/*
 * sha256_files: pc_sha256_pair over the first n bytes of file fd and, where
 * fd2 >= 0, the first m bytes of fd2 (the merge's verifier, which has no
 * patchctl to read them with): read a chunk (bytes, a multiple of 64; 0 for
 * the default) at a time by positioned reads into one buffer, the two
 * chains interleaved. 0; -1 without SHA-NI; -2 where a read failed or a
 * file ended before its n bytes (the caller hashes that pair another way).
 */
PC_EXPORT int pc_sha256_files(int fd, int64_t n, int fd2, int64_t m, uint8_t *out, int64_t chunk) {
#ifdef PC_SHA_FILES
    if (!sha_ni()) return -1;
    if (chunk <= 0) chunk = (int64_t)256 << 10; /* two chunks stay in L2: the hashing reads what the copy left there */
    chunk &= ~(int64_t)63;
    if (chunk < 64) chunk = 64;
    uint8_t *buf = (uint8_t *)malloc((size_t)(2 * chunk));
    if (!buf) return -2;
    uint8_t *x = buf, *y = buf + chunk;
    uint32_t s[8], t[8];
    memcpy(s, sha_h0, sizeof s);
    memcpy(t, sha_h0, sizeof t);
    int64_t at = 0, total = n > m || fd2 < 0 ? n : m;
    int rc = 0;
    if (fd2 < 0) m = 0;
    for (; at < total; at += chunk) {
        int64_t a = n - at > chunk ? chunk : (n > at ? n - at : 0);
        int64_t b = m - at > chunk ? chunk : (m > at ? m - at : 0);
        if ((a && sha_pread(fd, x, a, at) != a) || (b && sha_pread(fd2, y, b, at) != b)) {
            rc = -2;
            break;
        }
        int64_t both = (a < b ? a : b) / 64;
        if (both) sha_blocks2(s, x, t, y, both);
        if (a / 64 > both) sha_blocks1(s, x + 64 * both, a / 64 - both);
        if (b / 64 > both) sha_blocks1(t, y + 64 * both, b / 64 - both);
        if (a && a < chunk) sha_finish(s, x + (a & ~(int64_t)63), (size_t)(a & 63), n, out);
        if (b && b < chunk) sha_finish(t, y + (b & ~(int64_t)63), (size_t)(b & 63), m, out + 32);
        if (a == chunk && at + chunk == n) sha_finish(s, x, 0, n, out);
        if (b == chunk && at + chunk == m) sha_finish(t, y, 0, m, out + 32);
    }
    if (rc == 0 && n == 0) sha_finish(s, x, 0, 0, out);
    if (rc == 0 && fd2 >= 0 && m == 0) sha_finish(t, y, 0, 0, out + 32);
    free(buf);
    return rc;
#else
    (void)fd, (void)n, (void)fd2, (void)m, (void)out, (void)chunk;
    return -1;
#endif
}

static struct PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                            "C kernels for patchctl (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
