import json
import logging
import math
import re
import subprocess
import sys

import pytest
import torch

from checkpoint_helpers import rewrite_weights
from glade import fast_generate, native_decoding
from glade.cli import main
from glade.decoding import CompiledDecoder
from glade.generate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_REPETITION_PENALTY, generate, load_generator
from glade.tiny import byte_level_tokenizer, tiny_model


@pytest.fixture
def checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("flags, expected", [("avx2 fma", torch.float32), ("avx2 avx512_bf16", torch.bfloat16)])
def test_bf16_weights_run_in_fp32_where_the_cpu_would_emulate_bf16(tmp_path, fake_cpu, flags, expected):
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    byte_level_tokenizer().save_pretrained(tmp_path)
    fake_cpu("x86_64", flags)
    assert load_generator(str(tmp_path), device="cpu").model.dtype == expected


def test_greedy_generation_from_a_checkpoint_matches_model_generate(checkpoint):
    text = generate(["Hello"], model=str(checkpoint), max_new_tokens=6, greedy=True)[0]
    tokenizer = byte_level_tokenizer()
    ids = torch.tensor([tokenizer("Hello")["input_ids"]])
    expected = tiny_model().generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256, fast_decoding="off")
    assert text == tokenizer.decode(expected[0])


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(checkpoint):
    first = generate(["Hi", "Yo"], model=str(checkpoint), max_new_tokens=8, seed=7, top_k=20, top_p=0.9)
    assert first == generate(["Hi", "Yo"], model=str(checkpoint), max_new_tokens=8, seed=7, top_k=20, top_p=0.9)
    assert all(text.startswith(prompt) for text, prompt in zip(first, ["Hi", "Yo"]))


def greedy_continuation(prompt: str, max_new_tokens: int) -> str:
    """The tiny model's own greedy continuation, through transformers' generate() (not the pipeline)."""
    tokenizer = byte_level_tokenizer()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    output = tiny_model().generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=256,
        fast_decoding="off",
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)


def save_generation_config(checkpoint, **settings) -> None:
    model = tiny_model()
    model.generation_config.update(**settings)
    model.generation_config.save_pretrained(checkpoint)


@pytest.mark.slow
def test_unset_sampling_options_come_from_the_checkpoints_generation_config(checkpoint):
    # Near-zero temperature samples the argmax, so an honoured config makes sampling reproduce greedy decoding.
    save_generation_config(checkpoint, do_sample=True, temperature=1e-3, top_k=0)
    options = dict(model=str(checkpoint), max_new_tokens=7, repetition_penalty=1.0)
    greedy = generate(["Hello"], greedy=True, **options)
    assert greedy == [greedy_continuation("Hello", 7)]
    assert all(generate(["Hello"], seed=seed, **options) == greedy for seed in range(3))
    explicit = [generate(["Hello"], seed=seed, top_k=200, temperature=5.0, **options) for seed in range(3)]
    assert any(text != greedy for text in explicit)


@pytest.mark.slow
def test_length_and_repetition_penalty_are_glade_generates_own_not_the_checkpoints(checkpoint):
    # A generation config may still carry them (older checkpoints did): they must not drive `glade generate`.
    save_generation_config(checkpoint, do_sample=True, temperature=0.7, max_new_tokens=7, repetition_penalty=3.0)

    def sample(**options) -> list[str]:
        return generate(["Hello"], model=str(checkpoint), seed=0, **options)

    defaults = sample()
    assert defaults == sample(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, repetition_penalty=DEFAULT_REPETITION_PENALTY)
    assert defaults != sample(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, repetition_penalty=1.0)
    assert generate(["Hello"], model=str(checkpoint), greedy=True) == [
        greedy_continuation("Hello", DEFAULT_MAX_NEW_TOKENS)
    ]


@pytest.mark.slow
def test_a_checkpoint_without_length_or_penalty_gets_the_commands_defaults(checkpoint, capsys):
    generation_config = json.loads((checkpoint / "generation_config.json").read_text())
    assert not {"max_new_tokens", "max_length", "repetition_penalty"} & set(generation_config)
    assert main(["generate", "Hello", "--model", str(checkpoint), "--greedy"]) == 0
    assert capsys.readouterr().out == greedy_continuation("Hello", DEFAULT_MAX_NEW_TOKENS) + "\n"


@pytest.mark.slow
def test_generation_stops_at_the_end_of_the_context_and_keeps_the_text(checkpoint, caplog):
    prompt = "x" * 120  # one byte, one token: 8 of the tiny model's 128 positions are left
    with caplog.at_level(logging.WARNING, logger="glade.generate"):
        texts = generate([prompt, "short"], model=str(checkpoint), max_new_tokens=20, greedy=True)
    assert texts[0] == greedy_continuation(prompt, 8)
    assert texts[1].startswith("short")
    assert ("generating at most 8 new tokens instead of 20: with the 120-token prompt they fill the model's context "
            "of 128 tokens (n_positions, times any RoPE scaling factor)") in caplog.text


