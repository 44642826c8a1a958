import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from glade.training.metrics import read_metrics
from glade.training.model_card import inherited_card_fields, write_model_card

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"step": 200, "train_loss": 2.75, "lr": 3e-4, "tokens_seen": 409600, "tokens_per_sec": 3712.5}
EARLY_EVAL = {"step": 100, "val_loss": 3.1, "val_ppl": 22.198, "val_bpb": 1.41}
LAST_EVAL = {"step": 200, "val_loss": 2.8125, "val_ppl": 16.6525, "val_bpb": 1.2034}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def write_metrics(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def model_dir(tmp_path, model, tokenizer):
    directory = tmp_path / "glade-card-test"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_metadata_parses_back_with_the_last_eval_as_model_index(model_dir):
    write_metrics(model_dir / "metrics.jsonl", [EARLY_EVAL, TRAIN, LAST_EVAL])  # picked up by default
    readme = write_model_card(
        model_dir, dataset_names=["roneneldan/TinyStories"], base_model="org/glade-base", language="en"
    )

    assert readme == model_dir / "README.md"
    card = ModelCard.load(readme)
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0"
    assert data.datasets == ["roneneldan/TinyStories"]
    assert data.base_model == "org/glade-base"
    assert {"custom_code", "glade", "gpt2"} <= set(data.tags)
    assert data.model_name == "glade-card-test"
    results = {result.metric_type: result for result in data.eval_results}
    assert {name: result.metric_value for name, result in results.items()} == {
        "loss": LAST_EVAL["val_loss"], "perplexity": LAST_EVAL["val_ppl"], "bits_per_byte": LAST_EVAL["val_bpb"],
    }
    assert all(r.task_type == "text-generation" and r.dataset_split == "validation" for r in results.values())
    assert "at step 200" in card.text


def test_body_has_usage_training_setup_and_samples(model_dir, model, tmp_path):
    metrics = write_metrics(tmp_path / "run.jsonl", [TRAIN, LAST_EVAL])
    (tmp_path / "curve.png").write_bytes(PNG)
    generated = "Once upon a time ```the end``` and more"  # a triple backtick must not close the fence
    write_model_card(
        model_dir, metrics, repo_id="org/glade-demo",
        training_args={"learning_rate": 3e-4, "batch_size": 8, "betas": (0.9, 0.95), "schedule": "cosine|warmup"},
        sample_generations=[("Once upon", {"temperature": 0.8, "top_k": 50}, generated), ("The", "greedy", "The cat")],
        loss_curve_png=tmp_path / "curve.png",
        parity_report={"max |logits - GPT2LMHeadModel|": 2.5e-7},
    )

    card = ModelCard.load(model_dir / "README.md")
    assert card.data.model_name == "glade-demo"  # named after the Hub repo, not the local folder
    text = card.text
    assert 'import glade' in text and 'AutoModelForCausalLM.from_pretrained("org/glade-demo")' in text
    assert 'AutoModelForCausalLM.from_pretrained("org/glade-demo", trust_remote_code=True)' in text
    assert 'AutoTokenizer.from_pretrained("org/glade-demo", trust_remote_code=True)' in text
    n_params = sum(p.numel() for p in model.parameters())
    assert f"({n_params:,})" in text
    assert "| Layers / heads / width | 2 / 4 / 64 |" in text
    assert "after 409,600 tokens, at a training loss of 2.7500 (3,712 tokens/s)" in text
    assert "| learning_rate | 0.0003 |" in text and "| betas | 0.9, 0.95 |" in text
    assert "| schedule | cosine\\|warmup |" in text  # an unescaped pipe would split the table cell
    assert "| Bits per byte | 1.2034 |" in text and "| Perplexity | 16.65 |" in text
    assert "| max \\|logits - GPT2LMHeadModel\\| | 2.5e-07 |" in text
    assert f"**Prompt:** `Once upon` (temperature=0.8, top_k=50)\n\n````text\n{generated}\n````" in text
    assert "**Prompt:** `The` (greedy)\n\n```text\nThe cat\n```" in text
    assert "![Training and validation loss](loss_curve.png)" in text
    assert (model_dir / "loss_curve.png").read_bytes() == PNG
    assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_without_metrics_log_the_card_has_no_results(model_dir):
    card = ModelCard.load(write_model_card(model_dir))
    assert card.data.eval_results is None and "model-index" not in card.content
    assert card.data.base_model is None and card.data.datasets is None
    assert "No evaluation results were logged" in card.text
    assert "custom_code" in card.data.tags


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"step": 1, "train_loss": 3.0}', "", '{"step": 2, "train_loss":'], r"line 3: not valid JSON"),
        (['{"step": 1, "train_loss": 3.0}', "[1, 2]"], r"line 2: expected a JSON object, got list"),
        (['{"step": 5, "val_loss": "nan?"}'], r"line 1: 'val_loss' must be a number, got 'nan\?'"),
        (['{"step": true, "train_loss": 3.0}'], r"line 1: 'step' must be a number, got True"),
    ],
)
def test_malformed_metrics_line_is_named(model_dir, tmp_path, lines, message):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        write_model_card(model_dir, metrics)
    assert not (model_dir / "README.md").exists()


