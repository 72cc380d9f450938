/* Cascade-routing candidates per row, for rows [begin, end) that all have `t` models run: the expected
 * max of every candidate supermodel and its cost (VALUES_NAME), or also the choice among them (NAME),
 * fused in one pass per row so that nothing of size (rows x candidates x samples) is written to memory.
 *
 * Included by fused.c once per element type: REAL is the samples' type, LANES the values summed per
 * vector step; NAME, VALUES_NAME, ROW_NAME, HSUM, HALF, SCRATCH and SCRATCH_INIT the names it defines.
 * It computes what `build_candidates` + `choose` compute with the `levels` backend (same candidates in the
 * same order, the same parent + added recurrences for maxima and costs, exact singletons, the same tie
 * rule), walking the candidates depth first so that only one running-max vector per subset size is live.
 * Returns 0, or 1 when scratch memory cannot be allocated.
 */

/* The sum of LANES values as a tree of halves: one vector add of the two halves, then pairwise (a serial
 * chain of scalar adds per candidate would bound the kernel's speed). */
typedef REAL HALF __attribute__((vector_size(LANES / 2 * sizeof(REAL))));

static inline REAL HSUM(const REAL *a)
{
    HALF lo, hi;
    memcpy(&lo, a, sizeof lo);
    memcpy(&hi, a + LANES / 2, sizeof hi);
    lo += hi;
    REAL r[LANES / 2];
    memcpy(r, &lo, sizeof r);
    for (int w = LANES / 4; w > 0; w /= 2)
        for (int i = 0; i < w; i++) r[i] += r[i + w];
    return r[0];
}

/* Scratch memory of one thread: free models' samples (padded), one running max per subset size. */
typedef struct {
    REAL *xc, *vec;
    int64_t P;
} SCRATCH;

/* E[max] (value) and cost (cst) of every subset of row r, in table order; returns the run set's mask
 * and writes its free models (comp) and last run model (last_run). */
static int64_t ROW_NAME(SCRATCH *w, int64_t r, int64_t k, int64_t S, const REAL *x, const REAL *quality,
                        const double *cost, const uint8_t *run, int64_t t, int64_t m, const int64_t *order,
                        const int64_t *size, const int64_t *parent, const int64_t *added, double *value,
                        double *cst, int64_t *comp, int64_t *last_run)
{
    const int64_t P = w->P, n = k - t;
    REAL *xc = w->xc, *vec = w->vec;
    const REAL *xr = x + r * S * k;
    const uint8_t *rr = run + r * k;
    const double *cr = cost + r * k;
    int64_t nf = 0, run_mask = 0;
    double base_cost = 0.0;
    *last_run = -1;
    for (int64_t i = 0; i < k; i++) {
        if (rr[i]) { run_mask |= (int64_t)1 << i; base_cost += cr[i]; *last_run = i; }
        else comp[nf++] = i;
    }
    for (int64_t p = 0; p < n; p++)
        for (int64_t s = 0; s < S; s++) xc[p * P + s] = xr[s * k + comp[p]];
    /* the run set itself: the max over run models per sample (-inf when none ran) */
    {
        REAL acc = 0;
        for (int64_t s = 0; s < S; s++) {
            REAL best = -INFINITY;
            for (int64_t i = 0; i < k; i++)
                if (rr[i] && xr[s * k + i] > best) best = xr[s * k + i];
            vec[s] = best;
            acc += best;
        }
        value[0] = t == 0 ? -INFINITY : (double)(acc / (REAL)S);
        if (quality && t == 1) value[0] = (double)quality[r * k + *last_run];
        cst[0] = base_cost;
    }
    for (int64_t o = 1; o < m; o++) {
        const int64_t j = order[o], L = size[j], a = added[j];
        const REAL *prev = vec + (L - 1) * P, *xa = xc + a * P;
        REAL *cur = vec + L * P;
        REAL acc[LANES] = {0};  /* one partial sum per vector lane, added up as a tree: no serial chain */
        for (int64_t s = 0; s < P; s += LANES)
            for (int64_t l = 0; l < LANES; l++) {
                const REAL v = prev[s + l] > xa[s + l] ? prev[s + l] : xa[s + l];
                cur[s + l] = v;
                acc[l] += v;
            }
        value[j] = (double)(REAL)(HSUM(acc) / (REAL)S);
        if (quality && t == 0 && L == 1) value[j] = (double)quality[r * k + comp[a]];
        /* costs accumulate along the same parent chain as `supermodel_costs` */
        cst[j] = cst[parent[j]] + cr[comp[a]];
    }
    return run_mask;
}

/* Rows of samples padded with zeros to a whole number of vectors: a padded entry's running max stays 0
 * and adds nothing to the sums, and the inner loop needs no remainder. Returns 1 if out of memory. */
