"""`glade inspect`: look inside a Glade model.

- `next`: the next-token distribution after a prompt, at a chosen temperature.
- `steps`: a greedy generation token by token, with each token's probability and the runners-up.
- `attention`: one layer's attention weights, per head, as token x token maps.
- `lens`: the logit lens, the top prediction read out after every layer through the final LayerNorm and unembedding.
- `neighbors` / `analogy`: the geometry of the token embedding (wte) under cosine similarity.

Each analysis returns plain data (dataclasses and lists); a separate `plot_*` function draws it as a PNG.
"""

import argparse
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import PreTrainedTokenizerBase

from .atomic import save_figure
from .loading import add_model_argument, default_model, load_model_and_tokenizer, read_glade_config
from .generate import check_temperature, fit_in_context
from .modeling_glade import GladeForCausalLM

# Tokens carry their whitespace (GPT-2's "Ġking" is " king"); these make it visible in tables and pictures.
VISIBLE_WHITESPACE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥"})


@dataclass(frozen=True)
class TokenProbability:
    token_id: int
    token: str
    probability: float
    logit: float


@dataclass(frozen=True)
class NextTokenPrediction:
    prompt_tokens: list[str]
    temperature: float
    candidates: list[TokenProbability]  # most probable first


@dataclass(frozen=True)
class GenerationStep:
    chosen: TokenProbability
    runners_up: list[TokenProbability]  # the next most probable tokens at this step, most probable first


@dataclass(frozen=True)
class AttentionMaps:
    tokens: list[str]
    layer: int
    heads: list[int]
    # [len(heads), query, key]: row q is how position q spreads its attention over positions 0..q.
    weights: torch.Tensor


@dataclass(frozen=True)
class AttentionLink:
    head: int
    query_position: int
    query_token: str
    key_position: int
    key_token: str
    weight: float


@dataclass(frozen=True)
class LogitLens:
    tokens: list[str]
    layers: list[str]  # row names: "embeddings", then "layer 0" ... (the residual stream after that block)
    predictions: list[list[TokenProbability]]  # [row][position]: the top next-token prediction read out there


@dataclass(frozen=True)
class TokenSimilarity:
    token_id: int
    token: str
    similarity: float


@dataclass(frozen=True)
class EmbeddingQuery:
    query: str  # e.g. "␣king" or "␣king - ␣man + ␣woman"
    answers: list[TokenSimilarity]  # most similar first


def load_glade(model: str | None = None) -> tuple[GladeForCausalLM, PreTrainedTokenizerBase]:
    """A Glade checkpoint dir, hub id or `tiny-random` (default: the shipped model), ready to inspect."""
    name = model or default_model()
    read_glade_config(name)  # a non-Glade checkpoint is refused before its weights are loaded
    lm, tokenizer = load_model_and_tokenizer(name)
    _use_eager_attention(lm)
    return lm.eval(), tokenizer


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token as the tokenizer split it, whitespace made visible: GPT-2's "Ġking" reads "␣king"."""
    text = tokenizer.decode([token_id]).translate(VISIBLE_WHITESPACE)
    # Other control and space characters would print as nothing (or break a table row): show their escapes.
    return "".join(
        char.encode("unicode_escape").decode() if unicodedata.category(char)[0] in "CZ" else char for char in text
    )


def next_token_distribution(
    model: GladeForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, top_k: int = 10, temperature: float = 1.0
) -> NextTokenPrediction:
    """The `top_k` most probable next tokens after `prompt` under softmax(logits / temperature)."""
    check_temperature(temperature)
    _check_top_k(top_k, model.config.vocab_size)
    input_ids = _encode(tokenizer, prompt)
    with torch.no_grad():
        logits = model(input_ids.to(model.device), use_cache=False).logits[0, -1]
    return NextTokenPrediction(
        prompt_tokens=_token_texts(tokenizer, input_ids[0]),
        temperature=temperature,
        candidates=_most_probable(tokenizer, logits, top_k, temperature),
    )


