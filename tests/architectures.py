"""Architectures the model tests run against: GPT-2's (the default config) and one with every modern option.

Value embeddings are left out: they read token ids, so such a model refuses `inputs_embeds`, which many of these tests
pass. tests/modeling/test_value_embeddings.py covers them."""

# relu2 is the other modern activation; it has tests of its own.
MODERN = dict(
    positions="rotary", norm="rmsnorm", qk_norm=True, activation_function="swiglu", n_kv_head=2, logit_softcap=30.0,
    bias=False, tie_word_embeddings=False, residual_lambdas=True,
)
ARCHITECTURES = {"gpt2": {}, "modern": MODERN}
