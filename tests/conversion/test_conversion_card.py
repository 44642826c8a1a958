"""Every folder a conversion or export writes carries a full model card, written by the one card writer
(glade.training.model_card), with the parity report as one of its sections when the conversion was checked; and
`glade push` uploads that card."""

import json

import huggingface_hub.constants
import pytest
from huggingface_hub import ModelCard
from hub_server import LocalHub

from export_helpers import saved_random_glade
from glade.cli import main
from glade.conversion import convert_nanogpt, export_gpt2, export_stock
from glade.training.hub import push_folder
from glade.training.model_card import write_model_card

LLAMA = dict(positions="rotary", norm="rmsnorm", activation_function="swiglu", bias=False, n_kv_head=2)
LAST_EVAL = {"step": 40, "val_loss": 5.25, "val_ppl": 190.5662, "val_bpb": 7.5742}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the Hub here is local, on 127.0.0.1
    with LocalHub(tmp_path / "hub") as server:
        yield server


def parity_section(text: str) -> str:
    return text[text.index("## Conversion parity") : text.index("## Limitations")]


def test_a_checked_conversion_writes_a_full_card_with_its_parity_section_and_push_uploads_it(tmp_path, gpt2_dir, hub):
    assert main(["convert", "gpt2", str(gpt2_dir), str(tmp_path / "glade-gpt2"), "--check"]) == 0
    readme = tmp_path / "glade-gpt2" / "README.md"

    card = ModelCard.load(readme)
    assert (card.data.library_name, card.data.pipeline_tag, card.data.license) == (
        "transformers", "text-generation", "apache-2.0"
    )
    assert {"glade", "custom_code", "text-generation"} <= set(card.data.tags)
    assert card.data.model_name == "glade-gpt2"  # the destination's name, not the staging folder's
    text = card.text
    assert "import glade" in text and 'AutoModelForCausalLM.from_pretrained("glade-gpt2")' in text
    assert 'AutoModelForCausalLM.from_pretrained("glade-gpt2", trust_remote_code=True)' in text
    assert f"It was converted from `{gpt2_dir}`" in text and "| Layers / heads / width | 2 / 4 / 64 |" in text
    section = parity_section(text)
    assert f"`{gpt2_dir}` and this conversion (`{tmp_path / 'glade-gpt2'}`)" in section
    assert "- first block that drifts: none" in section and "- result: PASS" in section

    push_folder(tmp_path / "glade-gpt2", "org/glade-gpt2", token=hub.token, endpoint=hub.url)
    assert hub.files("org/glade-gpt2")["README.md"] == readme.read_bytes()


def test_an_export_card_loads_the_stock_class_and_keeps_what_still_holds_of_the_source_card(tmp_path):
    saved_random_glade(tmp_path / "glade", **LLAMA)
    (tmp_path / "glade" / "metrics.jsonl").write_text(json.dumps(LAST_EVAL) + "\n")
    write_model_card(tmp_path / "glade", dataset_names=["roneneldan/TinyStories"], license="mit", language="en")
    conversion = export_stock(tmp_path / "glade", tmp_path / "glade-llama", check=True)
    assert conversion.parity.passed

    card = ModelCard.load(tmp_path / "glade-llama" / "README.md")
    assert (card.data.license, card.data.language, card.data.datasets) == ("mit", "en", ["roneneldan/TinyStories"])
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["loss"] == LAST_EVAL["val_loss"]
    assert set(card.data.tags) == {"glade", "llama", "text-generation"}  # no custom_code: none ships
    text = card.text
    assert "`LlamaForCausalLM`" in text and 'AutoModelForCausalLM.from_pretrained("glade-llama")' in text
    assert "trust_remote_code" not in text and "import glade" not in text
    assert "- result: PASS" in parity_section(text)


def test_an_unchecked_export_has_a_card_without_parity_and_push_writes_a_stock_card_where_none_is(tmp_path, hub):
    saved_random_glade(tmp_path / "glade")
    export_gpt2(tmp_path / "glade", tmp_path / "glade-gpt2")
    text = ModelCard.load(tmp_path / "glade-gpt2" / "README.md").text
    assert "`GPT2LMHeadModel`" in text and "## Conversion parity" not in text
    assert not (tmp_path / "glade-gpt2" / "parity_report.json").exists()

    (tmp_path / "glade-gpt2" / "README.md").unlink()
    push_folder(tmp_path / "glade-gpt2", "org/gpt2-again", token=hub.token, endpoint=hub.url)
    card = ModelCard(hub.files("org/gpt2-again")["README.md"].decode())
    assert "custom_code" not in card.data.tags
    assert 'AutoModelForCausalLM.from_pretrained("org/gpt2-again")' in card.text
    assert "trust_remote_code" not in card.text


def test_a_nanogpt_conversion_has_a_card_naming_the_checkpoint(tmp_path, nanogpt):
    path, _, _ = nanogpt(tmp_path / "ckpt.pt")
    convert_nanogpt(path, tmp_path / "glade")
    card = ModelCard.load(tmp_path / "glade" / "README.md")
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert f"It was converted from `{path}`" in card.text
