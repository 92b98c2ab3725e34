"""Batch-Instance Normalization (Nam & Kim, "Batch-Instance Normalization for Adaptively
Style-Invariant Neural Networks", NeurIPS 2018) and conversion between BN / IN / BIN.

BIN mixes a batch-normalised and an instance-normalised copy of its input with a learned
per-channel gate rho in [0, 1]:

    y = gamma * (rho * x_B + (1 - rho) * x_I) + beta
    x_B = (x - mu_B) / sqrt(var_B + eps)      batch statistics (running statistics in eval)
    x_I = (x - mu_nc) / sqrt(var_nc + eps)    per-sample, per-channel statistics, always

The layer is fused: the per-(n, c) moments are computed once and the batch moments derived
from them by the law of total variance, var_B = mean_n(var_nc) + mean_n((mu_nc - mu_B)^2),
so the output is ONE per-(n, c) affine map y = A_nc * x + B_nc, and the hand-written
backward needs only the per-(n, c) sums of g and g * (x - mu_nc) plus one elementwise map.
On CPU (float32/float64, NCHW or channels_last) each direction is one call into a small C
kernel compiled on first use (see "kernels" below; torch ops elsewhere), so a BIN layer costs
what a BN layer costs and keeps for the backward what BN keeps plus one value per (n, c)
(benchmarks/bench_bin.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.modules.batchnorm import _NormBase

from domadapt.io import cache_dir

__all__ = [
    "GATE_HIGH",
    "GATE_LOW",
    "BatchInstanceNorm2d",
    "batch_instance_norm",
    "gate_fraction_below",
    "gate_parameters",
    "gate_values",
    "kernel_info",
    "mean_gate",
]

# A gate below GATE_LOW mostly instance-normalises its channel (style removed); above
# GATE_HIGH mostly batch-normalises it (style kept). Used by run metrics and gate reports.
GATE_LOW, GATE_HIGH = 0.1, 0.9
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- kernels
#
# Two implementations of the same function. The torch one (`_forward_torch`,
# `_backward_torch`) runs on any device, dtype and memory format. On CPU, for float32 and
# float64 inputs that are NCHW- or channels_last-contiguous, a small C/OpenMP library
# compiled once per machine does each direction in ONE call: two passes over memory (moments,
# affine map; gradient sums, dx) in the layout's own order, the [N, C] algebra inline. That
# removes the ~25 small tensor ops per layer and direction that dominated the cost of small
# layers. A CUDA kernel (e.g. Triton) would be a third pair, chosen in `_c_library_for`'s place.

_C_SOURCE = r"""
/* Fused BIN on CPU: one call per direction. Layout 0: NCHW, element (n, c, i) at
   (n C + c) M + i; layout 1: channels_last, at (n M + i) C + c. Sums and the [N, C]
   algebra in double; full-size passes vectorised along the layout's inner run. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BIN_ROWS 64 /* rows summed in the input precision before adding in double */

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

#define BIN_KERNELS(T, SFX, SQRT)                                                                   \
/* Per (n, c). mu (a per-channel shift K) given: s1 = sum_i u, s2 = sum_i u (v - K),       \
   s3 = sum_i (v - K); mu NULL: s1 = mean of u, s2 = sum_i (u - s1)^2 (two-pass). */       \
