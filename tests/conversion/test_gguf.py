"""`glade export gguf`: every tensor and the metadata llama.cpp reads, read back with gguf's own reader."""

import importlib.util
import json
import shutil
from importlib.resources import files
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from glade.atomic import NoSpaceLeftError
from glade.cli import main
from glade.conversion import export_gpt2
from glade.conversion.gguf import export_gguf
from glade.tiny import byte_level_tokenizer, tiny_model
from export_helpers import assert_llama_cpp_continues_like_transformers, saved_random_glade

# llama.cpp's gpt2 names, written out here rather than taken from gguf's map, which the exporter uses.
GGUF_NAMES = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
              "lm_head": "output"}
GGUF_BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
SHIPPED = Path(str(files("glade.model_cards") / "glade-gutenberg-7m"))
# A Glade that llama.cpp's llama architecture computes: rotary positions, RMSNorm, SwiGLU, grouped-query attention.
LLAMA_OPTIONS = dict(positions="rotary", norm="rmsnorm", activation_function="swiglu", n_kv_head=2, bias=False)
NANOCHAT_OPTIONS = dict(positions="rotary", norm="rmsnorm", norm_gain=False, embedding_norm=True, qk_norm=True,
                        activation_function="relu2", bias=False, tie_word_embeddings=False)
# Exports llama.cpp runs beside the plain ones: options of the llama-like Glade.
LLAMA_CPP_VARIANTS = {
    "llama": {},
    "llama-with-biases": {"bias": True},
    "qwen3": {"qk_norm": True},
    "llama-linear-rope": {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    "nemotron-relu2": {"norm": "layernorm", "activation_function": "relu2", "n_kv_head": None, "bias": True,
                       "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "gptneox-partial-rotary": {"norm": "layernorm", "activation_function": "gelu_new", "n_kv_head": None,
                               "bias": True, "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
}
F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0


def gguf_name(key: str) -> str:
    module, suffix = key.rsplit(".", 1)
    if module.startswith("transformer.h."):
        block, inner = module.removeprefix("transformer.h.").split(".", 1)
        return f"blk.{block}.{GGUF_BLOCK_NAMES[inner]}.{suffix}"
    return f"{GGUF_NAMES[module]}.{suffix}"


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[gguf.GGMLQuantizationType, torch.Tensor]]]:
    """The metadata, and each tensor's type and values (dequantized, in torch's [out, in] order)."""
    reader = gguf.GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for tensor in reader.tensors:
        values = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        tensors[tensor.name] = (tensor.tensor_type, torch.from_numpy(values.reshape(tensor.shape.tolist()[::-1])))
    return metadata, tensors


def llama_like_glade(directory: Path, gpt2_tokenizer_dir: Path, **overrides) -> Path:
    """A saved llama-shaped Glade with every tensor random and GPT-2's tokenizer (llama.cpp needs BPE merges)."""
    saved_random_glade(directory, **{**LLAMA_OPTIONS, "vocab_size": 50304, "bos_token_id": 50256,
                                     "eos_token_id": 50256, **overrides})
    for path in gpt2_tokenizer_dir.iterdir():
        shutil.copyfile(path, directory / path.name)
    return directory


