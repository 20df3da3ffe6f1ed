/* Fused CPU kernel for stage one: top-k, log-sum-exp at each grid temperature and the exact tail
 * mass of rows of float32 logits, in two passes over each row while it sits in cache.
 *
 * Built on first use by pipeline/native.py with the system C compiler and loaded with ctypes;
 * pipeline/topk.py falls back to torch operations where no compiler is found. Portable C11 plus
 * GCC/Clang vector extensions (8 x float32): AVX2 on x86-64 with -march=native, NEON or SSE
 * elsewhere. Rows run on OpenMP threads where built with -fopenmp: linked by soname, the
 * library shares the libgomp that torch has loaded, so its threads are torch's own pool (no
 * oversubscription, no handoff to threads spinning in another pool). Without OpenMP the caller
 * splits rows across Python threads (ctypes releases the GIL).
 *
 * Per row z[0..V) (row stride ld), with k <= V and inverse temperatures inv_t[0..G):
 *   top_ids[k], top_values[k]: the k largest logits, largest first, ties to the lower id;
 *   lse[g]  = log sum_i exp(z_i * inv_t[g])                       (float64 sums)
 *   tail[g] = log sum_{i not kept} exp(z_i * inv_t[g]) - lse[g]   (summed directly, not 1 - kept)
 * exp underflows to 0 below max - 87.33 T (float32's normal range), as torch's does near there;
 * pipeline/topk.py recomputes in float64 the rows whose tail is that small.
 * Returns the number of rows holding NaN or +inf (their outputs are unspecified).
 *
 * sample_rows (at the end) draws sampled-token targets (pipeline/sampling.py): per row, n ids with
 * replacement from softmax(z / T), optionally restricted to the ids outside a row's top-k, by
 * inverse CDF in float64 on uniforms passed in from Python, written as unique ids with counts.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define SEGMENT 256 /* logits per segment in the top-k prefilter: 32 vectors, 8 strided blocks */
