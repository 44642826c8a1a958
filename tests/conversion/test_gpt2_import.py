"""Hugging Face GPT-2 -> Glade: numerical parity, old checkpoint formats, config mapping, bad inputs."""

import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from glade import GladeForCausalLM
from glade.conversion import convert_gpt2, glade_config_from_gpt2, gpt2_to_glade
from glade.conversion.state_dict import model_from_state_dict

ATOL = 1e-5
# The two models sum the same products in different orders (fused or separate kernels, one logsumexp over 50,257
# logits or another), so a scalar like the loss may differ in its last bits: a few units in the last place (ulp) of
# its own magnitude. 1.5 ulp of a loss of 10.3 is 1.9e-6, more than a fixed 1e-6; 4 ulp still catches any real error.
LOSS_ULPS = 4


def assert_forward_parity(gpt2: GPT2LMHeadModel, glade: GladeForCausalLM, input_ids: torch.Tensor) -> None:
    """Logits and every block's hidden states agree within 1e-5, the loss on the same labels within a few ulp."""
    labels = input_ids.roll(1, dims=1)
    with torch.no_grad():
        expected = gpt2(input_ids, labels=labels, output_hidden_states=True)
        actual = glade(input_ids, labels=labels, output_hidden_states=True)
    assert (expected.logits - actual.logits).abs().max() <= ATOL
    assert len(actual.hidden_states) == gpt2.config.n_layer + 1
    for block, (ref, out) in enumerate(zip(expected.hidden_states, actual.hidden_states)):
        assert (ref - out).abs().max() <= ATOL, f"hidden state {block}"
    ulp = torch.finfo(expected.loss.dtype).eps * expected.loss.abs().item()
    assert (actual.loss - expected.loss).abs().item() <= LOSS_ULPS * ulp, (actual.loss, expected.loss)


def greedy(model, prompt: torch.Tensor, tokens: int) -> list[int]:
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=tokens, min_new_tokens=tokens)
    return output[0, prompt.shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_tiny_gpt2_converts_with_fp32_parity(tmp_path, gpt2_dir, gpt2_model, attn_implementation):
    convert_gpt2(gpt2_dir, tmp_path / "glade")
    glade = GladeForCausalLM.from_pretrained(tmp_path / "glade", attn_implementation=attn_implementation).eval()
    gpt2_model.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    assert_forward_parity(gpt2_model, glade, input_ids)
    tokens = greedy(gpt2_model, input_ids[:1, :6], 32)
    assert len(tokens) == 32 and len(set(tokens)) > 4
    assert greedy(glade, input_ids[:1, :6], 32) == tokens


@pytest.fixture(scope="module")
def gpt2_124m():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_full_124m_shape_converts_with_fp32_parity(gpt2_124m, attn_implementation):
    config = glade_config_from_gpt2(gpt2_124m.config)
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size) == (12, 12, 768, 50257)
    glade = model_from_state_dict(GladeForCausalLM, config, gpt2_to_glade(gpt2_124m.state_dict(), config))
    glade.set_attn_implementation(attn_implementation)
    gpt2_124m.set_attn_implementation(attn_implementation)
    input_ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(2))
    assert_forward_parity(gpt2_124m, glade, input_ids)
    assert greedy(glade, input_ids[:, :4], 4) == greedy(gpt2_124m, input_ids[:, :4], 4)


