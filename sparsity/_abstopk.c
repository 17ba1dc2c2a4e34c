/* AbsTopK on CPU: keep the k largest |x| of every row, zero the rest (see sparsity/abstopk.py).

   Exact, with the documented tie rule (among entries equal to the row's k-th largest |x|,
   the lowest indices are kept), for float32, bfloat16 and float16. The order of |x| is the
   order of the sign-cleared bit patterns ("keys"), so selection works on integers.

   Per row, three passes over the row (it sits in L1 after the first):
   1. the keys and the row's mean |x|;
   2. a bracket [lo, hi) of keys around the predicted k-th |x| (the mean |x| times a ratio
      learned over the thread's previous rows: rows at one location are alike, and the ratio
      varies far less than either term): how many keys lie at or above hi, and a copy of
      the few inside (about 20 of 256); ranking those (up to 32: each key's count of larger
      keys) or a quickselect among them (more) gives the k-th key exactly
      whenever the bracket holds it (97% of the rows of benchmarks/train_step.py's forward;
      the rest on a second try with a 4x wider bracket, and a radix select over the whole row
      if that misses too — unless the row holds at most k nonzeros, which keeps them all and
      then its lowest-index zeros, with no selection);
   3. y = x where kept, +0 elsewhere — in place when y is x.
   The bracket's half-width follows the running error of the prediction. Only the speed
   depends on the prediction, never the result. Rows are split over `threads` OpenMP
   threads, and the next rows are prefetched while one is worked on. The GIL is released
   throughout. On x86-64 an AVX2 version, picked at run time, packs pass 2's copies without
   branches (AVX-512 measured no faster).

   The kept set can also come out as bits (1 per element), which is all the backward keeps:
   autograd then holds 1/32 of a float32 activation, not the activation itself.

   Built by `pip install` (pyproject.toml, ext-modules); after editing this file re-run
   `pip install -e .` — an optional build that fails keeps the old module in place. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Threads: OpenMP, so the kernel runs on torch's own OpenMP pool (the extension links
   libgomp.so.1, which is the one torch has already loaded). Separate POSIX threads measured
   ~2x slower inside a forward: torch's idle OpenMP workers spin on the cores they need. */
#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(threads) schedule(static, 1)") /* over `threads` */
#else
#define PARALLEL_FOR
#endif

#define MAX_THREADS 256

/* The r-th largest (1-based) of buf[0..c), all in [base, base + 2^bits): radix select with
   6-bit digits, compacting in place. *gt: how many are larger, *eq: how many equal it. */
static uint32_t select_rth(uint32_t *buf, int64_t c, int64_t r, uint32_t base, int bits, int64_t *gt, int64_t *eq) {
    int64_t above = 0;
    uint32_t prefix = 0;
    while (bits > 0 && c > 1) {
        int s = bits > 6 ? bits - 6 : 0;
        uint32_t m = (1u << (bits - s)) - 1, h[64] = {0};
        for (int64_t i = 0; i < c; i++) h[((buf[i] - base) >> s) & m]++;
        int d = (int)m;
        while (above + h[d] < r) above += h[d--];
        int64_t c2 = 0;
        for (int64_t i = 0; i < c; i++) {
            uint32_t v = buf[i];
            buf[c2] = v;
            c2 += (((v - base) >> s) & m) == (uint32_t)d;
        }
        c = c2;
        bits = s;
        prefix |= (uint32_t)d << s;
    }
    *gt = above;
    if (bits == 0) {
        *eq = c;
        return base + prefix;
    }
    *eq = 1; /* one key left whose prefix no other key shares */
    return buf[0];
}

/* The r-th largest (1-based) of buf[0..c) by quickselect, for the few keys in a bracket.
   Each round splits its keys three ways (> p, == p, < p) into two other arrays, without
   branches (a mispredicted branch per key cost more than all the rest of a row) and
   without reading back what it just wrote. s1, s2: scratch of c entries each. *gt, *eq as
   for select_rth. */