#define MAX_GRID 8   /* temperatures per pass over a row */

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8i splati(int32_t x) { return (v8i){x, x, x, x, x, x, x, x}; }
static inline v8f select8(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }
#if defined(__AVX__)
#include <immintrin.h>
static inline v8f max8(v8f a, v8f b) { return (v8f)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline v8f max8(v8f a, v8f b) { return select8(a > b, a, b); } /* same NaN rule as maxps: b */
#endif
static inline double hsum8(v8f v) {
    double s = 0.0;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

/* exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial in r, ~1 ulp);
 * 0 below -87.3365 (2^-126), which also covers -inf. n is rounded to nearest by adding 1.5 * 2^23,
 * which leaves it in the low mantissa bits. */
static inline v8f exp8_nonpositive(v8f x) {
    const v8f lowest = splat(-87.3365447505f), magic = splat(12582912.0f);
    v8i under = x < lowest;
    x = max8(x, lowest);
    v8f shifted = x * splat(1.44269504088896341f) + magic;
    v8f fn = shifted - magic;
    v8i n = (v8i)shifted - (v8i)magic;
    x = x - fn * splat(0.693359375f) + fn * splat(2.12194440e-4f);
    v8f x2 = x * x;
    v8f y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * x2 + x + splat(1.0f);
    y = y * (v8f)((n + splati(127)) << 23);
    return (v8f)((v8i)y & ~under);
}

static inline float exp1_nonpositive(float x) {
    v8f v = exp8_nonpositive(splat(x));
    return v[0];
}

/* ----------------------------------------------------------------- selection of the top k */

/* A candidate as one integer that sorts like (value descending, id ascending): the float's bits
 * mapped to an order-preserving unsigned integer, then the complement of the id. Comparisons are
 * single integer compares, and ties go to the lower id, so the result is deterministic. */
typedef uint64_t key;

static inline key make_key(float value, int64_t id) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
    return ((key)bits << 32) | (uint32_t)(0xFFFFFFFFu - (uint32_t)id);
}
static inline float key_value(key k) {
    uint32_t bits = (uint32_t)(k >> 32);
    bits = (bits & 0x80000000u) ? bits & 0x7FFFFFFFu : ~bits;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}
static inline int64_t key_id(key k) { return (int64_t)(0xFFFFFFFFu - (uint32_t)k); }

static inline void swap(key *a, key *b) { key t = *a; *a = *b; *b = t; }

static void insertion_sort(key *e, int64_t n) { /* descending */
    for (int64_t i = 1; i < n; i++) {
        key x = e[i];
        int64_t j = i - 1;
        while (j >= 0 && e[j] < x) { e[j + 1] = e[j]; j--; }
        e[j + 1] = x;
    }
}

/* Partition e[lo..hi] (hi - lo >= 2) around a median of three, descending; returns the pivot's
 * final index. Keys are distinct (ids are), so the sentinels stop both scans. */
static int64_t partition(key *e, int64_t lo, int64_t hi) {
    int64_t mid = lo + (hi - lo) / 2;
    if (e[mid] > e[lo]) swap(&e[mid], &e[lo]);
    if (e[hi] > e[lo]) swap(&e[hi], &e[lo]);
    if (e[hi] > e[mid]) swap(&e[hi], &e[mid]);
    swap(&e[mid], &e[hi - 1]);
    key pivot = e[hi - 1];
    int64_t i = lo, j = hi - 1;
    for (;;) {
        while (e[++i] > pivot) {}
        while (e[--j] < pivot) {}
        if (i >= j) break;
        swap(&e[i], &e[j]);
    }
    swap(&e[i], &e[hi - 1]);
    return i;
}

/* Reorder e[0..n) so that e[0..k) are the k largest (unsorted). */
static void select_largest(key *e, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (hi - lo > 16) {
        int64_t p = partition(e, lo, hi);
        if (p == k - 1 || p == k) return;
        if (p < k) lo = p + 1; else hi = p - 1;
    }
    insertion_sort(e + lo, hi - lo + 1);
}

static void sort_descending(key *e, int64_t n) {
    while (n > 16) {
        int64_t p = partition(e, 0, n - 1);
        sort_descending(e + p + 1, n - p - 1); /* recurse on one side, loop on the other */
        n = p;
    }
    insertion_sort(e, n);
}

/* How many of x[0..n) are >= t (n a multiple of 8). */
static inline int64_t count_at_least(const float *x, int64_t n, float t) {
    v8i count = splati(0);
    const v8f t8 = splat(t);
    for (int64_t i = 0; i < n; i += 8) count -= load8(x + i) >= t8;
    int64_t total = 0;
    for (int j = 0; j < 8; j++) total += count[j];
    return total;
}

/* Append the logits of z[lo..hi) (hi - lo a multiple of 8) that are >= t to e[n..); returns n. */
static inline int64_t append_at_least(const float *z, int64_t lo, int64_t hi, float t, key *e, int64_t n) {
#if defined(__AVX__)
    const __m256 t8 = _mm256_set1_ps(t);
    for (int64_t i = lo; i < hi; i += 8) {
        unsigned mask = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + i), t8, _CMP_GE_OQ));
        while (mask) {
            int lane = __builtin_ctz(mask);
            e[n++] = make_key(z[i + lane], i + lane);
            mask &= mask - 1;
        }
    }
#else
    for (int64_t i = lo; i < hi; i++) {
        e[n] = make_key(z[i], i); /* branch-free append: kept when at or above */
        n += z[i] >= t;
    }
#endif
    return n;
}

/* The k largest logits of row z[0..V) as keys, sorted, in e[0..k); e[k..n) holds the other
 * candidates (every logit >= the bound, so every logit equal to the k-th). Returns n.
 * Scratch: e holds V keys, block_max V/SEGMENT*8 floats.
 * Prefilter: the lane-wise maximum of a segment's 32 vectors is the maximum of 8 blocks of 32
 * logits (stride 8). Any t with at least k block maxima >= t is a lower bound on the k-th largest
 * logit (those blocks hold k logits >= t), so only logits >= t can be kept. t is found by
 * bisection on the block maxima, stopping once at most 5k/4 of them are above it: on a language
 * model's logits that leaves a few times k candidates out of V. */
