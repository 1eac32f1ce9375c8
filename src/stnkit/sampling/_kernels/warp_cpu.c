/*
 * Fused grid generator + sampler for the matrix families of stnkit (CPU).
 *
 * Each output pixel's source point is computed from the 3x3 matrix inside the
 * sampling loop, so the (N, H_out, W_out, 2) grid is never materialised, and
 * the backward pass accumulates d loss / d matrix directly instead of writing
 * d loss / d grid.
 *
 * Convention (see stnkit.transforms.base): the matrix maps OUTPUT normalised
 * points (x, y, 1), -1/+1 at the image edges (align_corners=False), to INPUT
 * normalised points. Unnormalisation, padding, bilinear weights and their
 * gradients follow ATen's GridSampler.h, so results agree with F.grid_sample
 * to rounding.
 *
 * Built by stnkit.sampling.fused with `cc -O3 -march=native -fopenmp -shared`
 * and called through ctypes with pointers to contiguous tensors. The typed
 * part of the file is included twice (float and double) through
 * `#include __FILE__`.
 * Modes: 0 bilinear, 1 nearest. Padding: 0 zeros, 1 border, 2 reflection, 3 fill.
 */
#ifndef STN_TYPED_PART

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PAD_ZEROS 0
#define PAD_BORDER 1
#define PAD_REFLECTION 2
#define PAD_FILL 3

/* ATen: clip_coordinates_set_grad */
static inline double clip_set_grad(double in, long size, double *grad) {
    if (in <= 0.0) { *grad = 0.0; return 0.0; }
    double max = (double)(size - 1);
    if (in >= max) { *grad = 0.0; return max; }
    *grad = 1.0;
    return in;
}

/* ATen: reflect_coordinates_set_grad with align_corners=False (twice_low=-1, twice_high=2*size-1) */
static inline double reflect_set_grad(double in, long size, double *grad) {
    double min = -0.5, span = (double)size, mult = 1.0;
    in = in - min;
    if (in < 0.0) { mult = -1.0; in = -in; }
    double extra = fmod(in, span);
    long flips = (long)floor(in / span);
    if (flips % 2 == 0) { *grad = mult; return extra + min; }
    *grad = -mult;
    return span - extra + min;
}

static inline int threads_for(int requested) {
#ifdef _OPENMP
    return requested < 1 ? 1 : (requested > 64 ? 64 : requested);
#else
    (void)requested;
    return 1;
#endif
}

static inline void thread_info(int *t, int *n) {
#ifdef _OPENMP
    *t = omp_get_thread_num();
    *n = omp_get_num_threads();
#else
    *t = 0;
    *n = 1;
#endif
}

#if defined(__GNUC__)
#define STN_NOINLINE __attribute__((noinline))
#else
#define STN_NOINLINE
#endif

#define STN_TYPED_PART
#define T float
#define S(name) name##_f32
#define FLOOR floorf
#define RINT nearbyintf
#include __FILE__
#undef T
#undef S
#undef FLOOR
#undef RINT
#define T double
#define S(name) name##_f64
#define FLOOR floor
#define RINT nearbyint
#include __FILE__

#else /* STN_TYPED_PART: everything below is compiled once for T = float and once for T = double */

/*
 * The kernels work on spans of consecutive output rows of one image (about
 * a thousand pixels, so that short rows still give long loops), in passes the
 * compiler can vectorise: (1) the source point of every pixel of the span,
 * after padding; (2) its taps (clamped indices, in-bounds masks, fractional
 * offsets); (3) per channel, the gather (forward) or the scatter and the
 * gradient w.r.t. the source point (backward). Taps outside the input read
 * `fill` (zero unless padding is "fill").
 */
typedef struct {
    long rows, cap; /* rows per span, pixels per span */
    T *xn, *yn, *ix, *iy, *gmx, *gmy, *sx, *sy, *w, *wc, *ax, *ay, *m00, *m01, *m10, *m11, *gix, *giy;
    int *i00, *i01, *i10, *i11;
    void *block;
} S(span);

