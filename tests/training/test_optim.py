"""The optimizers of `glade pretrain`: which parameters Muon and AdamW take, Muon's block-by-block update of fused
projections, the schedule both follow, and a Muon run end to end."""

import io
import json

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn

from glade import GladeConfig, GladeForCausalLM
from glade.cli import main as glade_main
from glade.training.optim import (
    BlockwiseMuon,
    MuonOptions,
    OptimizerFamilies,
    check_optimizer_fits,
    make_optimizer,
    make_scheduler,
    polar_express,
)
from glade.training.pretrain_config import PretrainConfig

WIDTH = 64


def tiny_model(**overrides) -> GladeForCausalLM:
    torch.manual_seed(0)
    return GladeForCausalLM(GladeConfig(n_layer=2, n_head=4, n_embd=WIDTH, n_positions=64, vocab_size=256,
                                        **overrides))


def muon_and_adamw(model: nn.Module) -> OptimizerFamilies:
    return make_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=False, muon_lr=0.02)


def names_in(groups: list[dict], model: nn.Module) -> list[str]:
    """The names of the parameters in param groups, once per appearance (a tied parameter under its first name)."""
    name_of = {id(param): name for name, param in model.named_parameters()}
    return [name_of[id(param)] for group in groups for param in group["params"]]


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_matrices_inside_blocks_and_adamw_everything_else_once(tied):
    model = tiny_model(tie_word_embeddings=tied)
    optimizer = muon_and_adamw(model)
    adamw, muon = optimizer.optimizers
    assert type(adamw) is torch.optim.AdamW and type(muon) is BlockwiseMuon

    in_muon, in_adamw = names_in(muon.param_groups, model), names_in(adamw.param_groups, model)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]  # tied: once, as wte
    assert sorted(in_muon + in_adamw) == sorted(trainable)  # every parameter in exactly one family, once
    assert set(in_muon) == {name for name, param in model.named_parameters()
                            if name.startswith("transformer.h.") and param.ndim == 2}
    assert "transformer.h.1.attn.c_attn.weight" in in_muon and "transformer.h.1.attn.c_attn.bias" in in_adamw
    assert (model.lm_head.weight is model.transformer.wte.weight) is tied
    assert ("lm_head.weight" in in_adamw) is not tied  # a tied head is its embedding, in AdamW once

    # AdamW keeps its decay rules: only a matrix outside the blocks (an untied head) decays.
    decay, keep = adamw.param_groups
    assert (decay["weight_decay"], keep["weight_decay"]) == (0.1, 0.0)
    assert names_in([decay], model) == ([] if tied else ["lm_head.weight"])
    assert muon.param_groups[0]["weight_decay"] == 0.1  # --weight-decay applies to Muon too

    # Only c_attn declares a split; Muon groups by it.
    split = {group["fused_output_sizes"]: names_in([group], model) for group in muon.param_groups}
    assert split[(WIDTH, WIDTH, WIDTH)] == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
    assert set(split) == {(WIDTH, WIDTH, WIDTH), None}


def test_the_partition_follows_modules_not_names():
    """Modules added to a block later (a gate projection, a QK-norm gain) go where their kind belongs."""
    model = tiny_model()
    attention, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    mlp.extra_gate = nn.Linear(WIDTH, WIDTH)
    attention.extra_norm = nn.RMSNorm(WIDTH // 4)
    model.transformer.h[1].mlp.c_fc.weight.requires_grad_(False)  # frozen: in neither family
    adamw, muon = muon_and_adamw(model).optimizers

    in_muon, in_adamw = names_in(muon.param_groups, model), names_in(adamw.param_groups, model)
    assert "transformer.h.0.mlp.extra_gate.weight" in in_muon
    no_decay = names_in(adamw.param_groups[1:], model)
    assert {"transformer.h.0.mlp.extra_gate.bias", "transformer.h.0.attn.extra_norm.weight"} <= set(no_decay)
    assert "transformer.h.1.mlp.c_fc.weight" not in in_muon + in_adamw


def test_adamw_alone_decays_matrices_but_not_embeddings_norm_gains_or_biases():
    model = tiny_model(tie_word_embeddings=False)
    optimizer = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=False)
    assert type(optimizer) is torch.optim.AdamW
    decay, keep = (set(names_in([group], model)) for group in optimizer.param_groups)
    assert decay == {name for name, param in model.named_parameters() if param.ndim == 2 and "wte" not in name
                     and "wpe" not in name}
    assert keep == {name for name, _ in model.named_parameters()} - decay


