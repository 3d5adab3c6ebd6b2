"""C source of the CPU kernels of `lightning_probes.functional._native` (kept as a string: no package data).

One loop per tensor reads each gradient, weight and state byte once and writes every count, squared norm and
the new state byte; ``gcc -O3`` vectorises the common case (contiguous float32, every entry followed). Semantics
are those of the eager reference in `lightning_probes.functional._fused` (`dynamics_before_one`,
`dynamics_after_one`): comparisons in the gradients' dtype (float64 for float64, float32 otherwise), codes and
the weight encoding bit for bit the same.
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#define INLINE static inline __attribute__((always_inline))
#define MANT 0x007FFFFFu /* also the zero mark: a +-0 weight in the tiny class (see _fused.encode_weights) */
/* Index arrays of the followed entries: int32 (i64 == 0) or int64, one kind per call. */
#define IDX(idx, k) ((idx) ? (i64 ? ((const int64_t*)(idx))[k] : (int64_t)((const int32_t*)(idx))[k]) : (k))

typedef union { float f; uint32_t u; } f32_bits;
INLINE float f32_from_bits(uint32_t u) { f32_bits b; b.u = u; return b.f; }
INLINE uint32_t bits_of_f32(float f) { f32_bits b; b.f = f; return b.u; }
INLINE float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }
static float f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0) {
        if (m == 0) return f32_from_bits(s);
        float f = (float)m * 5.9604644775390625e-8f; /* 2**-24 */
        return f32_from_bits(bits_of_f32(f) | s);
    }
    if (e == 31) u = s | 0x7f800000u | (m << 13);
    else u = s | ((e + 112u) << 23) | (m << 13);
    return f32_from_bits(u);
}

/* dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16 */
INLINE float load_f(const void* p, int64_t k, int dt) {
    if (dt == 0) return ((const float*)p)[k];
    if (dt == 2) return bf16_to_f32(((const uint16_t*)p)[k]);
    return f16_to_f32(((const uint16_t*)p)[k]);
}

/* float32 weight encoding (see _fused.encode_weights): mantissa in p16 and the low 7 bits of p8, the sign in
   p8's top bit, the exponent's distance below the tensor's largest (saturating at 15) in the state byte's top
   nibble. The encoder returns the nibble (already shifted) and writes the planes. */
INLINE uint32_t encode_f32(uint32_t u, uint32_t eref, uint16_t* q16, uint8_t* q8) {
    uint32_t e = (u >> 23) & 0xFFu, m = u & MANT;
    uint32_t ed = eref - e;
    uint32_t tiny = ed >= 15u;
    ed = tiny ? 15u : ed;
    m = (tiny & ((u & 0x7FFFFFFFu) == 0)) ? MANT : m;
    *q16 = (uint16_t)m;
    *q8 = (uint8_t)((m >> 16) | ((u >> 24) & 0x80u));
    return ed << 4;
}

/* The bits of the float32 weight before the step from its encoding (code: the state byte, as 32 bits). */
INLINE uint32_t decode_f32(uint32_t code, uint32_t q16, uint32_t q8, uint32_t eref, uint32_t after_bits) {
    uint32_t m = q16 | ((q8 & 0x7Fu) << 16);
    uint32_t sign = (q8 & 0x80u) << 24;
    uint32_t edsh = (code & 0xF0u) << 19;     /* the nibble's distance, at the exponent's place */
    uint32_t exact = ((eref << 23) - edsh) | m;
    int32_t ma = (int32_t)(after_bits & 0x7FFFFFFFu);
    int32_t j = (ma - (int32_t)m + (1 << 22)) >> 23; /* tiny class: the exponent nearest to |after|'s */
    int32_t top = (int32_t)eref - 15;
    j = j < 0 ? 0 : j;
    j = j > top ? top : j;
    uint32_t small = m == MANT ? 0u : (((uint32_t)j << 23) | m);
    uint32_t mag = (code & 0xF0u) == 0xF0u ? small : exact;
    return sign | mag;
}

INLINE uint32_t exponent_max_f32(const float* w, const void* idx, int i64, int64_t n) {
    uint32_t e = 0;
    for (int64_t k = 0; k < n; k++) {
        uint32_t x = (bits_of_f32(w[IDX(idx, k)]) >> 23) & 0xFFu;
        e = x > e ? x : e;
    }
    return e;
}

/* The 7 counts of one entry from its previous state s (0..26) and current sign/level. */
#define COUNT_ENTRY(s, sg, lvl)                                                         \
    do {                                                                                \
        int32_t prev_ = ((s) * 11) >> 5, moved_ = (s) - 3 * prev_ - 1;                  \
        int32_t pl_ = (prev_ * 11) >> 5, ps_ = prev_ - 3 * pl_ - 1, bp_ = (s) >= 9;     \
        int32_t prod_ = ps_ * (sg), fl_ = prod_ < 0, dir_ = ps_ * moved_;               \
        c1 += bp_; c2 += bp_ & ((lvl) == 0); c3 += prod_ != 0; c4 += fl_;               \
        c5 += fl_ & (dir_ < 0); c6 += fl_ & (dir_ > 0);                                 \
    } while (0)

/* Generic loop: any dtype, an index, a scale. */
static void before_tensor(int gdt, const void* g, const void* idx, int i64, int64_t n, uint8_t* st, int has_prev,
                          int wdt, const void* w, uint16_t* p16, uint8_t* p8, double* c64, uint32_t eref,
                          float zt, float rt, double ztd, double rtd, float sc, double scd, int scaled,
                          int64_t* counts, double* sumsq) {
    int64_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0;
    double sq = 0.0;
    for (int64_t k = 0; k < n; k++) {
        int64_t j = IDX(idx, k);
        int32_t sg, below, zero;
        if (gdt == 1) {
            double x = ((const double*)g)[j];
            sq += x * x;
            if (scaled) x = x * scd;
            double a = fabs(x);
            below = a < rtd; zero = a < ztd; sg = (x > 0) - (x < 0);
        } else {
            float x = load_f(g, j, gdt);
            sq += (double)x * (double)x;
            if (scaled) x = x * sc;
            float a = fabsf(x);
            below = a < rt; zero = a < zt; sg = (x > 0) - (x < 0);
        }
        int32_t lvl = below + zero;
        c0 += below & zero;
        if (has_prev) { int32_t s = st[k]; COUNT_ENTRY(s, sg, lvl); }
        uint32_t code = (uint32_t)(3 * lvl + sg + 1);
        if (wdt == 0) code |= encode_f32(bits_of_f32(((const float*)w)[j]), eref, p16 + k, p8 + k);
        else if (wdt == 1) c64[k] = ((const double*)w)[j];
        else p16[k] = ((const uint16_t*)w)[j];
        st[k] = (uint8_t)code;
    }
    counts[0] = c0; counts[1] = c1; counts[2] = c2; counts[3] = c3; counts[4] = c4; counts[5] = c5;
    counts[6] = c6;
    *sumsq = sq;
}

static void after_tensor(int64_t n, const void* idx, int i64, uint8_t* st, int snapshot, int wdt, const void* w,
                         const uint16_t* p16, const uint8_t* p8, const double* c64, uint32_t eref, int norms,
                         double* usq, double* wsq) {
    double us = 0.0, ws = 0.0;
    for (int64_t k = 0; k < n; k++) {
        int64_t j = IDX(idx, k);
        uint32_t code = st[k];
        int gt, ge;
        if (wdt == 1) {
            double a = ((const double*)w)[j], b = c64[k];
            gt = a > b; ge = a >= b;
            if (norms) { double d = a - b; us += d * d; ws += a * a; }
        } else {
            float a, b;
            if (wdt == 0) {
                a = ((const float*)w)[j];
                b = f32_from_bits(decode_f32(code, p16[k], p8[k], eref, bits_of_f32(a)));
            } else {
                a = load_f(w, j, wdt);
                b = wdt == 2 ? bf16_to_f32(p16[k]) : f16_to_f32(p16[k]);
            }
            gt = a > b; ge = a >= b;
            if (norms) { double d = (double)a - (double)b; us += d * d; ws += (double)a * (double)a; }
        }
        if (snapshot) st[k] = (uint8_t)(3 * (code & 15u) + gt + ge);
    }
    *usq = us; *wsq = ws;
}

/* The common case written out without dispatch (contiguous float32 gradients and weights, every entry
   followed, unscaled): gcc vectorises these loops. Same results as the generic loops above. */
static void before_f32(const float* restrict g, int64_t n, uint8_t* restrict st, int has_prev,
                       const float* restrict w, uint16_t* restrict p16, uint8_t* restrict p8, uint32_t eref,
                       float zt, float rt, int64_t* counts, double* sumsq) {
    int64_t c[7] = {0, 0, 0, 0, 0, 0, 0};
    double sq = 0.0;
    for (int64_t k0 = 0; k0 < n; k0 += 1 << 20) { /* int32 counters per block: narrower vector lanes */
        int64_t m = n - k0 < (1 << 20) ? n - k0 : (1 << 20);
        const float* restrict x_ = g + k0;
        const uint32_t* restrict w_ = (const uint32_t*)(w + k0);
        uint8_t* restrict s_ = st + k0;
        uint16_t* restrict q16 = p16 + k0;
        uint8_t* restrict q8 = p8 + k0;
        int32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0;
        for (int64_t k = 0; k < m; k++) {
            float x = x_[k], a = fabsf(x);
            sq += (double)x * (double)x;
            int32_t below = a < rt, zero = a < zt, sg = (x > 0) - (x < 0), lvl = below + zero;
            c0 += below & zero;
            if (has_prev) { int32_t s = s_[k]; COUNT_ENTRY(s, sg, lvl); }
            uint32_t u = w_[k], e = (u >> 23) & 0xFFu, mm = u & MANT, ed = eref - e;
            uint32_t tiny = ed >= 15u;
            ed = tiny ? 15u : ed;
            mm = (tiny & ((u & 0x7FFFFFFFu) == 0)) ? MANT : mm;
            q16[k] = (uint16_t)mm;
            q8[k] = (uint8_t)((mm >> 16) | ((u >> 24) & 0x80u));
            s_[k] = (uint8_t)((uint32_t)(3 * lvl + sg + 1) | (ed << 4));
        }
        c[0] += c0; c[1] += c1; c[2] += c2; c[3] += c3; c[4] += c4; c[5] += c5; c[6] += c6;
    }
    for (int i = 0; i < 7; i++) counts[i] = c[i];
    *sumsq = sq;
}

static void after_f32(int64_t n, uint8_t* restrict st, const float* restrict w, const uint16_t* restrict p16,
                      const uint8_t* restrict p8, uint32_t eref, double* usq, double* wsq) {
    double us = 0.0, ws = 0.0;
    uint32_t bb[256]; /* blocks of decoded weights: each loop below vectorises on its own */
    const float* b = (const float*)bb;
    for (int64_t k0 = 0; k0 < n; k0 += 256) {
        int64_t m = n - k0 < 256 ? n - k0 : 256;
        const float* restrict a = w + k0;
        uint8_t* restrict c = st + k0;
        for (int64_t k = 0; k < m; k++)
            bb[k] = decode_f32(c[k], p16[k0 + k], p8[k0 + k], eref, ((const uint32_t*)a)[k]);
        for (int64_t k = 0; k < m; k++)
            c[k] = (uint8_t)(3 * (c[k] & 15u) + (a[k] > b[k]) + (a[k] >= b[k]));
        for (int64_t k = 0; k < m; k++) {
            double d = (double)a[k] - (double)b[k];
            us += d * d; ws += (double)a[k] * (double)a[k];
        }
    }
    *usq = us; *wsq = ws;
}

static void abs_f32(const float* restrict g, int64_t n, double* out) {
    double s = 0.0, q = 0.0;
    uint32_t m = 0; /* max of the bit patterns of |g|: the value order, and a NaN beats every number */
    for (int64_t k = 0; k < n; k++) {
        float x = g[k];
        uint32_t u = bits_of_f32(x) & 0x7FFFFFFFu;
        s += (double)fabsf(x); q += (double)x * (double)x; m = u > m ? u : m;
    }
    out[0] = s; out[1] = q; out[2] = (double)f32_from_bits(m);
}

static void abs_tensor(int dt, const void* g, int64_t n, double* out) {
    double s = 0.0, q = 0.0, m = 0.0;
    int64_t nan = 0;
    for (int64_t k = 0; k < n; k++) {
        double x = dt == 1 ? ((const double*)g)[k] : (double)load_f(g, k, dt), a = fabs(x);
        s += a; q += x * x; m = a > m ? a : m; nan += x != x;
    }
    out[0] = s; out[1] = q; out[2] = nan ? NAN : m;
}

/* Group entry points: pointer and size arrays, one entry per tensor; eref: per tensor the largest exponent of
   its followed float32 weights (written by the first pass, read by the second). */
void lp_dynamics_before(int64_t P, int gdt, const int64_t* gptr, const int64_t* iptr, int i64, const int64_t* n,
                        const int64_t* off, uint8_t* st, int has_prev, int wdt, const int64_t* wptr,
                        uint16_t* p16, uint8_t* p8, double* c64, int32_t* eref, double zt, double rt, double sc,
                        int scaled, int64_t* counts, double* sumsq, const int64_t* sptr, const int64_t* sn,
                        double* sample) {
    /* The sign-map columns first: positions (int64) in each flat local gradient, values as compared. */
    int64_t so = 0;
    for (int64_t i = 0; i < P; i++) {
        const int64_t* pos = (const int64_t*)sptr[i];
        for (int64_t c = 0; c < sn[i]; c++, so++) {
            int64_t j = pos[c];
            if (gdt == 1) sample[so] = ((const double*)gptr[i])[j] * (scaled ? sc : 1.0);
            else {
                float x = load_f((const void*)gptr[i], j, gdt);
                sample[so] = (double)(scaled ? x * (float)sc : x);
            }
        }
    }
    for (int64_t i = 0; i < P; i++) {
        const void* g = (const void*)gptr[i];
        const void* w = (const void*)wptr[i];
        const void* idx = (const int64_t*)iptr[i];
        int64_t o = off[i];
        uint16_t* q16 = p16 ? p16 + o : 0;
        uint8_t* q8 = p8 ? p8 + o : 0;
        double* q64 = c64 ? c64 + o : 0;
        uint32_t e = wdt == 0 ? exponent_max_f32((const float*)w, idx, i64, n[i]) : 0u;
        eref[i] = (int32_t)e;
        if (gdt == 0 && wdt == 0 && !idx && !scaled)
            before_f32((const float*)g, n[i], st + o, has_prev, (const float*)w, q16, q8, e, (float)zt, (float)rt,
                       counts + 7 * i, sumsq + i);
        else
            before_tensor(gdt, g, idx, i64, n[i], st + o, has_prev, wdt, w, q16, q8, q64, e, (float)zt, (float)rt, zt,
                          rt, (float)sc, sc, scaled, counts + 7 * i, sumsq + i);
    }
}

void lp_dynamics_after(int64_t P, const int64_t* iptr, int i64, const int64_t* n, const int64_t* off, uint8_t* st,
                       int snapshot, int wdt, const int64_t* wptr, const uint16_t* p16, const uint8_t* p8,
                       const double* c64, const int32_t* eref, int norms, double* usq, double* wsq) {
    for (int64_t i = 0; i < P; i++) {
        const void* w = (const void*)wptr[i];
        const void* idx = (const int64_t*)iptr[i];
        int64_t o = off[i];
        const uint16_t* q16 = p16 ? p16 + o : 0;
        const uint8_t* q8 = p8 ? p8 + o : 0;
        const double* q64 = c64 ? c64 + o : 0;
        if (wdt == 0 && !idx && snapshot && norms)
            after_f32(n[i], st + o, (const float*)w, q16, q8, (uint32_t)eref[i], usq + i, wsq + i);
        else
            after_tensor(n[i], idx, i64, st + o, snapshot, wdt, w, q16, q8, q64, (uint32_t)eref[i], norms, usq + i,
                         wsq + i);
    }
}

/* [sum |g|, sum g^2, max |g|] per tensor (max: NaN if any entry is NaN, like torch.amax). */
void lp_abs_summary(int64_t P, int dt, const int64_t* gptr, const int64_t* n, double* out) {
    for (int64_t i = 0; i < P; i++) {
        if (dt == 0) abs_f32((const float*)gptr[i], n[i], out + 3 * i);
        else abs_tensor(dt, (const void*)gptr[i], n[i], out + 3 * i);
    }
}

/* Per-sample sums of one tensor's per-sample gradients g (c rows of n entries, float32 or float64, contiguous), a
   tile of entries at a time so that the per-entry sums stay in cache across the rows: entries[k] += g_ik^2
   (float64; added to what entries holds with accumulate), proj[i] = g_i . mean and squares[0] = sum_ik g_ik^2
   (float64), and with bins > 0 the 1-D histogram of every entry against the exact
   edges (bin j holds edges[j] <= x < edges[j + 1]; x == edges[bins] in the last bin; x below edges[0] or above
   edges[bins] clipped into the edge bins and counted in outside[0] / outside[1]; NaN not counted). counts holds
   4 * bins int64 (four interleaved copies, summed by the caller: fewer stalls on a bin hit twice in a row). */
#define LP_TILE 2048
void lp_sample_sums(int dt, const void* g, int64_t c, int64_t n, const void* mean, double* entries, int accumulate,
                    double* proj, double* squares, int64_t bins, const double* edges, int64_t* counts,
                    int64_t* outside) {
    const float* gf = (const float*)g; const double* gd = (const double*)g;
    const float* mf = (const float*)mean; const double* md = (const double*)mean;
    double lo = bins ? edges[0] : 0.0, hi = bins ? edges[bins] : 0.0, scale = bins ? (double)bins / (hi - lo) : 0.0;
    int64_t below = 0, above = 0;
    double sq = 0.0;
    for (int64_t i = 0; i < c; i++) proj[i] = 0.0;
    if (!accumulate) for (int64_t k = 0; k < n; k++) entries[k] = 0.0;
    for (int64_t t0 = 0; t0 < n; t0 += LP_TILE) {
        int64_t t1 = t0 + LP_TILE < n ? t0 + LP_TILE : n;
        for (int64_t i = 0; i < c; i++) {
            double p = 0.0, q = 0.0;
            if (dt == 1) {
                const double* row = gd + i * n;
                for (int64_t k = t0; k < t1; k++) {
                    double x = row[k];
                    entries[k] += x * x; q += x * x; p += x * md[k];
                }
            } else {
                const float* row = gf + i * n;
                for (int64_t k = t0; k < t1; k++) {
                    double x = (double)row[k];
                    entries[k] += x * x; q += x * x; p += x * (double)mf[k];
                }
            }
            proj[i] += p;
            sq += q;
            if (!bins) continue;
            for (int64_t k = t0; k < t1; k++) {
                double x = dt == 1 ? gd[i * n + k] : (double)gf[i * n + k];
                int64_t b;
                if (x < lo) { b = 0; below++; }
                else if (x > hi) { b = bins - 1; above++; }
                else if (x != x) continue;
                else {
                    b = (int64_t)((x - lo) * scale);
                    if (b > bins - 1) b = bins - 1;
                    if (b < 0) b = 0;
                    while (b > 0 && x < edges[b]) b--;
                    while (b < bins - 1 && x >= edges[b + 1]) b++;
                }
                counts[(k & 3) * bins + b]++;
            }
        }
    }
    outside[0] = below; outside[1] = above;
    squares[0] = sq;
}
"""
