"""`GladeForCausalLM.generate()` on the fast decoder (`glade.decoding`) whenever a request fits it.

The mechanism is a delegating `generate`: Glade's model class overrides it, so `model.generate()`,
`pipeline("text-generation")`, `glade generate` and the remote-code model (whose files carry this module) all take
the route with no change on the caller's side. transformers' `custom_generate` would need every caller to name it.

A request fits when it is greedy or multinomial sampling, on CPU or CUDA, of at most `MAX_BATCH` rows of input ids,
with no beams, assistant model, custom logits processor or stopping criterion, no request for scores or hidden states,
and only the processors `glade.sampling` reproduces (repetition penalty, minimum length, temperature, top-k, top-p).
Its settings are read from what transformers' own preparation builds, so the two routes cannot disagree on them.
Anything else goes to transformers' `generate()` unchanged. `fast_decoding` (a `generate()` keyword or a generation
config field) picks the route:
- "auto" (default): the fast route; its step is the C one (`glade.native_decoding`) where it runs (an fp32 model on
  CPU, a C compiler at hand), and otherwise compiled for requests of `COMPILE_MIN_NEW_TOKENS` or more new tokens per
  row and for every request of a batch size that already has a compiled decoder, eager otherwise (compiling costs
  seconds, a short one-off request does not repay it);
- "native" / "int8": the fast route on the C step, with the model's fp32 weights / int8 copies of its projections
  (one scale per output row); refused, with the reason, where the C step cannot run;
- "compiled" / "eager": the fast route, always compiled / never compiled;
- "off": transformers' `generate()`.
"""

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

from .decoding import CompiledDecoder, check_native
from .native_decoding import unavailable
from .sampling import Sampling

FAST_DECODING_MODES = ("auto", "native", "int8", "compiled", "eager", "off")
# The decoder of each route: its `compile` and `native` arguments.
ROUTES = {"native": (False, "fp32"), "int8": (False, "int8"), "compiled": (True, None), "eager": (False, None)}
MAX_BATCH = 8
COMPILE_MIN_NEW_TOKENS = 128
# Shortest cache a decoder is built with; longer ones double up to the model's context, so that requests of nearby
# lengths share a decoder (and its compiled graph) while a short request does not attend over the whole context.
MIN_CACHE_LENGTH = 64
# generate() arguments the fast route does not reproduce: any of them set sends the request to transformers.
FOREIGN_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
    "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "tokenizer",
)


@dataclass
class FastRequest:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    max_new_tokens: int
    sampling: Sampling
    eos_token_id: list[int] | None
    pad_token_id: int | None
    route: str  # a key of ROUTES