static int S(span_init)(S(span) *r, long Wo) {
    r->rows = Wo >= 1024 ? 1 : 1024 / Wo;
    r->cap = r->rows * Wo;
    char *block = (char *)malloc((size_t)r->cap * (18 * sizeof(T) + 4 * sizeof(int)) + 64);
    if (!block) return 0;
    r->block = block;
    T *tp = (T *)block;
    T **fields[18] = {&r->xn, &r->yn, &r->ix, &r->iy, &r->gmx, &r->gmy, &r->sx, &r->sy, &r->w, &r->wc,
                      &r->ax, &r->ay, &r->m00, &r->m01, &r->m10, &r->m11, &r->gix, &r->giy};
    for (int k = 0; k < 18; ++k) *fields[k] = tp + k * r->cap;
    int *ip = (int *)(tp + 18 * r->cap);
    r->i00 = ip; r->i01 = ip + r->cap; r->i10 = ip + 2 * r->cap; r->i11 = ip + 3 * r->cap;
    /* as normalised_pixel_centres: (2 j + 1) / W - 1, repeated for every row of the span */
    for (long j = 0; j < Wo; ++j) r->xn[j] = (T)(j * 2 + 1) / (T)Wo - (T)1;
    for (long k = 1; k < r->rows; ++k) memcpy(r->xn + k * Wo, r->xn, Wo * sizeof(T));
    return 1;
}

static STN_NOINLINE void S(points_kernel)(const T *m, int projective, T eps, T Wt, T Ht, const T *restrict xn,
                                          const T *restrict yn, T *restrict sxs, T *restrict sys, T *restrict ws,
                                          T *restrict wc, T *restrict ix, T *restrict iy, T *restrict gmx,
                                          T *restrict gmy, long n) {
    const T m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3], m4 = m[4], m5 = m[5], m6 = m[6], m7 = m[7], m8 = m[8];
    if (projective) {
        for (long j = 0; j < n; ++j) {
            /* points on or behind the horizon: clamp w, as apply_matrix_to_grid does */
            const T w0 = m6 * xn[j] + m7 * yn[j] + m8;
            const T w = w0 >= eps ? w0 : eps;
            wc[j] = w0 >= eps ? (T)0 : (T)1;
            ws[j] = w;
            sxs[j] = (m0 * xn[j] + m1 * yn[j] + m2) / w;
            sys[j] = (m3 * xn[j] + m4 * yn[j] + m5) / w;
        }
    } else {
        for (long j = 0; j < n; ++j) {
            sxs[j] = m0 * xn[j] + m1 * yn[j] + m2;
            sys[j] = m3 * xn[j] + m4 * yn[j] + m5;
        }
    }
    for (long j = 0; j < n; ++j) {
        ix[j] = ((sxs[j] + (T)1) * Wt - (T)1) * (T)0.5;
        iy[j] = ((sys[j] + (T)1) * Ht - (T)1) * (T)0.5;
        gmx[j] = Wt * (T)0.5;
        gmy[j] = Ht * (T)0.5;
    }
}

/* Pass 1: source point (pixels, after padding) of every pixel of rows [i0, i0 + rows), and d pixel / d normalised. */
static void S(span_points)(S(span) *r, const T *m, int projective, T eps, long i0, long rows, long Ho, long Wo,
                           long H, long W, int pad) {
    const long n = rows * Wo;
    for (long k = 0; k < rows; ++k) {
        const T y = (T)((i0 + k) * 2 + 1) / (T)Ho - (T)1;
        T *restrict yrow = r->yn + k * Wo;
        for (long j = 0; j < Wo; ++j) yrow[j] = y;
    }
    S(points_kernel)(m, projective, eps, (T)W, (T)H, r->xn, r->yn, r->sx, r->sy, r->w, r->wc, r->ix, r->iy, r->gmx,
                     r->gmy, n);
    T *ix = r->ix, *iy = r->iy, *gmx = r->gmx, *gmy = r->gmy;
    if (pad == PAD_BORDER || pad == PAD_REFLECTION) {
        for (long j = 0; j < n; ++j) {
            double g1 = 1.0, g2 = 1.0, h1 = 1.0, h2 = 1.0, px = ix[j], py = iy[j];
            if (pad == PAD_REFLECTION) {
                px = reflect_set_grad(px, W, &g1);
                py = reflect_set_grad(py, H, &h1);
            }
            px = clip_set_grad(px, W, &g2);
            py = clip_set_grad(py, H, &h2);
            ix[j] = (T)px;
            iy[j] = (T)py;
            gmx[j] *= (T)(g1 * g2);
            gmy[j] *= (T)(h1 * h2);
        }
    }
}

/* Pass 2: taps. Bilinear: four clamped indices, in-bounds masks and offsets. Nearest: one index (i00), mask m00.
   Written with floating-point selects and clamps only, so that the loops vectorise; coordinates are compared
   as floats because far-away points overflow an int. (The loops sit in functions of their own, with restrict
   parameters: once inlined, gcc loses track of the restrict locals and stops vectorising.) */
