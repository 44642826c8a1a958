import pytest

from architectures import ARCHITECTURES
from glade.tiny import byte_level_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request):
    """Every look inside works on GPT-2's architecture and on one with every modern option."""
    return tiny_model(seed=0, **ARCHITECTURES[request.param])


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, model, tokenizer):
    """A saved tiny Glade checkpoint, as the command line loads it."""
    path = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A checkpoint directory whose config is not Glade's."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert")
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(path)
    return path


@pytest.fixture
def assert_png():
    def check(path):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == [], "temporary file left behind"

    return check