static int64_t top_k_row(const float *z, int64_t V, int64_t k, key *e, float *block_max) {
    int64_t n_segments = V / SEGMENT, n_blocks = n_segments * 8, n = 0;
    if (n_blocks >= k) {
        v8f low = splat(INFINITY), high = splat(-INFINITY);
        for (int64_t s = 0; s < n_segments; s++) {
            const float *p = z + s * SEGMENT;
            v8f m0 = splat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
            for (int j = 0; j < SEGMENT; j += 32) { /* a NaN logit is skipped: max8 returns its b */
                m0 = max8(load8(p + j), m0);
                m1 = max8(load8(p + j + 8), m1);
                m2 = max8(load8(p + j + 16), m2);
                m3 = max8(load8(p + j + 24), m3);
            }
            v8f m = max8(max8(m0, m1), max8(m2, m3));
            memcpy(block_max + s * 8, &m, sizeof m);
            low = select8(m < low, m, low);
            high = max8(m, high);
        }
        float bound = low[0], top = high[0]; /* invariant: count_at_least(bound) >= k */
        for (int j = 1; j < 8; j++) {
            bound = low[j] < bound ? low[j] : bound;
            top = high[j] > top ? high[j] : top;
        }
        if (bound > -INFINITY) {
            float above = top;
            for (int step = 0; step < 32 && count_at_least(block_max, n_blocks, bound) > k + k / 4; step++) {
                float mid = bound + (above - bound) * 0.5f;
                if (!(mid > bound && mid < above)) break; /* adjacent floats */
                if (count_at_least(block_max, n_blocks, mid) >= k) bound = mid; else above = mid;
            }
        }
        n = append_at_least(z, 0, n_segments * SEGMENT, bound, e, 0);
        for (int64_t i = n_segments * SEGMENT; i < V; i++) {
            e[n] = make_key(z[i], i);
            n += z[i] >= bound;
        }
    } else {
        for (int64_t i = 0; i < V; i++) e[n++] = make_key(z[i], i);
    }
    if (n > k) select_largest(e, n, k);
    sort_descending(e, k);
    return n;
}

/* Tail sums of one row for n temperatures: rest[j] += sum over logits below the k-th of
 * exp((z - top) * scale[j]), over the row's whole vectors; where squares_previous[j], that exp is
 * the previous temperature's squared. Returns whether the row holds a NaN. Always inlined with a
 * constant n. */
static inline __attribute__((always_inline)) int tail_pass(const float *z, int64_t V, float top, float kth,
                                                           const v8f *scale, const int64_t *squares_previous,
                                                           const int n, double *rest) {
    const v8f top8 = splat(top), kth8 = splat(kth);
    v8i nan8 = splati(0);
    v8f exps[MAX_GRID];
#define TAIL_STEP(i)                                                                                  \
    do {                                                                                              \
        v8f x = load8(z + (i));                                                                       \
        v8f below_top = x - top8; /* <= 0 */                                                          \
        v8i in_tail = x < kth8;                                                                       \
        nan8 |= x != x;                                                                               \
        for (int j = 0; j < n; j++) {                                                                 \
            exps[j] = j > 0 && squares_previous[j] ? exps[j - 1] * exps[j - 1]                        \
                                                   : exp8_nonpositive(below_top * scale[j]);          \
            rest8[j] += (v8f)((v8i)exps[j] & in_tail);                                                \
        }                                                                                             \
    } while (0)
    int64_t i = 0;
    for (; i + 64 <= V; i += 64) { /* 64 logits per flush to double: fixed trip counts unroll */
        v8f rest8[MAX_GRID];
        for (int j = 0; j < n; j++) rest8[j] = splat(0.0f);
        for (int u = 0; u < 64; u += 8) TAIL_STEP(i + u);
        for (int j = 0; j < n; j++) rest[j] += hsum8(rest8[j]);
    }
    for (; i + 8 <= V; i += 8) {
        v8f rest8[MAX_GRID];
        for (int j = 0; j < n; j++) rest8[j] = splat(0.0f);
        TAIL_STEP(i);
        for (int j = 0; j < n; j++) rest[j] += hsum8(rest8[j]);
    }
#undef TAIL_STEP
    int any = 0;
    for (int j = 0; j < 8; j++) any |= nan8[j] != 0;
    return any;
}