def after_steps(optimizer_for, weight: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """A copy of `weight` after one step of `optimizer_for(parameter)` per gradient."""
    param = nn.Parameter(weight.clone())
    optimizer = optimizer_for(param)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [(WIDTH, WIDTH, WIDTH), (WIDTH, WIDTH // 4, WIDTH // 4)], ids=["mha", "gqa"])
def test_a_fused_projection_is_updated_as_separate_matrices(sizes):
    torch.manual_seed(0)
    weight = torch.randn(sum(sizes), WIDTH) / WIDTH**0.5
    grads = [torch.randn_like(weight) for _ in range(3)]
    settings = dict(lr=0.02, weight_decay=0.1)

    split = after_steps(
        lambda param: BlockwiseMuon([{"params": [param], "fused_output_sizes": sizes}], **settings), weight, grads)

    # The slow reference: q, k and v as three parameters, each with its own momentum, through torch's own Muon.
    blocks = [nn.Parameter(block.clone()) for block in weight.split(sizes)]
    reference = torch.optim.Muon(blocks, **settings)
    for grad in grads:
        for block, block_grad in zip(blocks, grad.split(sizes)):
            block.grad = block_grad.clone()
        reference.step()
    assert split.equal(torch.cat([block.detach() for block in blocks]))

    # One matrix: singular directions shared across q, k and v, and one lr scale for all: a different update.
    whole = after_steps(lambda param: torch.optim.Muon([param], **settings), weight, grads)
    assert (whole - split).norm() > 0.2 * (split - weight).norm()


@pytest.mark.parametrize("shape", [(2 * WIDTH, WIDTH), (WIDTH, 2 * WIDTH)])
def test_an_unsplit_matrix_is_updated_exactly_as_by_torch_muon(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(3)]
    ours = after_steps(lambda param: BlockwiseMuon([{"params": [param]}], lr=0.02), weight, grads)
    torchs = after_steps(lambda param: torch.optim.Muon([param], lr=0.02), weight, grads)
    assert ours.equal(torchs)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The exact orthogonal factor U V^T of `matrix`'s SVD."""
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(2 * WIDTH, WIDTH), (WIDTH, 2 * WIDTH)], ids=["tall", "wide"])
def test_polar_express_orthogonalises_closer_than_torchs_newton_schulz(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    # A gradient-like spectrum: a few large directions over many small ones.
    matrix = torch.randn(shape) + 10 * torch.randn(shape[0], 2) @ torch.randn(2, shape[1])
    exact = polar_factor(matrix)
    ours = polar_express(matrix, eps=1e-7)
    torchs = _zeropower_via_newtonschulz(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7)
    assert ours.shape == matrix.shape and ours.dtype == torch.bfloat16
    error = lambda result: ((result.double() - exact).norm() / exact.norm()).item()
    singular_values = torch.linalg.svdvals(ours.double())
    assert 0.8 < singular_values.min() and singular_values.max() < 1.2
    assert error(ours) < 0.3 and error(ours) < error(torchs), (error(ours), error(torchs))


@pytest.mark.parametrize("shape", [(2 * WIDTH, WIDTH), (WIDTH, 2 * WIDTH)], ids=["tall", "wide"])
def test_normuon_gives_every_neuron_the_same_update_rms_at_the_update_s_own_norm(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    # Rows (or columns) of very different scales: plain Muon's update leaves their RMS unequal.
    grad = torch.randn(shape) * torch.logspace(-2, 1, max(shape)).reshape((-1, 1) if shape[0] > shape[1] else (1, -1))
    settings = dict(lr=1.0, weight_decay=0.0, adjust_lr_fn="original")
    plain = after_steps(lambda param: BlockwiseMuon([{"params": [param]}], **settings), weight, [grad])
    normed = after_steps(lambda param: BlockwiseMuon([{"params": [param]}], MuonOptions(normuon=True), **settings),
                         weight, [grad])
    plain_update, normed_update = weight - plain, weight - normed
    neuron_rms = lambda update: update.square().mean(dim=1 if shape[0] > shape[1] else 0).sqrt()
    assert neuron_rms(plain_update).std() / neuron_rms(plain_update).mean() > 0.05
    torch.testing.assert_close(neuron_rms(normed_update), neuron_rms(normed_update).mean().expand(max(shape)),
                               rtol=1e-3, atol=0)
    torch.testing.assert_close(normed_update.norm(), plain_update.float().norm(), rtol=1e-4, atol=0)


def test_cautious_weight_decay_decays_only_where_the_update_shrinks_the_weight_too():
    torch.manual_seed(0)
    weight, grad = torch.randn(WIDTH, WIDTH), torch.randn(WIDTH, WIDTH)
    settings = dict(lr=0.02, weight_decay=0.5)
    undecayed = after_steps(lambda param: BlockwiseMuon([{"params": [param]}], lr=0.02, weight_decay=0.0), weight,
                            [grad])
    decayed = after_steps(lambda param: BlockwiseMuon([{"params": [param]}], **settings), weight, [grad])
    cautious = after_steps(lambda param: BlockwiseMuon([{"params": [param]}], MuonOptions(cautious_weight_decay=True),
                                                       **settings), weight, [grad])
    update = weight - undecayed  # lr x the orthogonalised update, which a step subtracts
    shrinks = update * weight >= 0
    assert 0.3 < shrinks.float().mean() < 0.7
    torch.testing.assert_close(cautious, torch.where(shrinks, decayed, undecayed), rtol=0, atol=1e-6)
    assert not torch.equal(cautious, decayed)


@pytest.mark.slow
@pytest.mark.parametrize("options", [MuonOptions(polar_express=True), MuonOptions(True, True, True)],
                         ids=["polar-express", "all"])
def test_refined_muon_updates_a_fused_projection_as_separate_matrices(options):
    torch.manual_seed(0)
    sizes = (WIDTH, WIDTH // 4, WIDTH // 4)
    weight = torch.randn(sum(sizes), WIDTH) / WIDTH**0.5
    grads = [torch.randn_like(weight) for _ in range(3)]
    split = after_steps(lambda param: BlockwiseMuon([{"params": [param], "fused_output_sizes": sizes}], options,
                                                    lr=0.02, weight_decay=0.1), weight, grads)
    blocks = [nn.Parameter(block.clone()) for block in weight.split(sizes)]
    reference = BlockwiseMuon([{"params": [block]} for block in blocks], options, lr=0.02, weight_decay=0.1)
    for grad in grads:
        for block, block_grad in zip(blocks, grad.split(sizes)):
            block.grad = block_grad.clone()
        reference.step()
    assert split.equal(torch.cat([block.detach() for block in blocks]))


def test_muon_refinements_are_refused_without_muon(base_options):
    for flag in ("polar_express", "normuon", "cautious_weight_decay"):
        with pytest.raises(ValueError, match="refine Muon: they need --optimizer muon"):
            PretrainConfig(**base_options, max_steps=2, **{flag: True})
        with pytest.raises(ValueError, match="refine Muon: they need --optimizer muon"):
            make_optimizer(tiny_model(), "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=False,
                           muon_options=MuonOptions(**{flag: True}))
    PretrainConfig(**base_options, max_steps=2, optimizer="muon", polar_express=True, normuon=True,
                   cautious_weight_decay=True)


def test_a_split_that_does_not_cover_the_rows_is_refused():
    with pytest.raises(ValueError, match=r"fused_output_sizes \(64, 16\) do not add up to the 96 rows"):
        BlockwiseMuon([{"params": [nn.Parameter(torch.zeros(96, 64))], "fused_output_sizes": (64, 16)}])


def test_both_families_warm_up_and_decay_to_the_same_fraction_of_their_own_peak():
    model = tiny_model()
    optimizer = muon_and_adamw(model)
    scheduler = make_scheduler(optimizer, warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    peaks = [group["initial_lr"] for group in optimizer.param_groups]
    assert sorted(set(peaks)) == [1e-3, 0.02]
    fractions = []  # per step, each group's lr as a fraction of its peak
    for step in range(21):
        inner = [group["lr"] for family in optimizer.optimizers for group in family.param_groups]
        assert inner == scheduler.get_last_lr()  # the scheduler sets the lr each family steps with
        fractions.append([lr / peak for lr, peak in zip(inner, peaks)])
        if step == 10:  # as accelerate.prepare and load_state do: the groups are replaced, still scheduled
            optimizer.load_state_dict(optimizer.state_dict())
        optimizer.step()
        scheduler.step()
    curve = [groups[0] for groups in fractions]
    assert fractions == [pytest.approx([fraction] * len(peaks)) for fraction in curve]  # one curve for all
    assert curve[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert curve[20] == pytest.approx(0.1) and all(a > b for a, b in zip(curve[4:], curve[5:]))


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_a_linear_weight_decay_schedule_falls_to_zero_in_step_with_the_learning_rate(schedule):
    model = tiny_model(tie_word_embeddings=False)  # an untied head: AdamW decays a matrix too
    optimizer = muon_and_adamw(model)
    scheduler = make_scheduler(optimizer, warmup_steps=2, max_steps=20, min_lr_ratio=0.1, weight_decay_schedule=schedule)
    decays = []
    for step in range(21):
        decays.append([group["weight_decay"] for group in optimizer.param_groups])
        if step == 10:  # as accelerate.prepare and load_state do: the groups are replaced, still scheduled
            optimizer.load_state_dict(optimizer.state_dict())
        optimizer.step()
        scheduler.step()
    initial = decays[0]
    assert sorted(set(initial)) == [0.0, 0.1]  # the decayed groups of both families, and the undecayed ones
    factors = [1 - step / 20 for step in range(21)] if schedule == "linear" else [1.0] * 21
    assert decays == [pytest.approx([value * factor for value in initial]) for factor in factors]
    torch.save(scheduler.state_dict(), io.BytesIO())  # as accelerate's checkpoints save it


@pytest.mark.parametrize("sharded, name", [(DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed")])
def test_muon_is_refused_where_weight_matrices_are_sharded(sharded, name):
    with pytest.raises(ValueError, match=f"--optimizer muon needs whole weight matrices, but {name} shards them"):
        check_optimizer_fits("muon", sharded)
    check_optimizer_fits("adamw", sharded)
    for whole in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_optimizer_fits("muon", whole)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("refinements", [{}, {"polar_express": True, "normuon": True, "cautious_weight_decay": True}],
                         ids=["muon", "refined"])
def test_pretraining_with_muon_lowers_the_loss_and_records_the_optimizer(
    refinements, base_options, argv, capsys, fresh_accelerate
):
    options = {**base_options, "max_steps": 30, "optimizer": "muon", "muon_lr": 0.02, "save_every": 30, **refinements}
    assert glade_main(["pretrain", *argv(options)]) == 0
    output = options["output_dir"]
    records = read_jsonl(output / "metrics.jsonl")
    first_loss, val_loss = records[0]["train_loss"], records[-1]["val_loss"]
    assert val_loss < first_loss - 0.7, (first_loss, val_loss)
    card = (output / "final" / "README.md").read_text()
    assert "| optimizer | muon |" in card and "| muon_lr | 0.02 |" in card
    assert all(f"| {name} | True |" in card for name in refinements)
    assert refinements or "normuon" not in card

    # The checkpoint holds both families' state: AdamW's for each of its parameters, Muon's momentum for every
    # block matrix.
    checkpoint = output / "checkpoint-30"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["optimizer"] == "muon"
    adamw_state, muon_state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["optimizers"]
    assert len(adamw_state["state"]) == sum(len(group["params"]) for group in adamw_state["param_groups"]) > 0
    block_matrices = [name for name, tensor in load_file(output / "final" / "model.safetensors").items()
                      if name.startswith("transformer.h.") and tensor.ndim == 2]
    momenta = [state["momentum_buffer"] for state in muon_state["state"].values()]
    assert len(momenta) == len(block_matrices) and all(momentum.abs().sum() > 0 for momentum in momenta)

    # The checkpoint holds Muon's state: continuing it with AdamW (the default) is refused, not misread.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        continued = {**base_options, "output_dir": options["output_dir"], "max_steps": 40, "resume": "latest"}
        glade_main(["pretrain", *argv(continued)])
    assert "it holds the state of --optimizer muon, not of --optimizer adamw" in capsys.readouterr().err