static uint32_t select_small(uint32_t *buf, uint32_t *s1, uint32_t *s2, int64_t c, int64_t r, uint32_t guess, int64_t *gt,
                             int64_t *eq) {
    uint32_t *in = buf, *hi = s1, *lo = s2, p = guess; /* first pivot: the caller's guess */
    int64_t above = 0, want = r - 1; /* want: position in descending order within in[0..c) */
    for (int round = 0;; round++) {
        if (round) { /* then the median of three */
            uint32_t a = in[0], b = in[c / 2], d = in[c - 1];
            p = a < b ? (b < d ? b : a < d ? d : a) : (a < d ? a : b < d ? d : b);
        }
        int64_t nh = 0, nl = 0;
        for (int64_t i = 0; i < c; i++) {
            uint32_t v = in[i];
            hi[nh] = v;
            lo[nl] = v;
            nh += v > p;
            nl += v < p;
        }
        int64_t ne = c - nh - nl; /* >= 1 after the first round: p is one of them */
        if (want < nh) { /* in the keys above p */
            uint32_t *t = in;
            in = hi;
            hi = t;
            c = nh;
        } else if (want < nh + ne) { /* p itself */
            *gt = above + nh;
            *eq = ne;
            return p;
        } else { /* below p */
            above += nh + ne;
            want -= nh + ne;
            uint32_t *t = in;
            in = lo;
            lo = t;
            c = nl;
        }
    }
}

/* The r-th largest (1-based) of buf[0..c), c <= 32, by counting for every key how many are
   larger: the answer is the smallest key with fewer than r larger. All compares, no
   branches on the data. buf has room for c rounded up to 8; keys are >= 1 (0 pads). *gt,
   *eq as for select_rth. */
static inline __attribute__((always_inline)) uint32_t select_by_rank(uint32_t *buf, int64_t c, int64_t r, int64_t *gt, int64_t *eq) {
    typedef int32_t v8 __attribute__((vector_size(32)));
    const int nb = (int)((c + 7) / 8);
    for (int64_t i = c; i < 8 * nb; i++) buf[i] = 0; /* a pad has c larger, so it is never chosen */
    v8 kv[4], cnt[4];
    for (int q = 0; q < 4; q++) {
        memcpy(&kv[q], buf + 8 * (q < nb ? q : 0), 32);
        cnt[q] = (v8){0};
    }
    for (int64_t j = 0; j < c; j++) {
        const v8 b = (v8){0} + (int32_t)buf[j];
        for (int q = 0; q < 4; q++)
            if (q < nb) cnt[q] -= b > kv[q];
    }
    v8 best = (v8){0} + INT32_MAX;
    for (int q = 0; q < nb; q++) {
        v8 take = (cnt[q] < (int32_t)r) & (kv[q] < best);
        best = (take & kv[q]) | (~take & best);
    }
    int32_t t = best[0];
    for (int l = 1; l < 8; l++) t = best[l] < t ? best[l] : t;
    v8 g = {0}, e = {0};
    for (int q = 0; q < nb; q++) {
        g -= kv[q] > t;
        e -= kv[q] == t;
    }
    int64_t ng = 0, ne = 0;
    for (int l = 0; l < 8; l++) ng += g[l], ne += e[l];
    *gt = ng;
    *eq = ne;
    return (uint32_t)t;
}

typedef struct {
    const char *x;
    int64_t stride; /* elements between rows of x */
    char *y;        /* may be x itself (in place) */
    int64_t ystride;
    int64_t r0, r1, n, k;
    int dtype; /* DT_F32, DT_BF16 or DT_F16 */
    uint8_t *mask; /* NULL, or the kept set as bits: bit i of row r at mask[r * mstride + i / 8], bit i % 8 */
    int64_t mstride;
    int failed;
} job_t;

enum { DT_F32, DT_BF16, DT_F16 };