/* ----------------------------------------------------------------- the kernel */

/* One row: outputs at row r; returns whether it is bad (NaN, +inf, or nothing but -inf). */
static int one_row(const float *logits, int64_t r, int64_t V, int64_t ld, int64_t k, const double *inv_t,
                   int64_t G, const int64_t *order, const int64_t *squares_previous, key *e, float *block_max,
                   int64_t *top_ids, float *top_values, float *lse, float *tail) {
    const float *z = logits + r * ld;
    int64_t n_candidates = top_k_row(z, V, k, e, block_max);
    float top = key_value(e[0]), kth = key_value(e[k - 1]);
    /* logits equal to the k-th that were not kept belong to the tail; all of them are
     * candidates (the k-th is at or above the bound) */
    int64_t tied_outside = 0;
    for (int64_t j = 0; j < k; j++) {
        top_ids[r * k + j] = key_id(e[j]);
        top_values[r * k + j] = key_value(e[j]);
    }
    for (int64_t j = k; j < n_candidates; j++) tied_outside += key_value(e[j]) == kth;
    int bad = !(top > -INFINITY && top < INFINITY); /* +inf, or nothing but -inf */
    for (int64_t p0 = 0; p0 < G; p0 += MAX_GRID) {
        /* One pass over the row (in cache) for up to MAX_GRID temperatures: e = exp((z - top)/T)
         * <= 1 of the logits below the k-th (the tail), summed in float vectors flushed to
         * double every 64 logits, so that a 150k vocabulary keeps float64 accuracy. The kept
         * mass is added separately (k terms): the tail is never a difference of two sums. */
        int64_t p1 = p0 + MAX_GRID < G ? p0 + MAX_GRID : G;
        double rest[MAX_GRID] = {0};
        v8f scale[MAX_GRID];
        for (int64_t p = p0; p < p1; p++) scale[p - p0] = splat((float)inv_t[order[p]]);
        int64_t i = V - V % 8;
        switch (p1 - p0) { /* a constant count, so that the loop over temperatures unrolls into registers */
#define CASE(n) case n: bad |= tail_pass(z, V, top, kth, scale, squares_previous + p0, n, rest); break;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
        for (; i < V; i++) {
            bad |= z[i] != z[i];
            if (z[i] < kth)
                for (int64_t p = p0; p < p1; p++) rest[p - p0] += exp1_nonpositive((z[i] - top) * (float)inv_t[order[p]]);
        }
        for (int64_t p = p0; p < p1; p++) {
            int64_t g = order[p];
            float scale1 = (float)inv_t[g];
            double kept = 0.0; /* the kept logits, already written out as floats: 8 at a time */
            const float *kept_values = top_values + r * k;
            int64_t j = 0;
            for (; j + 8 <= k; j += 8)
                kept += hsum8(exp8_nonpositive((load8(kept_values + j) - splat(top)) * splat(scale1)));
            for (; j < k; j++) kept += exp1_nonpositive((kept_values[j] - top) * scale1);
            double tail_mass = rest[p - p0] + (double)tied_outside * exp1_nonpositive((kth - top) * scale1);
            double total = tail_mass + kept;
            lse[r * G + g] = (float)((double)top * inv_t[g] + log(total));
            tail[r * G + g] = tail_mass > 0.0 ? (float)(log(tail_mass) - log(total)) : -INFINITY;
        }
    }
    return bad;
}

int sparse_teacher_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Rows [0, rows) of logits (row stride ld), on `threads` OpenMP threads (0: the runtime's default,
 * which is torch's setting when the runtime is torch's libgomp: one pool, no oversubscription).
 * Returns the number of bad rows, or -1 when memory ran out. */
int64_t sparse_teacher_rows(const float *logits, int64_t rows, int64_t V, int64_t ld, int64_t k,
                            const double *inv_t, int64_t G, int64_t *top_ids, float *top_values,
                            float *lse, float *tail, int64_t threads) {
    /* Temperatures in order of 1/T; one whose 1/T is twice the previous one's (T = 1 after T = 2)
     * reuses its exp squared: exp(2d) = exp(d)^2, one multiply instead of a polynomial. The first
     * of each group of MAX_GRID computes its own. */
    int64_t *order = malloc((size_t)G * sizeof(int64_t)), *squares_previous = malloc((size_t)G * sizeof(int64_t));
    if (!order || !squares_previous) {
        free(order); free(squares_previous);
        return -1;
    }
    for (int64_t p = 0; p < G; p++) {
        int64_t q = p;
        for (; q > 0 && inv_t[order[q - 1]] > inv_t[p]; q--) order[q] = order[q - 1];
        order[q] = p;
    }
    for (int64_t p = 0; p < G; p++)
        squares_previous[p] = p % MAX_GRID > 0 && inv_t[order[p]] == 2.0 * inv_t[order[p - 1]];
    int64_t bad_rows = 0, failed = 0;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? (int)threads : omp_get_max_threads()) if (rows >= 16) \
    reduction(+ : bad_rows, failed)
#endif
    {
        key *e = malloc((size_t)V * sizeof(key)); /* per thread: V keys, the block maxima */
        float *block_max = malloc((size_t)(V / SEGMENT + 1) * 8 * sizeof(float));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < rows; r++) {
            if (!e || !block_max) {
                failed = 1;
                continue;
            }
            bad_rows += one_row(logits, r, V, ld, k, inv_t, G, order, squares_previous, e, block_max,
                                top_ids, top_values, lse, tail);
        }
        free(e); free(block_max);
    }
    free(order); free(squares_previous);
    return failed ? -1 : bad_rows;
}