def generation_steps(
    model: GladeForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 10, top_k: int = 5
) -> list[GenerationStep]:
    """Greedy generation one token at a time: each chosen token's probability and the `top_k` runners-up.

    It stops where the model's context ends, with a warning, after fewer than `max_new_tokens` steps."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_top_k(top_k + 1, model.config.vocab_size)
    input_ids = _encode(tokenizer, prompt).to(model.device)
    max_new_tokens = fit_in_context(input_ids.shape[1], max_new_tokens, model.config.max_position_embeddings)
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    steps = []
    for chosen_id, step_logits in zip(output.sequences[0, input_ids.shape[1]:].tolist(), output.logits):
        # Raw logits, not generate's processed scores: the probabilities are the model's own.
        logits = step_logits[0]
        probabilities = torch.softmax(logits.float(), dim=-1)
        runner_up_ids = [i for i in probabilities.topk(top_k + 1).indices.tolist() if i != chosen_id][:top_k]
        steps.append(
            GenerationStep(
                chosen=_token_probability(tokenizer, logits, probabilities, chosen_id),
                runners_up=[_token_probability(tokenizer, logits, probabilities, i) for i in runner_up_ids],
            )
        )
    return steps


def attention_maps(
    model: GladeForCausalLM, tokenizer: PreTrainedTokenizerBase, text: str, layer: int, head: int | None = None
) -> AttentionMaps:
    """The attention weights of one head of `layer`, or of all its heads when `head` is None.

    The model is switched to eager attention, the only implementation that returns its weights.
    """
    _check_index("layer", layer, model.config.n_layer)
    heads = list(range(model.config.n_head)) if head is None else [_check_index("head", head, model.config.n_head)]
    input_ids = _encode(tokenizer, text)
    _use_eager_attention(model)
    with torch.no_grad():
        attentions = model(input_ids.to(model.device), output_attentions=True, use_cache=False).attentions
    return AttentionMaps(
        tokens=_token_texts(tokenizer, input_ids[0]),
        layer=layer,
        heads=heads,
        weights=attentions[layer][0, heads].float().cpu(),
    )


def strongest_links(maps: AttentionMaps, top_n: int = 10) -> list[AttentionLink]:
    """The `top_n` largest attention weights across the heads in `maps`, strongest first."""
    # Position 0 can only attend to itself (weight 1), which says nothing about the head.
    weights = maps.weights[:, 1:, :]
    values, flat = weights.flatten().topk(min(top_n, weights.numel()))
    links = []
    for value, index in zip(values.tolist(), flat.tolist()):
        head_index, query, key = torch.unravel_index(torch.tensor(index), weights.shape)
        query_position, key_position = int(query) + 1, int(key)
        links.append(
            AttentionLink(
                head=maps.heads[int(head_index)],
                query_position=query_position,
                query_token=maps.tokens[query_position],
                key_position=key_position,
                key_token=maps.tokens[key_position],
                weight=value,
            )
        )
    return links


def logit_lens(model: GladeForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str) -> LogitLens:
    """The top next-token prediction at each position, read out after the embeddings and after every block."""
    input_ids = _encode(tokenizer, prompt)
    with torch.no_grad():
        hidden_states = model(input_ids.to(model.device), output_hidden_states=True, use_cache=False).hidden_states
        # The model hands back its last state already through ln_f; the earlier ones are the raw residual stream.
        normed = [model.transformer.ln_f(state) for state in hidden_states[:-1]] + [hidden_states[-1]]
        logits = model.unembed(torch.cat(normed)).float()  # [n_layer + 1, positions, vocab]
    probabilities = torch.softmax(logits, dim=-1)
    top_ids = probabilities.argmax(dim=-1)
    predictions = [
        [_token_probability(tokenizer, logits[row, position], probabilities[row, position], int(token_id))
         for position, token_id in enumerate(row_ids)]
        for row, row_ids in enumerate(top_ids)
    ]
    layers = ["embeddings"] + [f"layer {index}" for index in range(model.config.n_layer)]
    return LogitLens(tokens=_token_texts(tokenizer, input_ids[0]), layers=layers, predictions=predictions)


def word_token_id(tokenizer: PreTrainedTokenizerBase, word: str) -> int:
    """The one token that spells `word`, trying " word" first: GPT-2 style tokens carry the space ("Ġking")."""
    if not word.strip():
        raise ValueError("the word is empty: give a word that is a single token")
    forms = [word] if word.startswith(" ") else [" " + word, word]
    splits = {}
    for form in forms:
        ids = tokenizer.encode(form, add_special_tokens=False)
        if len(ids) == 1 and not _is_unknown(tokenizer, ids[0], form):
            return ids[0]
        splits[form] = ids
    if all(len(ids) == 1 for ids in splits.values()):
        raise ValueError(f"{word!r} is not in the vocabulary: it encodes to the unknown token {tokenizer.unk_token!r}")
    shown = "; ".join(f"{form!r} splits into {_token_texts(tokenizer, ids)}" for form, ids in splits.items())
    raise ValueError(f"{word!r} is not a single token: {shown}. Choose a word that is one token")


@torch.no_grad()
def nearest_tokens(
    model: GladeForCausalLM, tokenizer: PreTrainedTokenizerBase, word: str, top_k: int = 10
) -> EmbeddingQuery:
    """The `top_k` tokens whose input embeddings are closest to `word`'s by cosine similarity."""
    token_id = word_token_id(tokenizer, word)
    embeddings = model.get_input_embeddings().weight
    answers = _most_similar(tokenizer, embeddings, embeddings[token_id], {token_id}, top_k)
    return EmbeddingQuery(token_text(tokenizer, token_id), answers)