static STN_NOINLINE void S(taps_bilinear)(const T *restrict ix, const T *restrict iy, T *restrict ax,
                                          T *restrict ay, T *restrict m00, T *restrict m01, T *restrict m10,
                                          T *restrict m11, int *restrict i00, int *restrict i01, int *restrict i10,
                                          int *restrict i11, long n, int w, T wmax, T hmax) {
    for (long j = 0; j < n; ++j) {
        const T fx = FLOOR(ix[j]), fy = FLOOR(iy[j]), gx = fx + (T)1, gy = fy + (T)1;
        ax[j] = ix[j] - fx;
        ay[j] = iy[j] - fy;
        const T bx0 = (fx >= (T)0 && fx <= wmax) ? (T)1 : (T)0, bx1 = (gx >= (T)0 && gx <= wmax) ? (T)1 : (T)0;
        const T by0 = (fy >= (T)0 && fy <= hmax) ? (T)1 : (T)0, by1 = (gy >= (T)0 && gy <= hmax) ? (T)1 : (T)0;
        const int x0 = (int)(fx < (T)0 ? (T)0 : (fx > wmax ? wmax : fx));
        const int x1 = (int)(gx < (T)0 ? (T)0 : (gx > wmax ? wmax : gx));
        const int y0 = (int)(fy < (T)0 ? (T)0 : (fy > hmax ? hmax : fy));
        const int y1 = (int)(gy < (T)0 ? (T)0 : (gy > hmax ? hmax : gy));
        m00[j] = bx0 * by0;
        m01[j] = bx1 * by0;
        m10[j] = bx0 * by1;
        m11[j] = bx1 * by1;
        i00[j] = y0 * w + x0;
        i01[j] = y0 * w + x1;
        i10[j] = y1 * w + x0;
        i11[j] = y1 * w + x1;
    }
}

static STN_NOINLINE void S(taps_nearest)(const T *restrict ix, const T *restrict iy, T *restrict m00,
                                         int *restrict i00, long n, int w, T wmax, T hmax) {
    for (long j = 0; j < n; ++j) {
        const T fx = RINT(ix[j]), fy = RINT(iy[j]);
        const T inside = (fx >= (T)0 && fx <= wmax && fy >= (T)0 && fy <= hmax) ? (T)1 : (T)0;
        const T cx = fx < (T)0 ? (T)0 : (fx > wmax ? wmax : fx), cy = fy < (T)0 ? (T)0 : (fy > hmax ? hmax : fy);
        m00[j] = inside;
        i00[j] = (int)cy * w + (int)cx;
    }
}

static void S(span_taps)(S(span) *r, long n, long H, long W, int nearest) {
    if (nearest)
        S(taps_nearest)(r->ix, r->iy, r->m00, r->i00, n, (int)W, (T)(W - 1), (T)(H - 1));
    else
        S(taps_bilinear)(r->ix, r->iy, r->ax, r->ay, r->m00, r->m01, r->m10, r->m11, r->i00, r->i01, r->i10,
                         r->i11, n, (int)W, (T)(W - 1), (T)(H - 1));
}

/* Pass 3, forward: one channel of the span. */
static STN_NOINLINE void S(gather_bilinear)(const T *restrict p, T *restrict o, const T *restrict ax,
                                            const T *restrict ay, const T *restrict m00, const T *restrict m01,
                                            const T *restrict m10, const T *restrict m11, const int *restrict i00,
                                            const int *restrict i01, const int *restrict i10,
                                            const int *restrict i11, long n, T f) {
    for (long j = 0; j < n; ++j) {
        const T bx = (T)1 - ax[j], by = (T)1 - ay[j];
        const T v00 = m00[j] * p[i00[j]] + ((T)1 - m00[j]) * f;
        const T v01 = m01[j] * p[i01[j]] + ((T)1 - m01[j]) * f;
        const T v10 = m10[j] * p[i10[j]] + ((T)1 - m10[j]) * f;
        const T v11 = m11[j] * p[i11[j]] + ((T)1 - m11[j]) * f;
        o[j] = by * (bx * v00 + ax[j] * v01) + ay[j] * (bx * v10 + ax[j] * v11);
    }
}

static STN_NOINLINE void S(gather_nearest)(const T *restrict p, T *restrict o, const T *restrict m00,
                                           const int *restrict i00, long n, T f) {
    for (long j = 0; j < n; ++j) o[j] = m00[j] * p[i00[j]] + ((T)1 - m00[j]) * f;
}

