"""`--ema-decay`: the weight average against a slow loop, swapped in and out exactly, checkpointed with the run, and
what `final/` exports; refused where the launch shards the weights."""

import pickle

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from glade.tiny import tiny_model
from glade.training.pretrain import PretrainConfig, pretrain
from glade.training.weight_average import WeightAverage, check_average_fits, warmed_up_decay


def perturb(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def test_the_average_follows_the_exponential_moving_average_of_each_step():
    model = tiny_model()  # a tied head: listed once
    average = WeightAverage(model, decay=0.9)
    expected = {name: param.detach().clone() for name, param in model.named_parameters()}
    for step in range(1, 30):
        perturb(model, step)
        average.update(model, step)
        decay = min(0.9, (1 + step) / (10 + step))
        for name, param in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * param.detach()
    assert len(average.averages) == len(expected)
    for (name, _), value in zip(model.named_parameters(), average.averages):
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0)
    assert warmed_up_decay(0.9, 1) == pytest.approx(2 / 11) and warmed_up_decay(0.9, 1000) == 0.9


def test_applied_holds_the_average_inside_and_gives_the_trained_weights_back_exactly():
    model = tiny_model()
    average = WeightAverage(model, decay=0.5)
    perturb(model, 0)
    average.update(model, 100)
    trained = [param.detach().clone() for param in model.parameters()]
    with average.applied(model):
        assert all(torch.equal(param, value) for param, value in zip(model.parameters(), average.averages))
    assert all(torch.equal(param, value) for param, value in zip(model.parameters(), trained))
    with pytest.raises(RuntimeError, match="inside"), average.applied(model):
        raise RuntimeError("inside")
    assert all(torch.equal(param, value) for param, value in zip(model.parameters(), trained))


def test_its_state_round_trips():
    model = tiny_model()
    average = WeightAverage(model, decay=0.5)
    perturb(model, 0)
    average.update(model, 100)
    restored = WeightAverage(tiny_model(seed=1), decay=0.5)
    restored.load_state_dict(pickle.loads(pickle.dumps(average.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(average.averages, restored.averages))


@pytest.mark.parametrize("distributed_type, name", [(DistributedType.FSDP, "FSDP"),
                                                    (DistributedType.DEEPSPEED, "DeepSpeed")])
def test_a_launch_that_shards_the_weights_is_refused_by_name(distributed_type, name):
    with pytest.raises(ValueError, match=f"--ema-decay averages whole weights on each process, but {name} shards"):
        check_average_fits(0.99, distributed_type)
    check_average_fits(0.0, distributed_type)
    check_average_fits(0.99, DistributedType.MULTI_CPU)


def test_a_decay_outside_zero_to_one_is_refused(base_options):
    with pytest.raises(ValueError, match=r"--ema-decay must be in \[0, 1\), got 1.0"):
        PretrainConfig(**base_options, max_steps=2, ema_decay=1.0)


def test_final_exports_the_average_the_last_checkpoint_holds(base_options, fresh_accelerate):
    options = {**base_options, "max_steps": 6, "save_every": 6, "ema_decay": 0.8}
    final = pretrain(PretrainConfig(**options))
    exported = load_file(final / "model.safetensors")
    checkpoint = final.parent / "checkpoint-6"
    [state_file] = checkpoint.glob("custom_checkpoint_*.pkl")
    averages = torch.load(state_file, weights_only=False)["averages"]
    trained = load_file(next(checkpoint.glob("**/model.safetensors")))
    # The average holds the parameters in the model's order, a tied one once.
    names = [name for name, _ in AutoModelForCausalLM.from_pretrained(final).named_parameters()]
    assert len(names) == len(averages)
    assert all(torch.equal(exported[name], average) for name, average in zip(names, averages))
    assert not all(torch.equal(exported[name], trained[name]) for name in names)
