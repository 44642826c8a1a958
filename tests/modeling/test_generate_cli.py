import subprocess
import sys

import pytest
import torch

from checkpoint_helpers import rewrite_weights
from glade.cli import main
from glade.generate import generate
from glade.tiny import byte_level_tokenizer, tiny_model


@pytest.fixture
def checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_greedy_generation_from_a_checkpoint_matches_model_generate(checkpoint):
    text = generate(["Hello"], model=str(checkpoint), max_new_tokens=6, greedy=True)[0]
    tokenizer = byte_level_tokenizer()
    ids = torch.tensor([tokenizer("Hello")["input_ids"]])
    expected = tiny_model().generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert text == tokenizer.decode(expected[0])


def test_seeded_sampling_is_reproducible(checkpoint):
    first = generate(["Hi", "Yo"], model=str(checkpoint), max_new_tokens=8, seed=7, top_k=20, top_p=0.9)
    assert first == generate(["Hi", "Yo"], model=str(checkpoint), max_new_tokens=8, seed=7, top_k=20, top_p=0.9)
    assert all(text.startswith(prompt) for text, prompt in zip(first, ["Hi", "Yo"]))


def test_unset_options_come_from_the_checkpoints_generation_config(checkpoint):
    model = tiny_model()
    # Near-zero temperature samples the argmax, so an honoured config makes sampling reproduce greedy decoding.
    model.generation_config.update(do_sample=True, temperature=1e-3, top_k=0, max_new_tokens=7)
    model.generation_config.save_pretrained(checkpoint)
    greedy = generate(["Hello"], model=str(checkpoint), greedy=True)
    assert len(greedy[0]) == len("Hello") + 7  # one byte per token
    assert all(generate(["Hello"], model=str(checkpoint), seed=seed) == greedy for seed in range(3))
    explicit = [generate(["Hello"], model=str(checkpoint), seed=seed, top_k=200, temperature=5.0) for seed in range(3)]
    assert any(text != greedy for text in explicit)


def test_cli_prints_the_continuation(checkpoint, capsys):
    assert main(["generate", "Hello", "--model", str(checkpoint), "--greedy", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_console_script_runs_the_default_model():
    result = subprocess.run(
        [sys.executable, "-m", "glade.cli", "generate", "Once", "--max-new-tokens", "3", "--seed", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "", "--model", "tiny-random"], "at least one non-empty prompt"),
        (["generate", "Hi", "--model", "tiny-random", "--temperature", "0"], "temperature must be > 0"),
        (["generate", "Hi", "--model", "tiny-random", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    ],
)
def test_cli_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_clear_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "Hi", "--model", str(tmp_path / "nowhere")])
    assert f"glade generate: error: model directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_a_checkpoint_missing_a_tensor_is_refused_not_filled_with_random_weights(checkpoint, capsys):
    rewrite_weights(checkpoint, lambda tensors: tensors.pop("transformer.h.0.attn.c_proj.weight"))
    with pytest.raises(SystemExit):
        main(["generate", "Hi", "--model", str(checkpoint)])
    assert "does not match its config: missing transformer.h.0.attn.c_proj.weight" in capsys.readouterr().err