class DecoderPool:
    """A model's decoders, one per batch size and route, and the lock that lets one request at a time use them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decoders: dict[tuple[int, str], CompiledDecoder] = {}

    def has_compiled(self, batch: int) -> bool:
        return (batch, "compiled") in self.decoders

    def decoder(self, model: PreTrainedModel, batch: int, length: int, route: str) -> CompiledDecoder:
        decoder = self.decoders.get((batch, route))
        if decoder is None or decoder.max_length < length:
            context = model.config.max_position_embeddings
            cache_length = min(context, max(MIN_CACHE_LENGTH, 1 << (length - 1).bit_length()))
            compile, native = ROUTES[route]
            decoder = self.decoders[(batch, route)] = CompiledDecoder(model, cache_length, compile, native)
        return decoder


_pools: "weakref.WeakKeyDictionary[PreTrainedModel, DecoderPool]" = weakref.WeakKeyDictionary()
_pools_lock = threading.Lock()


def decoder_pool(model: PreTrainedModel) -> DecoderPool:
    with _pools_lock:
        return _pools.setdefault(model, DecoderPool())


def fast_generate(
    model: PreTrainedModel,
    generate: Callable[..., torch.Tensor],
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    fast_decoding: str | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.Tensor:
    """`generate(inputs, generation_config, **kwargs)` (transformers' own), or the same request on the fast decoder.
    `generator` seeds the sampling on either route."""
    mode = fast_decoding or getattr(generation_config or model.generation_config, "fast_decoding", None) or "auto"
    if mode not in FAST_DECODING_MODES:
        raise ValueError(f"fast_decoding must be one of {', '.join(FAST_DECODING_MODES)}, got {mode!r}")
    if mode in ("native", "int8"):
        check_native(model, ROUTES[mode][1])
    streamer = kwargs.pop("streamer", None)
    request = None if mode == "off" else plan(model, inputs, generation_config, kwargs, mode)
    if request is None:
        with global_rng_from(generator):
            return generate(inputs, generation_config, streamer=streamer, **kwargs)
    pool = decoder_pool(model)
    batch, prompt_length = request.input_ids.shape
    with pool.lock:
        decoder = pool.decoder(model, batch, prompt_length + request.max_new_tokens, request.route)
        return decoder.generate(
            request.input_ids, request.max_new_tokens, attention_mask=request.attention_mask,
            eos_token_id=request.eos_token_id, pad_token_id=request.pad_token_id, sampling=request.sampling,
            generator=generator, streamer=streamer,
        )


def plan(
    model: PreTrainedModel,
    inputs: torch.Tensor | None,
    generation_config: GenerationConfig | None,
    kwargs: dict,
    mode: str,
) -> FastRequest | None:
    """The request as the fast decoder runs it, prepared as `generate()` prepares it; None if it does not fit."""
    if any(kwargs.get(name) is not None for name in FOREIGN_ARGUMENTS) or model.device.type not in ("cpu", "cuda"):
        return None
    defaults = model.generation_config
    has_default = {
        name: kwargs.get(name) is None
        and (generation_config is None or getattr(generation_config, name) is None)
        and getattr(defaults, name) is None
        for name in ("max_length", "min_length")
    }
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    attention_mask = model_kwargs.pop("attention_mask", None)
    model_kwargs.pop("use_cache", None)
    if (
        model_kwargs
        or not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or not 1 <= input_ids.shape[0] <= MAX_BATCH
        or input_ids.dtype not in (torch.long, torch.int)
        or config.get_generation_mode() not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
        or config.num_return_sequences not in (None, 1)
        or config.return_dict_in_generate
        or config.use_cache is False
        or config.cache_implementation is not None
        or config.prefill_chunk_size is not None
        or config.token_healing
        or config.is_assistant
        or (attention_mask is not None and not is_left_padded(attention_mask))
    ):
        return None
    prompt_length = input_ids.shape[1]
    device = input_ids.device
    model._prepare_special_tokens(config, attention_mask is not None, device=device, batch_size=input_ids.shape[0])
    config = model._prepare_generated_length(
        config, has_default["max_length"], has_default["min_length"], "input_ids", prompt_length, input_ids
    )
    max_new_tokens = config.max_length - prompt_length
    if not 1 <= max_new_tokens <= model.config.max_position_embeddings - prompt_length:
        return None  # generate() says what is wrong with the length
    processors = model._get_logits_processor(
        config, prompt_length, input_ids, None, LogitsProcessorList(), device,
        {"attention_mask": attention_mask} if attention_mask is not None else {},
    )
    criteria = model._get_stopping_criteria(config, StoppingCriteriaList())
    if not all(isinstance(criterion, (MaxLengthCriteria, EosTokenCriteria)) for criterion in criteria):
        return None
    sampling = Sampling.from_processors(processors, config.do_sample, prompt_length, model.config.vocab_size, device)
    if sampling is None:
        return None
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    route = mode
    if mode == "auto":
        if unavailable(model) is None:
            route = "native"
        elif max_new_tokens >= COMPILE_MIN_NEW_TOKENS or decoder_pool(model).has_compiled(input_ids.shape[0]):
            route = "compiled"
        else:
            route = "eager"
    return FastRequest(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_id=eos.flatten().tolist() if eos is not None else None,
        pad_token_id=int(pad) if pad is not None else None,
        route=route,
    )


def is_left_padded(attention_mask: torch.Tensor) -> bool:
    """Whether each row is zeros then ones: the padding the fast decoder's static cache is laid out for. Other masks
    (right padding, holes) go to generate(), which derives positions from them as the model does."""
    if attention_mask.dim() != 2:
        return False
    mask = attention_mask.bool()
    return bool(torch.equal(mask.long(), attention_mask.long()) and (mask[:, 1:] >= mask[:, :-1]).all())


@contextlib.contextmanager
def global_rng_from(generator: torch.Generator | None) -> Iterator[None]:
    """Run with the global random state of `generator` (which transformers' generate() draws from), then hand the
    advanced state back to it and restore the global one."""
    if generator is None:
        yield
        return
    device = generator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        if device.type == "cuda":
            torch.cuda.set_rng_state(generator.get_state(), device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
