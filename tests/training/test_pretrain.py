import importlib.util
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import glade.training.pretrain_setup as pretrain_setup
from checkpoint_helpers import rewrite_weights
from glade.loading import load_model_and_tokenizer
from glade.cli import main as glade_main
from glade.hardware import cpu_name
from glade.training.kernel_choice import UNCOMPILED, KernelChoice
from glade.kernels_glade import BLOCK_ATTENTION
from glade.manifest import MANIFEST, ManifestError
from glade.tiny import byte_level_tokenizer, tiny_model
from glade.training.data import eval_batches, resolve_text_source, split_train_val, tokenize_to_cache
from glade.cli import build_parser
from glade.training.pretrain import PretrainConfig, TrainingDiverged, forward_backward, pretrain
from glade.training.tokenizer import token_byte_lengths

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def unigram_entropy(token_ids) -> float:
    """Nats per token of the best model that ignores context: the data's own token frequencies."""
    counts = np.bincount(np.asarray(token_ids))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_pretraining_learns_and_exports_a_pipeline_ready_model(
    base_options, argv, fresh_accelerate, capsys, shakespeare, fake_cpu
):
    # The default precision on a CPU without bf16 instructions (Zen 3, say): fp32, and the start-up line says why.
    fake_cpu("x86_64", "avx2 fma")
    options = {**base_options, "max_steps": 200, "batch_size": 16, "block_size": 64, "warmup_steps": 20,
               "eval_every": 100, "eval_batches": 8, "log_every": 10, "save_every": 100, "keep_last": 1}
    del options["mixed_precision"]
    assert glade_main(["pretrain", *argv(options)]) == 0
    assert ("precision fp32 (auto: this CPU has neither avx512_bf16 nor amx_bf16, so bf16 would be emulated and slow)"
            in capsys.readouterr().out)
    output, final = options["output_dir"], options["output_dir"] / "final"

    records = read_jsonl(output / "metrics.jsonl")
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [100, 200]
    assert [r["step"] for r in records if "train_loss" in r] == list(range(10, 201, 10))
    assert records[-2]["tokens_seen"] == 200 * 16 * 64
    last = evaluations[-1]

    # Far better than any context-free model of this text.
    tokenizer = AutoTokenizer.from_pretrained(final)
    entropy = unigram_entropy(tokenizer(shakespeare.read_text())["input_ids"])
    assert last["val_loss"] < entropy - 0.7, (last, entropy)
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))

    # The same validation blocks, scored independently by the exported fp32 model.
    token_file = tokenize_to_cache(resolve_text_source([str(shakespeare)]), tokenizer, options["cache_dir"], show_progress=False)
    _, val = split_train_val(token_file, 64, 0.1)
    blocks = torch.stack([val[i]["tokens"] for batch in eval_batches(len(val), 16, 1, 0, 8) for i in batch])
    model = AutoModelForCausalLM.from_pretrained(final)
    with torch.no_grad():
        logits = model(input_ids=blocks[:, :-1]).logits
    nats = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten(), reduction="sum").item()
    assert last["val_loss"] == pytest.approx(nats / blocks[:, 1:].numel(), rel=2e-2)  # bf16 in training
    text_bytes = token_byte_lengths(tokenizer)[blocks[:, 1:].numpy()].sum()
    assert last["val_bpb"] == pytest.approx(last["val_loss"] * blocks[:, 1:].numel() / (text_bytes * math.log(2)))

    generation = model.generation_config
    assert (generation.do_sample, generation.temperature, generation.top_k) == (True, 0.8, 50)
    saved_generation = json.loads((final / "generation_config.json").read_text())
    assert not {"max_new_tokens", "max_length", "repetition_penalty"} & set(saved_generation)
    assert generation.eos_token_id == generation.pad_token_id == tokenizer.eos_token_id
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("ROMEO:", max_new_tokens=20)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")

    assert (output / "loss_curve.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (final / "loss_curve.png").read_bytes().startswith(PNG_SIGNATURE)
    assert read_jsonl(final / "metrics.jsonl") == records
    assert not {"is_local", "local_files_only"} & json.loads((final / "tokenizer_config.json").read_text()).keys()
    assert "val_bpb" in (final / "README.md").read_text() or "bits per byte" in (final / "README.md").read_text()
    assert sorted(p.name for p in output.iterdir()) == [".lock", "checkpoint-200", "final", "loss_curve.png",
                                                       "metrics.jsonl"]

    # final/ carries a manifest of every file, written last; loading checks it and names what was damaged.
    listed = json.loads((final / MANIFEST).read_text())["files"]
    assert set(listed) == {p.name for p in final.iterdir()} - {MANIFEST}
    weights = final / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match=f"model {final} is corrupt: model.safetensors does not match its recorded"):
        load_model_and_tokenizer(str(final))