@torch.no_grad()
def analogy(
    model: GladeForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    word: str,
    minus: str,
    plus: str,
    top_k: int = 5,
) -> EmbeddingQuery:
    """Tokens nearest to `word - minus + plus` (king - man + woman) in the input embedding, inputs excluded."""
    ids = [word_token_id(tokenizer, w) for w in (word, minus, plus)]
    embeddings = model.get_input_embeddings().weight
    target = embeddings[ids[0]] - embeddings[ids[1]] + embeddings[ids[2]]
    first, second, third = (token_text(tokenizer, token_id) for token_id in ids)
    answers = _most_similar(tokenizer, embeddings, target, set(ids), top_k)
    return EmbeddingQuery(f"{first} - {second} + {third}", answers)


def plot_next_token(prediction: NextTokenPrediction, out: str | Path | None = None) -> Figure:
    """A bar chart of the candidate next tokens' probabilities, most probable on top."""
    candidates = prediction.candidates
    figure = _new_figure(7, 1.2 + 0.35 * len(candidates))
    ax = figure.add_subplot()
    ax.barh(range(len(candidates)), [c.probability for c in candidates], color="tab:blue")
    ax.set_yticks(range(len(candidates)), [c.token for c in candidates])
    ax.invert_yaxis()
    for row, candidate in enumerate(candidates):
        ax.text(candidate.probability, row, f" {candidate.probability:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, min(1.0, 1.15 * max(c.probability for c in candidates)))
    ax.set_xlabel(f"probability (temperature {prediction.temperature:g})")
    ax.set_title(f"next token after {_tail(prediction.prompt_tokens)}")
    return _finish(figure, out)


def plot_generation_steps(steps: list[GenerationStep], out: str | Path | None = None) -> Figure:
    """Each greedy step as a column: the chosen token on top, the runners-up below, coloured by probability."""
    if not steps:
        raise ValueError("there are no generation steps to plot")
    ranks = 1 + max(len(step.runners_up) for step in steps)
    columns = [[step.chosen, *step.runners_up] for step in steps]
    cells = [[column[rank] if rank < len(column) else None for column in columns] for rank in range(ranks)]
    figure = _new_figure(1.5 + 0.9 * len(steps), 1.5 + 0.45 * ranks)
    ax = figure.add_subplot()
    _annotated_heatmap(ax, cells, ["chosen"] + [f"#{rank + 1}" for rank in range(1, ranks)],
                       [f"{index + 1}" for index in range(len(steps))])
    ax.set_xlabel("generation step")
    ax.set_title("greedy generation: chosen token and runners-up")
    return _finish(figure, out)


def plot_attention(maps: AttentionMaps, out: str | Path | None = None) -> Figure:
    """A token x token heatmap per head (one panel per head in `maps`), with one shared colour scale."""
    n_panels, n_tokens = len(maps.heads), len(maps.tokens)
    columns = math.ceil(math.sqrt(n_panels))
    rows = math.ceil(n_panels / columns)
    panel_size = max(3.0, 0.3 * n_tokens + 1.5)
    figure = _new_figure(columns * panel_size + 1, rows * panel_size + 0.5)
    grid = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax in grid[n_panels:]:
        figure.delaxes(ax)
    for index, (ax, head) in enumerate(zip(grid, maps.heads)):
        image = ax.imshow(maps.weights[index].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {head}", fontsize=9)
        # Label only the outer panels: the grid shares one token order on both axes.
        show_y, show_x = index % columns == 0, index + columns >= n_panels
        ax.set_yticks(range(n_tokens), maps.tokens if show_y else [], fontsize=7)
        ax.set_xticks(range(n_tokens), maps.tokens if show_x else [], fontsize=7, rotation=90)
    figure.colorbar(image, ax=list(grid[:n_panels]), label="attention weight (query row -> key column)")
    figure.suptitle(f"layer {maps.layer} attention")
    return _finish(figure, out)


def plot_logit_lens(lens: LogitLens, out: str | Path | None = None) -> Figure:
    """Layers x positions, coloured by the probability of the top token, each cell labelled with that token."""
    figure = _new_figure(2 + 0.9 * len(lens.tokens), 1.5 + 0.4 * len(lens.layers))
    ax = figure.add_subplot()
    _annotated_heatmap(ax, lens.predictions, lens.layers, lens.tokens)
    ax.invert_yaxis()  # embeddings at the bottom, the model's output on top
    ax.set_xlabel("input token (prediction is for the token after it)")
    ax.set_title("logit lens: top next-token prediction after each layer")
    return _finish(figure, out)


def _use_eager_attention(model: GladeForCausalLM) -> None:
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    if not text:
        raise ValueError("the prompt is empty: give some text to inspect")
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if input_ids.shape[1] == 0:
        raise ValueError(f"the prompt {text!r} encodes to no tokens")
    return input_ids


def _token_texts(tokenizer: PreTrainedTokenizerBase, ids) -> list[str]:
    return [token_text(tokenizer, int(token_id)) for token_id in ids]


def _check_top_k(top_k: int, vocab_size: int) -> None:
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {top_k}")


def _check_index(name: str, index: int, count: int) -> int:
    if not 0 <= index < count:
        raise ValueError(f"{name} {index} is out of range: this model has {count} {name}s, numbered 0..{count - 1}")
    return index


def _token_probability(
    tokenizer: PreTrainedTokenizerBase, logits: torch.Tensor, probabilities: torch.Tensor, token_id: int
) -> TokenProbability:
    return TokenProbability(
        token_id, token_text(tokenizer, token_id), float(probabilities[token_id]), float(logits[token_id])
    )


def _most_probable(
    tokenizer: PreTrainedTokenizerBase, logits: torch.Tensor, top_k: int, temperature: float = 1.0
) -> list[TokenProbability]:
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    top_ids = probabilities.topk(top_k).indices.tolist()
    return [_token_probability(tokenizer, logits, probabilities, token_id) for token_id in top_ids]


def _is_unknown(tokenizer: PreTrainedTokenizerBase, token_id: int, form: str) -> bool:
    return token_id == tokenizer.unk_token_id and form.strip() != tokenizer.unk_token


def _most_similar(
    tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor, vector: torch.Tensor, exclude: set[int], top_k: int
) -> list[TokenSimilarity]:
    _check_top_k(top_k, embeddings.shape[0] - len(exclude))
    similarities = F.cosine_similarity(embeddings.float(), vector.float().unsqueeze(0), dim=-1)
    similarities[list(exclude)] = -math.inf
    top = similarities.topk(top_k)
    return [
        TokenSimilarity(token_id, token_text(tokenizer, token_id), similarity)
        for similarity, token_id in zip(top.values.tolist(), top.indices.tolist())
    ]


def _tail(tokens: list[str], keep: int = 8) -> str:
    text = "".join(tokens[-keep:])
    return f"'…{text}'" if len(tokens) > keep else f"'{text}'"


def _new_figure(width: float, height: float) -> Figure:
    # A bare Figure on the Agg canvas: no pyplot global state, no display needed.
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _annotated_heatmap(
    ax: Axes, cells: list[list[TokenProbability | None]], row_names: list[str], column_names: list[str]
) -> None:
    probabilities = [[cell.probability if cell else math.nan for cell in row] for row in cells]
    ax.imshow(probabilities, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for row, row_cells in enumerate(cells):
        for column, cell in enumerate(row_cells):
            if cell is not None:
                colour = "white" if cell.probability > 0.6 else "black"
                ax.text(column, row, f"{cell.token}\n{cell.probability:.2f}", ha="center", va="center",
                        fontsize=7, color=colour)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
    ax.set_xticks(range(len(column_names)), column_names, fontsize=8, rotation=45, ha="right")


def _finish(figure: Figure, out: str | Path | None) -> Figure:
    if out is not None:
        save_figure(figure, out)
    return figure


def add_arguments(inspect: argparse.ArgumentParser) -> None:
    """`glade inspect WHAT ...`."""
    commands = inspect.add_subparsers(dest="what", required=True, metavar="WHAT")

    def add(name: str, help: str, handler, picture: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help)
        add_model_argument(parser)
        if picture:
            parser.add_argument("--out", default=None, metavar="PATH.png", help="also save a picture here")
        parser.set_defaults(func=handler)
        return parser

    parser = add("next", "the most probable next tokens after a prompt", _run_next)
    parser.add_argument("prompt")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=1.0)

    parser = add("steps", "a greedy generation step by step, with runner-up tokens", _run_steps)
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=4, help="runner-up tokens shown per step")

    parser = add("attention", "attention weights of one layer (one head, or all heads)", _run_attention)
    parser.add_argument("prompt")
    parser.add_argument("--layer", type=int, required=True, help="layer index, from 0")
    parser.add_argument("--head", type=int, default=None, help="head index, from 0 (default: all heads)")
    parser.add_argument("--links", type=int, default=10, help="strongest links listed")

    parser = add("lens", "the logit lens: top prediction after each layer", _run_lens)
    parser.add_argument("prompt")

    parser = add("neighbors", "nearest tokens in the input embedding", _run_neighbors, picture=False)
    parser.add_argument("word")
    parser.add_argument("--top-k", type=int, default=10)

    parser = add("analogy", "embedding arithmetic: WORD - MINUS + PLUS", _run_analogy, picture=False)
    parser.add_argument("word", help="e.g. king")
    parser.add_argument("minus", help="e.g. man")
    parser.add_argument("plus", help="e.g. woman")
    parser.add_argument("--top-k", type=int, default=5)


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(f"{cell:<{width}}" for cell, width in zip(line, widths)).rstrip())


