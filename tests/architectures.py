"""Architectures the model tests run against: GPT-2's (the default config) and one with every modern option."""

# relu2 is the other modern activation; it has tests of its own.
MODERN = dict(
    positions="rotary", norm="rmsnorm", qk_norm=True, activation_function="swiglu", n_kv_head=2, logit_softcap=30.0,
    bias=False, tie_word_embeddings=False, residual_lambdas=True, value_embeddings=True,
)
ARCHITECTURES = {"gpt2": {}, "modern": MODERN}
