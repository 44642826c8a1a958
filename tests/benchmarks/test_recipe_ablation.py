"""`benchmarks/recipe_ablation.py`: what each option row asks `glade pretrain` for, and which learning rate counts."""

import argparse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT / "tests" / "fixtures" / "tinyshakespeare_150k.txt"


@pytest.fixture
def ablation(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import recipe_ablation

    return recipe_ablation


def test_model_options_go_to_the_config_and_training_options_to_flags(ablation):
    options = {**ablation.OPTIONS["value_embeddings"], **ablation.OPTIONS["muon"],
               **ablation.MUON_OPTIONS["normuon"], **ablation.OPTIONS["batch_ramp"], **ablation.OPTIONS["ema"]}
    assert ablation.model_fields(options) == {"value_embeddings": True}
    flags = ablation.training_flags(options, steps=100)
    assert flags == ["--optimizer", "muon", "--batch-size", "8", "--normuon", "--grad-accum", "2", "--ema-decay",
                     "0.99", "--batch-ramp-steps", "30"]
    assert ablation.training_flags({}, steps=100) == ["--optimizer", "adamw", "--batch-size", "16"]


def test_every_option_key_is_a_glade_config_field_or_a_pretrain_flag(ablation):
    from glade import GladeConfig
    from glade.training.pretrain_config import PretrainConfig

    config_fields = set(GladeConfig().to_dict())
    flags = set(PretrainConfig.__dataclass_fields__) | {"batch_ramp_fraction"}
    for name, options in {**ablation.OPTIONS, **ablation.MUON_OPTIONS}.items():
        for key in options:
            assert key in (flags if key in ablation.TRAINING_FLAGS else config_fields), (name, key)


def row(ablation, name, lr, bpbs):
    return ablation.Row(name, {}, lr, runs=[{"curve": [[0, 9.0], [1, bpb]]} for bpb in bpbs])


def test_an_option_counts_at_its_best_learning_rate(ablation):
    rows = [row(ablation, "qk_norm", 1e-3, [2.0, 2.1]), row(ablation, "qk_norm", 2e-3, [1.9, 1.92]),
            row(ablation, "qk_norm", 4e-3, [2.3, 2.2]), row(ablation, "swiglu", 2e-3, [2.5, 2.5])]
    best = ablation.best_rows(rows)
    assert best["qk_norm"].lr == 2e-3 and best["swiglu"].lr == 2e-3
    baseline = row(ablation, "gpt2_adamw", 2e-3, [1.95, 1.97])
    assert ablation.helps(best["qk_norm"], baseline)  # 1.91 < 1.96 - 0.01
    assert not ablation.helps(rows[0], baseline)


@pytest.mark.slow
def test_an_option_row_trains_with_glade_pretrain(ablation, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    text = SHAKESPEARE.read_text()
    (data / "children.txt").write_text(text[: len(text) * 9 // 10])
    (data / "valid.txt").write_text(text[len(text) * 9 // 10 :])
    args = argparse.Namespace(data=data, train_files=["children.txt"], tokenizer=ROOT / "model_cards" /
                              "glade-gutenberg-7m", work=tmp_path / "work", shape="tiny", steps=4, eval_every=2,
                              speed_steps=4)
    args.work.mkdir()
    options = {**ablation.OPTIONS["muon"], **ablation.MUON_OPTIONS["normuon"], **ablation.OPTIONS["batch_ramp"]}
    run = ablation.train(ablation.Row("muon+normuon+batch_ramp", options, 4e-3), seed=1, args=args)
    # Steps of 16 blocks of 256 tokens, but the ramp's first step (30% of 4, rounded) takes one micro-batch of 8.
    assert [tokens for tokens, _ in run["curve"]] == [(8 + 16) * 256, (8 + 3 * 16) * 256]
    assert all(0 < bpb < 20 for _, bpb in run["curve"])
    card = next(args.work.glob("*/final/README.md")).read_text()
    assert "| optimizer | muon |" in card and "| normuon | True |" in card
