/* AbsTopK on CPU: keep the k largest |x| of every row, zero the rest (see sparsity/abstopk.py).

   Exact, with the documented tie rule (among entries equal to the row's k-th largest |x|,
   the lowest indices are kept), for float32, bfloat16 and float16. The order of |x| is the
   order of the sign-cleared bit patterns ("keys"), so selection works on integers.

   Per row: one vectorised pass makes the keys and their mean; a histogram of 64 bins over
   a bracket [lo, hi) of keys, centred on the previous row's k-th key relative to its mean
   (rows at one location are alike), finds the bin that holds the k-th key; a radix select
   over the few keys in that bin gives it exactly. When the bracket misses (the k-th key
   lies outside it) a radix select over the whole row runs instead and the bracket widens;
   it narrows again after a run of hits. Only the speed depends on the bracket, never the
   result. Rows are split over `threads` OpenMP threads. The GIL is released throughout.

   Built by `pip install` (pyproject.toml, ext-modules); after editing this file re-run
   `pip install -e .` — an optional build that fails keeps the old module in place. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NB 64

/* Threads: OpenMP, so the kernel runs on torch's own OpenMP pool (the extension links
   libgomp.so.1, which is the one torch has already loaded). Separate POSIX threads measured
   ~2x slower inside a forward: torch's idle OpenMP workers spin on the cores they need. */
#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for num_threads(threads) schedule(static, 1)") /* over `threads` */
#else
#define PARALLEL_FOR
#endif

typedef uint32_t v4u __attribute__((vector_size(16))); /* GCC/Clang vectors: SSE2 or NEON */
typedef uint64_t v2w __attribute__((vector_size(16)));
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

typedef struct {
    const char *x;
    int64_t stride; /* elements between rows of x */
    char *y;
    uint8_t *mask;
    int64_t r0, r1, n, k;
    int wide; /* 4-byte elements (float32) or 2-byte (bfloat16, float16) */
    int failed;
} job_t;

