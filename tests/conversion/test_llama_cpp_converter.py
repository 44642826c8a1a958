"""`glade export stock --untie-head`, and llama.cpp's own convert_hf_to_gguf.py run on its folder as
docs/exporting.md says (the converter is named by GLADE_LLAMA_CPP_CONVERTER; nothing is downloaded)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from export_helpers import assert_llama_cpp_continues_like_transformers, saved_random_glade
from glade.cli import main
from glade.conversion import export_stock
from glade.conversion.stock import load_glade_as_stock

SHIPPED = Path(str(files("glade.model_cards") / "glade-gutenberg-7m"))
DOCS = Path(__file__).resolve().parents[2] / "docs" / "exporting.md"
# llama.cpp's convert_hf_to_gguf.py, beside its `conversion` package and `gguf-py` (docs/exporting.md says where to
# find one).
CONVERTER = os.environ.get("GLADE_LLAMA_CPP_CONVERTER", "")
ROTARY = dict(positions="rotary", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LLAMA = dict(ROTARY, norm="rmsnorm", activation_function="swiglu", bias=False, n_kv_head=2)
# The stock class's name of its own head, as save_pretrained writes it.
HEADS = {
    "gpt_neox": ("embed_out.weight", "gpt_neox.embed_in.weight"),
    "llama": ("lm_head.weight", "model.embed_tokens.weight"),
}
# What llama.cpp's GPT-NeoX converter (conversion/gptneox.py) reads of config.json, with the shipped model's values.
GPT_NEOX_FIELDS = {"max_position_embeddings": 256, "hidden_size": 256, "num_hidden_layers": 6,
                   "intermediate_size": 1024, "num_attention_heads": 4, "rotary_pct": 1.0, "rotary_emb_base": 10000.0,
                   "use_parallel_residual": False, "layer_norm_eps": 1e-05}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family,options", [("gpt_neox", ROTARY), ("llama", LLAMA)])
def test_untie_head_gives_the_stock_model_its_own_head_and_glades_logits(tmp_path, family, options):
    glade = saved_random_glade(tmp_path / "glade", **options)
    stock = load_glade_as_stock(tmp_path / "glade", untie_head=True)
    assert stock.config.model_type == family and stock.config.tie_word_embeddings is False
    head, embedding = stock.get_output_embeddings().weight, stock.get_input_embeddings().weight
    assert head.data_ptr() != embedding.data_ptr() and torch.equal(head, glade.transformer.wte.weight)
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, glade(IDS).logits)
    stock.save_pretrained(tmp_path / "stock")
    weights = load_file(tmp_path / "stock" / "model.safetensors")
    assert torch.equal(weights[HEADS[family][0]], weights[HEADS[family][1]])
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    if family == "gpt_neox":  # what llama.cpp's GPT-NeoX converter reads
        assert GPT_NEOX_FIELDS.keys() <= config.keys()
        rotary = (config["rotary_pct"], config["rotary_emb_base"], config["use_parallel_residual"])
        assert rotary == (1.0, 10000.0, False)


@pytest.mark.slow
@pytest.mark.parametrize("family,options", [("gpt_neox", ROTARY), ("llama", LLAMA)])
def test_untied_export_passes_the_parity_check_and_reloads_with_glades_logits(tmp_path, family, options):
    glade = saved_random_glade(tmp_path / "glade", **options)
    conversion = export_stock(tmp_path / "glade", tmp_path / "stock", untie_head=True, check=True)
    assert conversion.parity.passed, conversion.parity.format()

    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == family and config["tie_word_embeddings"] is False
    head, embedding = HEADS[family]
    weights = load_file(tmp_path / "stock" / "model.safetensors")
    assert torch.equal(weights[head], weights[embedding])
    assert torch.equal(weights[head], glade.transformer.wte.weight.detach())
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    assert stock.get_output_embeddings().weight.data_ptr() != stock.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, glade(IDS).logits)
    # The source stays as it was.
    assert json.loads((tmp_path / "glade" / "config.json").read_text())["tie_word_embeddings"] is True


def test_without_the_option_the_head_stays_tied(tmp_path):
    saved_random_glade(tmp_path / "glade", **ROTARY)
    export_stock(tmp_path / "glade", tmp_path / "stock")
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "embed_out.weight" not in load_file(tmp_path / "stock" / "model.safetensors")


@pytest.mark.slow
def test_cli_writes_the_fields_llama_cpps_gpt_neox_converter_reads(tmp_path, capsys):
    assert main(["export", "stock", str(SHIPPED), str(tmp_path / "stock"), "--untie-head"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"Wrote {tmp_path / 'stock'}")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["tie_word_embeddings"] is False
    assert {name: config[name] for name in GPT_NEOX_FIELDS} == GPT_NEOX_FIELDS
    weights = load_file(tmp_path / "stock" / "model.safetensors")
    shipped = load_file(SHIPPED / "model.safetensors")
    assert torch.equal(weights["embed_out.weight"], shipped["transformer.wte.weight"])


def documented_wrapper() -> str:
    """glade_convert_hf_to_gguf.py, as docs/exporting.md gives it."""
    match = re.search(r'```python\n("""glade_convert_hf_to_gguf\.py: .*?)```', DOCS.read_text(), re.DOTALL)
    assert match, "docs/exporting.md no longer holds glade_convert_hf_to_gguf.py"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.skipif(not Path(CONVERTER).is_file(), reason="GLADE_LLAMA_CPP_CONVERTER names no convert_hf_to_gguf.py")
def test_llama_cpps_converter_writes_a_file_llama_cpp_continues_like_transformers(tmp_path):
    from llama_cpp import Llama

    # The documented sequence: export with --untie-head, the wrapper around the converter, llama.cpp.
    assert main(["export", "stock", str(SHIPPED), str(tmp_path / "glade-stock"), "--untie-head"]) == 0
    (tmp_path / "glade_convert_hf_to_gguf.py").write_text(documented_wrapper())
    command = [sys.executable, "glade_convert_hf_to_gguf.py", CONVERTER, "glade-stock",
               "--outfile", "glade-stock.gguf", "--outtype", "f32"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    llama = Llama(str(tmp_path / "glade-stock.gguf"), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert llama.metadata["general.architecture"] == "gptneox"
        assert llama.metadata["tokenizer.ggml.pre"] == "gpt-2"
        assert_llama_cpp_continues_like_transformers(llama, tmp_path / "glade-stock")
    finally:
        llama.close()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CONVERTER).is_file(), reason="GLADE_LLAMA_CPP_CONVERTER names no convert_hf_to_gguf.py")
def test_the_wrapper_stops_a_folder_llama_cpp_would_compute_otherwise(tmp_path):
    source = tmp_path / "glade"
    saved_random_glade(source, positions="rotary", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 500.0})
    assert main(["export", "stock", str(source), str(tmp_path / "glade-stock"), "--untie-head"]) == 0
    (tmp_path / "glade_convert_hf_to_gguf.py").write_text(documented_wrapper())
    command = [sys.executable, "glade_convert_hf_to_gguf.py", CONVERTER, "glade-stock", "--outfile", "out.gguf"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and not (tmp_path / "out.gguf").exists()
    assert "llama.cpp's GPT-NeoX converter drops rope_theta=500.0, rope_type='linear'" in result.stderr
