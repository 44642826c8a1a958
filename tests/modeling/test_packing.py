"""Packed sequences (transformers' padding-free format): several sequences end to end in one row, `position_ids`
restarting at 0 for each. Glade must compute for each what it computes for the same sequence in a padded batch."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from glade.tiny import tiny_model


# Three sequences, 153 tokens together: a packed row longer than the tiny model's n_positions=128, though no sequence
# is (transformers' padding-free tests pack a left-padded batch the same way).
LENGTHS = [60, 53, 40]
IDS = torch.randint(0, 256, (len(LENGTHS), max(LENGTHS)), generator=torch.Generator().manual_seed(0))
MASK = torch.stack([torch.arange(max(LENGTHS)) >= max(LENGTHS) - n for n in LENGTHS]).long()  # left padding
PACKED_IDS = IDS[MASK.bool()].unsqueeze(0)
PACKED_POSITIONS = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)


@pytest.mark.parametrize("attn_implementation",
                         ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow), "glade_block"])
@pytest.mark.parametrize("use_cache", [False, None], ids=["no_cache", "config_default"])
@torch.no_grad()
def test_padding_matches_padding_free_with_position_ids(model, attn_implementation, use_cache):
    """transformers' `test_*_padding_matches_padding_free_with_position_ids`, also with the config's `use_cache=True`
    (transformers' own models then ignore the packing). `glade_block` hands packed rows to sdpa."""
    assert PACKED_IDS.shape[1] > model.config.n_positions
    model.set_attn_implementation(attn_implementation)
    padded_positions = (MASK.cumsum(-1) - 1).clamp(min=0)
    padded = model(IDS, attention_mask=MASK, position_ids=padded_positions, use_cache=False).logits
    packed = model(PACKED_IDS, position_ids=PACKED_POSITIONS, use_cache=use_cache).logits
    torch.testing.assert_close(packed[0], padded[MASK.bool()], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_learned_positions_restart_with_each_packed_sequence(gpt2_model):
    embeddings = gpt2_model(PACKED_IDS, position_ids=PACKED_POSITIONS, output_hidden_states=True).hidden_states[0]
    transformer = gpt2_model.transformer
    expected = transformer.wte(PACKED_IDS) + transformer.wpe.weight[PACKED_POSITIONS]
    torch.testing.assert_close(embeddings, expected)


@pytest.mark.slow
def test_flattening_collator_trains_as_the_padded_batch(model):
    """A forward and backward pass on `DataCollatorWithFlattening`'s batch (labels -100 at each sequence start, so no
    sequence predicts the next one) gives the padded batch's loss and gradients."""
    model.train()
    features = [{"input_ids": row[mask.bool()].tolist()} for row, mask in zip(IDS, MASK)]
    batch = DataCollatorWithFlattening(return_tensors="pt")(features)
    assert torch.equal(batch["position_ids"], PACKED_POSITIONS)
    labels = IDS.masked_fill(MASK == 0, -100)
    labels[torch.arange(len(LENGTHS)), MASK.argmax(-1)] = -100  # as in the collator: no padding predicts a first token
    losses, grads = [], []
    for inputs in (batch, {"input_ids": IDS, "attention_mask": MASK, "labels": labels}):
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: param.grad for name, param in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_plain_position_ids_keep_sdpa_mask_free(sdpa_masks, model):
    """Position ids that do not restart are no packing: sdpa still runs its causal kernel without a mask."""
    masks = sdpa_masks
    with torch.no_grad():
        model(IDS, position_ids=torch.arange(IDS.shape[1]).unsqueeze(0))
        model(PACKED_IDS, position_ids=PACKED_POSITIONS)
    n_layer = model.config.n_layer
    assert masks[:n_layer] == [None] * n_layer
    assert all(isinstance(mask, torch.Tensor) for mask in masks[n_layer:])


def test_a_position_beyond_n_positions_is_named():
    model = tiny_model()  # learned positions: a table of n_positions rows
    positions = torch.cat([torch.arange(100), torch.arange(30) + 100]).unsqueeze(0)  # the second one runs to 129
    with pytest.raises(ValueError, match=r"position_ids holds position 129, beyond the model's last position 127 "
                                         r"\(n_positions=128\)"):
        model(torch.zeros(1, 130, dtype=torch.long), position_ids=positions)