@pytest.mark.slow
def test_gradient_accumulation_weights_micro_batches_by_their_real_targets(fresh_accelerate):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_model(seed=0).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 257, (8, 16), generator=generator)
    labels = torch.randint(0, 257, (8, 16), generator=generator)
    for row in range(8):  # uneven padding: row i ignores its last 2i targets
        labels[row, 16 - 2 * row:] = -100

    def gradients(micro_batches):
        model.zero_grad()
        loss, num_targets = forward_backward(model, accelerator, micro_batches)
        return loss, num_targets, {name: p.grad.clone() for name, p in model.named_parameters()}

    one_loss, one_count, one_step = gradients([{"input_ids": input_ids, "labels": labels}])
    rows = [slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8)]  # uneven micro-batches too
    acc_loss, acc_count, accumulated = gradients([{"input_ids": input_ids[r], "labels": labels[r]} for r in rows])

    model.zero_grad()
    logits = model(input_ids=input_ids).logits
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    reference.backward()
    assert one_count == acc_count == (labels != -100).sum()
    torch.testing.assert_close(acc_loss, reference.detach(), rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(accumulated[name], one_step[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(accumulated[name], p.grad, rtol=0, atol=1e-5)
    # Averaging per-micro-batch means instead would weight a 1-row batch like a 3-row one: clearly different.
    naive = sum(F.cross_entropy(logits[r].flatten(0, 1), labels[r].flatten(), ignore_index=-100) for r in rows) / 4
    assert abs(naive.item() - reference.item()) > 1e-3


@pytest.fixture
def small_model_dir(tmp_path):
    path = tmp_path / "vocab-257-model"
    tiny_model().save_pretrained(path)
    return path


def empty_jsonl(tmp_path):
    path = tmp_path / "empty_docs.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": ""}) + "\n")
    return path