static int SCRATCH_INIT(SCRATCH *w, int64_t k, int64_t S, int64_t t, int64_t m, const int64_t *size)
{
    int64_t max_size = 0;
    for (int64_t j = 0; j < m; j++) max_size = size[j] > max_size ? size[j] : max_size;
    w->P = (S + LANES - 1) / LANES * LANES;
    w->xc = calloc((size_t)(k - t > 0 ? k - t : 1) * (size_t)w->P, sizeof(REAL));
    w->vec = calloc((size_t)(max_size + 1) * (size_t)w->P, sizeof(REAL));
    if (!w->xc || !w->vec) { free(w->xc); free(w->vec); return 1; }
    return 0;
}

/* value (B, m) and cost (B, m) of every candidate of rows [begin, end), as `build_candidates` has them. */
int VALUES_NAME(int64_t begin, int64_t end, int64_t k, int64_t n_samples, const REAL *x, const REAL *quality,
                const double *cost, const uint8_t *run, int64_t t, int64_t m, const int64_t *order,
                const int64_t *size, const int64_t *parent, const int64_t *added, double *value_out,
                double *cost_out)
{
    SCRATCH w;
    int64_t comp[64], last_run;
    if (SCRATCH_INIT(&w, k, n_samples, t, m, size)) return 1;
    for (int64_t r = begin; r < end; r++)
        ROW_NAME(&w, r, k, n_samples, x, quality, cost, run, t, m, order, size, parent, added, value_out + r * m,
                 cost_out + r * m, comp, &last_run);
    free(w.xc); free(w.vec);
    return 0;
}

/* The decision of rows [begin, end): next model (-1: stop) and the chosen supermodel's bitmask. */
int NAME(int64_t begin, int64_t end, int64_t k, int64_t n_samples,
         const REAL *x,          /* (B, S, k) quality samples (S = 1: the point estimates)           */
         const REAL *quality,    /* (B, k) estimates for exact singletons; NULL without Σ             */
         const double *cost,     /* (B, k) estimated costs                                           */
         const uint8_t *run,     /* (B, k) models already run                                        */
         int64_t t, int64_t m,   /* run models per row; subsets in the table                         */
         const int64_t *order,   /* (m) depth-first order of the subsets, order[0] = 0 (the empty set) */
         const int64_t *size,    /* (m) subset sizes                                                 */
         const int64_t *parent,  /* (m) the subset without its lowest element, -1 for the empty set  */
         const int64_t *added,   /* (m) position among the free models of that element, -1           */
         const int64_t *rel,     /* (m) bitmask of the subset over free-model positions              */
         int force_order, const double *lam, const uint8_t *expensive, double tie_tol, double cost_rtol,
         int64_t *next_model, int64_t *supermodel)
{
    SCRATCH w;
    int64_t comp[64], last_run;
    double *value = malloc(sizeof(double) * (size_t)m), *cst = malloc(sizeof(double) * (size_t)m);
    if (!value || !cst || SCRATCH_INIT(&w, k, n_samples, t, m, size)) {
        free(value); free(cst);
        return 1;
    }
    for (int64_t r = begin; r < end; r++) {
        const int64_t run_mask = ROW_NAME(&w, r, k, n_samples, x, quality, cost, run, t, m, order, size, parent,
                                          added, value, cst, comp, &last_run);
        /* choose: the best E[max] - λ cost; ties within tie_tol to the cheapest (or, where expensive, the
         * dearest), costs within cost_rtol counting as equal, then the first listed */
        const double l = lam[r];
        const int64_t lowest_allowed = last_run + 1 - t;
        double best = -INFINITY;
        for (int64_t j = 0; j < m; j++) {
            const int valid = !(t == 0 && j == 0) && !(force_order && t > 0 && j > 0 && added[j] < lowest_allowed);
            value[j] = valid ? value[j] - l * cst[j] : -INFINITY;
            if (value[j] > best) best = value[j];
        }
        const int dear = expensive[r] != 0;
        double target = dear ? -INFINITY : INFINITY;
        for (int64_t j = 0; j < m; j++)
            if (value[j] >= best - tie_tol && (dear ? cst[j] > target : cst[j] < target)) target = cst[j];
        int64_t pick = 0;
        for (int64_t j = 0; j < m; j++) {
            if (!(value[j] >= best - tie_tol)) continue;
            if (dear ? cst[j] >= target - cost_rtol * fabs(target) : cst[j] <= target + cost_rtol * fabs(target)) {
                pick = j;
                break;
            }
        }
        int64_t mask = run_mask;
        for (int64_t p = 0; p < k - t; p++)
            if (rel[pick] >> p & 1) mask |= (int64_t)1 << comp[p];
        supermodel[r] = mask;
        next_model[r] = added[pick] >= 0 ? comp[added[pick]] : -1;
    }
    free(w.xc); free(w.vec); free(value); free(cst);
    return 0;
}