/* Keys and approximate values. A key maps to a float of about its |x| (exact for float32
   and bfloat16; float16 through its exponent and mantissa bits, subnormals approximated),
   and a float maps back to a key; monotone both ways. Only the bracket uses them, so only
   the speed depends on their accuracy. */
static inline float f32_of_bits(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline uint32_t bits_of_f32(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}
#define F16_BIAS (112u << 23) /* float32 exponent bias minus float16's, in place */
static inline float value_of_key(uint32_t key, int dtype) {
    return f32_of_bits(dtype == DT_F32 ? key : dtype == DT_BF16 ? key << 16 : (key << 13) + F16_BIAS);
}
/* The largest key whose value is <= v (v >= 0, finite): a bracket's lower end. */
static inline uint32_t key_at_or_below(float v, int dtype) {
    uint32_t b = bits_of_f32(v);
    if (dtype == DT_F32) return b;
    if (dtype == DT_BF16) return b >> 16;
    return b <= F16_BIAS ? 0 : (b - F16_BIAS) >> 13 > 0x7C00 ? 0x7C00 : (b - F16_BIAS) >> 13;
}

typedef float v8f __attribute__((vector_size(32))); /* GCC/Clang vectors: SSE2, AVX2 or NEON */
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

/* Pass 1: keys (sign-cleared bits, whose order is the order of |x|) and the sum of the
   rows' approximate |x|, in 8 float lanes (a fixed order: the same sum every run). */
static inline __attribute__((always_inline)) float keys_and_sum(const char *xr, int64_t n, int dtype, uint32_t *keys) {
    v8f acc = {0};
    int64_t i = 0;
    if (dtype == DT_F32) {
        for (; i + 8 <= n; i += 8) {
            v8u v;
            memcpy(&v, xr + 4 * i, 32);
            v &= 0x7FFFFFFFu;
            memcpy(keys + i, &v, 32);
            acc += (v8f)v;
        }
        for (; i < n; i++) keys[i] = ((const uint32_t *)xr)[i] & 0x7FFFFFFFu;
    } else {
        const uint16_t *xb = (const uint16_t *)xr;
        const uint32_t shift = dtype == DT_BF16 ? 16 : 13, add = dtype == DT_BF16 ? 0 : F16_BIAS;
        for (; i + 8 <= n; i += 8) {
            v8u v = {xb[i], xb[i + 1], xb[i + 2], xb[i + 3], xb[i + 4], xb[i + 5], xb[i + 6], xb[i + 7]};
            v &= 0x7FFFu;
            memcpy(keys + i, &v, 32);
            acc += (v8f)((v << shift) + add);
        }
        for (; i < n; i++) keys[i] = xb[i] & 0x7FFFu;
    }
    float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (int64_t t = n & ~(int64_t)7; t < n; t++) sum += value_of_key(keys[t], dtype);
    return sum;
}

/* How many keys are not 0 (|x| > 0). */
static inline __attribute__((always_inline)) int64_t count_nonzero(const uint32_t *keys, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += keys[i] != 0;
    return c;
}

/* The scalar end of pass 2, from key i on (c copied and nh counted so far). */
static inline __attribute__((always_inline)) int64_t bracket_tail(const uint32_t *keys, int64_t i, int64_t n, uint32_t lo, uint32_t hi,
                                                                  uint32_t *buf, int64_t c, int64_t nh, int64_t *ge_hi) {
    for (; i < n; i++) {
        nh += keys[i] >= hi;
        if (keys[i] - lo < hi - lo) buf[c++] = keys[i];
    }
    *ge_hi = nh;
    return c;
}

/* Pass 2: the keys in [lo, hi) copied to buf (their count is returned; buf has room for
   n + 8) and how many keys are >= hi. Keys are < 2^31, so signed compares order them;
   1 <= lo < hi <= 2^31. */
static inline __attribute__((always_inline)) int64_t bracket_generic(const uint32_t *keys, int64_t n, uint32_t lo, uint32_t hi,
                                                                     uint32_t *buf, int64_t *ge_hi) {
    v8i chi = {0};
    const int32_t l1 = (int32_t)(lo - 1), h1 = (int32_t)(hi - 1);
    int64_t c = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        v8i a;
        memcpy(&a, keys + i, 32);
        v8i gh = a > h1, in = (a > l1) & ~gh;
        chi -= gh;
        uint64_t w[4]; /* any lane in the bracket? */
        memcpy(w, &in, 32);
        if (w[0] | w[1] | w[2] | w[3])
            for (int64_t l = i; l < i + 8; l++)
                if (keys[l] - lo < hi - lo) buf[c++] = keys[l];
    }
    int64_t nh = 0;
    for (int l = 0; l < 8; l++) nh += chi[l];
    return bracket_tail(keys, i, n, lo, hi, buf, c, nh, ge_hi);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
/* Pass 2 on AVX2, without branches: the in-bracket lanes of each 8 are packed to the front
   by a permutation looked up from their bit mask (PACK: the lanes' indices, 4 bits each). */
static uint32_t PACK[256];
static void init_pack(void) {
    for (unsigned m = 0; m < 256; m++) {
        uint32_t v = 0;
        for (unsigned l = 0, o = 0; l < 8; l++)
            if (m >> l & 1) v |= l << (4 * o++);
        PACK[m] = v;
    }
}
#define TARGET_AVX2 __attribute__((target("avx2,bmi,popcnt")))
TARGET_AVX2 static int64_t bracket_avx2(const uint32_t *keys, int64_t n, uint32_t lo, uint32_t hi, uint32_t *buf,
                                        int64_t *ge_hi) {
    const __m256i l1 = _mm256_set1_epi32((int32_t)(lo - 1)), h1 = _mm256_set1_epi32((int32_t)(hi - 1));
    const __m256i nib = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), seven = _mm256_set1_epi32(7);
    __m256i chi = _mm256_setzero_si256();
    int64_t c = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(keys + i));
        __m256i gh = _mm256_cmpgt_epi32(a, h1);
        chi = _mm256_sub_epi32(chi, gh);
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gh, _mm256_cmpgt_epi32(a, l1))));
        __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)PACK[m]), nib), seven);
        _mm256_storeu_si256((__m256i *)(buf + c), _mm256_permutevar8x32_epi32(a, idx));
        c += __builtin_popcount(m);
    }
    int32_t th[8];
    _mm256_storeu_si256((__m256i *)th, chi);
    int64_t nh = 0;
    for (int l = 0; l < 8; l++) nh += th[l];
    return bracket_tail(keys, i, n, lo, hi, buf, c, nh, ge_hi);
}

