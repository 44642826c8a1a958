"""The pretrained checkpoint that ships in model_cards/: loadable both ways, documented, and the default model."""

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

import glade
from glade.checkpoints import default_model
from glade.cli import main
from glade.training.metrics import read_metrics
from subprocess_helpers import last_json_line, run_without_glade

SHIPPED = Path(str(files("glade.model_cards") / "glade-gutenberg-7m"))
TEXT = 'It was a dark and stormy night; the rain fell in torrents.\n\n"Who is there?" cried Mr. Lorry, twice.'


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(SHIPPED).eval()


def test_it_is_the_default_model():
    assert Path(default_model()) == SHIPPED


def test_loads_as_glade_and_fits_the_size_limit(model):
    assert isinstance(model, glade.GladeForCausalLM)
    assert (SHIPPED / "model.safetensors").stat().st_size <= 60 * 2**20
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_tokenizer_round_trips_text():
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode()) / 2  # real merges, not bytes
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.model_max_length == 256


def test_greedy_generation_is_deterministic_english_tokens(model):
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    ids = tokenizer("It was a dark and stormy night", return_tensors="pt").input_ids
    first = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(first, model.generate(ids, max_new_tokens=12, do_sample=False))
    continuation = tokenizer.decode(first[0, ids.shape[1]:])
    assert sum(c.isalpha() for c in continuation) > len(continuation) / 2


def test_loads_without_glade_through_remote_code(model, tmp_path):
    ids = [[464, 1092, 373, 257, 2042]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    stdout = run_without_glade(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(SHIPPED)!r}, trust_remote_code=True)
        AutoTokenizer.from_pretrained({str(SHIPPED)!r}, trust_remote_code=True)
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({ids})).logits.tolist()))
        """,
        cwd=str(tmp_path),
    )
    assert (torch.tensor(last_json_line(stdout)) - expected).abs().max().item() == 0.0


def test_card_metadata_parses_and_matches_the_training_log():
    card = ModelCard.load(SHIPPED / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert "custom_code" in card.data.tags
    last_eval = [r for r in read_metrics(SHIPPED / "metrics.jsonl") if "val_loss" in r][-1]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"loss": last_eval["val_loss"], "perplexity": last_eval["val_ppl"], "bits_per_byte": last_eval["val_bpb"]}
    assert f"{last_eval['val_bpb']:.4f}" in card.text
    generation = json.loads((SHIPPED / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["eos_token_id"] == 0


def test_readme_main_command_prints_a_continuation(capsys):
    assert main(["generate", "It was a dark and stormy night", "--max-new-tokens", "20", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It was a dark and stormy night") and len(out) > len("It was a dark and stormy night") + 20


def test_card_baseline_comparison_matches_both_training_logs():
    text = ModelCard.load(SHIPPED / "README.md").text
    for log, name in (("metrics.jsonl", "Glade"), ("baseline_metrics.jsonl", "transformers GPT2LMHeadModel")):
        last_eval = [r for r in read_metrics(SHIPPED / log) if "val_loss" in r][-1]
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} | "))
        assert f"{last_eval['step']:,}" in row and f"{last_eval['tokens_seen']:,}" in row
        assert f"{last_eval['val_loss']:.4f}" in row and f"{last_eval['val_bpb']:.4f}" in row
    assert "](baseline_comparison.png)" in text and "](loss_curve.png)" in text
    for picture in ("baseline_comparison.png", "loss_curve.png"):
        assert (SHIPPED / picture).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
