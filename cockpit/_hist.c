/* Histogram counting kernels for cockpit's CPU path (loaded by cockpit/native.py).
 *
 * Each kernel bins a block of values exactly as the torch path in cockpit/factors.py
 * does, op for op in the value's own precision:
 *
 *     s = floor(x * k + frac)          (two roundings: built with -ffp-contract=off)
 *     s = clamp(s, lo, hi)             (NaN stays NaN)
 *     bin = (NaN ? nan_bin : s + ioff)
 *
 * and counts the block's bins into WAYS sub-histograms, so that runs of the same bin
 * (gradient entries crowd around zero) do not wait on each other's increments; the 1D
 * kernel counts runs of values within a few bins by vectorized compares instead. One
 * pass over the values, no index array in memory: the torch path needs five
 * elementwise passes and a bincount. Each kernel splits its work over `threads`
 * OpenMP threads (built with -fopenmp, these are torch's own libgomp workers): every
 * thread counts into its own sub-histograms and adds them to the caller's counts under
 * a critical section. Built without OpenMP, the pragmas are ignored: one thread.
 *
 * Build flags (cockpit/native.py): -ffp-contract=off keeps x * k + frac two roundings,
 * as torch computes them; -fno-trapping-math lets the clamps vectorize (the values
 * are the same, only floating-point exception flags are not preserved).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 512          /* values binned before they are counted */
#define WAYS 4             /* sub-histograms */
#define FLUSH (1L << 30)   /* values counted before the uint32 sub-histograms are flushed */

static void count_block(const int32_t *idx, int64_t n, uint32_t *sub, int64_t size) {
    int64_t i = 0;
    for (; i + WAYS <= n; i += WAYS) {
        sub[idx[i]]++;
        sub[size + idx[i + 1]]++;
        sub[2 * size + idx[i + 2]]++;
        sub[3 * size + idx[i + 3]]++;
    }
    for (; i < n; i++) sub[idx[i]]++;
}

/* Gradient entries crowd into a few bins around zero (nearly all of a conv layer's
 * entries fall into the middle bins of the default 1D histogram, 100 bins on [-2, 2]).
 * A run of BAND_RUN values whose bins span fewer than BAND values is counted with one
 * compare-and-add pass per bin, which vectorizes (16 int32 lanes), instead of one
 * dependent increment per value; other runs are counted as before. The conv entries
 * of a fresh 3C3D (22 M) 11.3–12.0 → 8.2–8.7 ms, of All-CNN-C (44 M) 27 → 14.4–16.2 ms,
 * two threads; 10 M values spread over all bins 2.3 → 2.6 ms (the min/max pass). */
#define BAND 4
#define BAND_RUN 256

static void count_block_banded(const int32_t *idx, int64_t n, uint32_t *sub, int64_t size) {
    for (int64_t s = 0; s < n; s += BAND_RUN) {
        const int32_t *run = idx + s;
        const int64_t m = n - s < BAND_RUN ? n - s : BAND_RUN;
        int32_t lo = run[0], hi = run[0];
        for (int64_t i = 1; i < m; i++) {
            lo = run[i] < lo ? run[i] : lo;
            hi = run[i] > hi ? run[i] : hi;
        }
        if (hi - lo >= BAND) {
            count_block(run, m, sub, size);
            continue;
        }
        uint32_t rest = (uint32_t)m; /* the last bin gets what the others did not */
        for (int32_t b = lo; b < hi; b++) {
            uint32_t c = 0;
            for (int64_t i = 0; i < m; i++) c += run[i] == b;
            sub[b] += c;
            rest -= c;
        }
        sub[hi] += rest;
    }
}

static void flush(uint32_t *sub, int64_t size, int64_t *counts) {
    _Pragma("omp critical(cockpit_counts)")
    for (int64_t w = 0; w < WAYS; w++)
        for (int64_t b = 0; b < size; b++) {
            counts[b] += sub[w * size + b];
            sub[w * size + b] = 0;
        }
}

/* Counts of `size` bins, added to the caller's int64 counts when closed. */
typedef struct {
    uint32_t *sub;
    int64_t size, since;
    int64_t *counts;
} counter_t;

static int counter_open(counter_t *c, int64_t size, int64_t *counts) {
    c->sub = calloc((size_t)(WAYS * size), sizeof(uint32_t));
    c->size = size;
    c->since = 0;
    c->counts = counts;
    return c->sub == NULL;
}

static void counter_add(counter_t *c, const int32_t *idx, int64_t n, int banded) {
    if (banded)
        count_block_banded(idx, n, c->sub, c->size);
    else
        count_block(idx, n, c->sub, c->size);
    if ((c->since += n) >= FLUSH) {
        flush(c->sub, c->size, c->counts);
        c->since = 0;
    }
}

