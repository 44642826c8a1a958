"""The tensor-parallel plan: two CPU processes (gloo) sharding a model with transformers' `DistributedConfig(tp_plan=
"auto")` (what the deprecated `from_pretrained(..., tp_plan="auto")` builds) compute the logits, loss and gradients
of one unsharded process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from architectures import ARCHITECTURES
from glade.tiny import tiny_model

pytestmark = pytest.mark.slow

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

WORKER = textwrap.dedent(
    """
    import sys

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    import glade  # registers the model type

    ids = torch.load(sys.argv[1])
    results = {}
    for checkpoint in sys.argv[3:]:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(tp_plan="auto"))
        with torch.no_grad():
            logits = model(ids).logits
        model.train()
        loss = model(ids, labels=ids).loss  # the training path: fused loss where it applies
        loss.backward()
        grads = {}
        for name, param in model.named_parameters():
            grad = param.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # a collective: every rank
        wte, head = model.transformer.wte.weight, model.lm_head.weight
        results[checkpoint] = {
            "logits": logits, "loss": loss.detach(), "grads": grads,
            "wte_placements": str(getattr(wte, "placements", "replicated")),
            "head_placements": str(getattr(head, "placements", "replicated")),
        }
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[2])
    dist.destroy_process_group()
    """
)


def reference(model) -> dict:
    with torch.no_grad():
        logits = model(IDS).logits
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return {"logits": logits, "loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def test_tensor_parallel_plan_in_two_processes_matches_one(tmp_path):
    checkpoints, references = [], {}
    for name, options in ARCHITECTURES.items():
        model = tiny_model(**options)
        checkpoint = str(tmp_path / name)
        model.save_pretrained(checkpoint)
        checkpoints.append(checkpoint)
        references[checkpoint] = reference(model)
    (tmp_path / "worker.py").write_text(WORKER)
    torch.save(IDS, tmp_path / "ids.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "worker.py"), str(tmp_path / "ids.pt"), str(tmp_path / "results.pt"), *checkpoints]
    # The same thread count as this process: fp32 matmuls round differently with a different split of the work.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"torch.distributed.run failed ({result.returncode}):\n{result.stderr[-5000:]}")
    results = torch.load(tmp_path / "results.pt")

    for checkpoint in checkpoints:
        sharded, expected = results[checkpoint], references[checkpoint]
        # The embedding holds the head's rows: tied, they are one weight, split by vocabulary on both sides.
        assert sharded["wte_placements"] == sharded["head_placements"] == "(Shard(dim=0),)"
        torch.testing.assert_close(sharded["logits"], expected["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sharded["loss"], expected["loss"], atol=1e-6, rtol=1e-6)
        assert sharded["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            torch.testing.assert_close(sharded["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