static void S(span_gather)(const S(span) *r, const T *p, T *o, long n, int nearest, T f) {
    if (nearest)
        S(gather_nearest)(p, o, r->m00, r->i00, n, f);
    else
        S(gather_bilinear)(p, o, r->ax, r->ay, r->m00, r->m01, r->m10, r->m11, r->i00, r->i01, r->i10, r->i11, n, f);
}

/* Pass 3, backward: scatter one channel of d loss / d output into d loss / d input. */
static void S(span_scatter)(const S(span) *r, const T *restrict g, T *restrict q, long n, int nearest) {
    const T *ax = r->ax, *ay = r->ay, *m00 = r->m00, *m01 = r->m01, *m10 = r->m10, *m11 = r->m11;
    const int *i00 = r->i00, *i01 = r->i01, *i10 = r->i10, *i11 = r->i11;
    if (nearest) {
        for (long j = 0; j < n; ++j) q[i00[j]] += m00[j] * g[j];
        return;
    }
    for (long j = 0; j < n; ++j) {
        const T bx = (T)1 - ax[j], by = (T)1 - ay[j], gj = g[j];
        q[i00[j]] += m00[j] * bx * by * gj;
        q[i01[j]] += m01[j] * ax[j] * by * gj;
        q[i10[j]] += m10[j] * bx * ay[j] * gj;
        q[i11[j]] += m11[j] * ax[j] * ay[j] * gj;
    }
}

/* Pass 3, backward: add one channel's d loss / d (ix, iy) (pixels) into gix, giy. */
static STN_NOINLINE void S(point_grad)(const T *restrict p, const T *restrict g, T *restrict gix, T *restrict giy,
                                       const T *restrict ax, const T *restrict ay, const T *restrict m00,
                                       const T *restrict m01, const T *restrict m10, const T *restrict m11,
                                       const int *restrict i00, const int *restrict i01, const int *restrict i10,
                                       const int *restrict i11, long n, T f) {
    for (long j = 0; j < n; ++j) {
        const T v00 = m00[j] * p[i00[j]] + ((T)1 - m00[j]) * f;
        const T v01 = m01[j] * p[i01[j]] + ((T)1 - m01[j]) * f;
        const T v10 = m10[j] * p[i10[j]] + ((T)1 - m10[j]) * f;
        const T v11 = m11[j] * p[i11[j]] + ((T)1 - m11[j]) * f;
        gix[j] += g[j] * ((v01 - v00) * ((T)1 - ay[j]) + (v11 - v10) * ay[j]);
        giy[j] += g[j] * ((v10 - v00) * ((T)1 - ax[j]) + (v11 - v01) * ax[j]);
    }
}

static void S(span_point_grad)(S(span) *r, const T *p, const T *g, long n, T f) {
    S(point_grad)(p, g, r->gix, r->giy, r->ax, r->ay, r->m00, r->m01, r->m10, r->m11, r->i00, r->i01, r->i10, r->i11,
                  n, f);
}

