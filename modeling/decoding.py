"""Fast decoding: a static cache, one compiled step per token, and matrix-vector products that stream weights.

At batch 1 a decoding step reads every weight once and does two FLOPs per weight, so its floor is the time to stream
the weights from memory. `generate()` spends most of a small model's step elsewhere: its per-token Python (input
preparation, logits processors, stopping criteria, cache bookkeeping) and, on CPU, BLAS matrix-vector products that
run well below memory bandwidth. `CompiledDecoder` keeps the model's own forward and transformers' `StaticCache`, and
compiles one step, from the last token to the next one (its sampling filters included), into a single graph that is called once per
token with no other work between calls. Measurements and a profile: docs/benchmarks.md.
"""

import contextlib
import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import PreTrainedModel, StaticCache
from transformers.generation.streamers import BaseStreamer

from .hardware import bf16_support, native_bf16, warn_emulated_bf16
from .native_decoding import NATIVE_WEIGHTS, NativeStep, library, unavailable, weights_signature
from .sampling import Sampling, choose, process_scores, seen_tokens

logger = logging.getLogger(__name__)

# Rows (batch x new positions) up to which a projection is written as multiply-and-sum. For one row inductor turns it
# into a reduction that streams the weight at close to memory bandwidth, where MKL's sgemv reached a quarter of it on
# the machines measured; with more rows the weight would be streamed once per row, and a GEMM reads it once.
MATVEC_MAX_ROWS = 1
# Tokens between checks of whether every row has ended: reading that flag makes an accelerator wait for the step.
DONE_CHECK_INTERVAL = 16


