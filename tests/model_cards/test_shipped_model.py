"""The pretrained checkpoint that ships in model_cards/: loadable both ways, documented, and the default model."""

import importlib.util
import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

import glade
from glade.loading import default_model
from glade.cli import main
from glade.training.metrics import read_metrics
from subprocess_helpers import last_json_line, run_without_glade

SHIPPED = Path(str(files("glade.model_cards") / "glade-gutenberg-7m"))
REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "tinyshakespeare_150k.txt"
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


@pytest.mark.slow
def test_greedy_generation_is_deterministic_english_tokens(model):
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    ids = tokenizer("It was a dark and stormy night", return_tensors="pt").input_ids
    first = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(first, model.generate(ids, max_new_tokens=12, do_sample=False))
    continuation = tokenizer.decode(first[0, ids.shape[1]:])
    assert sum(c.isalpha() for c in continuation) > len(continuation) / 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_remote_code_samples_on_the_fast_route_as_transformers_does(model, tmp_path):
    ids = [[464, 1092, 373, 257, 2042]]
    seed = torch.Generator().manual_seed(0)
    expected = model.generate(torch.tensor(ids), max_new_tokens=12, fast_decoding="off", generator=seed)
    stdout = run_without_glade(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(SHIPPED)!r}, trust_remote_code=True)
        tokens = model.generate(torch.tensor({ids}), max_new_tokens=12, generator=torch.Generator().manual_seed(0))
        route = next(module for name, module in sys.modules.items() if name.endswith(".fast_generate"))
        print(json.dumps({{"tokens": tokens.tolist(), "models on the fast route": len(route._pools)}}))
        """,
        cwd=str(tmp_path),
    )
    assert last_json_line(stdout) == {"tokens": expected.tolist(), "models on the fast route": 1}


@pytest.mark.slow
def test_remote_code_takes_a_lora_with_peft_defaults(tmp_path):
    stdout = run_without_glade(
        f"""
        import json
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(SHIPPED)!r}, trust_remote_code=True)
        lora = get_peft_model(model, LoraConfig(r=2))
        print(json.dumps(sorted({{name.rsplit(".", 1)[-1] for name, module in lora.named_modules()
                                  if hasattr(module, "lora_A")}})))
        """,
        cwd=str(tmp_path),
    )
    assert last_json_line(stdout) == ["c_attn", "c_fc", "c_proj"]


@pytest.mark.slow
def test_continued_pretraining_starts_from_the_shipped_model(tmp_path):
    # The user's command, in a process of its own: strict loading must hold under the installed transformers' load
    # defaults (5.25 kernelizes every load, and the strictness check builds the model on the meta device).
    output = tmp_path / "run"
    command = [
        sys.executable, "-m", "glade.cli", "pretrain", "--init-from", str(SHIPPED), "--tokenizer", str(SHIPPED),
        "--data", str(FIXTURE), "--output-dir", str(output), "--cache-dir", str(tmp_path / "cache"), "--max-steps", "2",
        "--batch-size", "2", "--block-size", "32", "--eval-every", "0", "--eval-batches", "1", "--save-every", "0",
        "--lr", "1e-12", "--weight-decay", "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "glade pretrain: 1 process(es)" in result.stdout
    # A vanishing learning rate: the export holds the shipped weights (Adam moves each by about lr per step).
    continued = AutoModelForCausalLM.from_pretrained(output / "final").state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(SHIPPED).state_dict().items():
        torch.testing.assert_close(continued[name], tensor, rtol=0, atol=1e-9, msg=name)


def test_card_metadata_parses_and_matches_the_training_log():
    card = ModelCard.load(SHIPPED / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert "custom_code" in card.data.tags
    last_eval = [r for r in read_metrics(SHIPPED / "metrics.jsonl") if "val_loss" in r][-1]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_split == "validation"}
    assert results == {"loss": last_eval["val_loss"], "perplexity": last_eval["val_ppl"], "bits_per_byte": last_eval["val_bpb"]}
    assert f"{last_eval['val_bpb']:.4f}" in card.text
    generation = json.loads((SHIPPED / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["eos_token_id"] == 0


@pytest.mark.slow
def test_readme_main_command_prints_a_continuation(capsys):
    assert main(["generate", "It was a dark and stormy night", "--max-new-tokens", "20", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("It was a dark and stormy night") and len(out) > len("It was a dark and stormy night") + 20


def load_make_card():
    """The folder's make_card.py, which holds the card's arithmetic (the folder name is not a module name)."""
    spec = importlib.util.spec_from_file_location("make_card", SHIPPED / "make_card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generation_config_holds_sampling_defaults_only():
    generation = json.loads((SHIPPED / "generation_config.json").read_text())
    assert generation["do_sample"] is True and 0 < generation["temperature"] <= 1 and generation["top_k"] > 0
    # A max_new_tokens here would override a caller's max_length; a penalty would change what "greedy" means.
    assert not {"max_new_tokens", "max_length", "repetition_penalty"} & set(generation)


def test_card_training_table_matches_the_training_and_baseline_logs():
    make_card = load_make_card()
    text = ModelCard.load(SHIPPED / "README.md").text
    last_eval = [r for r in read_metrics(SHIPPED / "metrics.jsonl") if "val_loss" in r][-1]
    glade_speed, baseline_speed, baseline_tokens, estimate = make_card.same_wall_clock_baseline(SHIPPED)
    ours = next(line for line in text.splitlines() if line.startswith("| this model"))
    assert f"{last_eval['tokens_seen']:,} tokens" in ours and f"**{last_eval['val_bpb']:.4f}**" in ours
    baseline = next(line for line in text.splitlines() if line.startswith("| GPT2LMHeadModel + AdamW"))
    assert baseline.endswith(f"| {estimate:.4f} |") and last_eval["val_bpb"] < estimate
    assert f"({baseline_speed:,.0f} tokens/s)" in text and f"{baseline_tokens:,.0f} tokens" in text
    assert f"median {glade_speed:,.0f}" in text
    replaced = next(line for line in text.splitlines() if line.startswith("| the model it replaces"))
    assert last_eval["val_bpb"] < make_card.ADAMW_RUNS[-1][1] and replaced.endswith(f"| {make_card.ADAMW_RUNS[-1][1]:.4f} |")
    assert "](loss_curve.png)" in text and (SHIPPED / "loss_curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_baseline_estimate_is_the_power_law_through_the_earlier_runs():
    make_card = load_make_card()
    for tokens, bits in make_card.ADAMW_RUNS:
        assert make_card.adamw_estimate(tokens) == pytest.approx(bits, rel=1e-12)
    assert make_card.adamw_estimate(4e7) < make_card.adamw_estimate(2e7) < make_card.ADAMW_RUNS[-1][1]


def test_lm_eval_result_is_in_the_model_index():
    make_card = load_make_card()
    bits = make_card.lm_eval_bits_per_byte(SHIPPED / make_card.LM_EVAL_RESULTS)
    card = ModelCard.load(SHIPPED / "README.md")
    lm_eval = [r for r in card.data.eval_results if r.source_name == "lm-evaluation-harness"]
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in lm_eval] == [
        ("gutenberg_heldout", "bits_per_byte", bits)
    ]
    assert f"**{bits:.4f}**" in card.text


def test_lm_eval_task_covers_the_held_out_books():
    task = (REPO / "benchmarks" / "lm_eval" / "gutenberg_heldout.yaml").read_text()
    assert "output_type: loglikelihood_rolling" in task and "bits_per_byte" in task
    docs = [json.loads(line) for line in (REPO / "benchmarks" / "lm_eval" / "gutenberg_heldout.jsonl").open()]
    assert [d["title"] for d in docs] == ["The Legend of Sleepy Hollow", "The Time Machine"]
    assert all(d["text"].startswith(d["title"]) and len(d["text"]) > 50_000 for d in docs)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-evaluation-harness is an optional extra")
def test_lm_eval_reproduces_the_cards_number(tmp_path):
    make_card = load_make_card()
    out = tmp_path / "lm-eval"
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={SHIPPED},trust_remote_code=True",
         "--include_path", "benchmarks/lm_eval", "--tasks", "gutenberg_heldout", "--batch_size", "8",
         "--output_path", str(out)],
        cwd=REPO, check=True,
    )
    (results,) = out.rglob("results_*.json")
    expected = make_card.lm_eval_bits_per_byte(SHIPPED / make_card.LM_EVAL_RESULTS)
    assert make_card.lm_eval_bits_per_byte(results) == pytest.approx(expected, abs=1e-4)
