/* One decoding step of a Glade model in C: a batch of single tokens through every block to the logits.

   Weights are fp32, or int8 with one fp32 scale per output row (the product accumulated in fp32). Keys and values
   are read from and written to the caller's cache, [batch, kv heads, cache length, head dim] per layer. Sums are
   written with GCC/Clang vector types, which compile to the ISA targeted (AVX2, AVX-512, NEON). One OpenMP region
   covers the whole step: the rows of each projection and the (row, head) pairs of attention are split across its
   threads. */

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { NORM_LAYER = 0, NORM_RMS = 1 };
enum { ACT_GELU_TANH = 0, ACT_GELU = 1, ACT_RELU2 = 2, ACT_SWIGLU = 3 };

typedef struct {
    const void *weight;   /* [out, in] fp32 or int8 */
    const float *scale;   /* [out] for int8, else NULL */
    const float *bias;    /* [out] or NULL */
    int32_t out, in;
} Linear;

typedef struct {
    const float *weight, *bias; /* NULL: a gain of 1, a bias of 0 */
} Norm;

typedef struct {
    Norm ln_1, ln_2;
    Linear c_attn, attn_proj, c_gate, c_fc, mlp_proj;
    float *keys, *values;
} Layer;

typedef struct {
    int32_t n_layer, n_embd, n_head, n_kv_head, head_dim, n_inner, vocab_size, rotary_dim, cache_length;
    int32_t norm, activation, int8, embedding_norm;
    float eps, softcap;
    const float *wte, *wpe;          /* wpe NULL with rotary positions */
    const float *cos, *sin;          /* [positions, rotary_dim] with rotary positions */
    Norm ln_emb, ln_f;
    Linear head;
    const Layer *layers;
    /* scratch, [batch, width] each */
    float *x, *h, *qkv, *att, *ff, *gate, *scores;
} Model;

/* 8 floats (an AVX register), and the unaligned form, which may alias float, that weights and inputs are loaded
   through. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8_u __attribute__((vector_size(32), aligned(4), may_alias));

#define LOAD_F32(p) (*(const v8_u *)(p))

#if defined(__AVX2__)
#include <immintrin.h>
/* Compilers turn a generic int8 -> float vector conversion into eight scalar ones. */
#define LOAD_I8(p) ((v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))))
#define CLAMP(x, lo, hi) ((v8)_mm256_min_ps(_mm256_max_ps((__m256)(x), _mm256_set1_ps(lo)), _mm256_set1_ps(hi)))
#else
#define LOAD_I8(p) ((v8){(p)[0], (p)[1], (p)[2], (p)[3], (p)[4], (p)[5], (p)[6], (p)[7]})
static inline v8 CLAMP(v8 x, float lo, float hi) {
    for (int l = 0; l < 8; l++) x[l] = x[l] < lo ? lo : x[l] > hi ? hi : x[l];
    return x;
}
#endif