static int counter_close(counter_t *c) {
    if (!c->sub) return 1;
    flush(c->sub, c->size, c->counts);
    free(c->sub);
    return 0;
}

/* The bins of one value type T (float or double), for the three kernels below: plain
 * (1D) and as the row of a 2D index, bin * bp + add[i]. int32 arithmetic vectorizes. */
#define BINS(T)                                                                           \
    static inline T bin_##T(T x, T k, T frac, T lo, T hi, T nan_s) {                      \
        T s = floor##T(x * k + frac);                                                     \
        s = s < lo ? lo : s; /* NaN compares false: stays NaN */                          \
        s = s > hi ? hi : s;                                                              \
        return s == s ? s : nan_s;                                                        \
    }                                                                                     \
    static inline void bins_##T(const T *restrict x, int64_t n, T k, T frac, T lo, T hi,  \
                                int32_t ioff, int32_t nan_bin, int32_t *restrict out) {   \
        const T nan_s = (T)(nan_bin - ioff);                                              \
        for (int64_t i = 0; i < n; i++)                                                   \
            out[i] = (int32_t)bin_##T(x[i], k, frac, lo, hi, nan_s) + ioff;               \
    }                                                                                     \
    static inline void bins2_##T(const T *restrict x, int64_t n, T k, T frac, T lo, T hi, \
                                 int32_t ioff, int32_t nan_bin, int32_t bp,               \
                                 const int32_t *restrict add, int32_t *restrict out) {    \
        const T nan_s = (T)(nan_bin - ioff);                                              \
        for (int64_t i = 0; i < n; i++)                                                   \
            out[i] = ((int32_t)bin_##T(x[i], k, frac, lo, hi, nan_s) + ioff) * bp + add[i]; \
    }                                                                                     \
    static inline void scaled_##T(const T *restrict x, int64_t n, T factor, T *restrict out) { \
        for (int64_t i = 0; i < n; i++) out[i] = factor * x[i];                           \
    }

#define floorfloat floorf
#define floordouble floor
BINS(float)
BINS(double)

/* counts[size] += the bins of x[0 : n] (size = bins + 1: the last counts NaN). */
#define COUNT1D(T)                                                                        \
    int cockpit_count1d_##T(const T *x, int64_t n, double k, double frac, double lo,      \
                            double hi, int64_t ioff, int64_t size, int64_t *counts,       \
                            int threads) {                                                \
        int fail = 0;                                                                     \
        const int64_t blocks = (n + BLOCK - 1) / BLOCK;                                   \
        _Pragma("omp parallel num_threads(threads) reduction(|:fail)") {                  \
            counter_t cnt;                                                                \
            int32_t buf[BLOCK];                                                           \
            counter_open(&cnt, size, counts);                                             \
            _Pragma("omp for schedule(static)")                                           \
            for (int64_t blk = 0; blk < blocks; blk++) {                                  \
                const int64_t start = blk * BLOCK;                                        \
                const int64_t m = n - start < BLOCK ? n - start : BLOCK;                  \
                if (!cnt.sub) continue;                                                   \
                bins_##T(x + start, m, (T)k, (T)frac, (T)lo, (T)hi, ioff, size - 1, buf);   \
                counter_add(&cnt, buf, m, 1);                                             \
            }                                                                             \
            fail |= counter_close(&cnt);                                                  \
        }                                                                                 \
        return fail;                                                                      \
    }

/* 2D counts of (g[r, c], param bin pbin[c]) for r < rows, c < cols; row r starts at
 * g + r * stride. Bin index (gradient bin) * bp + (param bin); the gradient's NaN bin
 * is nan_bin (its row of the counts is dropped by the caller). counts has
 * (nan_bin + 1) * bp entries. */
#define COUNT2D(T)                                                                        \
    int cockpit_count2d_##T(const T *g, int64_t rows, int64_t cols, int64_t stride,       \
                            const int32_t *pbin, double k, double frac, double lo,        \
                            double hi, int64_t ioff, int64_t nan_bin, int64_t bp,         \
                            int64_t *counts, int threads) {                               \
        int fail = 0;                                                                     \
        const int64_t per_row = (cols + BLOCK - 1) / BLOCK, tasks = rows * per_row;       \
        _Pragma("omp parallel num_threads(threads) reduction(|:fail)") {                  \
            counter_t cnt;                                                                \
            int32_t buf[BLOCK];                                                           \
            counter_open(&cnt, (nan_bin + 1) * bp, counts);                               \
            _Pragma("omp for schedule(static)")                                           \
            for (int64_t task = 0; task < tasks; task++) {                                \
                const int64_t r = task / per_row, c = (task % per_row) * BLOCK;           \
                const int64_t m = cols - c < BLOCK ? cols - c : BLOCK;                    \
                if (!cnt.sub) continue;                                                   \
                bins2_##T(g + r * stride + c, m, (T)k, (T)frac, (T)lo, (T)hi, ioff,       \
                          nan_bin, bp, pbin + c, buf);                                    \
                counter_add(&cnt, buf, m, 0);                                             \
            }                                                                             \
            fail |= counter_close(&cnt);                                                  \
        }                                                                                 \
        return fail;                                                                      \
    }

