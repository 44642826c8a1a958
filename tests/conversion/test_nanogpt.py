"""nanoGPT ckpt.pt -> Glade, checked against a plain-torch nanoGPT forward."""

import pytest
import torch

from glade import GladeForCausalLM
from glade.conversion import convert_nanogpt


@pytest.mark.slow
@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint_matches_the_reference_forward(tmp_path, nanogpt, nanogpt_reference, bias):
    path, state_dict, model_args = nanogpt(tmp_path / "ckpt.pt", bias=bias, vocab_size=256)
    convert_nanogpt(path, tmp_path / "glade")
    glade = GladeForCausalLM.from_pretrained(tmp_path / "glade").eval()
    config = glade.config
    assert (config.activation_function, config.bias, config.vocab_size, config.n_positions) == ("gelu", bias, 256, 64)
    assert not any(name.endswith("bias") for name, _ in glade.named_parameters()) or bias
    input_ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nanogpt_reference(state_dict, model_args["n_head"], input_ids)
        actual = glade(input_ids).logits
    assert (expected - actual).abs().max() <= 1e-5


@pytest.mark.slow
def test_padded_vocab_is_cropped_on_request(tmp_path, nanogpt, nanogpt_reference):
    path, state_dict, model_args = nanogpt(tmp_path / "ckpt.pt", vocab_size=256, compiled=False)
    convert_nanogpt(path, tmp_path / "glade", crop_vocab=250)
    glade = GladeForCausalLM.from_pretrained(tmp_path / "glade").eval()
    assert glade.config.vocab_size == 250 and glade.lm_head.weight.shape == (250, 64)
    assert glade.config.eos_token_id == 249
    input_ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = nanogpt_reference(state_dict, model_args["n_head"], input_ids)[..., :250]
        actual = glade(input_ids).logits
    assert (expected - actual).abs().max() <= 1e-5


def test_cropping_beyond_the_checkpoint_vocab_is_refused(tmp_path, nanogpt):
    path, _, _ = nanogpt(tmp_path / "ckpt.pt", vocab_size=256)
    with pytest.raises(ValueError, match="Cannot crop the vocabulary to 300: the checkpoint has 256"):
        convert_nanogpt(path, tmp_path / "glade", crop_vocab=300)
    assert not (tmp_path / "glade").exists()


@pytest.mark.slow
def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, nanogpt, gpt2_tokenizer_dir):
    path, _, _ = nanogpt(tmp_path / "ckpt.pt", vocab_size=256)
    with pytest.raises(ValueError, match="The tokenizer has 50257 tokens, more than the model's vocab_size=256"):
        convert_nanogpt(path, tmp_path / "glade", tokenizer_dir=gpt2_tokenizer_dir)
    assert not (tmp_path / "glade").exists()