def _save_picture(plot, data, out: str | None) -> None:
    if out:
        plot(data, out)
        print(f"\nsaved {out}")


def _run_next(args: argparse.Namespace) -> None:
    model, tokenizer = load_glade(args.model)
    prediction = next_token_distribution(model, tokenizer, args.prompt, args.top_k, args.temperature)
    print(f"next token after {_tail(prediction.prompt_tokens)} (temperature {prediction.temperature:g}):\n")
    _print_table(
        ["rank", "token", "id", "probability", "logit"],
        [[str(rank), c.token, str(c.token_id), f"{c.probability:.4f}", f"{c.logit:.3f}"]
         for rank, c in enumerate(prediction.candidates, start=1)],
    )
    _save_picture(plot_next_token, prediction, args.out)


def _run_steps(args: argparse.Namespace) -> None:
    model, tokenizer = load_glade(args.model)
    steps = generation_steps(model, tokenizer, args.prompt, args.max_new_tokens, args.top_k)
    _print_table(
        ["step", "token", "probability", "runners-up"],
        [[str(index), step.chosen.token, f"{step.chosen.probability:.4f}",
          "  ".join(f"{r.token} {r.probability:.3f}" for r in step.runners_up)]
         for index, step in enumerate(steps, start=1)],
    )
    print(f"\n{args.prompt}{tokenizer.decode([step.chosen.token_id for step in steps])}")
    _save_picture(plot_generation_steps, steps, args.out)


