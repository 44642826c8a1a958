import pytest
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from architectures import ARCHITECTURES


@pytest.fixture(params=list(ARCHITECTURES))
def model(request):
    """Each model test runs against GPT-2's architecture and against one with every modern option."""
    from glade.tiny import tiny_model

    return tiny_model(**ARCHITECTURES[request.param])


@pytest.fixture
def gpt2_model():
    """For what only GPT-2's architecture has (a tied head, biases, mask buffers in old checkpoints)."""
    from glade.tiny import tiny_model

    return tiny_model()


@pytest.fixture
def sdpa_masks(monkeypatch) -> list:
    """The attention_mask of every sdpa call made while the test runs, in order."""
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    masks = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording_sdpa)
    return masks
