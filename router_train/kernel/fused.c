/* The fused decision kernel (see fused.py): fused_body.h instantiated for float32 and float64 samples. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REAL float
#define LANES 16
#define HALF half_f32
#define HSUM hsum_f32
#define NAME rt_decide_f32
#define VALUES_NAME rt_values_f32
#define ROW_NAME row_f32
#define SCRATCH scratch_f32
#define SCRATCH_INIT scratch_init_f32
#include "fused_body.h"
#undef REAL
#undef LANES
#undef HALF
#undef HSUM
#undef NAME
#undef VALUES_NAME
#undef ROW_NAME
#undef SCRATCH
#undef SCRATCH_INIT

#define REAL double
#define LANES 8
#define HALF half_f64
#define HSUM hsum_f64
#define NAME rt_decide_f64
#define VALUES_NAME rt_values_f64
#define ROW_NAME row_f64
#define SCRATCH scratch_f64
#define SCRATCH_INIT scratch_init_f64
#include "fused_body.h"

/* ---- λ tables (lambda_table.py): `_build_block` per state, in C --------------------------------------
 * For each row r in [begin, end) with candidates value/cost/valid (row stride w) of which the first
 * width[r] are looked at (all w unless the valid ones come first): the sorted breakpoints, the picks
 * (cheap, dear) of every interval between them and the range of λ in which each pick is certain, written
 * from start[r] on (room for 2 width[r] + 1 intervals), and the number of breakpoints. The same
 * arithmetic, in the same order, as the torch code, so the tables are identical. Returns 1 if out of memory. */

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int rt_lambda_table(int64_t begin, int64_t end, int64_t w, const double *value, const double *cost,
                    const uint8_t *valid, const int64_t *width, const int64_t *start, double tie_tol,
                    double cost_rtol, double safety, double *breaks_out, int16_t *pick_out, double *safe_out,
                    int64_t *count_out)
{
    double *v = malloc(sizeof(double) * (size_t)(w > 0 ? w : 1) * 6);
    double *ends = malloc(sizeof(double) * (size_t)(2 * w + 2));
    uint8_t *never = malloc((size_t)(w > 0 ? w : 1));
    if (!v || !ends || !never) { free(v); free(ends); free(never); return 1; }
    double *c = v + w, *lower = v + 2 * w, *upper = v + 3 * w, *raw = v + 4 * w;
    const double inf = INFINITY;
    for (int64_t r = begin; r < end; r++) {
        const int64_t W = width[r];
        const double *vr = value + r * w, *cr = cost + r * w;
        const uint8_t *ok = valid + r * w;
        for (int64_t j = 0; j < W; j++) {
            v[j] = ok[j] ? vr[j] : 0.0;
            c[j] = ok[j] ? cr[j] : 0.0;
            raw[j] = cr[j];
        }
        double vmax = 0.0, cmax = 0.0, dc_min = inf, flat_gap = inf;
        for (int64_t j = 0; j < W; j++) {
            double lo = -inf, hi = inf;
            int nv = !ok[j];
            for (int64_t i = 0; i < W; i++) {
                if (!ok[i]) continue;
                const double dc = c[i] - c[j], dv = v[i] - v[j] - tie_tol;
                const double ratio = dv / (dc == 0 ? 1.0 : dc);
                if (dc > 0 && ratio > lo) lo = ratio;
                if (dc < 0 && ratio < hi) hi = ratio;
                if (ok[j]) {
                    if (dc == 0 && dv > 0) nv = 1;
                    if (dc != 0 && fabs(dc) < dc_min) dc_min = fabs(dc);
                    if (dc == 0 && i != j && fabs(dv) < flat_gap) flat_gap = fabs(dv);
                }
            }
            lower[j] = lo;
            upper[j] = hi;
            never[j] = (uint8_t)nv;
            if (ok[j]) {
                if (fabs(v[j]) > vmax) vmax = fabs(v[j]);
                if (fabs(c[j]) > cmax) cmax = fabs(c[j]);
            }
        }
        vmax += tie_tol;
        int64_t count = 0;
        for (int64_t j = 0; j < W; j++) {
            const double a = never[j] ? inf : lower[j], b = never[j] ? inf : upper[j];
            if (isfinite(a)) ends[count++] = a;
            if (isfinite(b)) ends[count++] = b;
        }
        qsort(ends, (size_t)count, sizeof(double), cmp_double);
        const int have_dc = isfinite(dc_min);
        const double m_abs = have_dc ? safety * 2 * vmax / dc_min : 0.0;
        const double m_rel = have_dc ? safety * (2 * cmax / dc_min + 1) : safety;
        const int flat_ok = flat_gap > safety * vmax;
        double flat_from = cmax > 0 ? (flat_gap / safety - vmax) / (cmax > 1e-300 ? cmax : 1e-300) * (1 - 1e-9)
                                    : (flat_ok ? inf : -inf);
        if (!flat_ok) flat_from = -inf;
        double *bo = breaks_out + start[r];
        int16_t *po = pick_out + 2 * start[r];
        double *so = safe_out + 2 * start[r];
        for (int64_t m = 0; m < count; m++) bo[m] = ends[m];
        for (int64_t m = 0; m <= count; m++) {
            const double left = m == 0 ? -inf : ends[m - 1], right = m == count ? inf : ends[m];
            double rep = left + (right - left) / 2;
            if (isinf(left)) rep = right - 1 - fabs(right);
            if (isinf(right)) rep = left + 1 + fabs(left);
            if (isinf(left) && isinf(right)) rep = 0.0;
            int any = 0;
            for (int64_t j = 0; j < W && !any; j++) any = !never[j] && lower[j] <= rep && rep <= upper[j];
            for (int dear = 0; dear < 2; dear++) {
                double target = dear ? -inf : inf;
                for (int64_t j = 0; j < W; j++) {
                    const int tied = !any || (!never[j] && lower[j] <= rep && rep <= upper[j]);
                    if (tied && (dear ? raw[j] > target : raw[j] < target)) target = raw[j];
                }
                int64_t pick = 0;
                for (int64_t j = 0; j < W; j++) {
                    const int tied = !any || (!never[j] && lower[j] <= rep && rep <= upper[j]);
                    if (tied && (dear ? raw[j] >= target - cost_rtol * fabs(target)
                                      : raw[j] <= target + cost_rtol * fabs(target))) {
                        pick = j;
                        break;
                    }
                }
                po[2 * m + dear] = (int16_t)pick;
            }
            const double lo_end = m == 0 ? -inf : ends[m - 1] + 2 * (m_abs + m_rel * fabs(ends[m - 1]));
            double hi_end = m == count ? inf : ends[m] - 2 * (m_abs + m_rel * fabs(ends[m]));
            if (flat_from < hi_end) hi_end = flat_from;
            so[2 * m] = lo_end;
            so[2 * m + 1] = hi_end;
        }
        count_out[r] = count;
    }
    free(v); free(ends); free(never);
    return 0;
}

