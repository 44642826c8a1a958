import shutil

import pytest
import torch

from checkpoint_helpers import rewrite_weights
from glade.cli import main
from glade.inspection import (
    attention_maps,
    generation_steps,
    load_glade,
    logit_lens,
    next_token_distribution,
    strongest_links,
)


def _run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def _fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_next_prints_the_table_and_saves_the_chart(checkpoint_dir, model, tokenizer, tmp_path, capsys, assert_png):
    out = _run(capsys, "inspect", "next", "Harry Potter was", "--top-k", "3", "--temperature", "0.7",
               "--model", str(checkpoint_dir), "--out", str(tmp_path / "pictures" / "next.png"))
    expected = next_token_distribution(model, tokenizer, "Harry Potter was", top_k=3, temperature=0.7)
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [int(row[2]) for row in rows] == [c.token_id for c in expected.candidates]
    assert [row[3] for row in rows] == [f"{c.probability:.4f}" for c in expected.candidates]
    assert_png(tmp_path / "pictures" / "next.png")


@pytest.mark.slow
def test_steps_attention_and_lens_from_the_command_line(
    checkpoint_dir, model, tokenizer, tmp_path, capsys, assert_png
):
    checkpoint = str(checkpoint_dir)
    out = _run(capsys, "inspect", "steps", "Once", "--max-new-tokens", "3", "--model", checkpoint,
               "--out", str(tmp_path / "steps.png"))
    rows = [line.split() for line in out.splitlines()[1:4]]
    expected_steps = generation_steps(model, tokenizer, "Once", max_new_tokens=3)
    assert [row[:3] for row in rows] == [
        [str(index), step.chosen.token, f"{step.chosen.probability:.4f}"]
        for index, step in enumerate(expected_steps, start=1)
    ]
    assert_png(tmp_path / "steps.png")

    out = _run(capsys, "inspect", "attention", "a blue cat", "--layer", "1", "--head", "3", "--links", "4",
               "--model", checkpoint, "--out", str(tmp_path / "attention.png"))
    assert "tokens: a | ␣ | b | l | u | e | ␣ | c | a | t" in out
    links = [line.split() for line in out.splitlines() if line[:1] == "3"]
    expected_links = strongest_links(attention_maps(model, tokenizer, "a blue cat", layer=1, head=3), top_n=4)
    assert [row[-1] for row in links] == [f"{link.weight:.3f}" for link in expected_links]
    assert_png(tmp_path / "attention.png")

    out = _run(capsys, "inspect", "lens", "Hi", "--model", checkpoint, "--out", str(tmp_path / "lens.png"))
    rows = [line.split() for line in out.splitlines()[3:6]]
    assert [row[0] for row in rows] == ["layer", "layer", "embeddings"]  # the output layer on top
    assert rows[0][2::2] == [p.token for p in logit_lens(model, tokenizer, "Hi").predictions[-1]]
    assert_png(tmp_path / "lens.png")


def test_tiny_random_loads_by_name_with_eager_attention():
    model, tokenizer = load_glade("tiny-random")
    assert model.config._attn_implementation == "eager" and not model.training
    assert tokenizer.decode(tokenizer.encode("hi")) == "hi"


def test_bad_input_exits_with_a_message(checkpoint_dir, bert_dir, tmp_path, capsys):
    model = str(checkpoint_dir)
    assert "the prompt is empty" in _fails(capsys, "inspect", "next", "", "--model", model)
    assert "layer 7 is out of range: this model has 2 layers, numbered 0..1" in _fails(
        capsys, "inspect", "attention", "ab", "--layer", "7", "--model", model
    )
    assert "head 4 is out of range: this model has 4 heads, numbered 0..3" in _fails(
        capsys, "inspect", "attention", "ab", "--layer", "0", "--head", "4", "--model", model
    )
    assert "'king' is not a single token" in _fails(capsys, "inspect", "neighbors", "king", "--model", model)
    assert "is not a glade config" in _fails(capsys, "inspect", "lens", "ab", "--model", str(bert_dir))
    assert f"model directory {tmp_path / 'nope'} does not exist" in _fails(
        capsys, "inspect", "lens", "ab", "--model", str(tmp_path / "nope")
    )


def test_a_checkpoint_with_an_extra_tensor_is_refused(checkpoint_dir, tmp_path, capsys):
    damaged = shutil.copytree(checkpoint_dir, tmp_path / "damaged")
    rewrite_weights(damaged, lambda tensors: tensors.update({"transformer.h.9.attn.c_attn.weight": torch.zeros(2)}))
    assert "does not match its config: unexpected transformer.h.9.attn.c_attn.weight" in _fails(
        capsys, "inspect", "lens", "ab", "--model", str(damaged)
    )