/* Chain rule from the points of the span to the matrix: sums of (gx, gy[, gw]) times (xn, yn, 1). */
static void S(span_matrix_grad)(const S(span) *r, double *acc, int projective, long n) {
    const T *restrict gix = r->gix, *restrict giy = r->giy, *restrict gmx = r->gmx, *restrict gmy = r->gmy;
    const T *restrict xn = r->xn, *restrict yn = r->yn;
    T s[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    if (projective) {
        const T *restrict ws = r->w, *restrict sx = r->sx, *restrict sy = r->sy, *restrict wc = r->wc;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
        for (long j = 0; j < n; ++j) {
            const T du = gix[j] * gmx[j] / ws[j], dv = giy[j] * gmy[j] / ws[j];
            const T dw = ((T)1 - wc[j]) * -(du * sx[j] + dv * sy[j]);
            s0 += du * xn[j]; s1 += du * yn[j]; s2 += du;
            s3 += dv * xn[j]; s4 += dv * yn[j]; s5 += dv;
            s6 += dw * xn[j]; s7 += dw * yn[j]; s8 += dw;
        }
        s[0] = s0; s[1] = s1; s[2] = s2; s[3] = s3; s[4] = s4; s[5] = s5; s[6] = s6; s[7] = s7; s[8] = s8;
    } else {
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0;
        for (long j = 0; j < n; ++j) {
            const T gx = gix[j] * gmx[j], gy = giy[j] * gmy[j];
            s0 += gx * xn[j]; s1 += gx * yn[j]; s2 += gx;
            s3 += gy * xn[j]; s4 += gy * yn[j]; s5 += gy;
        }
        s[0] = s0; s[1] = s1; s[2] = s2; s[3] = s3; s[4] = s4; s[5] = s5;
    }
    for (int k = 0; k < 9; ++k) acc[k] += (double)s[k];
}

/* Forward over rows [row0, row1) of one image. */
static void S(forward_rows)(S(span) *r, const T *in, T *out, const T *m, long C, long H, long W, long Ho, long Wo,
                            long row0, long row1, int mode, int pad, int projective, T eps, const T *fill) {
    for (long i = row0; i < row1; i += r->rows) {
        const long rows = i + r->rows < row1 ? r->rows : row1 - i, n = rows * Wo;
        S(span_points)(r, m, projective, eps, i, rows, Ho, Wo, H, W, pad);
        S(span_taps)(r, n, H, W, mode == 1);
        for (long c = 0; c < C; ++c)
            S(span_gather)(r, in + c * H * W, out + c * Ho * Wo + i * Wo, n, mode == 1,
                           pad == PAD_FILL ? fill[c] : (T)0);
    }
}

void S(stn_warp_forward)(const T *in, T *out, const T *mats, long mat_stride, long N, long C, long H, long W,
                         long Ho, long Wo, int mode, int pad, int projective, double eps, const T *fill,
                         int nthreads) {
    /* tasks of about 16k output pixels: enough to share out, few enough to keep scheduling cheap */
    const long chunk = Wo * Ho <= 16384 ? Ho : (16384 + Wo - 1) / Wo;
    const long per_image = (Ho + chunk - 1) / chunk;
    const long tasks = N * per_image;
    if (tasks == 0) return;
    const int nt = threads_for(nthreads) < tasks ? threads_for(nthreads) : (int)tasks;
#pragma omp parallel num_threads(nt)
    {
        S(span) r;
        const int ok = S(span_init)(&r, Wo);
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < tasks; ++t) {
            if (!ok) continue;
            const long b = t / per_image, r0 = (t % per_image) * chunk;
            const long r1 = r0 + chunk < Ho ? r0 + chunk : Ho;
            S(forward_rows)(&r, in + b * C * H * W, out + b * C * Ho * Wo, mats + b * mat_stride, C, H, W, Ho, Wo,
                            r0, r1, mode, pad, projective, (T)eps, fill);
        }
        if (ok) free(r.block);
    }
}

/* Backward over rows [row0, row1) of one image: scatter into gin (if any), add d loss / d matrix into acc (if any). */
static void S(backward_rows)(S(span) *r, const T *in, const T *gout, T *gin, double *acc, const T *m, long C,
                             long H, long W, long Ho, long Wo, long row0, long row1, int mode, int pad,
                             int projective, T eps, const T *fill) {
    const int nearest = mode == 1;
    if (nearest) acc = NULL; /* nearest interpolation has no gradient w.r.t. the points */
    for (long i = row0; i < row1; i += r->rows) {
        const long rows = i + r->rows < row1 ? r->rows : row1 - i, n = rows * Wo;
        S(span_points)(r, m, projective, eps, i, rows, Ho, Wo, H, W, pad);
        S(span_taps)(r, n, H, W, nearest);
        if (acc) {
            memset(r->gix, 0, n * sizeof(T));
            memset(r->giy, 0, n * sizeof(T));
        }
        for (long c = 0; c < C; ++c) {
            const T *g = gout + c * Ho * Wo + i * Wo;
            if (gin) S(span_scatter)(r, g, gin + c * H * W, n, nearest);
            if (acc) S(span_point_grad)(r, in + c * H * W, g, n, pad == PAD_FILL ? fill[c] : (T)0);
        }
        if (acc) S(span_matrix_grad)(r, acc, projective, n);
    }
}