class DecodeKernels(TorchFunctionMode):
    """Single-query forms of the two ops of a decoding step, written as plain tensor math for torch.compile to fuse.

    - `F.linear` of at most `MATVEC_MAX_ROWS` rows is `(x * weight).sum(-1)`, accumulated in fp32 (as BLAS
      accumulates bf16): inductor makes it a reduction that streams the weight.
    - `F.scaled_dot_product_attention` of one query position is softmax(q k^T * scale + mask) v with an fp32 softmax:
      inductor fuses it with its neighbours, where the CPU flash kernel is a separate call with fixed costs per head.
    Anything else goes to the op itself.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return self.linear(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.numel() > MATVEC_MAX_ROWS * hidden.shape[-1]:
            return F.linear(hidden, weight, bias)
        # A view that needs storage: inductor materialises the input (say a LayerNorm's output) once, instead of
        # recomputing it inside the reduction for every output row, which made bf16 steps ~50% slower.
        hidden = hidden.as_strided(hidden.shape, hidden.stride())
        output = (hidden.unsqueeze(-2).float() * weight.float()).sum(-1).to(hidden.dtype)
        return output if bias is None else output + bias

    @staticmethod
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.shape[-2] != 1 or dropout_p > 0.0 or is_causal:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                enable_gqa=enable_gqa,
            )
        if enable_gqa:
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        return torch.matmul(scores.softmax(-1).to(value.dtype), value)


def decode_step(
    model: PreTrainedModel,
    cache: StaticCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    seen: torch.Tensor,
    generated: torch.Tensor,
    sampling: Sampling,
) -> tuple[torch.Tensor, torch.Tensor]:
    """After `tokens` (one per row, at `positions`): the greedy next token [batch, 1], or with sampling the
    probabilities to draw it from [batch, vocab]; and the positions after them. `seen` gains `tokens`."""
    logits = model(
        input_ids=tokens, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
    ).logits
    return next_choice(logits[:, -1], tokens, seen, generated, sampling), positions + 1


def next_choice(
    logits: torch.Tensor, tokens: torch.Tensor, seen: torch.Tensor, generated: torch.Tensor, sampling: Sampling
) -> torch.Tensor:
    """The greedy next token [batch, 1], or with sampling the probabilities to draw it from, given the last position's
    logits [batch, vocab]; `seen` gains the `tokens` those logits followed."""
    seen.scatter_(1, tokens, True)
    scores = process_scores(logits, seen, generated, sampling)
    return scores.softmax(-1) if sampling.do_sample else scores.argmax(-1, keepdim=True)


def fused_decode_step(*args) -> tuple[torch.Tensor, torch.Tensor]:
    with DecodeKernels():
        return decode_step(*args)


# One compiled function for every decoder: models and caches are its arguments, so decoders of models with the same
# config and batch size share a graph, and new ones add entries to torch.compile's cache only for new shapes. Sampling
# settings are tensors, so new values reuse the graph; greedy and sampling, and top-k and top-p on or off, are separate
# graphs. A C++ wrapper calls the graph's kernels: ~0.1 ms less per token than the Python one for ~2 s more compilation.
compiled_decode_step = torch.compile(fused_decode_step, fullgraph=True, options={"cpp_wrapper": True})


class CompiledDecoder:
    """Decoding of a causal LM through a static cache, token for token what `model.generate()` gives.

        decoder = CompiledDecoder(model, max_length=256)
        sequences = decoder.generate(input_ids, max_new_tokens=100)   # [batch, prompt + new] like generate()

    Greedy by default; `sampling` (see `glade.sampling`) adds transformers' repetition penalty, minimum length,
    temperature, top-k and top-p, drawn with `generator` like generate() draws from the global one. The prompt runs
    eagerly through the static cache; every following token is one call of the compiled step (`compile=False` runs
    the same step eagerly: no compilation, for requests too short to pay for it), or with `native="fp32"` /
    `native="int8"` one call of the C step (`glade.native_decoding`: CPU, fp32 models; int8 quantizes each
    projection per output row), which compiles nothing per model and then chooses the token eagerly. The first
    call of a new batch size compiles (~15 s for a small model); later calls reuse it. `max_length` (prompt + new
    tokens) sizes the cache and defaults to the model's context. Left-padded batches need their `attention_mask`. The
    model is put in eval mode (no dropout), and weights changed later are used by the next call. One decoder serves
    one call at a time; calls from other threads wait for it.
    """

    def __init__(
        self, model: PreTrainedModel, max_length: int | None = None, compile: bool = True, native: str | None = None
    ):
        context = model.config.max_position_embeddings
        self.max_length = context if max_length is None else max_length
        if not 1 < self.max_length <= context:
            raise ValueError(f"max_length must be in [2, {context}] (the model's context), got {self.max_length}")
        if native is not None:
            check_native(model, native)
        self.model = model.eval()
        self.native = native
        self.native_step: NativeStep | None = None
        self.step = self.call_native_step if native else compiled_decode_step if compile else decode_step
        self.cache: StaticCache | None = None
        # One call at a time: calls share the cache, and compiled kernels run from two threads at once have crashed
        # the process.
        self.lock = threading.Lock()
        if model.dtype == torch.bfloat16 and not native_bf16(model.device):
            warn_emulated_bf16(bf16_support(model.device))
        if self.compiled and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and torch.get_num_threads() > 1:
            logger.warning(
                "OMP_WAIT_POLICY=PASSIVE: each of a compiled step's parallel loops ends with its threads asleep, and "
                "decoding runs ~2.5x slower than with OpenMP's default policy (docs/benchmarks.md)"
            )

    @property
    def compiled(self) -> bool:
        return self.step is compiled_decode_step

    def call_native_step(
        self, model, cache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, *choice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode_step` with the model's forward in C (on the model and cache the step is bound to); `choice` is
        `next_choice`'s seen, generated and sampling."""
        logits = self.native_step.logits_after(tokens, positions, attention_mask)
        return next_choice(logits, tokens, *choice), positions + 1

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        sampling: Sampling | None = None,
        generator: torch.Generator | None = None,
        streamer: BaseStreamer | None = None,
    ) -> torch.Tensor:
        """Prompt + up to `max_new_tokens` new tokens per row. With `eos_token_id`, a row that emits it is padded
        with `pad_token_id` (default: the first end id) from then on, and decoding stops once every row has ended.
        A `streamer` gets the prompt, then each step's tokens, as from generate(). Calls from several threads take
        turns."""
        with self.lock:
            return self._generate(
                input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id, sampling, generator, streamer
            )

    def _generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None,
        eos_token_id: int | list[int] | None,
        pad_token_id: int | None,
        sampling: Sampling | None,
        generator: torch.Generator | None,
        streamer: BaseStreamer | None,
    ) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be [batch, prompt length] with at least one token, got shape {list(input_ids.shape)}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}: they must "
                "match"
            )
        batch, prompt_length = input_ids.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_length + max_new_tokens > self.max_length:
            raise ValueError(
                f"the prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceed this decoder's "
                f"max_length of {self.max_length}: shorten them or build the decoder with a larger max_length"
            )
        device = input_ids.device
        vocab_size = self.model.config.vocab_size
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if sampling is None:
            sampling = greedy(vocab_size, device)
        # The mask keeps one shape for the whole run (the cache's), so the compiled step never sees a new one; the
        # positions not generated yet are hidden by causality.
        full_mask = attention_mask.new_ones((batch, self.max_length))
        full_mask[:, :prompt_length] = attention_mask
        stop_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [], device=device)
        if pad_token_id is None:
            pad_token_id = int(stop_ids[0]) if stop_ids.numel() else 0
        self._reset_cache(batch)
        if streamer is not None:
            streamer.put(input_ids.cpu())

        if self.native == "int8":
            logits = self._native_prompt(input_ids, full_mask)
        else:
            # The prompt runs eagerly: its length is seen once, and the compiled step only sees one token per row.
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, cache=self.cache, use_cache=True, logits_to_keep=1
            ).logits[:, -1]
            if self.native:
                self._bind_native_step(batch)
        seen = seen_tokens(input_ids, attention_mask, vocab_size)
        generated = torch.zeros((), dtype=torch.long, device=device)
        tokens = choose(process_scores(logits, seen, generated, sampling), sampling, generator)
        positions = attention_mask.long().sum(-1, keepdim=True)  # the next token's position (left padding excluded)
        done = torch.zeros((batch, 1), dtype=torch.bool, device=device)
        # A streamer sees every step, so the loop may as well stop at the first step where every row has ended.
        done_check_interval = 1 if streamer is not None else DONE_CHECK_INTERVAL
        new_tokens = []
        with contextlib.ExitStack() as later_steps:
            for step in range(max_new_tokens):
                if step > 0:
                    generated = generated + 1
                    choice, positions = self.step(
                        self.model, self.cache, tokens, positions, full_mask, seen, generated, sampling
                    )
                    tokens = torch.multinomial(choice, 1, generator=generator) if sampling.do_sample else choice
                if step == 1 and self.compiled:
                    # The first call checked the compiled step's guards; later calls differ from it in tensor values
                    # only, and checking the guards of every module again would take a fifth of a small model's step.
                    later_steps.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
                if stop_ids.numel():
                    tokens = tokens.masked_fill(done, pad_token_id)
                    done = done | torch.isin(tokens, stop_ids)
                new_tokens.append(tokens)
                if streamer is not None:
                    streamer.put(tokens[:, 0].cpu())
                if stop_ids.numel() and step % done_check_interval == done_check_interval - 1 and bool(done.all()):
                    break
        if streamer is not None:
            streamer.end()
        return self._trim(torch.cat([input_ids, *new_tokens], dim=1), prompt_length, stop_ids)

    def _native_prompt(self, input_ids: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
        """The last position's logits [batch, vocab] after the prompt, run through the C step."""
        self.model.transformer._check_inputs(input_ids, None, input_ids.shape[1])  # C reads ids unchecked
        return self._current_native_step(input_ids.shape[0]).prompt(self.cache, input_ids, full_mask)

    def _bind_native_step(self, batch: int) -> None:
        self._current_native_step(batch).bind(self.cache)

    def _current_native_step(self, batch: int) -> NativeStep:
        """The C step for this batch size and the model's current weights."""
        step = self.native_step
        if step is None or step.batch != batch or step.signature != weights_signature(self.model):
            step = self.native_step = NativeStep(
                library(), self.model, batch, self.max_length, int8=self.native == "int8"
            )
        return step

    @staticmethod
    def _trim(sequences: torch.Tensor, prompt_length: int, stop_ids: torch.Tensor) -> torch.Tensor:
        """Cut the padding that every row carries after the last row ended (done is checked only now and then)."""
        if not stop_ids.numel():
            return sequences
        new = sequences[:, prompt_length:]
        ended = torch.isin(new, stop_ids).cumsum(-1) > 0
        # A row has ended at a position if it emitted an end id there or before; the first position where every row had
        # ended before it is where generate() stops.
        all_ended_before = torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], dim=-1).all(0)
        if not all_ended_before.any():
            return sequences
        return sequences[:, : prompt_length + int(all_ended_before.int().argmax())]

    def _reset_cache(self, batch: int) -> None:
        layer = self.cache.layers[0] if self.cache is not None else None
        if layer is not None and (
            not layer.is_initialized
            or (layer.batch_size == batch and layer.keys.dtype == self.model.dtype and layer.device == self.model.device)
        ):
            self.cache.reset()
            return
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_length)


def check_native(model: PreTrainedModel, native: str) -> None:
    """Refuse, with the reason, a native step that cannot run `model` here."""
    if native not in NATIVE_WEIGHTS:
        raise ValueError(f"native must be one of {', '.join(NATIVE_WEIGHTS)} (or None), got {native!r}")
    reason = unavailable(model)
    if reason is not None:
        raise ValueError(f"the native decoding step cannot run this model: {reason}")


def greedy(vocab_size: int, device: torch.device) -> Sampling:
    """Plain greedy decoding: no penalty, no minimum length."""
    zero, one = torch.zeros((), dtype=torch.long, device=device), torch.ones((), device=device)
    end_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    return Sampling(
        do_sample=False, end_mask=end_mask, min_new_tokens=zero, repetition_penalty=one, temperature=one,
        penalize=False, hold_ends=False,
    )
