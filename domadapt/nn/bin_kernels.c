
/* Fused BIN on CPU: one call per direction. Layout 0: NCHW, element (n, c, i) at
   (n C + c) M + i; layout 1: channels_last, at (n M + i) C + c. Sums and the [N, C]
   algebra in double; full-size passes vectorised along the layout's inner run. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BIN_ROWS 64 /* rows summed in the input precision before adding in double */
#ifdef _OPENMP
#include <omp.h>
#define BIN_THREAD omp_get_thread_num()
#else
#define BIN_THREAD 0
#endif

/* Scratch memory, kept per calling thread and grown as needed: a fresh malloc of the
   [N, C] work arrays per call costs page faults that rival a small layer's arithmetic. */
static __thread void *bin_scratch_mem = 0;
static __thread size_t bin_scratch_bytes = 0;
static void *bin_scratch(size_t bytes) {
    if (bytes > bin_scratch_bytes) {
        free(bin_scratch_mem);
        bin_scratch_mem = malloc(bytes);
        bin_scratch_bytes = bin_scratch_mem ? bytes : 0;
    }
    return bin_scratch_mem;
}

/* v[k] /= d for k < n; a multiply when d is a power of two (1/d is then exact, so the
   result is the same) -- divisions dominate the [N, C] algebra of small layers. */
static void div_by(double *v, int64_t n, int64_t d) {
    if ((d & (d - 1)) == 0) {
        const double r = 1.0 / (double)d;
        for (int64_t k = 0; k < n; ++k) v[k] *= r;
    } else {
        for (int64_t k = 0; k < n; ++k) v[k] /= (double)d;
    }
}

/* An activation fused into the norm (act 1: ReLU, 2: ReLU6), as torch computes it: the
   output clamped to [lo, hi] (NaN and -0.0 kept; hi = NaN for ReLU: no upper bound), and the
   gradient kept where the output w lies strictly inside (NaN: kept), 0 elsewhere. */
#define BIN_KEEP(w, lo, hi) (!((w) <= (lo) || (w) >= (hi)))

#define BIN_KERNELS(T, SFX, SQRT)                                                                   \
/* Per (n, c). mu (a per-channel shift K) given: s1 = sum_i u, s2 = sum_i u (v - K),       \
   s3 = sum_i (v - K); mu NULL: s1 = mean of u, s2 = sum_i (u - s1)^2 (two-pass). With mu,  \
   w (not NULL) masks u: u where BIN_KEEP(w), else 0 (an activation's gradient); layout 0   \
   then needs rows: M values of T per thread. */                                            \