def test_a_prompt_that_fills_the_context_is_an_error_naming_both_lengths(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x" * 130, "--model", str(checkpoint)])
    assert exit_info.value.code == 2
    assert ("glade generate: error: the prompt is 130 tokens long and the model's context holds 128 (n_positions, "
            "times any RoPE scaling factor), so no token fits after it: shorten the prompt") in capsys.readouterr().err


@pytest.fixture
def built_decoders(monkeypatch) -> list[CompiledDecoder]:
    """Every decoder the fast route builds while the test runs, in order."""
    built = []

    class RecordingDecoder(CompiledDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(fast_generate, "CompiledDecoder", RecordingDecoder)
    return built


@pytest.mark.slow
@pytest.mark.parametrize("flags, compiled", [([], False), (["--compile"], True)], ids=["default", "--compile"])
def test_cli_decodes_on_the_fast_route_eagerly_unless_asked_to_compile(checkpoint, capsys, built_decoders, flags,
                                                                        compiled):
    assert main(["generate", "Hello", "--model", str(checkpoint), "--greedy", "--max-new-tokens", "6", *flags]) == 0
    out, err = capsys.readouterr()
    assert out == greedy_continuation("Hello", 6) + "\n"
    assert [decoder.compiled for decoder in built_decoders] == [compiled]
    assert re.search(r"first token after \d+ ms; 6 steps, then \d+ steps/s", err)


@pytest.mark.skipif(native_decoding.library() is None, reason="no C compiler to build the native step")
def test_quantize_int8_decodes_on_the_c_step_with_int8_weights(checkpoint, capsys, built_decoders):
    assert main(["generate", "Hello", "--model", str(checkpoint), "--greedy", "--max-new-tokens", "6"]) == 0
    assert main(["generate", "Hello", "--model", str(checkpoint), "--greedy", "--max-new-tokens", "6",
                 "--quantize", "int8"]) == 0
    assert [decoder.native for decoder in built_decoders] == ["fp32", "int8"]
    with pytest.raises(SystemExit):
        main(["generate", "Hello", "--model", str(checkpoint), "--quantize", "int8", "--compile"])
    assert "--compile and --quantize do not combine" in capsys.readouterr().err


@pytest.mark.slow
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
        (["generate", "Hi", "--model", "tiny-random", "--temperature", "0"], "temperature must be at least 0.0001"),
        (["generate", "Hi", "--temperature", "1e-300"], "temperature must be at least 0.0001 and finite (greedy "
                                                        "decoding is the limit of 0: use --greedy), got 1e-300"),
        (["generate", "Hi \udcff\udcfe"], "prompt 1 is not valid UTF-8 text (undecodable bytes at characters 3-5)"),
        (["generate", "Hi", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device cuda"),
        (["generate", "Hi", "--device", "tpu"], "--device 'tpu' is not a device name"),
        (["generate", "Hi", "--model", "tiny-random", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["generate", "Hi", "--temperature", "inf"], "temperature must be at least 0.0001 and finite"),
        (["generate", "Hi", "--temperature", "nan"], "temperature must be at least 0.0001 and finite"),
        (["generate", "Hi", "--top-p", "2"], "top_p must be in (0, 1] (1 turns nucleus filtering off), got 2.0"),
        (["generate", "Hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "Hi", "--top-k", "-1"], "top_k must be >= 0 (0 turns top-k filtering off), got -1"),
        (["generate", "Hi", "--repetition-penalty", "0"], "repetition_penalty must be > 0 and finite"),
        (["generate", "Hi", "--greedy", "--repetition-penalty", "nan"], "repetition_penalty must be > 0 and finite"),
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


def test_nan_weights_are_refused_by_name_not_decoded_into_an_empty_continuation(checkpoint, capsys):
    rewrite_weights(checkpoint, lambda tensors: tensors["transformer.h.1.mlp.c_fc.weight"].view(-1)[7].fill_(math.nan))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "Hi", "--model", str(checkpoint)])
    assert exit_info.value.code == 2
    assert (f"{checkpoint} holds NaN or infinite weights in transformer.h.1.mlp.c_fc.weight: the checkpoint is "
            "damaged or its training diverged") in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_of_unknown_code_is_refused_without_a_prompt(tmp_path):
    config = {"model_type": "mystery", "auto_map": {"AutoConfig": "configuration_mystery.MysteryConfig",
                                                    "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_mystery.py").write_text("raise SystemExit('remote code ran')\n")
    result = subprocess.run(
        [sys.executable, "-m", "glade.cli", "generate", "Hi", "--model", str(tmp_path)],
        input="y\n", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "remote code ran" not in result.stderr + result.stdout
    assert "trust_remote_code" in result.stderr.strip().splitlines()[-1]


def test_a_missing_or_broken_tokenizer_is_named(checkpoint, capsys):
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut off
    with pytest.raises(SystemExit):
        main(["generate", "Hi", "--model", str(checkpoint)])
    assert f"the tokenizer in {checkpoint} could not be read" in capsys.readouterr().err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink(missing_ok=True)
    with pytest.raises(SystemExit):
        main(["generate", "Hi", "--model", str(checkpoint)])
    assert f"{checkpoint} has no tokenizer files (none of tokenizer.json, " in capsys.readouterr().err