def _run_attention(args: argparse.Namespace) -> None:
    model, tokenizer = load_glade(args.model)
    maps = attention_maps(model, tokenizer, args.prompt, args.layer, args.head)
    print(f"tokens: {' | '.join(maps.tokens)}\n\nstrongest attention links in layer {maps.layer}:\n")
    _print_table(
        ["head", "from (query)", "to (key)", "weight"],
        [[str(link.head), f"{link.query_position} {link.query_token}", f"{link.key_position} {link.key_token}",
          f"{link.weight:.3f}"] for link in strongest_links(maps, args.links)],
    )
    _save_picture(plot_attention, maps, args.out)


def _run_lens(args: argparse.Namespace) -> None:
    model, tokenizer = load_glade(args.model)
    lens = logit_lens(model, tokenizer, args.prompt)
    print("top next-token prediction after each layer (probability), per input token:\n")
    _print_table(
        ["", *lens.tokens],
        [[name, *(f"{p.token} {p.probability:.2f}" for p in row)]
         for name, row in reversed(list(zip(lens.layers, lens.predictions)))],
    )
    _save_picture(plot_logit_lens, lens, args.out)


def _print_similar(title: str, result: EmbeddingQuery) -> None:
    print(f"{title} {result.query} (cosine similarity in the input embedding):\n")
    _print_table(
        ["rank", "token", "id", "similarity"],
        [[str(rank), a.token, str(a.token_id), f"{a.similarity:.4f}"] for rank, a in enumerate(result.answers, 1)],
    )


def _run_neighbors(args: argparse.Namespace) -> None:
    model, tokenizer = load_glade(args.model)
    _print_similar("nearest tokens to", nearest_tokens(model, tokenizer, args.word, args.top_k))


def _run_analogy(args: argparse.Namespace) -> None:
    model, tokenizer = load_glade(args.model)
    _print_similar("tokens nearest to", analogy(model, tokenizer, args.word, args.minus, args.plus, args.top_k))
