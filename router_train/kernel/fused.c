/* The fused decision kernel (see fused.py): fused_body.h instantiated for float32 and float64 samples. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Sums of 16 floats / 8 doubles as a tree of vector halves (GCC/Clang vector extensions, any target): a
 * serial chain of scalar adds per candidate would bound the kernel's speed. */
typedef float f8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));
typedef double d4 __attribute__((vector_size(32)));
typedef double d2 __attribute__((vector_size(16)));

static inline float hsum_f32(const float *a)
{
    f8 lo, hi;
    memcpy(&lo, a, sizeof lo);
    memcpy(&hi, a + 8, sizeof hi);
    lo += hi;
    f4 l4, h4;
    memcpy(&l4, &lo, sizeof l4);
    memcpy(&h4, (const float *)&lo + 4, sizeof h4);
    l4 += h4;
    return (l4[0] + l4[2]) + (l4[1] + l4[3]);
}

static inline double hsum_f64(const double *a)
{
    d4 lo, hi;
    memcpy(&lo, a, sizeof lo);
    memcpy(&hi, a + 4, sizeof hi);
    lo += hi;
    d2 l2, h2;
    memcpy(&l2, &lo, sizeof l2);
    memcpy(&h2, (const double *)&lo + 2, sizeof h2);
    l2 += h2;
    return l2[0] + l2[1];
}

#define REAL float
#define LANES 16
#define HSUM hsum_f32
#define NAME rt_decide_f32
#define VALUES_NAME rt_values_f32
#define ROW_NAME row_f32
#define SCRATCH scratch_f32
#define SCRATCH_INIT scratch_init_f32
#include "fused_body.h"
#undef REAL
#undef LANES
#undef HSUM
#undef NAME
#undef VALUES_NAME
#undef ROW_NAME
#undef SCRATCH
#undef SCRATCH_INIT

#define REAL double
#define LANES 8
#define HSUM hsum_f64
#define NAME rt_decide_f64
#define VALUES_NAME rt_values_f64
#define ROW_NAME row_f64
#define SCRATCH scratch_f64
#define SCRATCH_INIT scratch_init_f64
#include "fused_body.h"
