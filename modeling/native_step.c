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

/* 8 floats (an AVX register), and the unaligned form that weights and inputs are loaded through. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8_u __attribute__((vector_size(32), aligned(4)));

#define LOAD_F32(p) (*(const v8_u *)(p))

#if defined(__AVX2__)
#include <immintrin.h>
/* Compilers turn a generic int8 -> float vector conversion into eight scalar ones. */
#define LOAD_I8(p) ((v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))))
#else
#define LOAD_I8(p) ((v8){(p)[0], (p)[1], (p)[2], (p)[3], (p)[4], (p)[5], (p)[6], (p)[7]})
#endif

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
        const v8 v = (a + c) + (b + d);                                                                                \
        float sum = ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));                                \
        for (; k < n; k++) sum += (float)w[k] * x[k];                                                                  \
        return sum;                                                                                                    \
    }

DOT_KERNEL(dot_f32, float, LOAD_F32)
DOT_KERNEL(dot_i8, int8_t, LOAD_I8)

/* y[b] = x[b] @ W^T (+ bias) for every row b of the batch: the weight is streamed once, its rows split across the
   threads, and each row is read for the whole batch while it is in L1. */
static void linear(const Linear *lin, const float *x, int batch, float *y, int int8) {
    const int n = lin->in;
#pragma omp for schedule(static)
    for (int o = 0; o < lin->out; o++) {
        for (int b = 0; b < batch; b++) {
            float v = int8 ? dot_i8((const int8_t *)lin->weight + (long)o * n, x + (long)b * n, n)
                           : dot_f32((const float *)lin->weight + (long)o * n, x + (long)b * n, n);
            if (lin->scale) v *= lin->scale[o];
            if (lin->bias) v += lin->bias[o];
            y[(long)b * lin->out + o] = v;
        }
    }
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

static float activate(int kind, float x) {
    switch (kind) {
    case ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case ACT_RELU2: return x > 0 ? x * x : 0.0f;
    default: return x / (1.0f + expf(-x)); /* SiLU, SwiGLU's gate */
    }
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
            if (m->activation == ACT_SWIGLU) {
                linear(&layer->c_gate, m->h, batch, m->gate, m->int8);
#pragma omp for schedule(static)
                for (int i = 0; i < batch * m->n_inner; i++) m->ff[i] *= activate(ACT_SWIGLU, m->gate[i]);
            } else {
#pragma omp for schedule(static)
                for (int i = 0; i < batch * m->n_inner; i++) m->ff[i] = activate(m->activation, m->ff[i]);
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
