import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from glade.cli import main
from glade.inspection import analogy, nearest_tokens, word_token_id
from glade.modeling_glade import GladeForCausalLM
from glade.tiny import tiny_config

# GPT-2 style: words carry their leading space ("Ġking"); "plain" exists only without one.
WORDS = ["[UNK]", "Ġking", "Ġqueen", "Ġman", "Ġwoman", "Ġcat", "Ġkitten", "Ġdog", "plain"]


@pytest.fixture(scope="module")
def word_tokenizer():
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture(scope="module")
def word_model():
    """An embedding where king - man + woman is exactly queen and kitten is cat's nearest neighbour."""
    model = GladeForCausalLM(tiny_config(vocab_size=len(WORDS), n_embd=8, n_head=2)).eval()
    e = torch.eye(8)
    rows = {
        "[UNK]": e[7],
        "Ġking": e[0] + e[2],
        "Ġqueen": e[1] + e[2],
        "Ġman": e[0],
        "Ġwoman": e[1],
        "Ġcat": e[3],
        "Ġkitten": e[3] + 0.2 * e[4],
        "Ġdog": e[5] + 0.5 * e[3],
        "plain": e[6],
    }
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.stack([rows[w] for w in WORDS]))
    return model


def test_words_prefer_the_leading_space_token(word_tokenizer):
    assert word_token_id(word_tokenizer, "king") == WORDS.index("Ġking")
    assert word_token_id(word_tokenizer, " king") == WORDS.index("Ġking")
    assert word_token_id(word_tokenizer, "plain") == WORDS.index("plain")


def test_analogy_finds_the_answer_built_into_the_embedding(word_model, word_tokenizer):
    result = analogy(word_model, word_tokenizer, "king", "man", "woman", top_k=len(WORDS) - 3)
    assert result.query == "␣king - ␣man + ␣woman"
    assert result.answers[0].token == "␣queen"
    assert result.answers[0].similarity == pytest.approx(1.0)
    assert {"␣king", "␣man", "␣woman"}.isdisjoint(a.token for a in result.answers)  # woman would be second
    weights = word_model.get_input_embeddings().weight.detach()
    target = weights[1] - weights[3] + weights[4]
    for answer in result.answers:
        assert answer.similarity == pytest.approx(float(F.cosine_similarity(weights[answer.token_id], target, dim=0)))


def test_neighbors_rank_by_cosine_similarity(word_model, word_tokenizer):
    result = nearest_tokens(word_model, word_tokenizer, "cat", top_k=3)
    assert result.query == "␣cat"
    assert [a.token for a in result.answers][:2] == ["␣kitten", "␣dog"]
    assert result.answers[0].similarity == pytest.approx(1 / (1 + 0.2**2) ** 0.5)
    assert "␣cat" not in [a.token for a in result.answers]


def test_words_that_are_not_one_token_are_clear_errors(word_model, word_tokenizer, tokenizer, model):
    with pytest.raises(ValueError, match="'dragon' is not in the vocabulary"):
        nearest_tokens(word_model, word_tokenizer, "dragon")
    splits = r"'king' is not a single token: ' king' splits into \['␣', 'k', 'i', 'n', 'g'\]"
    with pytest.raises(ValueError, match=splits):
        analogy(model, tokenizer, "king", "m", "w")
    with pytest.raises(ValueError, match="the word is empty"):
        nearest_tokens(word_model, word_tokenizer, " ")
    with pytest.raises(ValueError, match="top_k must be between 1"):
        nearest_tokens(word_model, word_tokenizer, "cat", top_k=len(WORDS))


def test_analogy_and_neighbors_from_the_command_line(word_model, word_tokenizer, tmp_path, capsys):
    word_model.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)

    assert main(["inspect", "analogy", "king", "man", "woman", "--model", str(tmp_path), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "␣king - ␣man + ␣woman" in out
    assert out.splitlines()[-2].split()[:2] == ["1", "␣queen"]

    assert main(["inspect", "neighbors", "cat", "--model", str(tmp_path), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[:2] == ["1", "␣kitten"]

    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "neighbors", "dragon", "--model", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "'dragon' is not in the vocabulary" in capsys.readouterr().err