/* 2D counts of the outer products b[r, o] * a[r, i] (one parameter group: entry
 * o * in + i, parameter bin pbin[o * in + i]) without building them; a is
 * [rows, in], b [rows, out], both contiguous. Otherwise as cockpit_count2d.
 * A row (r, o) with b[r, o] = ±0 and a[r] finite holds only ±0 entries, which bin like
 * 0: such rows (half of them behind a ReLU) are only counted per o, and each adds
 * (bin of 0, pbin[o, i]) for every i at the end, O(in) per o instead of per row. */
#define OUTER2D(T)                                                                        \
    int cockpit_outer2d_##T(const T *a, const T *b, int64_t rows, int64_t in,             \
                            int64_t out, const int32_t *pbin, double k, double frac,      \
                            double lo, double hi, int64_t ioff, int64_t nan_bin,          \
                            int64_t bp, int64_t *counts, int threads) {                   \
        int fail = 0;                                                                     \
        char *finite = malloc(rows > 0 ? (size_t)rows : 1);                               \
        int64_t *zeros = calloc(out > 0 ? (size_t)out : 1, sizeof(int64_t));              \
        if (!finite || !zeros) {                                                          \
            free(finite);                                                                 \
            free(zeros);                                                                  \
            return 1;                                                                     \
        }                                                                                 \
        const T nan_s = (T)(nan_bin - ioff);                                              \
        const int64_t zero_row = ((int64_t)bin_##T((T)0, (T)k, (T)frac, (T)lo, (T)hi, nan_s) \
                                  + ioff) * bp;                                           \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                 \
        for (int64_t r = 0; r < rows; r++) {                                              \
            int ok = 1;                                                                   \
            for (int64_t i = 0; i < in; i++) ok &= isfinite(a[r * in + i]) != 0;          \
            finite[r] = (char)ok;                                                         \
        }                                                                                 \
        _Pragma("omp parallel num_threads(threads) reduction(|:fail)") {                  \
            counter_t cnt;                                                                \
            int32_t buf[BLOCK];                                                           \
            T prod[BLOCK];                                                                \
            int64_t *own = calloc(out > 0 ? (size_t)out : 1, sizeof(int64_t));           \
            counter_open(&cnt, (nan_bin + 1) * bp, counts);                               \
            _Pragma("omp for schedule(static)")                                           \
            for (int64_t task = 0; task < rows * out; task++) {                           \
                const int64_t r = task / out, o = task % out;                             \
                if (own && finite[r] && b[r * out + o] == 0) {                            \
                    own[o]++;                                                             \
                    continue;                                                             \
                }                                                                         \
                for (int64_t i = 0; cnt.sub && i < in; i += BLOCK) {                      \
                    const int64_t m = in - i < BLOCK ? in - i : BLOCK;                    \
                    scaled_##T(a + r * in + i, m, b[r * out + o], prod);                  \
                    bins2_##T(prod, m, (T)k, (T)frac, (T)lo, (T)hi, ioff, nan_bin, bp,    \
                              pbin + o * in + i, buf);                                    \
                    counter_add(&cnt, buf, m, 0);                                         \
                }                                                                         \
            }                                                                             \
            if (own) {                                                                    \
                _Pragma("omp critical(cockpit_counts)")                                   \
                for (int64_t o = 0; o < out; o++) zeros[o] += own[o];                     \
            }                                                                             \
            free(own);                                                                    \
            fail |= counter_close(&cnt);                                                  \
        }                                                                                 \
        for (int64_t o = 0; o < out; o++)                                                 \
            if (zeros[o])                                                                 \
                for (int64_t i = 0; i < in; i++) counts[zero_row + pbin[o * in + i]] += zeros[o]; \
        free(finite);                                                                     \
        free(zeros);                                                                      \
        return fail;                                                                      \
    }

/* 1D counts of the outer products b[r, o] * s[r, i] from rows s sorted ascending, all
 * finite: the bins of a row's entries are monotone in s (every op of the binning is
 * monotone), so each run of one bin ends where a search finds the bin change, and every
 * probe of the search evaluates the exact binning. Equal to binning every entry, at the
 * cost of a few probes per distinct bin of a row instead of one binning per entry.
 * Rows r of one sample share s[r]; taken in ascending order of b (cockpit.factors sorts
 * each row of b; any order gives the same counts, only slower), a run ends near where it ended
 * in the previous row of the same sign, so each search gallops out from that position
 * (a hint only: the probes alone decide). counts has size = bins + 1 entries (the last,
 * NaN, stays 0). */