static inline float total(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* A weight row against an input, read front to back (one stream that the prefetchers follow), with four independent
   sums so that their loads and FMAs overlap. */
#define DOT_KERNEL(name, type, LOAD)                                                                                   \
    static float name(const type *w, const float *x, int n) {                                                          \
        v8 a = {0}, b = {0}, c = {0}, d = {0};                                                                         \
        int k = 0;                                                                                                     \
        for (; k + 32 <= n; k += 32) {                                                                                 \
            a += LOAD(w + k) * LOAD_F32(x + k);                                                                        \
            b += LOAD(w + k + 8) * LOAD_F32(x + k + 8);                                                                \
            c += LOAD(w + k + 16) * LOAD_F32(x + k + 16);                                                              \
            d += LOAD(w + k + 24) * LOAD_F32(x + k + 24);                                                              \
        }                                                                                                              \
        for (; k + 8 <= n; k += 8) a += LOAD(w + k) * LOAD_F32(x + k);                                                 \
        float sum = total((a + c) + (b + d));                                                                          \
        for (; k < n; k++) sum += (float)w[k] * x[k];                                                                  \
        return sum;                                                                                                    \
    }

DOT_KERNEL(dot_f32, float, LOAD_F32)
DOT_KERNEL(dot_i8, int8_t, LOAD_I8)

/* Two consecutive int8 rows against one input. Converting int8 to float, not loading, bounds an int8 row's speed,
   and sharing the input's loads between two rows makes it ~30% faster; fp32 rows, bound by memory, stream fastest
   one at a time. */
static void dot2_i8(const int8_t *w, const float *x, int n, float *out) {
    const int8_t *w1 = w + n;
    v8 a0 = {0}, b0 = {0}, c0 = {0}, d0 = {0}, a1 = {0}, b1 = {0}, c1 = {0}, d1 = {0};
    int k = 0;
    for (; k + 32 <= n; k += 32) {
        const v8 x0 = LOAD_F32(x + k), x1 = LOAD_F32(x + k + 8), x2 = LOAD_F32(x + k + 16), x3 = LOAD_F32(x + k + 24);
        a0 += LOAD_I8(w + k) * x0;
        b0 += LOAD_I8(w + k + 8) * x1;
        c0 += LOAD_I8(w + k + 16) * x2;
        d0 += LOAD_I8(w + k + 24) * x3;
        a1 += LOAD_I8(w1 + k) * x0;
        b1 += LOAD_I8(w1 + k + 8) * x1;
        c1 += LOAD_I8(w1 + k + 16) * x2;
        d1 += LOAD_I8(w1 + k + 24) * x3;
    }
    out[0] = total((a0 + c0) + (b0 + d0)) + dot_i8(w + k, x + k, n - k);
    out[1] = total((a1 + c1) + (b1 + d1)) + dot_i8(w1 + k, x + k, n - k);
}

static inline void store(const Linear *lin, float *y, int b, int o, float v) {
    if (lin->scale) v *= lin->scale[o];
    if (lin->bias) v += lin->bias[o];
    y[(long)b * lin->out + o] = v;
}

/* y[b] = x[b] @ W^T (+ bias) for every row b of the batch: the weight is streamed once, its rows split across the
   threads, and each row is read for the whole batch while it is in L1. */
static void linear(const Linear *lin, const float *x, int batch, float *y, int int8) {
    const int n = lin->in;
    if (int8) {
        const int8_t *w = lin->weight;
#pragma omp for schedule(static)
        for (int pair = 0; pair < (lin->out + 1) / 2; pair++) {
            const int o = 2 * pair;
            for (int b = 0; b < batch; b++) {
                const float *xb = x + (long)b * n;
                if (o + 1 < lin->out) {
                    float sums[2];
                    dot2_i8(w + (long)o * n, xb, n, sums);
                    store(lin, y, b, o, sums[0]);
                    store(lin, y, b, o + 1, sums[1]);
                } else {
                    store(lin, y, b, o, dot_i8(w + (long)o * n, xb, n));
                }
            }
        }
        return;
    }
    const float *w = lin->weight;
#pragma omp for schedule(static)
    for (int o = 0; o < lin->out; o++)
        for (int b = 0; b < batch; b++) store(lin, y, b, o, dot_f32(w + (long)o * n, x + (long)b * n, n));
}

static void norm(const Model *m, const Norm *nm, const float *x, float *y, int batch) {
    const int n = m->n_embd;
#pragma omp for schedule(static)
    for (int b = 0; b < batch; b++) {
        const float *xb = x + (long)b * n;
        float *yb = y + (long)b * n;
        float mean = 0, var = 0;
        if (m->norm == NORM_LAYER) {
            for (int i = 0; i < n; i++) mean += xb[i];
            mean /= n;
        }
        for (int i = 0; i < n; i++) var += (xb[i] - mean) * (xb[i] - mean);
        const float inv = 1.0f / sqrtf(var / n + m->eps);
        for (int i = 0; i < n; i++) {
            float v = (xb[i] - mean) * inv;
            if (nm->weight) v *= nm->weight[i];
            if (nm->bias) v += nm->bias[i];
            yb[i] = v;
        }
    }
}

static void rotate(float *v, const float *cos, const float *sin, int rotary_dim) {
    const int half = rotary_dim / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* e^x for 8 floats, to within 2 ulp (Cephes' expf: 2^n times a polynomial in the remainder); libm's expf is a call
   per value, and GPT-2's GELU takes one per hidden unit, 15% of an int8 step. */
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 exp_v8(v8 x) {
    x = CLAMP(x, -87.0f, 88.0f); /* e^x is then a normal float, and 2^n fits the exponent bits */
    const v8 t = x * 1.44269504088896341f + 0.5f;
    v8i n = __builtin_convertvector(t, v8i);
    n += (v8i)(__builtin_convertvector(n, v8) > t); /* truncation rounded up below zero: floor */
    const v8 k = __builtin_convertvector(n, v8);
    const v8 g = x - k * 0.693359375f + k * 2.12194440e-4f;
    v8 y = 1.9875691500e-4f * g + 1.3981999507e-3f;
    y = y * g + 8.3334519073e-3f;
    y = y * g + 4.1665795894e-2f;
    y = y * g + 1.6666665459e-1f;
    y = y * g + 5.0000001201e-1f;
    y = y * g * g + g + 1.0f;
    return (v8)((v8i)y + (n << 23));
}

static inline float exp_1(float x) {
    v8 v = {x};
    return exp_v8(v)[0];
}

/* GPT-2's GELU, 0.5 x (1 + tanh(u)), written as the same function x sigmoid(2u); and SiLU, x sigmoid(x). */
static inline float gelu_tanh(float x) {
    return x / (1.0f + exp_1(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
}

static inline float silu(float x) { return x / (1.0f + exp_1(-x)); }

static float activate(int kind, float x) {
    switch (kind) {
    case ACT_GELU_TANH: return gelu_tanh(x);
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case ACT_RELU2: return x > 0 ? x * x : 0.0f;
    default: return silu(x); /* SwiGLU's gate */
    }
}

/* The MLP's activation over [count] hidden units, eight at a time where it is GPT-2's GELU or SwiGLU's gate. */
static void activate_all(int kind, float *ff, const float *gate, long count) {
    long i = 0;
    if (kind == ACT_GELU_TANH || kind == ACT_SWIGLU) {
        for (; i + 8 <= count; i += 8) {
            if (kind == ACT_GELU_TANH) {
                const v8 x = LOAD_F32(ff + i);
                *(v8_u *)(ff + i) = x / (1.0f + exp_v8(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
            } else {
                const v8 g = LOAD_F32(gate + i);
                *(v8_u *)(ff + i) = LOAD_F32(ff + i) * (g / (1.0f + exp_v8(-g)));
            }
        }
    }
    for (; i < count; i++) ff[i] = kind == ACT_SWIGLU ? ff[i] * silu(gate[i]) : activate(kind, ff[i]);
}

static void attention(const Model *m, const Layer *layer, const int64_t *positions, const int64_t *mask, int slot,
                      int batch) {
    const int hd = m->head_dim, nh = m->n_head, nkv = m->n_kv_head, groups = nh / nkv, L = m->cache_length;
    const int width = (nh + 2 * nkv) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    /* Rotate this token's queries and keys, and write its key and value into the cache at `slot`. */
#pragma omp for schedule(static)
    for (int b = 0; b < batch; b++) {
        float *qkv = m->qkv + (long)b * width;
        for (int head = 0; head < nh + nkv; head++) {
            if (m->rotary_dim)
                rotate(qkv + head * hd, m->cos + positions[b] * m->rotary_dim, m->sin + positions[b] * m->rotary_dim,
                       m->rotary_dim);
        }
        for (int g = 0; g < nkv; g++) {
            const long at = (((long)b * nkv + g) * L + slot) * hd;
            memcpy(layer->keys + at, qkv + (nh + g) * hd, hd * sizeof(float));
            memcpy(layer->values + at, qkv + (nh + nkv + g) * hd, hd * sizeof(float));
        }
    }
#pragma omp for schedule(static)
    for (int pair = 0; pair < batch * nh; pair++) {
        const int b = pair / nh, head = pair % nh, g = head / groups;
        const float *q = m->qkv + (long)b * width + head * hd;
        const float *keys = layer->keys + ((long)b * nkv + g) * L * hd;
        const float *values = layer->values + ((long)b * nkv + g) * L * hd;
        const int64_t *row_mask = mask + (long)b * L;
        float *scores = m->scores + (long)pair * L, *out = m->att + (long)b * nh * hd + head * hd;
        float top = -INFINITY;
        for (int j = 0; j <= slot; j++) {
            scores[j] = row_mask[j] ? dot_f32(keys + (long)j * hd, q, hd) * scale : -INFINITY;
            if (scores[j] > top) top = scores[j];
        }
        float total = 0;
        for (int j = 0; j <= slot; j++) {
            scores[j] = row_mask[j] ? expf(scores[j] - top) : 0.0f;
            total += scores[j];
        }
        for (int i = 0; i < hd; i++) out[i] = 0;
        if (total == 0) continue; /* a left-padding position of the prompt, which nothing may attend to */
        for (int j = 0; j <= slot; j++) {
            if (!scores[j]) continue;
            const float p = scores[j] / total, *v = values + (long)j * hd;
            for (int i = 0; i < hd; i++) out[i] += p * v[i];
        }
    }
}

/* logits [batch, vocab] after `tokens` at `positions` (one per row), written to cache slot `slot`; `mask` is
   [batch, cache_length], nonzero where a row may attend. */
void glade_step(const Model *m, const int64_t *tokens, const int64_t *positions, const int64_t *mask, int slot,
                int batch, float *logits, int threads) {
    const int E = m->n_embd;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int b = 0; b < batch; b++) {
            float *x = m->x + (long)b * E;
            memcpy(x, m->wte + tokens[b] * E, E * sizeof(float));
            if (m->wpe)
                for (int i = 0; i < E; i++) x[i] += m->wpe[positions[b] * E + i];
        }
        if (m->embedding_norm) {
            norm(m, &m->ln_emb, m->x, m->h, batch);
#pragma omp for schedule(static)
            for (int b = 0; b < batch; b++) memcpy(m->x + (long)b * E, m->h + (long)b * E, E * sizeof(float));
        }
        for (int l = 0; l < m->n_layer; l++) {
            const Layer *layer = &m->layers[l];
            norm(m, &layer->ln_1, m->x, m->h, batch);
            linear(&layer->c_attn, m->h, batch, m->qkv, m->int8);
            attention(m, layer, positions, mask, slot, batch);
            linear(&layer->attn_proj, m->att, batch, m->h, m->int8);
#pragma omp for schedule(static)
            for (int i = 0; i < batch * E; i++) m->x[i] += m->h[i];
            norm(m, &layer->ln_2, m->x, m->h, batch);
            linear(&layer->c_fc, m->h, batch, m->ff, m->int8);
            if (m->activation == ACT_SWIGLU) linear(&layer->c_gate, m->h, batch, m->gate, m->int8);
#pragma omp for schedule(static)
            for (int b = 0; b < batch; b++) {
                const long at = (long)b * m->n_inner;
                activate_all(m->activation, m->ff + at, m->gate + at, m->n_inner);
            }
            linear(&layer->mlp_proj, m->ff, batch, m->h, m->int8);
#pragma omp for schedule(static)
            for (int i = 0; i < batch * E; i++) m->x[i] += m->h[i];
        }
        norm(m, &m->ln_f, m->x, m->h, batch);
        linear(&m->head, m->h, batch, logits, m->int8);
        if (m->softcap > 0) {
#pragma omp for schedule(static)
            for (long i = 0; i < (long)batch * m->vocab_size; i++)
                logits[i] = m->softcap * tanhf(logits[i] / m->softcap);
        }
    }
}