static void sums_##SFX(const T *u, const T *v, const T *mu, int64_t N, int64_t C,           \
                      int64_t M, int layout, double *s1, double *s2, double *s3, T *tmp,    \
                      int nt) {                                                             \
    if (layout == 0) {                                                                      \
        _Pragma("omp parallel for num_threads(nt) if (nt > 1) schedule(static)")            \
        for (int64_t nc = 0; nc < N * C; ++nc) {                                            \
            const T *ur = u + nc * M, *vr = v + nc * M;                                     \
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
/* y = a u + b, or a u + p v + b when p is given (a, p, b per (n, c)) */                    \
static void affine_##SFX(const T *u, const T *v, T *y, int64_t N, int64_t C, int64_t M,     \
                         int layout, const T *a, const T *p, const T *b, int nt) {          \
    if (layout == 0) {                                                                      \
        _Pragma("omp parallel for num_threads(nt) if (nt > 1) schedule(static)")            \
        for (int64_t nc = 0; nc < N * C; ++nc) {                                            \
            const T *ur = u + nc * M, *vr = v + nc * M; T *yr = y + nc * M;                 \
            const T an = a[nc], bn = b[nc];                                                 \
            if (p) {                                                                        \
                const T pn = p[nc];                                                         \
                _Pragma("omp simd")                                                         \
                for (int64_t i = 0; i < M; ++i) yr[i] = an * ur[i] + pn * vr[i] + bn;       \
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
                if (p) {                                                                    \
                    _Pragma("omp simd")                                                     \
                    for (int64_t c = 0; c < C; ++c) yr[c] = an[c] * ur[c] + pn[c] * vr[c] + bn[c]; \
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
   of memory (nothing written). */                                                         \
int bin_forward_##SFX(const T *x, T *y, int64_t N, int64_t C, int64_t M, int layout,        \
                      const T *rho, const T *gamma, const T *beta, T *running_mean,          \
                      T *running_var, int use_batch, int update, double momentum,           \
                      double eps, T *save, int nt) {                                        \
    const int64_t NC = N * C;                                                               \
    double *mi = (double *)bin_scratch(sizeof(double) * (2 * NC + 3 * C)                    \
                                       + sizeof(T) * (6 * NC + 3 * C));                     \
    if (!mi) return -1;                                                                     \
    T *ab = (T *)(mi + 2 * NC + 3 * C), *tmp = ab + 2 * NC + 3 * C;                         \
    double *vi = mi + NC, *mb = vi + NC, *vb = mb + C, *kb = vb + C;                        \
    sums_##SFX(x, x, 0, N, C, M, layout, mi, vi, 0, tmp, nt);                               \
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
    affine_##SFX(x, x, y, N, C, M, layout, ab, 0, ab + NC, nt);                             \
    return 0;                                                                               \
}                                                                                           \
/* Backward (formulas in _BatchInstanceNormFn). dx, grad_*: NULL when not wanted.           \
   Returns 0, or -1 when out of memory (nothing written). */                                \
int bin_backward_##SFX(const T *g, const T *x, T *dx, int64_t N, int64_t C, int64_t M,     \
                       int layout, const T *rho, const T *gamma, const T *save,             \
                       int use_batch, T *grad_rho, T *grad_w, T *grad_b, int nt) {          \
    const int64_t NC = N * C;                                                               \
    double *mi = (double *)bin_scratch(sizeof(double) * (4 * NC + 3 * C)                    \
                                       + sizeof(T) * (7 * NC + 4 * C));                     \
    if (!mi) return -1;                                                                     \
    T *coef = (T *)(mi + 4 * NC + 3 * C), *tmp = coef + 3 * NC + 4 * C;                     \
    double *sg = mi + NC, *sc = sg + NC, *se = sc + NC, *tg = se + NC, *tb = tg + C, *ti = tb + C; \
    const T *ri = save, *mb = save + NC, *rb = mb + C, *kb = rb + C;                        \
    /* one pass: S_g, sum g (x - K), sum (x - K); then mu_i = K + sum (x - K) / M and       \
       S_c = sum g (x - K) - (mu_i - K) S_g, all in double (K is near every mu_i) */        \
    sums_##SFX(g, x, kb, N, C, M, layout, sg, sc, se, tmp, nt);                             \
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
    if (dx) affine_##SFX(g, x, dx, N, C, M, layout, coef, coef + NC, coef + 2 * NC, nt);    \
    return 0;                                                                               \
}

BIN_KERNELS(float, f32, sqrtf)
BIN_KERNELS(double, f64, sqrt)
"""
_C_TYPES = {torch.float32: "f32", torch.float64: "f64"}
_c_lib: ctypes.CDLL | None = None
_c_tried = False
_c_fns: dict[torch.dtype, tuple[Any, Any]] = {}  # dtype -> (forward, backward), set by _bind
_kernel: dict[str, Any] = {}  # what kernel_info() reports, set by _c_library


def _isa_flags() -> list[str]:
    """An explicit instruction-set level instead of -march=native, so every CPU of one level
    runs the same machine code: x86-64-v3 (AVX2 + FMA) where the CPU has it, else x86-64-v2,
    else the x86-64 baseline; other architectures: the compiler's default."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")),
                     set())
    if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"} <= flags:
        return ["-march=x86-64-v3"]
    if {"sse4_2", "ssse3", "popcnt", "cx16"} <= flags:
        return ["-march=x86-64-v2"]
    return ["-march=x86-64"]


def kernel_flags() -> list[str]:
    """Compiler flags of the C kernels. -ffp-contract=off: no fused multiply-add contraction,
    which is what made builds for different CPUs round differently (~5e-7)."""
    return ["-O3", *_isa_flags(), "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC",
            "-shared"]


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.stdout else cc
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


def _trusted(path: Path) -> bool:
    """A cached library may be loaded only if this user owns it and nobody else may write it
    (else another user could put code into this process)."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build_library(cc: str, flags: list[str], cache: Path) -> Path:
    """The library for (source, compiler, flags) in `cache`, built there if absent."""
    version = _compiler_version(cc)
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, version, *flags]).encode()).hexdigest()[:16]
    lib = cache / f"bin_kernels_{key}.so"
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    if lib.exists():
        if not _trusted(lib):
            raise OSError(f"{lib} is not owned by this user or is writable by others; "
                          f"not loaded")
        return lib
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, so = Path(tmp) / "bin_kernels.c", Path(tmp) / "bin_kernels.so"
        src.write_text(_C_SOURCE)
        subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.chmod(so, 0o700)
        os.replace(so, lib)  # atomic: concurrent builders each install a whole file
    return lib


def _c_library() -> ctypes.CDLL | None:
    """The compiled C kernels, built on first use into the cache; None if impossible.

    Cache: `domadapt.io.cache_dir()` (created private, 0700); the file name hashes the
    source, the compiler and its version, and the flags (`kernel_flags()`: an explicit ISA
    level, no FMA contraction, so CPUs of one level get identical results). A cached file is
    loaded only if this user owns it and nobody else may write it. DOMADAPT_BIN_KERNEL=torch
    disables it. Any failure (no compiler, read-only cache, another OS) leaves the torch path;
    `kernel_info()` says which ran and why.
    """
    global _c_lib, _c_tried
    if _c_tried:
        return _c_lib
    _c_tried = True
    _kernel.clear()
    if os.environ.get("DOMADAPT_BIN_KERNEL", "").lower() == "torch":
        _kernel.update(kernel="torch", reason="DOMADAPT_BIN_KERNEL=torch")
        return None
    if os.name != "posix":
        _kernel.update(kernel="torch", reason=f"no C kernel build on {platform.system()}")
        return None
    try:
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            raise OSError("no C compiler (set CC or install gcc/clang)")
        flags = kernel_flags()
        lib = _build_library(cc, flags, cache_dir())
        _c_lib = _bind(ctypes.CDLL(str(lib)))
        _kernel.update(kernel="c", compiler=_compiler_version(cc), flags=flags)
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        why = e.stderr.decode(errors="replace").strip().splitlines()[-1:] if isinstance(
            e, subprocess.CalledProcessError) and e.stderr else [str(e)]
        _kernel.update(kernel="torch", reason=(why or ["build failed"])[0])
        print(f"domadapt: BIN runs on the slower torch path ({_kernel['reason']}); for the "
              f"fast C kernels install a C compiler with OpenMP (gcc, or clang with libomp)",
              file=sys.stderr)
        _c_lib = None
    return _c_lib


def kernel_info() -> dict[str, Any]:
    """Which BIN kernel runs on CPU: {"kernel": "c", "compiler", "flags"} or
    {"kernel": "torch", "reason"} (builds the C kernels if not tried yet)."""
    _c_library()
    return dict(_kernel)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr, i32, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for sfx in _C_TYPES.values():
        fwd, bwd = getattr(lib, f"bin_forward_{sfx}"), getattr(lib, f"bin_backward_{sfx}")
        fwd.argtypes = [ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, ptr, ptr, i32, i32, f64,
                        f64, ptr, i32]
        bwd.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, ptr, ptr, ptr, i32, ptr, ptr, ptr,
                        i32]
        fwd.restype = bwd.restype = i32
    _c_fns.update({dtype: (getattr(lib, f"bin_forward_{sfx}"), getattr(lib, f"bin_backward_{sfx}"))
                   for dtype, sfx in _C_TYPES.items()})
    return lib


def _layout(x: Tensor) -> int | None:
    """0: NCHW-contiguous, 1: channels_last-contiguous, None: neither."""
    if x.is_contiguous():
        return 0
    return 1 if x.is_contiguous(memory_format=torch.channels_last) else None


def _c_library_for(x: Tensor, *others: Tensor | None) -> ctypes.CDLL | None:
    """The C kernels if they apply: CPU, float32/float64, a dense layout, and every other
    tensor (gate, affine, running statistics) contiguous in x's dtype."""
    if not x.is_cpu or x.dtype not in _C_TYPES or _layout(x) is None:
        return None
    if any(t is not None and (t.dtype != x.dtype or not t.is_cpu or not t.is_contiguous())
           for t in others):
        return None
    return _c_library()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are computed in float32 for half inputs, in the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _nc11(t: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, C] (or [C]) coefficients -> broadcastable against [N, C, H, W]."""
    return t.to(dtype)[..., None, None]


def _affine(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """out = x * scale + shift for [N, C, 1, 1] coefficients, keeping x's memory format.

    One `addcmul` kernel, except on CPU with NCHW-contiguous x: there the coefficients are
    constant along the inner H W run, which two binary kernels vectorise better.
    """
    if x.device.type == "cpu" and x.is_contiguous():
        return torch.mul(x, scale, out=out).add_(shift)
    return torch.addcmul(shift, x, scale, out=out)


class _BatchInstanceNormFn(torch.autograd.Function):
    """Fused BIN: y = A * x + B with per-(n, c) A, B (see the module docstring).

    Backward, with M = H W and the per-(n, c) sums S_g = sum_hw g, S_c = sum_hw g (x - mu_nc)
    (centred, like BN's backward, so no cancellation), d_I = sum_hw g x_I = rstd_nc S_c and
    d_B = sum_hw g x_B = rstd_B (S_c + (mu_nc - mu_B) S_g):

        dbeta  = sum_n S_g
        dgamma = sum_n (rho d_B + (1 - rho) d_I)
        drho   = gamma sum_n (d_B - d_I)
        dx     = A g + P x + Q   with per-(n, c) P, Q, where
        c_I = gamma (1 - rho) rstd_nc / M,   P_I = -c_I rstd_nc d_I,   Q_I = -c_I S_g - P_I mu_nc
        c_B = gamma rho rstd_B / (N M),      P_B = -c_B rstd_B sum_n d_B,
        Q_B = -c_B sum_n S_g - P_B mu_B,     P = P_I + P_B,   Q = Q_I + Q_B

    i.e. the instance-norm backward plus the batch-norm backward, each weighted by its share
    of the gate; the c_B terms vanish when running statistics are used (eval), which are
    constants. Each direction reads the full-size tensors twice (statistics, then one affine
    map), in C on CPU where it applies (see `_c_library_for`), in torch ops otherwise. Saved
    for the backward: x and rstd_nc, mu_B, rstd_B and the shift K = mean_n mu_nc (C; its
    one backward pass sums g, g (x - K) and x - K in double, whence mu_nc = K + mean(x - K)
    and S_c = sum g (x - K) - (mu_nc - K) S_g), or x, mu_nc, rstd_nc, mu_B, rstd_B (torch).
    Gradients are
    returned in the statistics dtype; autograd casts them to the dtype of each input. Not
    twice differentiable (`once_differentiable`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        rho: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        use_batch_stats = training or running_mean is None or running_var is None
        ctx.use_batch_stats = use_batch_stats
        lib = _c_library_for(x, rho, weight, bias, running_mean, running_var)
        if lib is None:
            return _forward_torch(ctx, x, rho, weight, bias, running_mean, running_var,
                                  training, use_batch_stats, momentum, eps)
        n, c, h, w = x.shape
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
        save = torch.empty(n * c + 3 * c, dtype=x.dtype)  # rstd_i, mean_b, rstd_b, shift
        update = training and running_mean is not None and running_var is not None
        if weight is None:
            weight = torch.ones(c, dtype=x.dtype)
        if bias is None:
            bias = torch.zeros(c, dtype=x.dtype)
        status = _c_fns[x.dtype][0](
            x.data_ptr(), out.data_ptr(), n, c, h * w, _layout(x), rho.data_ptr(),
            weight.data_ptr(), bias.data_ptr(), _ptr(running_mean), _ptr(running_var),
            int(use_batch_stats), int(update), momentum, eps, save.data_ptr(),
            torch.get_num_threads())
        if status != 0:
            raise MemoryError("BatchInstanceNorm2d: out of memory in the C kernel")
        ctx.save_for_backward(x, rho, weight, save)
        ctx.c_path = True
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if not getattr(ctx, "c_path", False):
            return _backward_torch(ctx, g)
        x, rho, weight, save = ctx.saved_tensors
        need_x, need_rho, need_w, need_b = ctx.needs_input_grad[:4]
        n, c, h, w = x.shape
        if g.dtype != x.dtype or g.stride() != x.stride():  # e.g. an expanded gradient
            g = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(g)
        grad_x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if need_x else None
        grad_rho, grad_w, grad_b = (torch.empty(c, dtype=x.dtype) if need else None
                                    for need in (need_rho, need_w, need_b))
        status = _c_fns[x.dtype][1](
            g.data_ptr(), x.data_ptr(), _ptr(grad_x), n, c, h * w, _layout(x), rho.data_ptr(),
            weight.data_ptr(), save.data_ptr(), int(ctx.use_batch_stats), _ptr(grad_rho),
            _ptr(grad_w), _ptr(grad_b), torch.get_num_threads())
        if status != 0:
            raise MemoryError("BatchInstanceNorm2d: out of memory in the C kernel")
        return grad_x, grad_rho, grad_w, grad_b, None, None, None, None, None


def _forward_torch(ctx: FunctionCtx, x: Tensor, rho: Tensor, weight: Tensor | None,
                   bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, training: bool, use_batch_stats: bool,
                   momentum: float, eps: float) -> Tensor:
    """`_BatchInstanceNormFn.forward` in torch ops (any device, dtype, memory format)."""
    n, _, h, w = x.shape
    sd = _stats_dtype(x.dtype)
    out = torch.empty_like(x)
    scratch = out if sd == x.dtype else torch.empty_like(x, dtype=sd)
    # Per-(n, c) moments, two-pass (no cancellation): mean, then mean squared deviation;
    # the deviations go to the output buffer, which the affine map overwrites afterwards.
    mean_i = x.mean((2, 3), dtype=sd)
    var_i = torch.sub(x, mean_i[..., None, None], out=scratch).square_().mean((2, 3))
    del scratch
    rstd_i = (var_i + eps).rsqrt()
    if use_batch_stats:
        mean_b = mean_i.mean(0)
        var_b = var_i.mean(0) + (mean_i - mean_b).square().mean(0)  # law of total variance
        if training and running_mean is not None and running_var is not None:
            count = n * h * w
            running_mean.lerp_(mean_b.to(running_mean.dtype), momentum)
            unbiased = var_b * (count / (count - 1))
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    else:  # eval: the running statistics are constants
        assert running_mean is not None and running_var is not None
        mean_b, var_b = running_mean.to(sd), running_var.to(sd)
    rstd_b = (var_b + eps).rsqrt()

    rho_s = rho.to(sd)
    gamma = weight.to(sd) if weight is not None else torch.ones_like(rstd_b)
    beta = bias.to(sd) if bias is not None else torch.zeros_like(rstd_b)
    a_b = rho_s * rstd_b  # [C]
    a_i = (1 - rho_s) * rstd_i  # [N, C]
    scale = gamma * (a_b + a_i)  # A
    shift = beta - gamma * (a_b * mean_b + a_i * mean_i)  # B

    ctx.save_for_backward(x, rho_s, gamma, mean_i, rstd_i, mean_b, rstd_b)
    return _affine(x, _nc11(scale, x.dtype), _nc11(shift, x.dtype), out=out)


def _backward_torch(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
    """`_BatchInstanceNormFn.backward` in torch ops."""
    x, rho, gamma, mean_i, rstd_i, mean_b, rstd_b = ctx.saved_tensors
    need_x, need_rho, need_w, need_b = ctx.needs_input_grad[:4]
    n, _, h, w = x.shape
    m = h * w
    sd = rho.dtype
    gs, xs = g.to(sd), x.to(sd)
    # One full-size buffer: first g * (x - mu_nc), then dx.
    buf = (xs - mean_i[..., None, None]).mul_(gs)
    dot_c = buf.sum((2, 3))  # sum_hw g (x - mu_nc)
    sum_g = gs.sum((2, 3))  # [N, C]
    dot_i = rstd_i * dot_c  # sum_hw g x_I
    dot_b = rstd_b * (dot_c + (mean_i - mean_b) * sum_g)  # sum_hw g x_B

    grad_x = grad_rho = grad_w = grad_b = None
    if need_rho:
        grad_rho = gamma * (dot_b - dot_i).sum(0)
    if need_w:
        grad_w = (rho * dot_b + (1 - rho) * dot_i).sum(0)
    if need_b:
        grad_b = sum_g.sum(0)
    if need_x:
        c_i = gamma * (1 - rho) * rstd_i / m
        p = -c_i * rstd_i * dot_i
        q = -c_i * sum_g - p * mean_i
        if ctx.use_batch_stats:
            c_b = gamma * rho * rstd_b / (n * m)
            p_b = -c_b * rstd_b * dot_b.sum(0)
            p = p + p_b
            q = q - c_b * sum_g.sum(0) - p_b * mean_b
        scale = gamma * (rho * rstd_b + (1 - rho) * rstd_i)  # A, as in forward
        grad_x = _affine(gs, _nc11(scale, sd), _nc11(q, sd), out=buf).addcmul_(xs, _nc11(p, sd))
    return grad_x, grad_rho, grad_w, grad_b, None, None, None, None, None


def batch_instance_norm(
    input: Tensor,
    rho: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Functional BIN on [N, C, H, W]; the arguments mean what they mean in `F.batch_norm`.

    The BN part uses batch statistics when `training` (or when no running statistics are
    given), and then updates the running statistics in place, r <- (1 - momentum) r +
    momentum s, with the unbiased batch variance; otherwise it uses the running statistics.
    The IN part always uses per-sample statistics. rho, weight, bias: shape [C].
    """
    if input.dim() != 4:
        raise ValueError(f"expected a 4-d input [N, C, H, W], got {input.dim()}-d")
    if (training or running_mean is None) and input.numel() // input.size(1) <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input size {input.shape}"
        )
    return _BatchInstanceNormFn.apply(
        input, rho, weight, bias, running_mean, running_var, training, momentum, eps
    )


class BatchInstanceNorm2d(_NormBase):
    """BIN layer: y = gamma * (rho * x_B + (1 - rho) * x_I) + beta (Nam & Kim, 2018).

    Parameters and buffers carry the names of `nn.BatchNorm2d` (weight, bias, running_mean,
    running_var, num_batches_tracked) plus the gate `rho` (shape [C], init 1 = pure BN), so a
    BN state dict loads into it, strictly: a missing `rho` keeps its current value. The BN
    part follows `nn.BatchNorm2d` exactly (momentum, `momentum=None` = cumulative average,
    unbiased running variance, running statistics in eval); the IN part always uses the
    statistics of each sample. Keep rho in [0, 1] with the optimizer clamp
    (`domadapt.nn.optim.attach_gate_clamp`). Statistics are float32 under autocast; the
    output has the input's dtype and memory format.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.rho = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "rho"):  # called by the base constructor before rho exists
            nn.init.ones_(self.rho)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A plain BN state dict (e.g. torchvision weights) has no gate: keep the current one.
        # `load_state_dict` hands modules a shallow copy, so the caller's dict is untouched.
        state_dict.setdefault(prefix + "rho", self.rho.detach())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Running-statistics bookkeeping exactly as nn.BatchNorm2d.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return batch_instance_norm(
            input, self.rho,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight, self.bias, use_batch, factor, self.eps,
        )


# --------------------------------------------------------------------------- gates

def gate_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The BIN gates rho of `model`, in network order."""
    for module in model.modules():
        if isinstance(module, BatchInstanceNorm2d):
            yield module.rho


def gate_values(model: nn.Module) -> dict[str, Tensor]:
    """Layer name -> detached copy of its gate rho ([C]), in network order."""
    return {
        name: module.rho.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, BatchInstanceNorm2d)
    }


def _all_gates(model: nn.Module) -> Tensor | None:
    gates = [rho.detach().float().flatten().cpu() for rho in gate_parameters(model)]
    return torch.cat(gates) if gates else None


def mean_gate(model: nn.Module) -> float | None:
    """Mean of all gate entries (every channel of every BIN layer); None without BIN layers."""
    rho = _all_gates(model)
    return None if rho is None else rho.mean().item()


def gate_fraction_below(model: nn.Module, threshold: float = GATE_LOW) -> float | None:
    """Fraction of all gate entries < threshold (channels that drop style); None without BIN."""
    rho = _all_gates(model)
    return None if rho is None else (rho < threshold).float().mean().item()