/* grad_in (may be NULL) must be zeroed; grad_mats (may be NULL) is (N, 9) and overwritten. */
void S(stn_warp_backward)(const T *in, const T *gout, T *gin, double *grad_mats, const T *mats, long mat_stride,
                          long N, long C, long H, long W, long Ho, long Wo, int mode, int pad, int projective,
                          double eps, const T *fill, int nthreads) {
    const int nt = threads_for(nthreads);
    if (grad_mats) memset(grad_mats, 0, sizeof(double) * 9 * N);
    if (N == 0) return;
    if (N >= nt || nt == 1 || !gin) {
        /* One image per task, so no two threads write the same input gradient; without an input
           gradient to scatter, images are split into row chunks too, each with its own partial sums. */
        const long chunk = (gin || Wo * Ho <= 16384) ? Ho : (16384 + Wo - 1) / Wo;
        const long per_image = (Ho + chunk - 1) / chunk;
        const long tasks = N * per_image;
        double *partial = grad_mats ? (double *)calloc((size_t)tasks * 9, sizeof(double)) : NULL;
        if (grad_mats && !partial) return;
        const int nthr = nt < tasks ? nt : (int)tasks;
#pragma omp parallel num_threads(nthr)
        {
            S(span) r;
            const int ok = S(span_init)(&r, Wo);
#pragma omp for schedule(dynamic, 1)
            for (long t = 0; t < tasks; ++t) {
                if (!ok) continue;
                const long b = t / per_image, r0 = (t % per_image) * chunk;
                const long r1 = r0 + chunk < Ho ? r0 + chunk : Ho;
                S(backward_rows)(&r, in + b * C * H * W, gout + b * C * Ho * Wo, gin ? gin + b * C * H * W : NULL,
                                 partial ? partial + 9 * t : NULL, mats + b * mat_stride, C, H, W, Ho, Wo, r0, r1,
                                 mode, pad, projective, (T)eps, fill);
            }
            if (ok) free(r.block);
        }
        if (partial) {
            for (long t = 0; t < tasks; ++t)
                for (int k = 0; k < 9; ++k) grad_mats[9 * (t / per_image) + k] += partial[9 * t + k];
            free(partial);
        }
        return;
    }
    const long size = C * H * W;
    if (C >= nt) {
        /* Fewer images than threads but at least as many channels: split channels, so each thread
           scatters into its own planes of the input gradient (the points are computed by every
           thread, which is cheap); d loss / d matrix is a sum over channels, added up below. */
        double acc[64][9];
        for (long b = 0; b < N; ++b) {
            memset(acc, 0, sizeof(acc));
#pragma omp parallel num_threads(nt)
            {
                int t = 0, n = 1;
                thread_info(&t, &n);
                S(span) r;
                if (S(span_init)(&r, Wo)) {
                    const long c0 = C * t / n, c1 = C * (t + 1) / n;
                    S(backward_rows)(&r, in + b * size + c0 * H * W, gout + (b * C + c0) * Ho * Wo,
                                     gin + b * size + c0 * H * W, grad_mats ? acc[t] : NULL, mats + b * mat_stride,
                                     c1 - c0, H, W, Ho, Wo, 0, Ho, mode, pad, projective, (T)eps, fill + c0);
                    free(r.block);
                }
            }
            if (grad_mats)
                for (int t = 0; t < nt; ++t)
                    for (int k = 0; k < 9; ++k) grad_mats[9 * b + k] += acc[t][k];
        }
        return;
    }
    /* Fewer images and channels than threads: split rows; each thread scatters into its own copy of the
       input gradient. */
    T *scratch = (T *)calloc((size_t)(nt - 1) * size, sizeof(T));
    double acc[64][9];
    for (long b = 0; b < N; ++b) {
        memset(acc, 0, sizeof(acc));
#pragma omp parallel num_threads(scratch ? nt : 1)
        {
            int t = 0, n = 1;
            thread_info(&t, &n);
            S(span) r;
            if (S(span_init)(&r, Wo)) {
                const long r0 = Ho * t / n, r1 = Ho * (t + 1) / n;
                T *target = t == 0 ? gin + b * size : scratch + (t - 1) * size;
                S(backward_rows)(&r, in + b * size, gout + b * C * Ho * Wo, target, grad_mats ? acc[t] : NULL,
                                 mats + b * mat_stride, C, H, W, Ho, Wo, r0, r1, mode, pad, projective, (T)eps, fill);
                free(r.block);
            }
        }
        if (grad_mats)
            for (int t = 0; t < nt; ++t)
                for (int k = 0; k < 9; ++k) grad_mats[9 * b + k] += acc[t][k];
        if (scratch) {
            T *restrict dst = gin + b * size;
            for (int t = 1; t < nt; ++t) {
                T *restrict src = scratch + (t - 1) * size;
                for (long k = 0; k < size; ++k) dst[k] += src[k];
                memset(src, 0, size * sizeof(T));
            }
        }
    }
    free(scratch);
}

#endif /* STN_TYPED_PART */