static void sums_##SFX(const T *u, const T *v, const T *mu, int64_t N, int64_t C,           \
                      int64_t M, int layout, double *s1, double *s2, double *s3, T *tmp,    \
                      const T *w, T lo, T hi, T *rows, int nt) {                            \
    if (layout == 0) {                                                                      \
        _Pragma("omp parallel for num_threads(nt) if (nt > 1) schedule(static)")            \
        for (int64_t nc = 0; nc < N * C; ++nc) {                                            \
            const T *ur = u + nc * M, *vr = v + nc * M;                                     \
            if (w) { /* the masked row first: then the very loop (same vector code, so      \
                        the same sums) that an unfused, already masked gradient meets */    \
                T *gm = rows + (int64_t)BIN_THREAD * M; const T *wr = w + nc * M;           \
                _Pragma("omp simd")                                                         \
                for (int64_t i = 0; i < M; ++i) gm[i] = BIN_KEEP(wr[i], lo, hi) ? ur[i] : (T)0;\
                ur = gm;                                                                    \
            }                                                                               \
            double a = 0.0, b = 0.0, e = 0.0, m = mu ? (double)mu[nc % C] : 0.0;            \
            if (!mu) {                                                                      \
                _Pragma("omp simd reduction(+:a)")                                          \
                for (int64_t i = 0; i < M; ++i) a += (double)ur[i];                         \
                m = a / (double)M;                                                          \
                _Pragma("omp simd reduction(+:b)")                                          \
                for (int64_t i = 0; i < M; ++i) { double d = (double)ur[i] - m; b += d * d; } \
            } else {                                                                        \
                _Pragma("omp simd reduction(+:a, b, e)")                                    \
                for (int64_t i = 0; i < M; ++i) {                                           \
                    double gi = (double)ur[i], d = (double)vr[i] - m;                       \
                    a += gi; b += gi * d; e += d;                                           \
                }                                                                           \
                s3[nc] = e;                                                                 \
            }                                                                               \
            s1[nc] = mu ? a : m; s2[nc] = b;                                                         \
        }                                                                                   \
    } else {                                                                                \
        /* Channels inner: per sample, accumulators in T for the whole channel row (one     \
           vector loop over C per spatial row) over BIN_ROWS rows at a time, then           \
           added in double into s1, s2, s3. tmp: 4 N C values of T. */               \
        _Pragma("omp parallel for num_threads(nt) if (nt > 1) schedule(static)")            \
        for (int64_t n = 0; n < N; ++n) {                                                   \
            const T *un = u + n * M * C, *vn = v + n * M * C;                               \
            double *a = s1 + n * C, *b = s2 + n * C, *e = mu ? s3 + n * C : 0;              \
            T *fa = tmp + 4 * n * C, *fb = fa + C, *fe = fb + C, *m = fe + C;               \
            if (mu) for (int64_t c = 0; c < C; ++c) m[c] = mu[c];                           \
            for (int pass = mu ? 1 : 0; pass < 2; ++pass) {                                 \
                for (int64_t i0 = 0; i0 < M; i0 += BIN_ROWS) {                              \
                    const int64_t i1 = i0 + BIN_ROWS < M ? i0 + BIN_ROWS : M;               \
                    /* first row initialises the accumulators (x, not 0 + x: same value) */ \
                    for (int64_t i = i0; i < i1; ++i) {                                     \
                        const T *ur = un + i * C, *vr = vn + i * C;                         \
                        const T *wr = w ? w + (n * M + i) * C : 0;                          \
                        if (pass == 0 && i == i0) {                                         \
                            _Pragma("omp simd")                                             \
                            for (int64_t c = 0; c < C; ++c) fa[c] = ur[c];                  \
                        } else if (pass == 0) {                                             \
                            _Pragma("omp simd")                                             \
                            for (int64_t c = 0; c < C; ++c) fa[c] += ur[c];                 \
                        } else if (!mu) {                                                   \
                            const int first = i == i0;                                      \
                            _Pragma("omp simd")                                             \
                            for (int64_t c = 0; c < C; ++c) {                               \
                                T d = ur[c] - m[c]; fb[c] = first ? d * d : fb[c] + d * d;  \
                            }                                                               \
                        } else if (wr && i == i0) {                                         \
                            _Pragma("omp simd")                                             \
                            for (int64_t c = 0; c < C; ++c) {                               \
                                T g = BIN_KEEP(wr[c], lo, hi) ? ur[c] : (T)0;               \
                                T d = vr[c] - m[c]; fa[c] = g; fb[c] = g * d; fe[c] = d;    \
                            }                                                               \
                        } else if (wr) {                                                    \
                            _Pragma("omp simd")                                             \
                            for (int64_t c = 0; c < C; ++c) {                               \
                                T g = BIN_KEEP(wr[c], lo, hi) ? ur[c] : (T)0;               \
                                T d = vr[c] - m[c];                                         \
                                fa[c] += g; fb[c] += g * d; fe[c] += d;                     \
                            }                                                               \
                        } else if (i == i0) {                                               \
                            _Pragma("omp simd")                                             \
                            for (int64_t c = 0; c < C; ++c) {                               \
                                T d = vr[c] - m[c]; fa[c] = ur[c]; fb[c] = ur[c] * d; fe[c] = d;\
                            }                                                               \
                        } else {                                                            \
                            _Pragma("omp simd")                                             \
                            for (int64_t c = 0; c < C; ++c) {                               \
                                T d = vr[c] - m[c];                                         \
                                fa[c] += ur[c]; fb[c] += ur[c] * d; fe[c] += d;             \
                            }                                                               \
                        }                                                                   \
                    }                                                                       \
                    /* into double: the first block starts the sums (0.0 + f, as if they    \
                       had been zeroed), later blocks add to them */                        \
                    const double z = 0.0; const int b0 = i0 == 0;                           \
                    if (pass == 0) {                                                        \
                        _Pragma("omp simd")                                                 \
                        for (int64_t c = 0; c < C; ++c) a[c] = (b0 ? z : a[c]) + fa[c];     \
                    } else if (!mu) {                                                       \
                        _Pragma("omp simd")                                                 \
                        for (int64_t c = 0; c < C; ++c) b[c] = (b0 ? z : b[c]) + fb[c];     \
                    } else {                                                                \
                        _Pragma("omp simd")                                                 \
                        for (int64_t c = 0; c < C; ++c) {                                   \
                            a[c] = (b0 ? z : a[c]) + fa[c]; b[c] = (b0 ? z : b[c]) + fb[c]; \
                            e[c] = (b0 ? z : e[c]) + fe[c];                                 \
                        }                                                                   \
                    }                                                                       \
                }                                                                           \
                if (pass == 0) /* the mean, and its rounding to T for the second pass */    \
                    { div_by(a, C, M); for (int64_t c = 0; c < C; ++c) m[c] = (T)a[c]; }    \
            }                                                                               \
            if (!mu) /* exact for the rounded mean: sum (u-m)^2 - M (mean-m)^2 */           \
                for (int64_t c = 0; c < C; ++c) {                                           \
                    double d = a[c] - (double)m[c], bc = b[c] - (double)M * d * d;          \
                    b[c] = bc < 0.0 ? 0.0 : bc;                                             \
                }                                                                           \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
/* y = a u + b, or a u + p v + b when p is given (a, p, b per (n, c)); with p, w (not NULL) \
   masks u as in sums_; without p, act clamps y to [lo, hi] (BIN_KEEP's comment) */         \
static void affine_##SFX(const T *u, const T *v, T *y, int64_t N, int64_t C, int64_t M,     \
                         int layout, const T *a, const T *p, const T *b, const T *w,        \
                         T lo, T hi, int act, int nt) {                                     \
    if (layout == 0) {                                                                      \
        _Pragma("omp parallel for num_threads(nt) if (nt > 1) schedule(static)")            \
        for (int64_t nc = 0; nc < N * C; ++nc) {                                            \
            const T *ur = u + nc * M, *vr = v + nc * M; T *yr = y + nc * M;                 \
            const T an = a[nc], bn = b[nc];                                                 \
            if (p && w) {                                                                   \
                const T pn = p[nc], *wr = w + nc * M;                                       \
                _Pragma("omp simd")                                                         \
                for (int64_t i = 0; i < M; ++i) {                                           \
                    const T g = BIN_KEEP(wr[i], lo, hi) ? ur[i] : (T)0;                     \
                    yr[i] = an * g + pn * vr[i] + bn;                                       \
                }                                                                           \
            } else if (p) {                                                                 \
                const T pn = p[nc];                                                         \
                _Pragma("omp simd")                                                         \
                for (int64_t i = 0; i < M; ++i) yr[i] = an * ur[i] + pn * vr[i] + bn;       \
            } else if (act) {                                                               \
                _Pragma("omp simd")                                                         \
                for (int64_t i = 0; i < M; ++i) {                                           \
                    T t = an * ur[i] + bn; t = t < lo ? lo : t; yr[i] = t > hi ? hi : t;    \
                }                                                                           \
            } else {                                                                        \
                _Pragma("omp simd")                                                         \
                for (int64_t i = 0; i < M; ++i) yr[i] = an * ur[i] + bn;                    \
            }                                                                               \
        }                                                                                   \
    } else {                                                                                \
        _Pragma("omp parallel for num_threads(nt) if (nt > 1) schedule(static)")            \
        for (int64_t n = 0; n < N; ++n) {                                                   \
            const T *an = a + n * C, *bn = b + n * C, *pn = p ? p + n * C : 0;              \
            for (int64_t i = 0; i < M; ++i) {                                               \
                const int64_t o = (n * M + i) * C;                                          \
                const T *ur = u + o, *vr = v + o; T *yr = y + o;                            \
                if (p && w) {                                                               \
                    const T *wr = w + o;                                                    \
                    _Pragma("omp simd")                                                     \
                    for (int64_t c = 0; c < C; ++c) {                                       \
                        const T g = BIN_KEEP(wr[c], lo, hi) ? ur[c] : (T)0;                 \
                        yr[c] = an[c] * g + pn[c] * vr[c] + bn[c];                          \
                    }                                                                       \
                } else if (p) {                                                             \
                    _Pragma("omp simd")                                                     \
                    for (int64_t c = 0; c < C; ++c) yr[c] = an[c] * ur[c] + pn[c] * vr[c] + bn[c]; \
                } else if (act) {                                                           \
                    _Pragma("omp simd")                                                     \
                    for (int64_t c = 0; c < C; ++c) {                                       \
                        T t = an[c] * ur[c] + bn[c]; t = t < lo ? lo : t;                   \
                        yr[c] = t > hi ? hi : t;                                            \
                    }                                                                       \
                } else {                                                                    \
                    _Pragma("omp simd")                                                     \
                    for (int64_t c = 0; c < C; ++c) yr[c] = an[c] * ur[c] + bn[c];          \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
}                                                                                           \
/* Forward. running_*: may be NULL when use_batch and not update. save [N C + 3 C]: rstd_i, \
   mean_b, rstd_b, and K = mean_n mu_i (the backward's shift). Returns 0, or -1 when out   \
   of memory (nothing written). act: 0, or the activation applied to y (BIN_KEEP). */       \
int bin_forward_##SFX(const T *x, T *y, int64_t N, int64_t C, int64_t M, int layout,        \
                      const T *rho, const T *gamma, const T *beta, T *running_mean,          \
                      T *running_var, int use_batch, int update, double momentum,           \
                      double eps, T *save, int nt, int act) {                               \
    const int64_t NC = N * C;                                                               \
    double *mi = (double *)bin_scratch(sizeof(double) * (2 * NC + 3 * C)                    \
                                       + sizeof(T) * (6 * NC + 3 * C));                     \
    if (!mi) return -1;                                                                     \
    T *ab = (T *)(mi + 2 * NC + 3 * C), *tmp = ab + 2 * NC + 3 * C;                         \
    double *vi = mi + NC, *mb = vi + NC, *vb = mb + C, *kb = vb + C;                        \
    sums_##SFX(x, x, 0, N, C, M, layout, mi, vi, 0, tmp, 0, 0, 0, 0, nt);                   \
    for (int64_t c = 0; c < C; ++c) { mb[c] = 0.0; vb[c] = 0.0; kb[c] = 0.0; }              \
    for (int64_t n = 0; n < N; ++n) { /* loops over c: independent per c, vectorised */     \
        _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) kb[c] += mi[n * C + c];         \
        div_by(vi + n * C, C, M);                                                           \
    }                                                                                       \
    for (int64_t c = 0; c < C; ++c) kb[c] /= (double)N;                                     \
    if (use_batch) { /* law of total variance: var_b = mean_n var_i + mean_n (mu_i - mu_b)^2 */ \
        for (int64_t c = 0; c < C; ++c) mb[c] = kb[c];                                      \
        for (int64_t n = 0; n < N; ++n)                                                     \
            _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) {                           \
                double d = mi[n * C + c] - mb[c]; vb[c] += vi[n * C + c] + d * d;           \
            }                                                                               \
        for (int64_t c = 0; c < C; ++c) vb[c] /= (double)N;                                 \
        if (update) {                                                                       \
            const double cnt = (double)(N * M);                                             \
            for (int64_t c = 0; c < C; ++c) {                                               \
                double rm = (double)running_mean[c], rv = (double)running_var[c];           \
                running_mean[c] = (T)(rm + momentum * (mb[c] - rm));                        \
                running_var[c] = (T)(rv + momentum * (vb[c] * cnt / (cnt - 1.0) - rv));     \
            }                                                                               \
        }                                                                                   \
    } else {                                                                                \
        for (int64_t c = 0; c < C; ++c) {                                                   \
            mb[c] = (double)running_mean[c]; vb[c] = (double)running_var[c];                \
        }                                                                                   \
    }                                                                                       \
    /* y = A x + B, A = a0_c + a1_c ri, B = b0_c - a1_c ri mi (per-(n, c) part in T) */    \
    T *a0 = ab + 2 * NC, *a1 = a0 + C, *b0 = a1 + C;                                       \
    for (int64_t c = 0; c < C; ++c) {                                                       \
        const double rb = 1.0 / sqrt(vb[c] + eps), g = (double)gamma[c], r = (double)rho[c]; \
        save[NC + c] = (T)mb[c]; save[NC + C + c] = (T)rb; save[NC + 2 * C + c] = (T)kb[c]; \
        a1[c] = (T)(g * (1.0 - r)); b0[c] = (T)((double)beta[c] - g * r * rb * mb[c]);      \
        a0[c] = (T)(g * r * rb);                                                            \
    }                                                                                       \
    for (int64_t n = 0; n < N; ++n) {                                                       \
        T *sr = save + n * C, *an = ab + n * C, *bn = ab + NC + n * C;                      \
        const double *mn = mi + n * C, *vn = vi + n * C;                                    \
        _Pragma("omp simd")                                                                 \
        for (int64_t c = 0; c < C; ++c) {                                                   \
            const T m = (T)mn[c], ri = (T)1 / SQRT((T)(vn[c] + eps)), ai = a1[c] * ri;   \
            sr[c] = ri; an[c] = a0[c] + ai; bn[c] = b0[c] - ai * m;                         \
        }                                                                                   \
    }                                                                                       \
    const T lo = 0, hi = act == 2 ? (T)6 : (T)NAN;                                          \
    affine_##SFX(x, x, y, N, C, M, layout, ab, 0, ab + NC, 0, lo, hi, act, nt);             \
    return 0;                                                                               \
}                                                                                           \
/* Backward (formulas in bin_function.bin_backward_torch). dx, grad_*: NULL when not        \
   wanted. act: 0, or the activation fused into the forward, whose output y masks g.        \
   Returns 0, or -1 when out of memory (nothing written). */                                \
int bin_backward_##SFX(const T *g, const T *x, T *dx, int64_t N, int64_t C, int64_t M,     \
                       int layout, const T *rho, const T *gamma, const T *save,             \
                       int use_batch, T *grad_rho, T *grad_w, T *grad_b, int nt,            \
                       const T *y, int act) {                                               \
    const int64_t NC = N * C;                                                               \
    double *mi = (double *)bin_scratch(sizeof(double) * (4 * NC + 3 * C)                    \
                                       + sizeof(T) * (7 * NC + 4 * C)                       \
                                       + (act ? sizeof(T) * (size_t)(nt > 1 ? nt : 1) * M : 0));\
    if (!mi) return -1;                                                                     \
    T *coef = (T *)(mi + 4 * NC + 3 * C), *tmp = coef + 3 * NC + 4 * C;                     \
    double *sg = mi + NC, *sc = sg + NC, *se = sc + NC, *tg = se + NC, *tb = tg + C, *ti = tb + C; \
    const T *ri = save, *mb = save + NC, *rb = mb + C, *kb = rb + C;                        \
    /* one pass: S_g, sum g (x - K), sum (x - K); then mu_i = K + sum (x - K) / M and       \
       S_c = sum g (x - K) - (mu_i - K) S_g, all in double (K is near every mu_i) */        \
    const T lo = 0, hi = act == 2 ? (T)6 : (T)NAN, *w = act ? y : 0;                        \
    sums_##SFX(g, x, kb, N, C, M, layout, sg, sc, se, tmp, w, lo, hi,                       \
               tmp + 4 * NC, nt);                                                           \
    for (int64_t c = 0; c < C; ++c) { tg[c] = 0.0; tb[c] = 0.0; ti[c] = 0.0; }              \
    for (int64_t n = 0; n < N; ++n) { /* loops over c: independent per c, vectorised */     \
        div_by(se + n * C, C, M);                                                           \
        _Pragma("omp simd") for (int64_t c = 0; c < C; ++c) { /* and sum_n S_g, d_B, d_I */ \
            const int64_t k = n * C + c;                                                    \
            const double e = se[k]; /* divided by M above */                                \
            mi[k] = (double)kb[c] + e; sc[k] -= e * sg[k];                                  \
            tg[c] += sg[k]; ti[c] += (double)ri[k] * sc[k];                                 \
            tb[c] += (double)rb[c] * (sc[k] + (mi[k] - (double)mb[c]) * sg[k]);             \
        }                                                                                   \
    }                                                                                       \
    for (int64_t c = 0; c < C; ++c) {                                                       \
        const double r = (double)rho[c], gm = (double)gamma[c];                             \
        if (grad_rho) grad_rho[c] = (T)(gm * (tb[c] - ti[c]));                              \
        if (grad_w) grad_w[c] = (T)(r * tb[c] + (1.0 - r) * ti[c]);                         \
        if (grad_b) grad_b[c] = (T)tg[c];                                                   \
        /* from here: tb = P_B, ti = Q_B */                                                 \
        const double cb = use_batch ? gm * r * (double)rb[c] / (double)(N * M) : 0.0;       \
        const double pb = -cb * (double)rb[c] * tb[c];                                      \
        tb[c] = pb; ti[c] = -cb * tg[c] - pb * (double)mb[c];                               \
    }                                                                                       \
    if (dx) { /* A = a0_c + a1_c ri, P = -a1_c ri^3 S_c / M + P_B, Q = -a1_c ri S_g / M - P_I mi + Q_B */ \
        T *a0 = coef + 3 * NC, *a1 = a0 + C, *pb = a1 + C, *qb = pb + C;                    \
        for (int64_t c = 0; c < C; ++c) {                                                   \
            const double r = (double)rho[c], gm = (double)gamma[c];                         \
            a0[c] = (T)(gm * r * (double)rb[c]); a1[c] = (T)(gm * (1.0 - r));               \
            pb[c] = (T)tb[c]; qb[c] = (T)ti[c];                                             \
        }                                                                                   \
        const T inv_m = (T)(1.0 / (double)M);                                               \
        for (int64_t n = 0; n < N; ++n) {                                                   \
            const T *rn = ri + n * C; const double *mn = mi + n * C;                        \
            const double *sgn = sg + n * C, *scn = sc + n * C;                              \
            T *an = coef + n * C, *pn = coef + NC + n * C, *qn = coef + 2 * NC + n * C;     \
            _Pragma("omp simd")                                                             \
            for (int64_t c = 0; c < C; ++c) {                                               \
                const T r = rn[c], ci = a1[c] * r * inv_m, pi = -ci * r * r * (T)scn[c];    \
                an[c] = a0[c] + a1[c] * r; pn[c] = pi + pb[c];                              \
                qn[c] = qb[c] - ci * (T)sgn[c] - pi * (T)mn[c];                             \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    if (dx) affine_##SFX(g, x, dx, N, C, M, layout, coef, coef + NC, coef + 2 * NC, w, lo,  \
                         hi, 0, nt);                                                        \
    return 0;                                                                               \
}

BIN_KERNELS(float, f32, sqrtf)
BIN_KERNELS(double, f64, sqrt)
