import pytest

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