/* x86-64: an AVX2 copy beside the baseline one, picked at load time (~18% faster measured). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FAST_CLONES
#endif

FAST_CLONES static void run_rows(void *arg) {
    job_t *j = (job_t *)arg;
    const int wide = j->wide;
    const int64_t n = j->n, k = j->k, esize = wide ? 4 : 2;
    const int kbits = wide ? 31 : 15, mbits = wide ? 23 : 7;
    uint32_t *keys = malloc(sizeof(uint32_t) * (size_t)n * 2 + (size_t)n * 2); /* keys, buf, mask scratch, bins */
    if (!keys) {
        j->failed = 1;
        return;
    }
    uint32_t *buf = keys + n;
    int dlog = mbits - 1, hits = 0, have_off = 0; /* bracket: centre ± 2^dlog keys (×/÷ √2) */
    int64_t off = 0;
    for (int64_t r = j->r0; r < j->r1; r++) {
        const char *xr = j->x + r * j->stride * esize;
        uint64_t sum = 0; /* of keys >> 16 (float32) in 32-bit lanes: vectorises; a bracket centre needs no more */
        if (wide) {
            const uint32_t *xb = (const uint32_t *)xr;
            for (int64_t i0 = 0; i0 < n; i0 += 32768) {
                uint32_t part = 0;
                int64_t i1 = i0 + 32768 < n ? i0 + 32768 : n;
                for (int64_t i = i0; i < i1; i++) {
                    uint32_t v = xb[i] & 0x7FFFFFFFu;
                    keys[i] = v;
                    part += v >> 16;
                }
                sum += part;
            }
            sum <<= 16;
        } else {
            const uint16_t *xb = (const uint16_t *)xr;
            for (int64_t i0 = 0; i0 < n; i0 += 65536) {
                uint32_t part = 0;
                int64_t i1 = i0 + 65536 < n ? i0 + 65536 : n;
                for (int64_t i = i0; i < i1; i++) {
                    uint32_t v = xb[i] & 0x7FFFu;
                    keys[i] = v;
                    part += v;
                }
                sum += part;
            }
        }
        int64_t mean = (int64_t)(sum / (uint64_t)n), T = -1, n_gt = 0, n_eq = 0;
        if (have_off) {
            int s = dlog + 1 - 6;
            if (s < 0) s = 0;
            int64_t lo = mean + off - ((int64_t)1 << dlog);
            if (lo < 0) lo = 0;
            uint32_t h[4][NB + 2]; /* four interleaved histograms: no store-to-load chains */
            memset(h, 0, sizeof h);
            /* bins first, in int32 lanes (vectorises: keys and lo are < 2^31), then counts */
            uint8_t *restrict bins = (uint8_t *)(buf + n) + n;
            const int32_t lo32 = (int32_t)lo;
            for (int64_t i = 0; i < n; i++) {
                int32_t d = (((int32_t)keys[i] - lo32) >> s) + 1;
                d = d < 0 ? 0 : d;
                bins[i] = (uint8_t)(d > NB + 1 ? NB + 1 : d);
            }
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) {
                h[0][bins[i]]++;
                h[1][bins[i + 1]]++;
                h[2][bins[i + 2]]++;
                h[3][bins[i + 3]]++;
            }
            for (; i < n; i++) h[0][bins[i]]++;
            int64_t above = (int64_t)h[0][NB + 1] + h[1][NB + 1] + h[2][NB + 1] + h[3][NB + 1];
            int b = NB;
            for (; b >= 1 && above < k; b--) {
                int64_t cnt = (int64_t)h[0][b] + h[1][b] + h[2][b] + h[3][b];
                if (above + cnt >= k) break;
                above += cnt;
            }
            if (above < k && b >= 1) { /* hit: the k-th key is in bin b */
                uint32_t blo = (uint32_t)(lo + ((int64_t)(b - 1) << s)), width = 1u << s;
                int64_t c = 0;
                i = 0;
                for (; i + 8 <= n; i += 8) { /* 8 at a time; one bin of 64 is rarely hit */
                    v4u a, b, ha, hb;
                    memcpy(&a, keys + i, sizeof a);
                    memcpy(&b, keys + i + 4, sizeof b);
                    ha = (a - blo) < width;
                    hb = (b - blo) < width;
                    v2w any = (v2w)(ha | hb);
                    if (any[0] | any[1])
                        for (int l = i; l < i + 8; l++)
                            if ((keys[l] - blo) < width) buf[c++] = keys[l];
                }
                for (; i < n; i++)
                    if ((keys[i] - blo) < width) buf[c++] = keys[i];
                int64_t g2, e2;
                T = select_rth(buf, c, k - above, blo, s, &g2, &e2);
                n_gt = above + g2;
                n_eq = e2;
                if (++hits >= 16 && dlog > mbits - 3) {
                    dlog--;
                    hits = 0;
                }
            } else {
                hits = 0;
                if (dlog < kbits - 2) dlog++;
            }
        }
        if (T < 0) { /* first row of this thread, or the bracket missed: the whole row */
            memcpy(buf, keys, sizeof(uint32_t) * (size_t)n);
            T = select_rth(buf, n, k, 0, kbits, &n_gt, &n_eq);
        }
        off = T - mean;
        have_off = 1;
        uint8_t *restrict mr = j->mask ? j->mask + r * n : (uint8_t *)(buf + n); /* no mask wanted: scratch */
        const uint32_t t = (uint32_t)T;
        if (n_gt + n_eq != k) { /* ties at the k-th key: keep > t, then the lowest-index ties */
            int64_t need = k - n_gt;
            for (int64_t i = 0; i < n; i++) {
                uint32_t keep = keys[i] > t || (keys[i] == t && need > 0);
                need -= keys[i] == t && need > 0;
                mr[i] = (uint8_t)keep;
            }
        } else {
            for (int64_t i = 0; i < n; i++) mr[i] = keys[i] >= t;
        }
        if (wide) {
            const uint32_t *restrict xb = (const uint32_t *)xr;
            uint32_t *restrict yr = (uint32_t *)j->y + r * n;
            for (int64_t i = 0; i < n; i++) yr[i] = xb[i] & (0u - (uint32_t)mr[i]);
        } else {
            const uint16_t *restrict xb = (const uint16_t *)xr;
            uint16_t *restrict yr = (uint16_t *)j->y + r * n;
            for (int64_t i = 0; i < n; i++) yr[i] = xb[i] & (uint16_t)(0u - (uint32_t)mr[i]);
        }
    }
    free(keys);
}