/* ----------------------------------------------------------------- sampled tokens (RS-KD) */

typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

static inline v4d splat4(double x) { return (v4d){x, x, x, x}; }

/* exp(x) for x <= 0 in float64 (Cephes exp: x = n ln2 + r, |r| <= ln2/2, a rational Padé form in
 * r; within 2 ulp of the correctly rounded value); 0 below -708.39 (no subnormals), which also
 * covers -inf. torch's float64 exp differs from it by an ulp or so: the draws of the two paths
 * then differ only where a uniform lands within ~1e-16 of a CDF boundary (never seen in tests). */
static inline v4d exp4d_nonpositive(v4d x) {
    const v4d lowest = splat4(-708.39), magic = splat4(6755399441055744.0); /* 1.5 * 2^52 */
    v4l under = x < lowest;
    x = (v4d)((under & (v4l)lowest) | (~under & (v4l)x));
    v4d shifted = x * splat4(1.4426950408889634073599) + magic;
    v4d fn = shifted - magic;
    v4l n = (v4l)shifted - (v4l)magic;
    x = x - fn * splat4(6.93145751953125E-1) - fn * splat4(1.42860682030941723212E-6);
    v4d xx = x * x;
    v4d px = x * ((splat4(1.26177193074810590878E-4) * xx + splat4(3.02994407707441961300E-2)) * xx +
                  splat4(9.99999999999999999910E-1));
    v4d qx = ((splat4(3.00198505138664455042E-6) * xx + splat4(2.52448340349684104192E-3)) * xx +
              splat4(2.27265548208155028766E-1)) * xx + splat4(2.00000000000000000009E0);
    v4d y = splat4(1.0) + splat4(2.0) * (px / (qx - px));
    y = y * (v4d)((n + 1023) << 52);
    return (v4d)((v4l)y & ~under);
}