#define OUTER1D(T)                                                                        \
    static inline int64_t run_end_##T(const T *row, int64_t lo_j, int64_t hi_j, int64_t h, \
                                      T bo, T bin, T k_, T f_, T lo_, T hi_, T nan_s) {   \
        /* the first j in [lo_j, hi_j] whose bin differs from `bin` (hi_j's does) */      \
        if (h >= lo_j && h <= hi_j) {                                                     \
            if (bin_##T(bo * row[h], k_, f_, lo_, hi_, nan_s) != bin) {                   \
                hi_j = h;                                                                 \
                for (int64_t step = 1; h - step >= lo_j; step *= 2) {                     \
                    if (bin_##T(bo * row[h - step], k_, f_, lo_, hi_, nan_s) == bin) {    \
                        lo_j = h - step + 1;                                              \
                        break;                                                            \
                    }                                                                     \
                    hi_j = h - step;                                                      \
                }                                                                         \
            } else {                                                                      \
                lo_j = h + 1;                                                             \
                for (int64_t step = 1; h + step < hi_j; step *= 2) {                      \
                    if (bin_##T(bo * row[h + step], k_, f_, lo_, hi_, nan_s) != bin) {    \
                        hi_j = h + step;                                                  \
                        break;                                                            \
                    }                                                                     \
                    lo_j = h + step + 1;                                                  \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        while (lo_j < hi_j) {                                                             \
            const int64_t mid = lo_j + (hi_j - lo_j) / 2;                                 \
            if (bin_##T(bo * row[mid], k_, f_, lo_, hi_, nan_s) != bin)                   \
                hi_j = mid;                                                               \
            else                                                                          \
                lo_j = mid + 1;                                                           \
        }                                                                                 \
        return lo_j;                                                                      \
    }                                                                                     \
    int cockpit_outer1d_##T(const T *s, const T *b, int64_t rows, int64_t in, int64_t out, \
                            double k, double frac, double lo, double hi, int64_t ioff,    \
                            int64_t size, int64_t *counts, int threads) {                 \
        const T k_ = (T)k, f_ = (T)frac, lo_ = (T)lo, hi_ = (T)hi;                        \
        const T nan_s = (T)(size - 1 - ioff);                                             \
        int fail = 0;                                                                     \
        if (in == 0) return 0;                                                            \
        _Pragma("omp parallel num_threads(threads) reduction(|:fail)") {                  \
            int64_t *own = calloc((size_t)size, sizeof(int64_t));                         \
            int64_t *hint = malloc(2 * (size_t)size * sizeof(int64_t)); /* by sign */     \
            _Pragma("omp for schedule(static)")                                           \
            for (int64_t r = 0; r < rows; r++) {                                          \
                if (!own || !hint) continue;                                              \
                const T *row = s + r * in;                                                \
                for (int64_t j = 0; j < 2 * size; j++) hint[j] = -1;                      \
                for (int64_t o = 0; o < out; o++) {                                       \
                    const T bo = b[r * out + o];                                          \
                    int64_t *h = hint + (bo < 0 ? size : 0);                              \
                    int64_t pos = 0;                                                      \
                    T bin = bin_##T(bo * row[0], k_, f_, lo_, hi_, nan_s);                \
                    const T last = bin_##T(bo * row[in - 1], k_, f_, lo_, hi_, nan_s);    \
                    while (bin != last) { /* row[in - 1] is past bin */                   \
                        const int64_t v = (int64_t)bin + ioff;                            \
                        const int64_t end = run_end_##T(row, pos + 1, in - 1, h[v], bo, bin, \
                                                        k_, f_, lo_, hi_, nan_s);         \
                        own[v] += end - pos;                                              \
                        h[v] = end;                                                       \
                        pos = end;                                                        \
                        bin = bin_##T(bo * row[pos], k_, f_, lo_, hi_, nan_s);            \
                    }                                                                     \
                    own[(int64_t)last + ioff] += in - pos;                                \
                }                                                                         \
            }                                                                             \
            if (own && hint) {                                                            \
                _Pragma("omp critical(cockpit_counts)")                                   \
                for (int64_t j = 0; j < size; j++) counts[j] += own[j];                   \
            }                                                                             \
            fail |= !own || !hint;                                                        \
            free(own);                                                                    \
            free(hint);                                                                   \
        }                                                                                 \
        return fail;                                                                      \
    }

COUNT1D(float)
COUNT1D(double)
OUTER1D(float)
OUTER1D(double)
COUNT2D(float)
COUNT2D(double)
OUTER2D(float)
OUTER2D(double)