/* The sign bits of 8 lanes. Not always_inline: the generic rows_impl also names it, in a
   branch its constant isa removes, and an always_inline AVX2 call there fails to build. */
TARGET_AVX2 static inline uint8_t movemask8(v8i v) { return (uint8_t)_mm256_movemask_ps(_mm256_castsi256_ps((__m256i)v)); }

#else
#define HAVE_AVX2_PATH 0
static void init_pack(void) {}
#endif

enum { ISA_GENERIC, ISA_AVX2 };

/* One element of pass 3: y[i] = x[i] if keep, else +0; its bit into mr (if not NULL, the
   byte already cleared). */
static inline __attribute__((always_inline)) void write_one(const char *xr, char *yr, uint8_t *mr, int64_t i, int64_t esize, int keep) {
    if (esize == 4) ((uint32_t *)yr)[i] = keep ? ((const uint32_t *)xr)[i] : 0;
    else ((uint16_t *)yr)[i] = keep ? ((const uint16_t *)xr)[i] : 0;
    if (mr) mr[i >> 3] |= (uint8_t)(keep << (i & 7));
}

/* Pass 3 where the kept set is key >= t: y = x there, +0 elsewhere; mr (if not NULL) gets
   the bits. */
static inline __attribute__((always_inline)) void write_kept(const uint32_t *keys, const char *xr, char *yr, uint8_t *mr, int64_t n,
                                                             int64_t esize, uint32_t t, const int isa) {
    const v8i tt = {(int32_t)t, (int32_t)t, (int32_t)t, (int32_t)t, (int32_t)t, (int32_t)t, (int32_t)t, (int32_t)t};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8i kk;
        memcpy(&kk, keys + i, 32);
        v8i keep = kk >= tt; /* keys < 2^31: signed compares order them */
        if (esize == 4) {
            v8u v;
            memcpy(&v, xr + 4 * i, 32);
            v &= (v8u)keep;
            memcpy(yr + 4 * i, &v, 32);
        } else {
            v8h v;
            memcpy(&v, xr + 2 * i, 16);
            v &= __builtin_convertvector(keep, v8h);
            memcpy(yr + 2 * i, &v, 16);
        }
        if (mr) {
#if HAVE_AVX2_PATH
            if (isa == ISA_AVX2) {
                mr[i >> 3] = movemask8(keep);
                continue;
            }
#endif
            unsigned b = 0;
            for (int l = 0; l < 8; l++) b |= (unsigned)(keep[l] & 1) << l;
            mr[i >> 3] = (uint8_t)b;
        }
    }
    if (i < n && mr) mr[i >> 3] = 0;
    for (; i < n; i++) write_one(xr, yr, mr, i, esize, keys[i] >= t);
}