def merges_txt(directory: Path) -> list[str]:
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#version")]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tied", [("f32", True), ("f16", False), ("q8_0", True), ("q8_0", False)])
def test_every_tensor_and_the_metadata_round_trip(tmp_path, make_glade, gpt2_tokenizer_dir, dtype, tied):
    source = make_glade(tie_word_embeddings=tied)
    assert export_gguf(source, tmp_path / "model.gguf", dtype=dtype) == tmp_path / "model.gguf"
    metadata, tensors = read_gguf(tmp_path / "model.gguf")

    expected = {gguf_name(key): tensor for key, tensor in load_file(source / "model.safetensors").items()}
    assert tensors.keys() == expected.keys()
    assert ("output.weight" in tensors) == (not tied)  # tied: llama.cpp reads token_embd as the output matrix
    matrix_type = {"f32": F32, "f16": F16, "q8_0": Q8_0}[dtype]
    for name, tensor in expected.items():
        qtype, values = tensors[name]
        assert qtype == (F32 if tensor.dim() == 1 or name == "position_embd.weight" else matrix_type), name
        if qtype == F32:
            assert torch.equal(values, tensor), name
        elif qtype == F16:
            assert torch.equal(values, tensor.half().float()), name
        else:  # each block of 32 shares one scale, max |x| / 127: no value moves by more than a step
            torch.testing.assert_close(values, tensor, rtol=0, atol=tensor.abs().max().item() / 127, msg=name)

    assert metadata["general.architecture"] == "gpt2" and metadata["general.name"] == "glade"
    assert metadata["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    hparams = ("context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count")
    assert [metadata[f"gpt2.{key}"] for key in hparams] == [64, 64, 256, 2, 4]
    assert metadata["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)

    vocab = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir).get_vocab()
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "gpt-2"
    padding = [f"[PAD{i}]" for i in range(50257, 50304)]
    assert metadata["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) + padding
    normal, control, unused = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED
    assert metadata["tokenizer.ggml.token_type"] == [normal] * 50256 + [control] + [unused] * 47
    assert metadata["tokenizer.ggml.merges"] == merges_txt(gpt2_tokenizer_dir)
    special = {key: metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown", "padding")}
    assert special == {"bos": 50256, "eos": 50256, "unknown": 50256, "padding": None}
    assert metadata["tokenizer.ggml.add_bos_token"] is False and metadata["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.slow
def test_q8_0_writes_rows_that_are_not_whole_blocks_in_f16(tmp_path, make_glade):
    source = make_glade(n_embd=48, n_head=4)  # rows of 48 values: one and a half blocks of 32
    export_gguf(source, tmp_path / "model.gguf", dtype="q8_0")
    _, tensors = read_gguf(tmp_path / "model.gguf")
    for key, tensor in load_file(source / "model.safetensors").items():
        qtype, values = tensors[gguf_name(key)]
        if tensor.dim() == 2 and key != "transformer.wpe.weight":
            assert qtype == (Q8_0 if tensor.shape[1] % 32 == 0 else F16), key
        if qtype == F16:
            assert torch.equal(values, tensor.half().float()), key


@pytest.mark.slow
def test_a_gpt2_checkpoint_and_its_glade_conversion_give_the_same_file(tmp_path, make_glade):
    glade = make_glade(tie_word_embeddings=False)
    gpt2 = tmp_path / "gpt2"
    export_gpt2(glade, gpt2)
    metadata, tensors = read_gguf(export_gguf(gpt2, tmp_path / "gpt2.gguf"))
    glade_metadata, glade_tensors = read_gguf(export_gguf(glade, tmp_path / "glade.gguf"))
    assert tensors.keys() == glade_tensors.keys()
    assert all(torch.equal(tensors[name][1], values) for name, (_, values) in glade_tensors.items())
    assert {**metadata, "general.name": "glade"} == glade_metadata
    # GPT-2 stores its projections transposed (Conv1D); GGUF wants them as nn.Linear (and Glade) has them.
    qkv = load_file(gpt2 / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(tensors["blk.0.attn_qkv.weight"][1], qkv.t())


@pytest.mark.slow
def test_transformers_gguf_reader_gets_the_same_model_and_tokenizer(tmp_path, make_glade):
    # An independent reader: transformers builds a GPT2LMHeadModel and a tokenizer from the file alone. It reads the
    # context length into n_ctx and leaves n_positions at GPT-2's 1024, hence a model of that length.
    source = make_glade(n_positions=1024)
    export_gguf(source, tmp_path / "model.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    glade = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.tensor([[15496, 995, 11, 50256, 3, 1000, 50303]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, glade(ids).logits, rtol=0, atol=1e-5)
    texts = ["Hello world", "  two spaces, tabs\tand\nnewlines", "caf\u00e9 \u2014 \u65e5\u672c"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert tokenizer(texts).input_ids == AutoTokenizer.from_pretrained(source)(texts).input_ids


@pytest.mark.parametrize(
    "pre_tokenizer, shown",
    [
        (dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False), "'use_regex': False"),
        (dict(type="Metaspace", replacement="▁", prepend_scheme="always", split=True), "'type': 'Metaspace'"),
        (None, "pre_tokenizer={}"),
    ],
)
def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path, pre_tokenizer, shown):
    tiny_model().save_pretrained(tmp_path / "glade")
    byte_level_tokenizer().save_pretrained(tmp_path / "glade")  # loads its tokenizer.json as written
    spec = json.loads((tmp_path / "glade" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = pre_tokenizer
    (tmp_path / "glade" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='gpt-2'") as error:
        export_gguf(tmp_path / "glade", tmp_path / "model.gguf")
    assert shown in str(error.value)
    assert [path.name for path in tmp_path.iterdir()] == ["glade"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(positions="rotary", n_kv_head=2), "n_kv_head=2"),
        (dict(positions="rotary", activation_function="gelu"), "activation_function='gelu'"),
        ({**LLAMA_OPTIONS, "qk_norm": True, "bias": True}, "bias=True"),
        ({**LLAMA_OPTIONS, "logit_softcap": 30.0}, "logit_softcap=30.0"),
        (dict(norm="rmsnorm", qk_norm=True), "norm='rmsnorm', qk_norm=True"),
        (dict(activation_function="gelu"), "activation_function='gelu'"),
        (dict(bias=False), "bias=False"),
        ({**LLAMA_OPTIONS, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn'"),
        (dict(positions="rotary", rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
        ({**LLAMA_OPTIONS, "rope_parameters": {"partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
        ({**NANOCHAT_OPTIONS, "logit_softcap": 15.0}, "embedding_norm=True, qk_norm=True, activation_function='relu2', "
                                                      "logit_softcap=15.0, which no llama.cpp architecture computes"),
    ],
)
def test_a_config_llama_cpp_does_not_compute_is_refused_by_name(tmp_path, overrides, message):
    tiny_model(**overrides).save_pretrained(tmp_path / "glade")
    byte_level_tokenizer().save_pretrained(tmp_path / "glade")
    with pytest.raises(ValueError, match="gpt2|llama|gptneox") as error:
        export_gguf(tmp_path / "glade", tmp_path / "model.gguf")
    assert message in str(error.value)
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.slow
def test_a_failure_while_writing_leaves_no_file_and_an_old_one_untouched(tmp_path, make_glade, monkeypatch):
    source = make_glade()
    (tmp_path / "model.gguf").write_bytes(b"old")

    def write_half_then_fail(writer, **kwargs):
        writer.fout[0].write(b"\0" * 1000)
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write_half_then_fail)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gguf(source, tmp_path / "model.gguf")
    with pytest.raises(NoSpaceLeftError, match="model.gguf: no space left on device"):
        export_gguf(source, tmp_path / "model.gguf", overwrite=True)
    with pytest.raises(NoSpaceLeftError, match="new.gguf: no space left on device"):
        export_gguf(source, tmp_path / "new.gguf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["glade", "model.gguf"]
    assert (tmp_path / "model.gguf").read_bytes() == b"old"


@pytest.mark.slow
def test_command_line(tmp_path, make_glade, capsys):
    source = make_glade()
    assert main(["export", "gguf", str(source), str(tmp_path / "model.gguf"), "--dtype", "q8_0"]) == 0
    assert f"Wrote {tmp_path / 'model.gguf'}" in capsys.readouterr().out
    assert gguf.GGUFReader(tmp_path / "model.gguf").fields["general.file_type"].contents() == 7
    assert (tmp_path / "model.gguf").stat().st_mode & 0o777 == 0o644
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "gguf", str(source), str(tmp_path / "model.gguf")])
    assert exit_info.value.code == 2
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", dict()),
        ("llama", dict(tie_word_embeddings=False)),
        # transformers' GGUF reader leaves Qwen3's head width at its default of 128, whatever the file says
        ("qwen3", dict(qk_norm=True, n_embd=256, n_head=2, n_kv_head=1)),
    ],
)
def test_a_llama_shaped_glade_is_written_as_llama_and_read_back_by_transformers(
    tmp_path, gpt2_tokenizer_dir, arch, overrides
):
    source = llama_like_glade(tmp_path / "glade", gpt2_tokenizer_dir, **overrides)
    export_gguf(source, tmp_path / "model.gguf")
    metadata, tensors = read_gguf(tmp_path / "model.gguf")
    config = AutoModelForCausalLM.from_pretrained(source).config
    qk_norm, tied = config.qk_norm, config.tie_word_embeddings
    assert metadata["general.architecture"] == arch
    hparams = {"context_length": config.n_positions, "embedding_length": config.n_embd,
               "feed_forward_length": config.n_inner, "block_count": config.n_layer,
               "attention.head_count": config.n_head, "attention.head_count_kv": config.n_kv_head,
               "rope.dimension_count": config.n_embd // config.n_head}
    assert {key: metadata[f"{arch}.{key}"] for key in hparams} == hparams
    assert ("blk.0.attn_q_norm.weight" in tensors) == qk_norm
    assert ("output.weight" in tensors) == (not tied)
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "gpt-2"
    # An independent reader: transformers rebuilds a LlamaForCausalLM from the file alone, undoing the q/k row order
    # llama.cpp rotates in.
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    glade = AutoModelForCausalLM.from_pretrained(source).eval()
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    ids = torch.tensor([[15496, 995, 11, 50256, 3, 1000, 50303]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, glade(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_shipped_model_is_written_as_gptneox_with_its_own_tensors(tmp_path):
    # GPT-2 with rotary positions: llama.cpp's gptneox (sequential residual), q|k|v stacked as Glade keeps them.
    export_gguf(SHIPPED, tmp_path / "model.gguf")
    metadata, tensors = read_gguf(tmp_path / "model.gguf")
    config = AutoModelForCausalLM.from_pretrained(SHIPPED).config
    assert metadata["general.architecture"] == "gptneox" and metadata["gptneox.use_parallel_residual"] is False
    assert metadata["gptneox.rope.dimension_count"] == config.n_embd // config.n_head
    assert metadata["gptneox.rope.freq_base"] == config.rope_parameters["rope_theta"]
    weights = load_file(SHIPPED / "model.safetensors")
    assert torch.equal(tensors["blk.0.attn_qkv.weight"][1], weights["transformer.h.0.attn.c_attn.weight"])
    assert torch.equal(tensors["blk.5.ffn_down.bias"][1], weights["transformer.h.5.mlp.c_proj.bias"])
    # llama.cpp's gptneox needs an output matrix, so the tied head is written out.
    assert torch.equal(tensors["output.weight"][1], weights["transformer.wte.weight"])
    assert len(tensors) == len(weights) + 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("architecture", ["gpt2", *LLAMA_CPP_VARIANTS, "shipped-gptneox"])
def test_llama_cpp_tokenizes_and_continues_like_glade(tmp_path, make_glade, gpt2_tokenizer_dir, architecture):
    from llama_cpp import Llama

    if architecture == "gpt2":
        source = make_glade()
    elif architecture == "shipped-gptneox":
        source = SHIPPED
    else:
        source = llama_like_glade(tmp_path / "llama", gpt2_tokenizer_dir, **LLAMA_CPP_VARIANTS[architecture])
    export_gguf(source, tmp_path / "model.gguf")
    llama = Llama(str(tmp_path / "model.gguf"), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert_llama_cpp_continues_like_transformers(llama, source)
    finally:
        llama.close()