/* ---- λ table lookup (LambdaTable.lookup): per looked-up state r in [begin, end), the interval of its
 * sorted breakpoints holding λ (a binary search for the count of breakpoints <= λ, as the torch code
 * counts them), that interval's pick with the row's tie-break, whether λ lies inside its certain range,
 * and (where range_out is given) that range, or (λ, λ) where the pick is uncertain. `span` holds per
 * state (first breakpoint, end of its breakpoints, first interval). */
int rt_lookup(int64_t begin, int64_t end, const int64_t *span, const double *breaks, const int16_t *pick,
              const double *safe, const int64_t *slots, const uint8_t *expensive, double lam, int64_t *pick_out,
              uint8_t *sure_out, double *range_out)
{
    for (int64_t r = begin; r < end; r++) {
        const int64_t *sp = span + 3 * slots[r];
        int64_t lo = sp[0], hi = sp[1];
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (breaks[mid] <= lam) lo = mid + 1;
            else hi = mid;
        }
        const int64_t at = sp[2] + (lo - sp[0]);
        pick_out[r] = pick[2 * at + (expensive[r] ? 1 : 0)];
        const double a = safe[2 * at], b = safe[2 * at + 1];
        const int sure = a < lam && lam < b;
        sure_out[r] = (uint8_t)sure;
        if (range_out) {
            range_out[2 * r] = sure ? a : lam;
            range_out[2 * r + 1] = sure ? b : lam;
        }
    }
    return 0;
}