/* Pass 3 with ties at the k-th key t: keep every key > t, then the first `need` keys == t. */
static void write_ties(const uint32_t *keys, const char *xr, char *yr, uint8_t *mr, int64_t n, int64_t esize, uint32_t t, int64_t need) {
    if (mr) memset(mr, 0, (size_t)((n + 7) / 8));
    for (int64_t i = 0; i < n; i++) {
        const int keep = keys[i] > t || (keys[i] == t && need > 0);
        need -= keys[i] == t && need > 0;
        write_one(xr, yr, mr, i, esize, keep);
    }
}

/* Rows r0..r1 of one thread: the three passes of the header, per row. The prediction's
   state (ratio, dev) lives per thread, learned from its earlier rows. */
#define PREFETCH_ROWS 2 /* rows ahead (1, 2 and 4 measured alike) */

static inline __attribute__((always_inline)) void rows_impl(job_t *j, const int isa) {
    const int dtype = j->dtype;
    const int64_t n = j->n, k = j->k, esize = dtype == DT_F32 ? 4 : 2;
    const int kbits = dtype == DT_F32 ? 31 : 15;
    uint32_t *keys = malloc(sizeof(uint32_t) * ((size_t)n * 4 + 24)); /* keys, buf (+8: pass 2 writes 8 at a time), 2 scratch */
    if (!keys) {
        j->failed = 1;
        return;
    }
    uint32_t *buf = keys + n, *s1 = buf + n + 8, *s2 = s1 + n + 8;
    float ratio = 0.f, dev = 0.f; /* k-th |x| / mean |x|, and its mean relative error */
    int have = 0;
    for (int64_t r = j->r0; r < j->r1; r++) {
        const char *xr = j->x + r * j->stride * esize;
        if (r + PREFETCH_ROWS < j->r1) { /* a later row into cache while this one is worked on: ~18% faster */
            const char *nx = xr + PREFETCH_ROWS * j->stride * esize;
            for (int64_t b = 0; b < n * esize; b += 64) __builtin_prefetch(nx + b, 1);
        }
        if (k == 0) { /* nothing kept */
            memset(j->y + r * j->ystride * esize, 0, (size_t)(n * esize));
            if (j->mask) memset(j->mask + r * j->mstride, 0, (size_t)((n + 7) / 8));
            continue;
        }
        int64_t nonzero = n, T = -1, n_gt = 0, n_eq = 0;
        const float mean = keys_and_sum(xr, n, dtype, keys) / (float)n;
        const int usable = mean > 0.f && mean < 1e30f; /* finite, nonzero: a scale to predict from */
        /* the bracket, and once more at about 4x its width when the k-th key falls outside */
        for (int attempt = 0; attempt < 2 && T < 0 && have && usable; attempt++) {
            float w = (attempt ? 12.f : 3.f) * dev + (attempt ? 0.05f : 1e-3f);
            if (w > 0.9f) w = 0.9f;
            const float pred = ratio * mean;
            uint32_t lo = key_at_or_below(pred * (1.f - w), dtype), hi = key_at_or_below(pred * (1.f + w), dtype) + 1;
            if (lo < 1) lo = 1;
            if (hi > 1u << kbits) hi = 1u << kbits;
            if (lo >= hi) break;
            int64_t ge_hi, c;
#if HAVE_AVX2_PATH
            c = isa == ISA_AVX2 ? bracket_avx2(keys, n, lo, hi, buf, &ge_hi) : bracket_generic(keys, n, lo, hi, buf, &ge_hi);
#else
            c = bracket_generic(keys, n, lo, hi, buf, &ge_hi);
#endif
            if (ge_hi < k && ge_hi + c >= k) { /* the k-th key is in [lo, hi) */
                int64_t g2, e2;
                if (c <= 32)
                    T = select_by_rank(buf, c, k - ge_hi, &g2, &e2);
                else if (c <= 512) {
                    /* a first pivot where the (k - ge_hi)-th of c keys spread evenly over [lo, hi) would be */
                    uint32_t guess = hi - 1 - (uint32_t)((double)(hi - lo) * ((double)(k - ge_hi) - 0.5) / (double)c);
                    T = select_small(buf, s1, s2, c, k - ge_hi, guess, &g2, &e2);
                } else {
                    int bits = 0;
                    while (((uint64_t)1 << bits) < (uint64_t)(hi - lo)) bits++;
                    T = select_rth(buf, c, k - ge_hi, lo, bits, &g2, &e2);
                }
                n_gt = ge_hi + g2;
                n_eq = e2;
            }
        }
        if (T < 0) { /* first row of this thread, a row without a usable scale, or a miss */
            nonzero = count_nonzero(keys, n);
            if (nonzero <= k) { /* the k-th |x| is 0: every nonzero kept, then the lowest-index zeros */
                T = 0;
                n_gt = nonzero;
                n_eq = n - nonzero;
            } else {
                memcpy(buf, keys, sizeof(uint32_t) * (size_t)n);
                T = select_rth(buf, n, k, 0, kbits, &n_gt, &n_eq);
            }
        }
        const float kth = value_of_key((uint32_t)T, dtype);
        if (usable && kth > 0.f && kth < 1e30f) {
            const float rr = kth / mean;
            if (have) {
                float e = rr / ratio - 1.f;
                e = e < 0.f ? -e : e;
                dev += (e - dev) * 0.125f;
                ratio += (rr - ratio) * 0.125f;
            } else {
                ratio = rr;
                dev = 0.1f;
                have = 1;
            }
        }
        /* Pass 3: y = x where kept, +0 elsewhere, and the kept set's bits when asked for; x and
           y may be one buffer (each element is read before it is written). A k-th |x| of 0
           keeps every nonzero and then the lowest-index zeros, which are +0 either way. */
        char *yr = j->y + r * j->ystride * esize;
        uint8_t *mr = j->mask ? j->mask + r * j->mstride : NULL;
        if (T && n_gt + n_eq != k) /* ties at the k-th key: keep > T, then the lowest-index ties */
            write_ties(keys, xr, yr, mr, n, esize, (uint32_t)T, k - n_gt);
        else {
            write_kept(keys, xr, yr, mr, n, esize, T ? (uint32_t)T : 1u, isa);
            if (!T && mr) /* the zeros kept: their bits (their values are +0 already) */
                for (int64_t i = 0, need = k - nonzero; need > 0 && i < n; i++)
                    if (keys[i] == 0) mr[i >> 3] |= (uint8_t)(1u << (i & 7)), need--;
        }
    }
    free(keys);
}