def assert_converts_to(source_dir, destination, reference: GPT2LMHeadModel) -> None:
    convert_gpt2(source_dir, destination)
    glade = GladeForCausalLM.from_pretrained(destination)
    input_ids = torch.randint(0, reference.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (glade(input_ids).logits - reference(input_ids).logits).abs().max() <= ATOL


@pytest.mark.slow
def test_old_pickled_checkpoint_with_unprefixed_keys_and_mask_buffers(tmp_path, gpt2_model):
    # What GPT-2 checkpoints of the pytorch-transformers era look like: GPT2Model keys, masks saved as buffers,
    # and the tied head written out as a second copy.
    source = tmp_path / "old"
    source.mkdir()
    gpt2_model.config.to_json_file(source / "config.json")
    n = gpt2_model.config.n_positions
    state_dict = {}
    for key, tensor in gpt2_model.state_dict().items():
        state_dict[key.removeprefix("transformer.")] = tensor.clone()
    for i in range(gpt2_model.config.n_layer):
        state_dict[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state_dict[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "lm_head.weight" in state_dict
    torch.save(state_dict, source / "pytorch_model.bin")
    assert_converts_to(source, tmp_path / "glade", gpt2_model)


@pytest.mark.slow
def test_sharded_safetensors_with_an_index(tmp_path, gpt2_model):
    source = tmp_path / "sharded"
    gpt2_model.save_pretrained(source, max_shard_size="100KB")
    assert len(list(source.glob("model-*.safetensors"))) > 1 and (source / "model.safetensors.index.json").is_file()
    assert_converts_to(source, tmp_path / "glade", gpt2_model)


@pytest.mark.slow
def test_sharded_pickles_with_an_index(tmp_path, gpt2_model):
    source = tmp_path / "sharded-bin"
    source.mkdir()
    gpt2_model.config.to_json_file(source / "config.json")
    state_dict = gpt2_model.state_dict()
    keys = sorted(state_dict)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, shard_keys in shards.items():
        torch.save({key: state_dict[key].clone() for key in shard_keys}, source / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_converts_to(source, tmp_path / "glade", gpt2_model)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["gelu", "gelu_pytorch_tanh"])
def test_other_gelu_activations_map_onto_glade(tmp_path, make_gpt2, activation):
    model = make_gpt2(activation_function=activation, n_inner=96)
    model.save_pretrained(tmp_path / "gpt2")
    config = glade_config_from_gpt2(model.config)
    assert config.activation_function == {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_new"}[activation]
    assert config.n_inner == 96
    assert_converts_to(tmp_path / "gpt2", tmp_path / "glade", model)


def test_config_fields_and_generation_config_carry_over(tmp_path, make_gpt2):
    model = make_gpt2(layer_norm_epsilon=1e-6, pad_token_id=0, resid_pdrop=0.05)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path / "gpt2")
    convert_gpt2(tmp_path / "gpt2", tmp_path / "glade")
    config = json.loads((tmp_path / "glade" / "config.json").read_text())
    assert config["model_type"] == "glade" and config["auto_map"]["AutoModelForCausalLM"]
    assert (config["layer_norm_epsilon"], config["pad_token_id"], config["resid_pdrop"]) == (1e-6, 0, 0.05)
    assert (config["bos_token_id"], config["eos_token_id"], config["n_positions"]) == (256, 256, 64)
    generation = json.loads((tmp_path / "glade" / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["max_new_tokens"]) == (256, 7)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("add_cross_attention", True),
        ("scale_attn_weights", False),
    ],
)
def test_unsupported_gpt2_flags_are_named(flag, value):
    with pytest.raises(ValueError, match=f"options Glade does not implement: {flag}={value}"):
        glade_config_from_gpt2(GPT2Config(**{flag: value}))


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="activation_function='relu'"):
        glade_config_from_gpt2(GPT2Config(activation_function="relu"))


TEXT = (
    "Hello world! The GPT-2 tokenizer splits text into byte-level BPE pieces.\n\n"
    "A second paragraph: numbers like 1234 and 3.14159, punctuation (yes!), and  double  spaces.\n\n"
    "Unicode too: café, naïve, 東京, emoji 🙂 — and a final <|endoftext|>"
)


@pytest.mark.slow
def test_tokenizer_files_are_copied_and_encode_identically(tmp_path, make_gpt2, gpt2_tokenizer_dir):
    model = make_gpt2(vocab_size=50257, n_embd=32, n_head=2, bos_token_id=50256, eos_token_id=50256)
    source = tmp_path / "gpt2"
    model.save_pretrained(source)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((gpt2_tokenizer_dir / name).read_bytes())
    conversion = convert_gpt2(source, tmp_path / "glade")
    assert sorted(conversion.tokenizer_files) == ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    converted = AutoTokenizer.from_pretrained(tmp_path / "glade")
    reference = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir)
    assert converted("Hello world")["input_ids"] == [15496, 995]
    ids = reference(TEXT)["input_ids"]
    assert len(ids) > 50 and ids[-1] == 50256
    assert converted(TEXT)["input_ids"] == ids
    assert converted.decode(ids) == TEXT