/* select(x, row_stride, y, mask, rows, n, k, elem_bytes, threads): addresses as ints.
   x: rows × n elements, rows `row_stride` elements apart; y: rows × n contiguous; mask:
   rows × n bytes (1 = kept), or 0 for none. Requires 0 < k < n. */
static PyObject *py_select(PyObject *self, PyObject *args) {
    unsigned long long xp, yp, mp;
    long long stride, rows, n, k;
    int ebytes, threads;
    if (!PyArg_ParseTuple(args, "KLKKLLLii", &xp, &stride, &yp, &mp, &rows, &n, &k, &ebytes, &threads)) return NULL;
    if (!(ebytes == 2 || ebytes == 4) || n <= 0 || k <= 0 || k >= n || rows < 0 || stride < n) {
        PyErr_SetString(PyExc_ValueError, "abstopk: needs 2- or 4-byte elements, 0 < k < n, row_stride >= n");
        return NULL;
    }
    if (threads > rows) threads = (int)rows;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++)
        jobs[t] = (job_t){(const char *)(uintptr_t)xp, stride, (char *)(uintptr_t)yp, (uint8_t *)(uintptr_t)mp,
                          rows * t / threads, rows * (t + 1) / threads, n, k, ebytes == 4, 0};
    Py_BEGIN_ALLOW_THREADS
    PARALLEL_FOR
    for (int t = 0; t < threads; t++) run_rows(&jobs[t]);
    Py_END_ALLOW_THREADS
    for (int t = 0; t < threads; t++)
        if (jobs[t].failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

typedef struct {
    const char *g;
    char *out;
    const uint8_t *mask;
    int64_t i0, i1;
    int wide;
} mjob_t;

FAST_CLONES static void run_masked(void *arg) {
    mjob_t *j = (mjob_t *)arg;
    if (j->wide) {
        const uint32_t *g = (const uint32_t *)j->g;
        uint32_t *o = (uint32_t *)j->out;
        for (int64_t i = j->i0; i < j->i1; i++) o[i] = g[i] & (0u - (uint32_t)j->mask[i]);
    } else {
        const uint16_t *g = (const uint16_t *)j->g;
        uint16_t *o = (uint16_t *)j->out;
        for (int64_t i = j->i0; i < j->i1; i++) o[i] = g[i] & (uint16_t)(0u - (uint32_t)j->mask[i]);
    }
}

/* masked(g, out, mask, numel, elem_bytes, threads): out = g where mask else +0 (the
   backward of select; torch's bool-mask multiply is ~4x slower on CPU). Contiguous. */
static PyObject *py_masked(PyObject *self, PyObject *args) {
    unsigned long long gp, op, mp;
    long long numel;
    int ebytes, threads;
    if (!PyArg_ParseTuple(args, "KKKLii", &gp, &op, &mp, &numel, &ebytes, &threads)) return NULL;
    if (!(ebytes == 2 || ebytes == 4) || numel < 0) {
        PyErr_SetString(PyExc_ValueError, "masked: needs 2- or 4-byte elements");
        return NULL;
    }
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1 || numel < 65536) threads = 1;
    mjob_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        /* chunk bounds on 64-element boundaries: no two threads share a cache line */
        int64_t a = (numel * t / threads) & ~(int64_t)63, b = t + 1 == threads ? numel : (numel * (t + 1) / threads) & ~(int64_t)63;
        jobs[t] = (mjob_t){(const char *)(uintptr_t)gp, (char *)(uintptr_t)op, (const uint8_t *)(uintptr_t)mp, a, b, ebytes == 4};
    }
    Py_BEGIN_ALLOW_THREADS
    PARALLEL_FOR
    for (int t = 0; t < threads; t++) run_masked(&jobs[t]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"masked", py_masked, METH_VARARGS, "masked(g, out, mask, numel, elem_bytes, threads): out = g where mask else 0"},
    {"select", py_select, METH_VARARGS, "AbsTopK rows: select(x, row_stride, y, mask, rows, n, k, elem_bytes, threads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_abstopk", "AbsTopK CPU kernel (sparsity/abstopk.py)", -1, methods};

PyMODINIT_FUNC PyInit__abstopk(void) { return PyModule_Create(&module); }