def file_in_the_way(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path / "a_file" / "run"


def misspelt_config(tmp_path):
    path = tmp_path / "misspelt.json"
    path.write_text(json.dumps({"n_layers": 2, "n_embd": 64, "n_head": 4}))
    return path


def damaged_model(tmp_path):
    path = tmp_path / "vocab-257-model"
    byte_level_tokenizer().save_pretrained(path)
    rewrite_weights(path, lambda tensors: tensors.pop("transformer.h.1.mlp.c_proj.weight"))
    return path


BAD_INPUTS = {
    "missing data file": (lambda t: {"data": [t / "missing.txt"]}, r"data file .*missing.txt does not exist"),
    "empty dataset": (lambda t: {"data": [empty_jsonl(t)]}, r"has no text in column 'text' \(empty dataset\)"),
    "missing text column": (lambda t: {"text_column": "body"}, r"text column 'body' not found .* its columns are: text"),
    "block size over n_positions": (lambda t: {"block_size": 256}, r"--block-size 256 is larger than the model's n_positions=128"),
    "vocabulary over the model's": (lambda t: {"config": None, "init_from": t / "vocab-257-model"},
                                    r"the tokenizer has 512 tokens but the model in .* only vocab_size=257"),
    "unwritable output directory": (lambda t: {"output_dir": file_in_the_way(t)}, r"output directory .*a_file/run is not writable"),
    "missing tokenizer": (lambda t: {"tokenizer": t / "no-tokenizer"}, r"tokenizer directory .*no-tokenizer does not exist"),
    "misspelt config field": (lambda t: {"config": misspelt_config(t)}, r"has unknown GladeConfig field\(s\): n_layers"),
    "init-from checkpoint missing a tensor": (
        lambda t: {"config": None, "init_from": damaged_model(t), "tokenizer": t / "vocab-257-model"},
        r"vocab-257-model does not match its config: missing transformer.h.1.mlp.c_proj.weight",
    ),
    "zero learning rate": (lambda t: {"lr": 0.0}, r"--lr must be > 0, got 0.0"),
    "zero Muon learning rate": (lambda t: {"optimizer": "muon", "muon_lr": 0.0}, r"--muon-lr must be > 0, got 0.0"),
    "negative Muon learning rate": (lambda t: {"optimizer": "muon", "muon_lr": -0.02},
                                    r"--muon-lr must be > 0, got -0.02"),
    "unknown optimizer": (lambda t: {"optimizer": "sgd"},
                          r"argument --optimizer: invalid choice: 'sgd' \(choose from '?adamw'?, '?muon'?\)"),
    "push without a repo id": (lambda t: {"push_to_hub": True}, r"--push-to-hub needs --hub-model-id"),
    "push to an invalid repo id": (lambda t: {"push_to_hub": True, "hub_model_id": "me//my model"},
                                   r"--hub-model-id 'me//my model' is not a Hub repository id"),
    # Values that used to fail only at export, after training, or not at all.
    "shard size that is not a size": (lambda t: {"max_shard_size": "banana"},
                                      r"--max-shard-size must be a size such as 2GB, 500MB or 100KB, got 'banana'"),
    "negative warmup": (lambda t: {"warmup_steps": -5}, r"--warmup-steps must be >= 0, got -5"),
    "negative gradient clip": (lambda t: {"grad_clip": -1}, r"--grad-clip must be >= 0, got -1.0"),
    "negative weight decay": (lambda t: {"weight_decay": -1}, r"--weight-decay must be >= 0, got -1.0"),
    "negative beta1": (lambda t: {"beta1": -0.1}, r"--beta1 must be in \[0, 1\), got -0.1"),
    "beta2 of one": (lambda t: {"beta2": 1}, r"--beta2 must be in \[0, 1\), got 1.0"),
    "dropout of one": (lambda t: {"dropout": 1}, r"--dropout must be in \[0, 1\), got 1.0"),
    "NaN learning rate": (lambda t: {"lr": "nan"}, r"--lr must be > 0, got nan"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_fail_early_with_a_clear_message(case, base_options, argv, tmp_path, small_model_dir, capsys, fresh_accelerate):
    overrides, message = BAD_INPUTS[case]
    options = {**base_options, "max_steps": 5, **overrides(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        glade_main(["pretrain", *argv(options)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "glade pretrain: error:" in err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before training started


def test_an_existing_run_is_not_overwritten_without_resume(base_options, argv, capsys, fresh_accelerate):
    (base_options["output_dir"] / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(SystemExit):
        glade_main(["pretrain", *argv({**base_options, "max_steps": 5})])
    assert "already holds a training run (checkpoint-4): continue it with --resume latest" in capsys.readouterr().err


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_training_and_val_data_is_used(
    base_options, tmp_path, shakespeare, capsys, fresh_accelerate
):
    val_data = tmp_path / "val.jsonl"
    paragraphs = shakespeare.read_text().split("\n\n")[-40:]
    val_data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    runs = {}
    for checkpointing in (False, True):
        fresh_accelerate()  # a second Accelerator in this process
        options = {**base_options, "max_steps": 3, "val_data": [val_data], "gradient_checkpointing": checkpointing,
                   "output_dir": tmp_path / f"checkpointing-{checkpointing}"}
        pretrain(PretrainConfig(**options))
        runs[checkpointing] = read_jsonl(options["output_dir"] / "metrics.jsonl")
    losses = [[r["train_loss"] for r in runs[c] if "train_loss" in r] for c in (False, True)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert [r["step"] for r in runs[False] if "val_loss" in r] == [3]
    # Validation comes from the --val-data file, so none of --data is held out.
    tokenizer = AutoTokenizer.from_pretrained(base_options["tokenizer"])
    train_tokens = tokenize_to_cache(resolve_text_source([str(shakespeare)]), tokenizer, base_options["cache_dir"],
                                     show_progress=False)
    val_tokens = tokenize_to_cache(resolve_text_source([str(val_data)]), tokenizer, base_options["cache_dir"],
                                   show_progress=False)
    assert val_tokens.num_documents == 40
    assert (f"data: {(train_tokens.num_tokens - 1) // 32} training blocks of 32 tokens, "
            f"{(val_tokens.num_tokens - 1) // 32} validation blocks") in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_reporting_to_a_tracker_that_is_not_installed_is_an_error(base_options, argv, capsys, fresh_accelerate):
    with pytest.raises(SystemExit):
        glade_main(["pretrain", *argv({**base_options, "max_steps": 2, "report_to": "tensorboard"})])
    assert "--report-to tensorboard: no such tracker is installed" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_continued_pretraining_starts_from_the_given_weights(compiled, base_options, tmp_path, fresh_accelerate):
    start = tmp_path / "start"
    tiny_model(seed=3).save_pretrained(start)
    byte_level_tokenizer().save_pretrained(start)
    # A vanishing learning rate: the export must hold the starting weights (Adam moves each by about lr per step).
    options = {**base_options, "config": None, "init_from": start, "tokenizer": start, "max_steps": 2, "lr": 1e-12,
               "weight_decay": 0.0, "max_shard_size": "100KB", "compile": compiled,
               # Named, so the compiled run compiles on every CPU: `auto` may find eager faster (tested below).
               "compile_attention": BLOCK_ATTENTION}
    final = pretrain(PretrainConfig(**options))
    assert final == options["output_dir"] / "final"
    assert len(list(final.glob("model-*.safetensors"))) > 1 and (final / "model.safetensors.index.json").exists()
    model, loading = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # no torch.compile wrapper names
    exported = model.state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(start).state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-10, msg=name)


@pytest.mark.slow
def test_a_compiled_run_trains_eager_where_the_uncompiled_block_was_fastest(
    base_options, fresh_accelerate, capsys, monkeypatch
):
    measured = KernelChoice(UNCOMPILED, {UNCOMPILED: 1.0, "sdpa": 2.0, BLOCK_ATTENTION: 3.0})
    monkeypatch.setattr(pretrain_setup, "choose_kernel", lambda *args, **kwargs: measured)

    def no_compiling(*args, **kwargs):
        raise AssertionError("torch.compile was called")

    monkeypatch.setattr(torch, "compile", no_compiling)
    pretrain(PretrainConfig(**{**base_options, "max_steps": 2, "compile": True}))
    assert ("--compile on " + cpu_name() + ": uncompiled (uncompiled 1.0 ms, sdpa 2.0 ms, glade_block 3.0 ms per block, "
            "forward + backward); eager is faster at this shape, so the run trains uncompiled") in capsys.readouterr().out


def test_the_command_line_and_the_python_api_build_the_same_config(base_options, argv, tmp_path):
    from_command_line = PretrainConfig.from_args(
        build_parser("pretrain").parse_args(["pretrain", *argv({**base_options, "max_steps": 40})])
    )
    assert from_command_line == PretrainConfig(**base_options, max_steps=40)  # one set of defaults
    assert from_command_line.data == (str(base_options["data"][0]),) and from_command_line.beta2 == 0.95
    # Resolved once, when the config is built; block_size needs the model (fit_block_size).
    minimal = PretrainConfig(preset="glade-tiny", data=["a.txt"], tokenizer="t", output_dir=tmp_path, max_steps=400)
    assert (minimal.min_lr, minimal.warmup_steps, minimal.block_size) == (6e-4 / 10, 20, None)
    assert minimal.output_dir == str(tmp_path)
    with pytest.raises(AttributeError):
        minimal.lr = 1.0  # frozen: nothing changes a run's settings behind its back
    with pytest.raises(ValueError, match="choose the model with exactly one of --preset, --config and --init-from"):
        PretrainConfig(preset="glade-tiny", config="c.json", data=["a.txt"], tokenizer="t", output_dir="o",
                       max_steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("options, stop", [
    ({"log_every": 5}, "training stopped at step 2: non-finite training loss"),  # step 1 made the weights NaN
    ({"log_every": 5, "eval_every": 1}, "training stopped at step 1: non-finite validation loss"),
], ids=["training-loss", "validation-loss"])
def test_an_infinite_learning_rate_stops_at_the_first_non_finite_loss(
    options, stop, base_options, argv, capsys, fresh_accelerate
):
    options = {**base_options, "max_steps": 8, "lr": "inf", **options}
    with pytest.raises(SystemExit) as exit_info:
        glade_main(["pretrain", *argv(options)])
    assert exit_info.value.code == 2
    assert f"glade pretrain: error: {stop} (nan or inf)" in capsys.readouterr().err
    output = options["output_dir"]
    assert not (output / "final").exists()
    assert (output / "metrics.jsonl").read_text() == ""  # the first record was due at step 5 or, from evaluation, 1


def strict_json(line: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: {line}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.slow
def test_a_run_that_diverges_keeps_its_last_good_checkpoint_and_exports_nothing(base_options, fresh_accelerate):
    good = {**base_options, "max_steps": 2, "save_every": 2}
    final = pretrain(PretrainConfig(**good))
    exported = (final / "model.safetensors").read_bytes()
    fresh_accelerate()

    # Resumed with an infinite learning rate, step 3's loss is still finite, its update is not: saving it would
    # have replaced checkpoint-2 (--keep-last 1).
    diverging = {**good, "max_steps": 6, "save_every": 1, "keep_last": 1, "lr": math.inf, "resume": "latest"}
    with pytest.raises(TrainingDiverged, match=r"step 3: its update made the weights non-finite"):
        pretrain(PretrainConfig(**diverging))
    output = good["output_dir"]
    assert sorted(p.name for p in output.glob("*checkpoint-*")) == ["checkpoint-2"]
    assert (output / "checkpoint-2" / "COMPLETE").exists()
    assert (final / "model.safetensors").read_bytes() == exported
    records = [strict_json(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert records[-1]["lr"] is None and math.isfinite(records[-1]["train_loss"])  # lr inf: null, not Infinity


def test_an_unknown_compiled_attention_kernel_is_refused_from_python_too(tmp_path):
    with pytest.raises(ValueError, match="--compile-attention must be one of auto, sdpa, glade_block, got flash"):
        PretrainConfig(preset="glade-tiny", data=["a.txt"], tokenizer="t", output_dir=tmp_path, max_steps=4,
                       compile=True, compile_attention="flash")
