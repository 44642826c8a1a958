"""Glade (or GPT-2) checkpoints as one GGUF file for llama.cpp and the tools built on it.

The file is written with `gguf`, the library llama.cpp publishes, and follows llama.cpp's own converter
(convert_hf_to_gguf.py): tensors named by gguf's map of Hugging Face names, 1-D tensors and position embeddings kept
in f32, a tied head left out (llama.cpp then reads the token embedding as the output matrix), and the byte-level BPE
vocabulary stored as llama.cpp's "gpt2" tokenizer.

Which llama.cpp architecture a config is written as, what its graph computes, its hyperparameters and Glade's tensors
under the Hugging Face names gguf maps come from the config's export family (families.py): learned positions are
written as llama.cpp's `gpt2`; rotary positions with RMSNorm and SwiGLU as its `llama` (`qwen3` with QK-norm), with
LayerNorm as its `gptneox`.
"""

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, GPT2Config, PreTrainedTokenizerBase

from glade import GladeConfig
from glade.atomic import atomic_file
from glade.loading import CONFIG_NAME, read_config_file, read_json

from .saving import resolve_model_folder
from .families import GGUFArchitecture, family_for
from .gpt2 import load_gpt2_as_glade
from .io import load_state_dict_files
from .state_dict import StateDict, check_glade_state_dict, complete_head

logger = logging.getLogger(__name__)

# --dtype: the file type recorded in the header, and the type of the weight matrices.
DTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# Matrices llama.cpp's converter keeps in f32 whatever the file type (as it does every 1-D tensor).
F32_TENSORS = (gguf.MODEL_TENSOR.POS_EMBD,)
# What llama.cpp's "gpt-2" pre-tokenizer reproduces: GPT-2's regex split, then bytes mapped to printable characters.
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
VOCABULARY_FILES = ("tokenizer.json", "vocab.json")
# llama.cpp's architectures by the names the export families give them.
MODEL_ARCHES = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def gguf_architecture_for(config: GladeConfig) -> GGUFArchitecture:
    """llama.cpp's architecture for `config`'s export family, or a ValueError naming what its graph does not
    compute."""
    return family_for(config).gguf_architecture(config)


def load_checkpoint(directory: Path) -> tuple[GGUFArchitecture, GladeConfig, StateDict]:
    """The llama.cpp architecture, config and complete state dict of a Glade or GPT-2 checkpoint folder."""
    if read_json(directory / CONFIG_NAME).get("model_type") == GPT2Config.model_type:
        model = load_gpt2_as_glade(directory)
        return gguf_architecture_for(model.config), model.config, model.state_dict()
    config = read_config_file(directory / CONFIG_NAME)
    architecture = gguf_architecture_for(config)  # before any weight is read
    state_dict = complete_head(load_state_dict_files(directory), config)
    check_glade_state_dict(state_dict, config)
    return architecture, config, state_dict


