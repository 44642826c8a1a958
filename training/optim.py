"""The optimizers of `glade pretrain` and their warmup + cosine learning-rate schedule.

`adamw`: AdamW with GPT-style weight decay for every parameter. `muon`: Muon for the weight matrices of the Linear
layers inside the transformer blocks, AdamW (the same groups and decay rules) for everything else: embeddings, the
output head, norm gains, biases. Both live in one optimizer object (`OptimizerFamilies`), so the training loop,
the scheduler, gradient clipping and accelerate's checkpoints treat a Muon run like an AdamW one.

Muon's 2025 refinements are options of `MuonOptions`, each off by default (torch's Muon bit for bit):
- Polar Express (Amsel et al., arXiv 2505.16932): five orthogonalisation steps, each with its own odd polynomial, the
  coefficients and 2% safety factor of modded-nanogpt;
- NorMuon (arXiv 2510.05491): each neuron's orthogonalised update divided by a running RMS of it (beta2 0.95), then
  rescaled to the update's own Frobenius norm;
- cautious weight decay (arXiv 2510.12402): a weight is decayed only where the update moves it towards zero too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from glade.modeling_glade import GladeBlock

OPTIMIZERS = ("adamw", "muon")
# Swept at a tiny shape: validation loss after `glade pretrain --config C --tokenizer T --data
# tests/fixtures/tinyshakespeare_150k.txt --max-steps 300 --batch-size 16 --block-size 64 --mixed-precision no
# --optimizer muon --muon-lr X --lr L` (C: 2 layers x 64 wide, 4 heads, no dropout; T: a 512-token BPE of the
# fixture; default warmup and decay), one thread:
#   muon-lr        0.005  0.01   0.02   0.04   0.08   0.16   (AdamW alone)
#   lr 6e-4        4.266  4.222  4.214  4.257  4.268  4.358  (4.398)
#   lr 3e-3        3.674  3.610  3.554  3.570  3.600  3.702  (3.857)
#   lr 3e-3 seed 1        3.588  3.545  3.573                (3.822)
# 0.02 wins at both AdamW learning rates (and is Keller Jordan's Muon default).
DEFAULT_MUON_LR = 0.02
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# The coefficients assume singular values at most 1; the input is normalised to a Frobenius norm 2% above 1.
POLAR_EXPRESS_SAFETY = 1.02
NORMUON_BETA2 = 0.95
# Muon orthogonalises each weight matrix as a whole; these hand every process only a shard of it.
SHARDING = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}


def parameter_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict]:
    """Decay only matrices that multiply activations: not biases or norm gains (any parameter of fewer than two
    dimensions) or embeddings (which the tied output head shares), where decay only pulls useful scales towards
    zero. Parameters whose id is in `exclude` (another optimizer's) are left out."""
    embeddings = {
        id(param)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for param in module.parameters(recurse=False)
    }
    decay, keep = [], []
    for param in model.parameters():  # tied parameters are listed once
        if not param.requires_grad or id(param) in exclude:
            continue
        (keep if id(param) in embeddings or param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def muon_parameter_groups(model: nn.Module) -> list[dict]:
    """Muon's parameters: the weight of every nn.Linear inside a GladeBlock (whatever its name), one group per
    `fused_output_sizes` that the Linear declares (None: an ordinary matrix)."""
    groups: dict[tuple[int, ...] | None, list[nn.Parameter]] = {}
    for block in model.modules():
        if not isinstance(block, GladeBlock):
            continue
        for linear in block.modules():
            if isinstance(linear, nn.Linear) and linear.weight.requires_grad:
                groups.setdefault(getattr(linear, "fused_output_sizes", None), []).append(linear.weight)
    return [{"params": params, "fused_output_sizes": sizes} for sizes, params in groups.items()]


def evaluate_closure(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss of an optimizer step's closure (torch's convention: recomputed with gradients enabled)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@dataclass(frozen=True)
class MuonOptions:
    """Muon's refinements (module docstring); all off is torch's Muon."""

    polar_express: bool = False
    normuon: bool = False
    cautious_weight_decay: bool = False

    def group_settings(self) -> dict[str, Any]:
        """Their param-group keys: the command line sets them, a checkpoint's optimizer state does not."""
        return {
            "polar_express": self.polar_express,
            "normuon_beta2": NORMUON_BETA2 if self.normuon else None,
            "cautious_weight_decay": self.cautious_weight_decay,
        }


def polar_express(update: torch.Tensor, eps: float) -> torch.Tensor:
    """The orthogonal factor of `update`, approximately: Polar Express's five steps, in bf16 as torch's Muon."""
    x = update.bfloat16()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() * POLAR_EXPRESS_SAFETY + eps)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def neuron_axis(shape: torch.Size) -> int:
    """NorMuon's neurons run along a matrix's longer side: its rows if it has at least as many rows as columns."""
    return 0 if shape[0] >= shape[1] else 1


def normalize_neurons(orthogonal: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: each neuron's update over the running RMS of its updates (`second_moment` moves in place), then
    rescaled to the Frobenius norm of `orthogonal`."""
    update = orthogonal.float()
    axis = neuron_axis(update.shape)
    second_moment.lerp_(update.square().mean(dim=1 - axis), 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    normalized = update * (scale[:, None] if axis == 0 else scale[None, :])
    return normalized * (update.norm() / normalized.norm().clamp_min(1e-10))


class BlockwiseMuon(torch.optim.Muon):
    """torch's Muon, except that a fused projection is orthogonalised one row block at a time.

    `c_attn` stacks the query, key and value projections ([q; k; v] rows, its `fused_output_sizes`). They are
    separate maps, and Muon's update for a map is its gradient with every singular value set to about one.
    Orthogonalised as one matrix, q, k and v would share one set of singular directions and values, a projection
    with small gradients would get almost no update, and the lr would be scaled for one tall matrix. So for a
    group with `fused_output_sizes`, momentum and nesterov run over the whole tensor as in torch (they are
    elementwise), and each row block then gets its own Newton-Schulz orthogonalisation and its own shape-adjusted
    learning rate, exactly as if it were a separate parameter. A group without it is updated bit for bit as by
    torch.optim.Muon.
    """

    def __init__(self, params: Iterable[dict], options: MuonOptions = MuonOptions(), **kwargs: Any):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            sizes = group.setdefault("fused_output_sizes", None)
            for key, value in options.group_settings().items():
                group.setdefault(key, value)
            for param in group["params"]:
                if sizes is not None and sum(sizes) != param.shape[0]:
                    raise ValueError(f"fused_output_sizes {sizes} do not add up to the {param.shape[0]} rows of a "
                                     f"{tuple(param.shape)} weight")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            lr, momentum = group["lr"], group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                sizes = group["fused_output_sizes"] or (param.shape[0],)
                blocks = [self._block_update(block, group) for block in update.split(sizes)]
                if group["normuon_beta2"] is not None:
                    moments = self._second_moments(param, sizes).split([b.shape[neuron_axis(b.shape)] for b in blocks])
                    blocks = [normalize_neurons(b, m, group["normuon_beta2"]) for b, m in zip(blocks, moments)]
                decay = lr * group["weight_decay"]
                if group["cautious_weight_decay"]:
                    toward_zero = torch.cat(blocks) * param >= 0  # where the update shrinks |weight| too
                    param.sub_(param * toward_zero, alpha=decay)
                else:
                    param.mul_(1 - decay)
                for rows, block in zip(param.split(sizes), blocks):
                    rows.add_(block, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], rows.shape))
        return loss

    @staticmethod
    def _block_update(block: torch.Tensor, group: dict) -> torch.Tensor:
        if group["polar_express"]:
            return polar_express(block, group["eps"])
        return _zeropower_via_newtonschulz(block, group["ns_coefficients"], group["ns_steps"], group["eps"])

    def _second_moments(self, param: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """NorMuon's running mean squares of `param`'s blocks, one per neuron, end to end in one fp32 vector."""
        state = self.state[param]
        if "normuon_second_moment" not in state:
            neurons = sum(max(rows, param.shape[1]) for rows in sizes)
            state["normuon_second_moment"] = torch.zeros(neurons, dtype=torch.float32, device=param.device)
        return state["normuon_second_moment"]


class OptimizerFamilies(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, driven as one: one object for accelerate.prepare, save_state and
    load_state, for the LR scheduler and for zero_grad, so the training loop does not know there are several.

    Its `param_groups` are the inner optimizers' own group dicts, in order: a scheduler that sets a group's lr
    sets it for the optimizer that steps it. The per-parameter state stays in the inner optimizers.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        super().__init__(self._inner_groups(), defaults={})

    def _inner_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = evaluate_closure(closure)
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.param_groups = self._inner_groups()  # torch's load_state_dict replaces each group dict


def make_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    fused: bool,
    muon_lr: float = DEFAULT_MUON_LR,
    muon_options: MuonOptions = MuonOptions(),
) -> torch.optim.Optimizer:
    """AdamW (`name="adamw"`), or Muon for the block matrices and AdamW for the rest (`"muon"`).

    `fused` runs AdamW's whole update in one kernel; otherwise torch picks its multi-tensor (foreach) path.
    Weight decay is decoupled in both: each step shrinks a decayed weight by its own lr x `weight_decay`.
    Muon keeps torch's defaults: momentum 0.95, nesterov, 5 Newton-Schulz steps, lr x sqrt(max(1, rows/cols)).
    AdamW's groups come first, so the first group's lr is --lr's schedule (what metrics.jsonl logs as `lr`).
    `muon_options` turn on Muon's refinements (`MuonOptions`); they need `name="muon"`.
    """
    check_muon_options(name, muon_options)
    if name == "adamw":
        return make_adamw(parameter_groups(model, weight_decay), lr, betas, fused)
    muon_groups = muon_parameter_groups(model)
    if not muon_groups:
        raise ValueError(f"--optimizer muon: {type(model).__name__} has no Linear layers in GladeBlocks for Muon")
    in_muon = frozenset(id(param) for group in muon_groups for param in group["params"])
    return OptimizerFamilies([
        make_adamw(parameter_groups(model, weight_decay, exclude=in_muon), lr, betas, fused),
        BlockwiseMuon(muon_groups, muon_options, lr=muon_lr, weight_decay=weight_decay),
    ])


def check_muon_options(name: str, options: MuonOptions) -> None:
    if name != "muon" and options != MuonOptions():
        raise ValueError("--polar-express, --normuon and --cautious-weight-decay refine Muon: they need --optimizer "
                         "muon")


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float], fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def check_optimizer_fits(name: str, distributed_type: DistributedType) -> None:
    """Refuse Muon under a launch that shards weight matrices, before any work is done."""
    if name == "muon" and distributed_type in SHARDING:
        sharding = SHARDING[distributed_type]
        raise ValueError(f"--optimizer muon needs whole weight matrices, but {sharding} shards them across "
                         "processes: use DDP or --optimizer adamw")


WEIGHT_DECAY_SCHEDULES = ("constant", "linear")


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """The learning-rate schedule, and with `decay_lambda` a weight-decay schedule in step with it: each group's
    weight decay is its `initial_weight_decay` times `decay_lambda(step)`, set whenever the lr is."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float],
                 decay_lambda: Callable[[int], float] | None = None):
        self.decay_lambda = decay_lambda
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])
        super().__init__(optimizer, lr_lambda)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        self.set_weight_decay()

    def state_dict(self) -> dict[str, Any]:
        # Like the lr lambdas, the decay's is rebuilt from the command line, not saved (a lambda cannot be pickled).
        return {key: value for key, value in super().state_dict().items() if key != "decay_lambda"}

    def set_weight_decay(self) -> None:
        if self.decay_lambda is None:
            return
        for group in self.optimizer.param_groups:
            group["weight_decay"] = group["initial_weight_decay"] * self.decay_lambda(self.last_epoch)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float,
    weight_decay_schedule: str = "constant",
) -> Schedule:
    """Linear warmup to each group's own lr, then half a cosine down to `min_lr_ratio` of it at `max_steps`:
    AdamW's and Muon's learning rates follow the same curve, each scaled to its own peak. `weight_decay_schedule`
    "linear" takes every group's weight decay down linearly from its own value at step 0 to zero at `max_steps`
    (nanochat's schedule); "constant" leaves it."""
    cosine = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, min_lr_rate=min_lr_ratio
    )
    decay = (lambda step: max(0.0, 1 - step / max_steps)) if weight_decay_schedule == "linear" else None
    return Schedule(optimizer, cosine.lr_lambdas[0], decay)


# What the command line sets in a param group (the peak learning rate as the scheduler's `initial_lr`), which a
# resumed run takes from its command line rather than from the checkpoint's optimizer state.
COMMAND_LINE_HYPERPARAMETERS = (
    "initial_lr", "weight_decay", "initial_weight_decay", "betas", *MuonOptions().group_settings()
)


def command_line_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's command-line hyperparameters, to restore after loading a checkpoint's optimizer state."""
    return [
        {key: group[key] for key in COMMAND_LINE_HYPERPARAMETERS if key in group} for group in optimizer.param_groups
    ]


def restore_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Schedule, saved: list[dict[str, Any]]) -> None:
    """Put back what `command_line_hyperparameters` returned: the peak learning rates (also the scheduler's base),
    weight decay and betas; and set each group's learning rate (and scheduled weight decay) to its place on the
    schedule at the restored step."""
    for group, values in zip(optimizer.param_groups, saved, strict=True):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler.set_weight_decay()