def test_read_metrics_keeps_order_and_skips_blank_lines(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", [TRAIN, LAST_EVAL])
    path.write_text(path.read_text() + "\n\n")
    assert read_metrics(path) == [TRAIN, LAST_EVAL]


def test_bad_inputs_are_clear_errors(model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        write_model_card(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        write_model_card(model_dir, tmp_path / "missing.jsonl")
    (tmp_path / "curve.jpg").write_bytes(b"\xff\xd8\xff\xe0 jpeg")
    with pytest.raises(ValueError, match="curve.jpg is not a PNG"):
        write_model_card(model_dir, loss_curve_png=tmp_path / "curve.jpg")


@pytest.mark.slow
def test_a_card_is_written_from_what_a_wheel_installs(tmp_path):
    # An editable install reads the template straight from model_cards/, so a card written here proves nothing about a
    # wheel. setuptools' build_py lays out what a wheel installs (the packages and package data pyproject.toml
    # declares); a fresh interpreter then writes a card with glade imported from that tree alone.
    pytest.importorskip("setuptools")
    build = tmp_path / "purelib"
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info", "--egg-base", str(tmp_path),
         "build_py", "--build-lib", str(build)],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=300,
    )
    from glade.tiny import tiny_model

    tiny_model().save_pretrained(tmp_path / "glade-from-a-wheel")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from glade.training.model_card import TEMPLATE, write_model_card;"
        "assert str(TEMPLATE).startswith(sys.argv[1]), TEMPLATE;"
        "print(write_model_card(sys.argv[2]).read_text())"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code, str(build), str(tmp_path / "glade-from-a-wheel")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "# glade-from-a-wheel" in result.stdout and "trust_remote_code=True" in result.stdout


def test_details_and_model_specific_limitations_are_rendered(tmp_path):
    from glade.tiny import tiny_model

    tiny_model().save_pretrained(tmp_path)
    readme = write_model_card(
        tmp_path, details="## Data\n\nPublic-domain books.", limitations=["Victorian spelling and attitudes."]
    )
    text = readme.read_text()
    assert "## Data\n\nPublic-domain books." in text
    assert text.index("- Victorian spelling and attitudes.") < text.index("- This is a small research model")


def test_a_converted_folder_inherits_its_sources_log_and_card_metadata(model_dir, caplog):
    write_metrics(model_dir / "metrics.jsonl", [LAST_EVAL])
    write_model_card(model_dir, dataset_names=["roneneldan/TinyStories"], license="mit", language=["en", "fr"])
    assert inherited_card_fields(model_dir) == {
        "metrics_path": model_dir / "metrics.jsonl", "license": "mit", "language": ["en", "fr"],
        "dataset_names": ["roneneldan/TinyStories"],
    }
    (model_dir / "README.md").write_text("---\ndatasets: roneneldan/TinyStories\n---\n# One dataset, no list\n")
    assert inherited_card_fields(model_dir)["dataset_names"] == ["roneneldan/TinyStories"]
    (model_dir / "README.md").write_text("# A hand-written card, no YAML header\n")
    assert inherited_card_fields(model_dir) == {"metrics_path": model_dir / "metrics.jsonl"}
    (model_dir / "README.md").write_text("---\nlicense: [mit\n---\n# broken header\n")
    assert inherited_card_fields(model_dir) == {"metrics_path": model_dir / "metrics.jsonl"}
    assert "ignoring its unreadable YAML header" in caplog.text
    assert inherited_card_fields(None) == {}


def test_a_stock_transformers_folder_gets_a_card_that_loads_it_without_glade(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=257))
    model.save_pretrained(tmp_path / "gpt2-demo")
    card = ModelCard.load(write_model_card(tmp_path / "gpt2-demo", repo_id="org/gpt2-demo"))
    assert set(card.data.tags) == {"glade", "gpt2", "text-generation"}
    assert f"({sum(p.numel() for p in model.parameters()):,})" in card.text
    assert "| Layers / heads / width | 2 / 4 / 64 |" in card.text and "| Context length | 128 tokens |" in card.text
    assert "`GPT2LMHeadModel`" in card.text and 'AutoModelForCausalLM.from_pretrained("org/gpt2-demo")' in card.text
    assert "trust_remote_code" not in card.text and "import glade" not in card.text