def check_gpt2_tokenization(tokenizer: PreTrainedTokenizerBase, source: str) -> dict:
    """The tokenizer's tokenizer.json, or a ValueError naming what llama.cpp's "gpt2" tokenizer would split
    differently: it has no normalizer, and only GPT-2's byte-level pre-tokenizer."""
    if not tokenizer.is_fast:
        raise ValueError(f"{source}: the tokenizer is not a fast (tokenizers) tokenizer; GGUF export reads its BPE")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    found = {
        "normalizer": spec.get("normalizer"),
        # trim_offsets changes only the character offsets reported, never the tokens
        "pre_tokenizer": {key: value for key, value in pre_tokenizer.items() if key != "trim_offsets"},
        "model": {key: model.get(key) for key in ("type", "byte_fallback", "ignore_merges")},
    }
    expected = {
        "normalizer": None,
        "pre_tokenizer": GPT2_PRE_TOKENIZER,
        "model": {"type": "BPE", "byte_fallback": False, "ignore_merges": False},
    }
    if differences := [f"{part}={found[part]}" for part in expected if found[part] != expected[part]]:
        raise ValueError(
            f"{source}: llama.cpp's GPT-2 tokenizer (tokenizer.ggml.pre='gpt-2') needs GPT-2's byte-level BPE "
            f"({', '.join(f'{part}={value}' for part, value in expected.items())}); this tokenizer has "
            + "; ".join(differences)
        )
    return spec


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int, source: str) -> None:
    """The tokenizer as llama.cpp's "gpt2" BPE: every token (ids past the tokenizer's end padded, as llama.cpp's
    converter does), its type, the merges, the special ids, and whether encoding adds bos / eos."""
    spec = check_gpt2_tokenization(tokenizer, source)
    tokens = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(tokens) > vocab_size or max(tokens) >= vocab_size:
        raise ValueError(
            f"{source}: the tokenizer has {len(tokens)} tokens (largest id {max(tokens)}), the model embeds only "
            f"{vocab_size}"
        )
    added = tokenizer.added_tokens_decoder
    types = [
        gguf.TokenType.UNUSED if index not in tokens
        else gguf.TokenType.NORMAL if index not in added
        else gguf.TokenType.CONTROL if added[index].special
        else gguf.TokenType.USER_DEFINED
        for index in range(vocab_size)
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([tokens.get(index, f"[PAD{index}]") for index in range(vocab_size)])
    writer.add_token_types(types)
    # Byte-level tokens never hold a space (it is "Ġ"), so "a b" is unambiguous in both merge formats.
    merges = spec["model"]["merges"]
    if not merges:  # gguf skips an empty array, and llama.cpp refuses a "gpt2" vocabulary without the key
        raise ValueError(f"{source}: the tokenizer has no BPE merges, which llama.cpp's GPT-2 tokenizer requires")
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    for kind in ("bos", "eos", "unk", "pad"):
        if (token_id := getattr(tokenizer, f"{kind}_token_id")) is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # llama.cpp adds bos / eos by these flags alone (a missing flag has a per-tokenizer default): record what the
    # Hugging Face tokenizer does.
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    writer.add_add_bos_token(full[:1] != plain[:1])
    writer.add_add_eos_token(full[-1:] != plain[-1:])


def tensor_data(
    name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """`tensor` as the bytes of `qtype`, with the type they ended up in (llama.cpp's converter falls back to f16
    for a q8_0 matrix whose rows are not whole 32-value blocks)."""
    data = tensor.detach().to(torch.float32).numpy()
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        try:
            return gguf.quants.quantize(data, qtype), qtype
        except gguf.QuantError:
            logger.warning("%s: rows of %d values are not whole q8_0 blocks; writing it in f16", name, data.shape[-1])
            qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    return data, gguf.GGMLQuantizationType.F32


def add_tensors(writer: gguf.GGUFWriter, arch: str, tensors: StateDict, n_layer: int, dtype: str) -> None:
    names = gguf.get_tensor_name_map(MODEL_ARCHES[arch], n_layer)
    for key, tensor in tensors.items():
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"{key} has no name in llama.cpp's {arch} architecture")
        kind, name = found
        keep_f32 = tensor.dim() <= 1 or kind in F32_TENSORS
        data, qtype = tensor_data(name, tensor, gguf.GGMLQuantizationType.F32 if keep_f32 else DTYPES[dtype][1])
        writer.add_tensor(name, data, raw_dtype=qtype)


def export_gguf(
    source: str | Path, destination: str | Path, *, dtype: str = "f32", overwrite: bool = False
) -> Path:
    """Write a Glade checkpoint (or a GPT-2 one) as one GGUF file for llama.cpp, in f32, f16 or q8_0.

    Everything is checked before the file is started, and it is written under a temporary name and renamed into
    place, so `destination` is never half written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    destination = Path(destination)
    if destination.is_dir():
        raise IsADirectoryError(f"Destination {destination} is a directory; give the path of the .gguf file")
    if destination.exists() and not overwrite:
        raise FileExistsError(f"Destination {destination} exists; pass --overwrite (overwrite=True) to replace it")
    directory = resolve_model_folder(source)
    if not any((directory / name).is_file() for name in VOCABULARY_FILES):
        raise FileNotFoundError(
            f"{source} has no tokenizer ({' or '.join(VOCABULARY_FILES)}); a GGUF file carries its vocabulary"
        )
    architecture, config, state_dict = load_checkpoint(directory)
    # Every check runs while the writer gathers metadata and tensors in memory; the file is only opened to write.
    writer = gguf.GGUFWriter(None, arch=architecture.arch)
    writer.add_name(Path(str(source)).name)
    writer.add_file_type(DTYPES[dtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    architecture.add_hparams(writer, config)
    add_vocabulary(writer, AutoTokenizer.from_pretrained(directory), config.vocab_size, str(source))
    add_tensors(writer, architecture.arch, architecture.tensors(state_dict, config), config.n_layer, dtype)
    with atomic_file(destination) as temporary:
        try:
            writer.write_header_to_file(temporary)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return destination
