import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from glade.cli import main as glade_main
from glade.tiny import byte_level_tokenizer
from glade.training.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer

TEXT = "Hello wörld, ROMEO:\n  thou art 🙂 <|endoftext|> naïve"


def test_trained_tokenizer_round_trips_and_loads_with_auto_tokenizer(bpe_tokenizer_dir, shakespeare):
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    assert len(tokenizer) == 512
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == eos
    # Byte-level: any text, including unseen characters, survives encode/decode.
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert eos in ids  # the special token is recognised as one token, not spelled out
    # Merges were learned: Shakespeare compresses well below one token per byte.
    sample = shakespeare.read_text()[:5000]
    assert len(tokenizer(sample)["input_ids"]) < 0.7 * len(sample.encode())


def test_train_tokenizer_rejects_a_vocabulary_without_room_for_the_bytes():
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        train_tokenizer(["some text"], vocab_size=200)


def test_cli_trains_on_a_jsonl_column(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": f"document number {i}, the quick brown fox"}) + "\n" for i in range(50)))
    assert glade_main(["train-tokenizer", "--data", str(data), "--text-column", "body", "--vocab-size", "300",
                       "--output-dir", str(tmp_path / "tok")]) == 0
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert 257 < len(tokenizer) <= 300
    assert len(tokenizer("the quick brown fox")["input_ids"]) < len("the quick brown fox")
    assert "saved a" in capsys.readouterr().out


def test_cli_names_a_missing_text_column(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        glade_main(["train-tokenizer", "--data", str(data), "--vocab-size", "300", "--output-dir", str(tmp_path / "t")])
    assert exit_info.value.code == 2
    assert "text column 'text' not found" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


GOOD_LINE = json.dumps({"text": "the quick brown fox"}) + "\n"
BROKEN_LINES = {
    "not-json": ('{"text": "cut off"\n', "is not JSON (Expecting ',' delimiter at column 20)"),
    "not-an-object": ('["text", "in a list"]\n', "is not a JSON object: a .jsonl file holds one object per line"),
    "no-text-column": ('{"body": "elsewhere", "id": 3}\n',
                       "text column 'text' not found in data file {path} line 3; its columns are: body, id"),
}


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["loaded", "streamed"])
@pytest.mark.parametrize("broken", BROKEN_LINES)
def test_cli_names_the_file_and_line_of_a_broken_jsonl_line(tmp_path, capsys, broken, streaming):
    line, problem = BROKEN_LINES[broken]
    data = tmp_path / "docs.jsonl"
    data.write_text(GOOD_LINE + "\n" + line + GOOD_LINE)  # the blank line counts, as in an editor
    with pytest.raises(SystemExit) as exit_info:
        glade_main(["train-tokenizer", "--data", str(data), "--vocab-size", "300", "--output-dir",
                    str(tmp_path / "tok"), *streaming])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("glade train-tokenizer: error: ")
    assert problem.format(path=data) in error and f"data file {data} line 3" in error
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["loaded", "streamed"])
def test_cli_names_a_binary_text_file(tmp_path, capsys, streaming):
    (tmp_path / "good.txt").write_text("the quick brown fox\n")
    binary = tmp_path / "random.txt"
    binary.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SystemExit) as exit_info:
        glade_main(["train-tokenizer", "--data", str(tmp_path / "*.txt"), "--vocab-size", "300", "--output-dir",
                    str(tmp_path / "tok"), *streaming])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"glade train-tokenizer: error: data file {binary} is not UTF-8 text (a binary file, or text in another "
        "encoding such as Latin-1): convert it to UTF-8 or leave it out"
    )
    assert not (tmp_path / "tok").exists()


def test_cli_never_wipes_a_folder_that_holds_more_than_a_tokenizer(tmp_path, capsys):
    # Pointed at the data's own folder, training must not delete the data (it used to, and exit 0).
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    command = ["train-tokenizer", "--data", str(data), "--vocab-size", "300", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        glade_main(command)
    assert exit_info.value.code == 2
    assert f"--output-dir {tmp_path} holds files that are not a tokenizer's (corpus.txt)" in capsys.readouterr().err
    assert data.read_text().startswith("the quick brown fox") and sorted(p.name for p in tmp_path.iterdir()) == [
        "corpus.txt"]

    # A folder holding only an earlier tokenizer is replaced; --overwrite replaces anything.
    tokenizer_dir = tmp_path / "tok"
    for _ in range(2):
        assert glade_main([*command[:-1], str(tokenizer_dir)]) == 0
    (tokenizer_dir / "notes.md").write_text("mine")
    with pytest.raises(SystemExit):
        glade_main([*command[:-1], str(tokenizer_dir)])
    assert (tokenizer_dir / "notes.md").exists()
    assert glade_main([*command[:-1], str(tokenizer_dir), "--overwrite"]) == 0
    assert not (tokenizer_dir / "notes.md").exists() and load_tokenizer(tokenizer_dir)


def test_load_tokenizer_requires_an_existing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory .*missing does not exist"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("make", ["bpe", "byte_level"])
def test_token_byte_lengths_count_the_utf8_bytes_of_the_text(make, bpe_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir) if make == "bpe" else byte_level_tokenizer()
    lengths = token_byte_lengths(tokenizer)
    text = TEXT.replace("<|endoftext|>", "")
    ids = tokenizer(text)["input_ids"]
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert lengths[tokenizer.eos_token_id] == 0


def test_token_byte_lengths_of_a_tokenizer_that_is_not_byte_level():
    # A word-level vocabulary: each token decodes to its own text.
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "héllo": 1, "x": 2, "</s>": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    lengths = token_byte_lengths(tokenizer)
    np.testing.assert_array_equal(lengths, [0, len("héllo".encode()), 1, 0])


def test_a_minimum_frequency_below_one_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("some text " * 20)
    with pytest.raises(SystemExit) as exit_info:
        glade_main(["train-tokenizer", "--data", str(data), "--vocab-size", "300", "--output-dir",
                    str(tmp_path / "tok"), "--min-frequency", "-1"])
    assert exit_info.value.code == 2
    assert "min_frequency must be at least 1 (a merge seen once), got -1" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()