#if HAVE_AVX2_PATH
TARGET_AVX2 static void run_rows_avx2(job_t *j) { rows_impl(j, ISA_AVX2); }
#endif
static void run_rows_generic(job_t *j) { rows_impl(j, ISA_GENERIC); }

static int cpu_has_avx2(void) {
#if HAVE_AVX2_PATH
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("popcnt");
#else
    return 0;
#endif
}
static int use_avx2; /* set at load where the CPU has it; isa() can turn it off (tests run both) */

static void run_rows(job_t *j) {
#if HAVE_AVX2_PATH
    if (use_avx2) {
        run_rows_avx2(j);
        return;
    }
#endif
    run_rows_generic(j);
}

/* isa([name]): the selection's instruction set, "avx2" or "generic" (the portable vector
   code every other CPU runs); with a name, switch to it. Returns the one in use before. */
static PyObject *py_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    PyObject *old = PyUnicode_FromString(use_avx2 ? "avx2" : "generic");
    if (name && strcmp(name, "generic") == 0) use_avx2 = 0;
    else if (name && strcmp(name, "avx2") == 0 && cpu_has_avx2()) use_avx2 = 1;
    else if (name) {
        Py_XDECREF(old);
        PyErr_SetString(PyExc_ValueError, cpu_has_avx2() ? "abstopk isa: choose 'avx2' or 'generic'" : "abstopk isa: this CPU runs 'generic' only");
        return NULL;
    }
    return old;
}