static inline double exp1d_nonpositive(double x) {
    v4d v = exp4d_nonpositive(splat4(x));
    return v[0];
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One row of sample_rows; w holds V doubles, u n doubles (per thread). Returns whether the row is bad. */
static int sample_one_row(const float *z, int64_t V, double inv_t, const double *uniforms, int64_t n,
                          const int64_t *exclude, int64_t k, int64_t *ids, int32_t *counts, double *w, double *u) {
    /* the logits in float64 with the excluded ids at -inf, and their maximum: weights are
     * exp((z - max) / T) of the residual, so the largest is 1 and a residual far below the top-k
     * still has mass */
    for (int64_t i = 0; i < V; i++) w[i] = (double)z[i];
    for (int64_t j = 0; j < k; j++)
        if (exclude[j] >= 0 && exclude[j] < V) w[exclude[j]] = -INFINITY;
    v4d top4 = splat4(-INFINITY);
    v4l nan4 = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= V; i += 4) {
        v4d x;
        memcpy(&x, w + i, sizeof x);
        nan4 |= x != x;
        v4l above = x > top4;
        top4 = (v4d)((above & (v4l)x) | (~above & (v4l)top4));
    }
    double top = -INFINITY;
    int nan = 0;
    for (int l = 0; l < 4; l++) {
        nan |= nan4[l] != 0;
        top = top4[l] > top ? top4[l] : top;
    }
    for (; i < V; i++) {
        nan |= w[i] != w[i];
        top = w[i] > top ? w[i] : top;
    }
    for (int64_t j = 0; j < n; j++) { ids[j] = 0; counts[j] = 0; }
    if (nan || top == INFINITY) return 1;
    if (top == -INFINITY) return 0; /* no residual mass: no draws */
    /* the CDF in place: w[i] = sum of the weights of ids 0..i, added in id order, the same
     * additions as torch.cumsum's, so that it is torch's CDF bit for bit (up to exp's last bit) */
    top4 = splat4(top);
    const v4d inv_t4 = splat4(inv_t);
    double cumulative = 0.0;
    i = 0;
    for (; i + 4 <= V; i += 4) {
        v4d x;
        memcpy(&x, w + i, sizeof x);
        x = exp4d_nonpositive((x - top4) * inv_t4);
        for (int l = 0; l < 4; l++) w[i + l] = cumulative += x[l];
    }
    for (; i < V; i++) w[i] = cumulative += exp1d_nonpositive((w[i] - top) * inv_t);
    const double total = w[V - 1];
    /* inverse CDF on the sorted uniforms in one walk: the draw is the smallest id whose cumulative
     * weight reaches u * total (torch.searchsorted's left side). An id of weight 0 repeats the
     * previous cumulative value, so it is never the first to reach a target above that value:
     * zero-probability ids are never drawn. u < 1 keeps every target at or below the total, so the
     * walk ends in the row. */
    memcpy(u, uniforms, (size_t)n * sizeof(double));
    if (n <= 32) {
        for (int64_t a = 1; a < n; a++) {
            double x = u[a];
            int64_t b = a - 1;
            while (b >= 0 && u[b] > x) { u[b + 1] = u[b]; b--; }
            u[b + 1] = x;
        }
    } else {
        qsort(u, (size_t)n, sizeof(double), compare_doubles);
    }
    int64_t id = 0, unique = -1;
    for (int64_t j = 0; j < n; j++) {
        double target = u[j] * total;
        while (w[id] < target && id < V - 1) id++;
        if (unique < 0 || ids[unique] != id) ids[++unique] = id;
        counts[unique]++;
    }
    return 0;
}

/* Rows [0, rows) of logits (row stride ld): per row, n draws with replacement from
 * softmax(z * inv_t) restricted to the ids not in exclude[r * k .. r * k + k) (k may be 0), by
 * inverse CDF on uniforms[r * n .. r * n + n) in (0, 1). Writes the distinct drawn ids in ascending
 * order with their counts to ids[r * n ..] and counts[r * n ..], then id 0 count 0. A row whose
 * residual holds only -inf gets no draws (all counts 0). Returns the number of rows holding NaN or
 * +inf (outputs zero), or -1 when memory ran out. */
int64_t sample_rows(const float *logits, int64_t rows, int64_t V, int64_t ld, double inv_t, const double *uniforms,
                    int64_t n, const int64_t *exclude, int64_t k, int64_t *ids, int32_t *counts, int64_t threads) {
    int64_t bad_rows = 0, failed = 0;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? (int)threads : omp_get_max_threads()) if (rows >= 16) \
    reduction(+ : bad_rows, failed)
#endif
    {
        double *w = malloc((size_t)V * sizeof(double)), *u = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < rows; r++) {
            if (!w || !u) {
                failed = 1;
                continue;
            }
            bad_rows += sample_one_row(logits + r * ld, V, inv_t, uniforms + r * n, n, exclude ? exclude + r * k : NULL,
                                       exclude ? k : 0, ids + r * n, counts + r * n, w, u);
        }
        free(w); free(u);
    }
    return failed ? -1 : bad_rows;
}
