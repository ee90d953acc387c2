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

/* Version of this ABI: native.py refuses a library whose version differs. */
PC_EXPORT int pc_abi_version(void) { return 1; }

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
 * row 0 = chunk s / chunk): sums[row * nk + j] = sum(gap >> (k0 + j)).
 * With check, every idx[i] (and idx[s-1]) must lie in [0, numel) and gaps be
 * >= 0. *gmax gets the largest gap. Returns 0, or -1 on a bad index.
 */
PC_EXPORT int pc_gap_sums(const int64_t *idx, int64_t s, int64_t e, int64_t numel, int k0, int nk,
                          int64_t chunk, int64_t *sums, int64_t *gmax, int check) {
    int64_t prev = -1, gm = 0;
    if (s > 0) {
        prev = idx[s - 1];
        if (check && (prev < 0 || prev >= numel)) return -1;
    }
    for (int64_t cs = s, row = 0; cs < e; cs += chunk, row++) {
        int64_t ce = e - cs < chunk ? e : cs + chunk;
        uint64_t acc[64] = {0};
        for (int64_t i = cs; i < ce; i++) {
            int64_t v = idx[i];
            if (check && (v < 0 || v >= numel)) return -1;
            int64_t g = v - prev - 1;
            if (check && g < 0) return -1;
            prev = v;
            if (g > gm) gm = g;
            for (int j = 0; j < nk; j++) acc[j] += (uint64_t)g >> (k0 + j);
        }
        for (int j = 0; j < nk; j++) sums[row * nk + j] = (int64_t)acc[j];
    }
    *gmax = gm;
    return 0;
}

/* the bit 7 - t of the result is bit 0 of byte t of y, t = 0..7 */
static inline uint8_t gather_lsb(uint64_t y) {
    y &= 0x0101010101010101ull;
    return (uint8_t)((y * 0x8040201008040201ull) >> 56);
}

/*
 * rice_encode: Golomb-Rice code, parameter k, of the gaps of idx[s..e)
 * (idx already checked by gap_sums). The unary codes go to P1 from absolute
 * bit `bitoff` on, MSB first, into p1, which must be zero there. The byte
 * holding bit `bitoff` may be shared with the range before: its bits go to
 * *head instead (the caller ORs it in after all ranges are done). The
 * remainders go to the k bit planes of P2 (plane p = bit k-1-p of every
 * remainder, `plane` bytes each, MSB first); s must be a multiple of 8.
 */
PC_EXPORT void pc_rice_encode(const int64_t *idx, int64_t s, int64_t e, int k, uint8_t *p1, int64_t bitoff,
                              uint8_t *p2, int64_t plane, uint8_t *head) {
    int64_t prev = s > 0 ? idx[s - 1] : -1;
    uint64_t pos = (uint64_t)bitoff;
    const uint64_t b0 = pos >> 3;
    uint8_t h = 0;
    const uint64_t rmask = k >= 64 ? ~0ull : ((1ull << k) - 1);
    for (int64_t i = s; i < e; i += 8) {
        int64_t m = e - i < 8 ? e - i : 8;
        uint64_t r[8] = {0};
        for (int64_t t = 0; t < m; t++) {
            uint64_t g = (uint64_t)(idx[i + t] - prev - 1);
            prev = idx[i + t];
            r[t] = g & rmask;
            pos += g >> k; /* q zero bits, then the one bit at pos */
            uint64_t byte = pos >> 3;
            uint8_t bit = (uint8_t)(0x80u >> (pos & 7));
            if (byte == b0)
                h |= bit;
            else
                p1[byte] |= bit;
            pos++;
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
    *head = h;
}

static struct PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                            "C kernels for patchctl (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