/* select(x, x_stride, y, y_stride, rows, n, k, dtype, threads[, mask, mask_stride]):
   addresses as ints; dtype 0 float32, 1 bfloat16, 2 float16.
   x: rows × n elements, rows x_stride elements apart; y likewise (y_stride); y may be x (in
   place, same stride). mask (0: none): the kept set as bits, rows mask_stride bytes apart
   (>= ceil(n / 8)), bit i of a row in its byte i / 8, bit i % 8 — what the backward reads.
   Requires 0 <= k < n. */
static PyObject *py_select(PyObject *self, PyObject *args) {
    unsigned long long xp, yp, mp = 0;
    long long xstride, ystride, rows, n, k, mstride = 0;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, "KLKLLLLii|KL", &xp, &xstride, &yp, &ystride, &rows, &n, &k, &dtype, &threads, &mp, &mstride)) return NULL;
    if (!(dtype == DT_F32 || dtype == DT_BF16 || dtype == DT_F16) || n <= 0 || k < 0 || k >= n || rows < 0 || xstride < n || ystride < n ||
        (xp == yp && xstride != ystride) || (mp && mstride < (n + 7) / 8)) {
        PyErr_SetString(PyExc_ValueError, "abstopk: needs dtype 0 (float32), 1 (bfloat16) or 2 (float16), 0 <= k < n, row strides >= n "
                                          "(equal in place), a mask stride >= ceil(n / 8) bytes");
        return NULL;
    }
    if (threads > rows) threads = (int)rows;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++)
        jobs[t] = (job_t){(const char *)(uintptr_t)xp, xstride, (char *)(uintptr_t)yp, ystride, rows * t / threads, rows * (t + 1) / threads,
                          n, k, dtype, (uint8_t *)(uintptr_t)mp, mstride, 0};
    Py_BEGIN_ALLOW_THREADS
    PARALLEL_FOR
    for (int t = 0; t < threads; t++) run_rows(&jobs[t]);
    Py_END_ALLOW_THREADS
    for (int t = 0; t < threads; t++)
        if (jobs[t].failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* x86-64: an AVX2 copy beside the baseline one, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FAST_CLONES
#endif

typedef struct {
    const uint8_t *mask;
    const char *g;
    char *out;
    int64_t ms, gs, os; /* row strides: bytes for the mask, elements for g and out */
    int64_t r0, r1, n;
    int wide;
} bjob_t;

/* The backward: out = g where the forward's mask bit is set, +0 elsewhere. */
FAST_CLONES static void run_backward(void *arg) {
    bjob_t *j = (bjob_t *)arg;
    const int64_t n = j->n;
    const v8u bit = {1, 2, 4, 8, 16, 32, 64, 128};
    for (int64_t r = j->r0; r < j->r1; r++) {
        const uint8_t *m = j->mask + r * j->ms;
        int64_t i = 0;
        if (j->wide) {
            const uint32_t *g = (const uint32_t *)j->g + r * j->gs;
            uint32_t *o = (uint32_t *)j->out + r * j->os;
            for (; i + 8 <= n; i += 8) {
                v8u v, keep = ((v8u){0} + m[i >> 3]) & bit;
                memcpy(&v, g + i, 32);
                v &= (v8u)(keep != 0);
                memcpy(o + i, &v, 32);
            }
            for (; i < n; i++) o[i] = m[i >> 3] >> (i & 7) & 1 ? g[i] : 0;
        } else {
            const uint16_t *g = (const uint16_t *)j->g + r * j->gs;
            uint16_t *o = (uint16_t *)j->out + r * j->os;
            for (; i + 8 <= n; i += 8) {
                v8u keep = ((v8u){0} + m[i >> 3]) & bit;
                v8h v;
                memcpy(&v, g + i, 16);
                v &= __builtin_convertvector((v8i)(keep != 0), v8h);
                memcpy(o + i, &v, 16);
            }
            for (; i < n; i++) o[i] = m[i >> 3] >> (i & 7) & 1 ? g[i] : 0;
        }
    }
}

/* backward(mask, mask_stride, g, g_stride, out, out_stride, rows, n, elem_bytes, threads):
   out = g at the entries select kept (its mask's bits), +0 elsewhere. */
static PyObject *py_backward(PyObject *self, PyObject *args) {
    unsigned long long mp, gp, op;
    long long ms, gs, os, rows, n;
    int ebytes, threads;
    if (!PyArg_ParseTuple(args, "KLKLKLLLii", &mp, &ms, &gp, &gs, &op, &os, &rows, &n, &ebytes, &threads)) return NULL;
    if (!(ebytes == 2 || ebytes == 4) || n <= 0 || rows < 0 || ms < (n + 7) / 8 || gs < n || os < n) {
        PyErr_SetString(PyExc_ValueError, "abstopk backward: needs 2- or 4-byte elements, a mask stride >= ceil(n / 8) bytes, row strides >= n");
        return NULL;
    }
    if (threads > rows) threads = (int)rows;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    bjob_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++)
        jobs[t] = (bjob_t){(const uint8_t *)(uintptr_t)mp, (const char *)(uintptr_t)gp, (char *)(uintptr_t)op, ms, gs, os,
                           rows * t / threads, rows * (t + 1) / threads, n, ebytes == 4};
    Py_BEGIN_ALLOW_THREADS
    PARALLEL_FOR
    for (int t = 0; t < threads; t++) run_backward(&jobs[t]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"select", py_select, METH_VARARGS, "AbsTopK rows: select(x, x_stride, y, y_stride, rows, n, k, dtype, threads[, mask, mask_stride])"},
    {"isa", py_isa, METH_VARARGS, "isa([name]): the selection's instruction set ('avx2' or 'generic'), switched to name if given; returns the previous"},
    {"backward", py_backward, METH_VARARGS,
     "its gradient: backward(mask, mask_stride, g, g_stride, out, out_stride, rows, n, elem_bytes, threads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_abstopk", "AbsTopK CPU kernel (sparsity/abstopk.py)", -1, methods};

PyMODINIT_FUNC PyInit__abstopk(void) {
    init_pack();
    use_avx2 = cpu_has_avx2();
    return PyModule_Create(&module);
}
