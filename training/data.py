"""Training data: documents -> one cached token file -> fixed blocks -> per-rank batches.

1. `resolve_text_source` / `load_documents`: local `.txt` / `.jsonl` / `.parquet` files (each `.txt` file is one
   document), a local dataset folder, or a Hub dataset id, read with `datasets` (optionally streaming).
2. `tokenize_to_cache`: every document is tokenized once, followed by `<|endoftext|>`, into a flat numpy token file
   (uint16 when the vocabulary fits, else uint32) whose name is a hash of the tokenizer, the data and the options,
   so a second run (or every other rank) reuses it. Long documents are encoded in pieces cut where the ids cannot
   change, so memory stays bounded (a 41 MB book file: 1.0 GB peak instead of 5.5 GB).
3. `TokenBlocks`: windows of block_size + 1 tokens stepping by block_size, so each token after the first is a
   prediction target exactly once; inputs are window[:-1] and targets window[1:].
   `DocumentShuffledBlocks` (`--shuffle-documents`) first puts the documents (the spans between `<|endoftext|>`s)
   in a new order each epoch, so each epoch cuts its blocks at other places.
4. `StepBatchSampler`: one shuffled order per epoch; each optimizer step takes the next
   batch_size x grad_accum x num_processes blocks of it, and each rank its own disjoint slice. The position in the
   data is therefore a function of the step alone, which is what makes resuming exact.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from glade.atomic import write_text_atomically
from glade.loading import looks_like_local_path

# Bump when the token file layout changes, so stale caches are not reused.
CACHE_FORMAT = 1
IGNORE_INDEX = -100
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKENIZE_BATCH = 256
# A whole 40 MB book file encoded in one call holds every token's string and offsets at once: gigabytes. Long
# documents are encoded in pieces of about this many characters, and at most ENCODE_CHARS characters per call.
PIECE_CHARS = 1 << 16
ENCODE_CHARS = 1 << 22
# Cut points that GPT-2-style byte-level pre-tokenization always separates: between a non-space character and a
# newline that is followed by another non-space character. Neither side's pre-tokens change, so neither do the ids.
SAFE_CUT = re.compile(r"(?<=\S)(?=\n\S)")


@dataclass(frozen=True)
class TextSource:
    """Where documents come from: local files of one format, a local dataset folder, or a Hub dataset."""

    kind: str  # "files", "folder" or "hub"
    locations: tuple[str, ...]
    text_column: str = "text"
    split: str = "train"
    config_name: str | None = None

    def describe(self) -> str:
        if self.kind == "hub":
            return f"Hub dataset {self.locations[0]} (split {self.split!r})"
        more = len(self.locations) - 3
        return ", ".join(self.locations[:3]) + (f" (+{more} more)" if more > 0 else "")

    def local_files(self) -> list[str]:
        """The files the documents are read from (none for a Hub dataset)."""
        if self.kind == "files":
            return list(self.locations)
        if self.kind == "folder":
            return sorted(str(p) for p in Path(self.locations[0]).rglob("*") if p.is_file())
        return []

    def fingerprint(self) -> dict:
        """What identifies this data for the token cache: for files their paths, sizes and modification times."""
        identity = asdict(self)
        if self.kind != "hub":
            identity["files"] = [[path, os.stat(path).st_size, os.stat(path).st_mtime_ns]
                                 for path in self.local_files()]
        return identity


def resolve_text_source(
    data: Sequence[str], text_column: str = "text", split: str = "train", config_name: str | None = None
) -> TextSource:
    """Classify `--data` arguments, failing early on missing or empty files and unsupported formats."""
    if not data:
        raise ValueError("no training data given: pass --data FILE... or a Hub dataset id")
    files: list[str] = []
    for item in map(os.path.expanduser, map(str, data)):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"data pattern {item!r} matches no files")
            files.extend(matches)
        elif os.path.isdir(item):
            if len(data) > 1:
                raise ValueError(f"a dataset folder ({item}) must be the only --data source")
            return TextSource("folder", (os.path.abspath(item),), text_column, "train")
        elif os.path.isfile(item) or _looks_like_path(item):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"data file {item} does not exist")
            files.append(item)
        else:
            if len(data) > 1:
                raise ValueError(f"a Hub dataset id ({item}) must be the only --data source")
            return TextSource("hub", (item,), text_column, split, config_name)

    suffixes = {Path(f).suffix.lower() for f in files}
    unknown = suffixes - set(FILE_BUILDERS)
    if unknown:
        raise ValueError(f"unsupported data file type {sorted(unknown)}; use one of {sorted(FILE_BUILDERS)}")
    if len({FILE_BUILDERS[s] for s in suffixes}) > 1:
        raise ValueError(f"data files must share one format, got {sorted(suffixes)}")
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValueError(f"data file {f} is empty")
    return TextSource("files", tuple(os.path.abspath(f) for f in files), text_column, "train")


def _looks_like_path(item: str) -> bool:
    # A Hub dataset id has no data-file suffix.
    return Path(item).suffix.lower() in FILE_BUILDERS or looks_like_local_path(item)


def load_documents(source: TextSource, streaming: bool = False):
    """The source as a `datasets` Dataset (or IterableDataset when streaming), checked to have the text column."""
    import datasets  # slow to import, and not needed at all when the tokens are cached

    if source.kind == "files":
        for path in source.locations:
            if Path(path).suffix.lower() == ".jsonl":
                check_json_lines(path, source.text_column)
        builder = FILE_BUILDERS[Path(source.locations[0]).suffix.lower()]
        # A .txt file is one document: splitting it by lines would put <|endoftext|> after every line.
        options = {"sample_by": "document"} if builder == "text" else {}
        documents = datasets.load_dataset(
            builder, data_files=list(source.locations), split="train", streaming=streaming, **options
        )
    elif source.kind == "folder":
        documents = datasets.load_dataset(source.locations[0], split="train", streaming=streaming)
    else:
        documents = datasets.load_dataset(
            source.locations[0], source.config_name, split=source.split, streaming=streaming
        )
    columns = documents.column_names
    if columns is None:  # a streamed dataset whose features are unknown until read
        columns = list(next(iter(documents), {}).keys())
    if source.text_column not in columns:
        raise ValueError(
            f"text column {source.text_column!r} not found in {source.describe()}; "
            f"its columns are: {', '.join(columns) or '(none)'} (choose one with --text-column)"
        )
    return documents


def check_json_lines(path: str, text_column: str) -> None:
    """Refuse the first line of a JSON Lines file that is not a JSON object with the text column, by file and line.

    `datasets` would stop at a line that is not JSON with a traceback naming neither (its row numbers count within a
    block), and read a line without the column as no text, skipped. Blank lines pass, as `datasets` skips them; a
    JSON array or objects spread over lines, which `datasets` also reads, belong in a .json file. A file that is not
    UTF-8 raises the UnicodeDecodeError that `naming_undecodable_files` names.
    """
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                # Not error.colno: a line cut off fails at its newline, which json counts as column 1 of a line 2.
                problem = f"{error.msg} at column {error.pos + 1}"
                raise ValueError(f"data file {path} line {number} is not JSON ({problem})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"data file {path} line {number} is not a JSON object: a .jsonl file holds one object per line"
                )
            if text_column not in record:
                raise ValueError(
                    f"text column {text_column!r} not found in data file {path} line {number}; its columns are: "
                    f"{', '.join(record) or '(none)'} (choose one with --text-column)"
                )


def iter_texts(documents, text_column: str, batch_size: int = TOKENIZE_BATCH) -> Iterator[list[str]]:
    """Non-empty texts of the column, in batches."""
    for batch in documents.iter(batch_size=batch_size):
        texts = []
        for text in batch[text_column]:
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise ValueError(f"text column {text_column!r} holds {type(text).__name__} values, not strings")
            texts.append(text)
        if texts:
            yield texts


@dataclass(frozen=True)
class TokenFile:
    """A flat file of token ids: every document's tokens followed by eos."""

    path: Path
    dtype: str
    num_tokens: int
    num_documents: int
    num_bytes: int  # UTF-8 bytes of the documents' text
    key: str

    def tokens(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def cache_key(source: TextSource, tokenizer: PreTrainedTokenizerFast) -> str:
    identity = {
        "format": CACHE_FORMAT,
        "source": source.fingerprint(),
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        "eos": tokenizer.eos_token_id,
        "dtype": token_dtype(len(tokenizer)),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "glade" / "tokens"


def cached_token_file(
    source: TextSource, tokenizer: PreTrainedTokenizerFast, cache_dir: str | Path
) -> TokenFile | None:
    """The finished token file for this data and tokenizer, if one is in the cache."""
    key = cache_key(source, tokenizer)
    meta_path = Path(cache_dir) / f"{key}.json"
    if not meta_path.is_file():
        return None
    try:
        token_file = TokenFile(path=Path(cache_dir) / f"{key}.bin", **json.loads(meta_path.read_text()))
        expected = token_file.num_tokens * np.dtype(token_file.dtype).itemsize
    except (ValueError, TypeError) as error:  # not JSON, not an object, missing or unknown fields, a bad dtype
        raise ValueError(
            f"the token cache entry {meta_path} is damaged ({error}): delete it and {key}.bin to tokenize again"
        ) from None
    if not token_file.path.is_file() or token_file.path.stat().st_size != expected:
        return None
    return token_file


def tokenize_to_cache(
    source: TextSource,
    tokenizer: PreTrainedTokenizerFast,
    cache_dir: str | Path,
    streaming: bool = False,
    show_progress: bool = True,
) -> TokenFile:
    """Tokenize `source` into the cache (or reuse what is there) and return the token file."""
    cached = cached_token_file(source, tokenizer, cache_dir)
    if cached is not None:
        return cached
    with naming_undecodable_files(source):
        return write_token_file(source, tokenizer, cache_dir, streaming, show_progress)


@contextmanager
def naming_undecodable_files(source: TextSource) -> Iterator[None]:
    """`datasets` reads a file that is not UTF-8 (binary, or Latin-1 text) into a UnicodeDecodeError, wrapped or
    not, that names no file: name the file."""
    try:
        yield
    except Exception as error:
        undecodable = first_non_utf8_file(source) if caused_by(error, UnicodeDecodeError) else None
        if undecodable is None:
            raise
        raise ValueError(
            f"data file {undecodable} is not UTF-8 text (a binary file, or text in another encoding such as "
            "Latin-1): convert it to UTF-8 or leave it out"
        ) from error


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `error`, or an exception it was raised from or while handling, is a `kind`."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error is not None


def first_non_utf8_file(source: TextSource) -> str | None:
    """The first text or JSON file of the source that does not decode as UTF-8, read in chunks."""
    for path in source.local_files():
        if FILE_BUILDERS.get(Path(path).suffix.lower()) not in ("text", "json"):
            continue  # parquet and datasets' own files are binary by design
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with open(path, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return path
    return None


def write_token_file(
    source: TextSource, tokenizer: PreTrainedTokenizerFast, cache_dir: str | Path, streaming: bool, show_progress: bool
) -> TokenFile:
    """Read and tokenize every document into the cache entry of this source and tokenizer."""
    documents = load_documents(source, streaming=streaming)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, tokenizer)
    dtype = np.dtype(token_dtype(len(tokenizer)))
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    piece_chars = PIECE_CHARS if splits_exactly_at_newlines(tokenizer) else None
    num_tokens = num_documents = num_bytes = 0

    # Tokens go to a temporary file; the metadata, written last, is what marks the cache entry as finished.
    staging = cache_dir / f".{key}.bin.{os.getpid()}.tmp"
    total = len(documents) if hasattr(documents, "__len__") else None
    progress = tqdm(total=total, desc=f"tokenizing {source.describe()}", unit="doc", disable=not show_progress)
    try:
        with open(staging, "wb") as out:
            for texts in iter_texts(documents, source.text_column):
                for ids, ends_document in encode_in_pieces(texts, tokenizer, piece_chars):
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    num_tokens += len(ids)
                    if ends_document:
                        out.write(eos.tobytes())
                        num_tokens += 1
                num_documents += len(texts)
                num_bytes += sum(len(text.encode("utf-8")) for text in texts)
                progress.update(len(texts))
        progress.close()
        if num_documents == 0:
            raise ValueError(f"{source.describe()} has no text in column {source.text_column!r} (empty dataset)")
        os.replace(staging, cache_dir / f"{key}.bin")
    finally:
        staging.unlink(missing_ok=True)
    meta = dict(dtype=dtype.name, num_tokens=num_tokens, num_documents=num_documents, num_bytes=num_bytes, key=key)
    write_text_atomically(cache_dir / f"{key}.json", json.dumps(meta, indent=2))
    return TokenFile(path=cache_dir / f"{key}.bin", **meta)


def splits_exactly_at_newlines(tokenizer: PreTrainedTokenizerFast) -> bool:
    """Whether cutting text at SAFE_CUT leaves the ids unchanged: GPT-2-style byte-level BPE."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre_tokenizer.get("type") == "ByteLevel"
        and pre_tokenizer.get("use_regex", True)
        and not pre_tokenizer.get("add_prefix_space", False)
        # A special token that strips whitespace next to it could swallow the newline on the other side of a cut.
        and not any(token.get("lstrip") or token.get("rstrip") for token in spec.get("added_tokens", []))
    )


def split_at_newlines(text: str, piece_chars: int) -> list[str]:
    """`text` cut at the first SAFE_CUT after every `piece_chars` characters (one piece if there is none)."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = SAFE_CUT.search(text, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def encode_in_pieces(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, piece_chars: int | None
) -> Iterator[tuple[list[int], bool]]:
    """(ids, ends_document) for each piece of each text, in order; `piece_chars=None` encodes texts whole."""
    pieces = [
        (piece, i == len(parts) - 1)
        for text in texts
        for parts in [split_at_newlines(text, piece_chars) if piece_chars else [text]]
        for i, piece in enumerate(parts)
    ]
    start = chars = 0
    for stop, (piece, _) in enumerate(pieces, 1):
        chars += len(piece)
        if chars >= ENCODE_CHARS or stop == len(pieces):
            group = pieces[start:stop]
            encodings = tokenizer.backend_tokenizer.encode_batch_fast([p for p, _ in group], add_special_tokens=False)
            yield from ((encoding.ids, ends) for encoding, (_, ends) in zip(encodings, group))
            start, chars = stop, 0


class TokenBlocks(torch.utils.data.Dataset):
    """Windows of block_size + 1 tokens over tokens[start:stop], consecutive windows sharing one token."""

    def __init__(self, token_file: TokenFile, block_size: int, start: int = 0, stop: int | None = None):
        self.token_file = token_file
        self.block_size = block_size
        self.start = start
        self.stop = token_file.num_tokens if stop is None else stop
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        return max(0, (self.stop - self.start - 1) // self.block_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range [0, {len(self)})")
        begin = self.start + index * self.block_size
        window = np.array(self.tokens()[begin : begin + self.block_size + 1], dtype=np.int64)
        return {"index": index, "tokens": torch.from_numpy(window)}

    def tokens(self) -> np.memmap:
        if self._tokens is None:  # opened lazily so DataLoader workers each map the file themselves
            self._tokens = self.token_file.tokens()
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


# Tokens per slice when DocumentShuffledBlocks looks for the ends of documents.
SCAN_TOKENS = 1 << 24
# Mixed into the seed of an epoch's document order, so that it is drawn apart from the same epoch's block order.
DOCUMENT_ORDER_STREAM = 1


class DocumentShuffledBlocks(TokenBlocks):
    """`TokenBlocks` over a stream whose documents (each ending with `eos_token_id`; the last may lack it) are put in
    a new order each epoch, drawn from (seed, epoch): each epoch cuts its blocks at other places and puts other
    documents side by side. Item `epoch * len(self) + index` is block `index` of epoch `epoch`'s stream, which holds
    the same tokens as every other epoch's, so an epoch has as many blocks."""

    def __init__(
        self, token_file: TokenFile, block_size: int, eos_token_id: int, seed: int, start: int = 0,
        stop: int | None = None,
    ):
        super().__init__(token_file, block_size, start, stop)
        self.eos_token_id = eos_token_id
        self.seed = seed
        self._spans: tuple[np.ndarray, np.ndarray] | None = None  # each document's first token and length
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # an epoch, its order and its documents' ends

    def __getitem__(self, item: int) -> dict[str, torch.Tensor | int]:
        if item < 0:
            raise IndexError(f"item {item} is negative")
        epoch, index = divmod(item, len(self))
        starts, lengths = self.document_spans()
        order, ends = self.epoch_order(epoch)
        begin, stop = index * self.block_size, (index + 1) * self.block_size + 1
        pieces = []
        document = int(np.searchsorted(ends, begin, side="right"))
        while begin < stop:
            taken = order[document]
            offset = begin - (ends[document] - lengths[taken])
            length = min(stop, ends[document]) - begin
            pieces.append(self.tokens()[starts[taken] + offset : starts[taken] + offset + length])
            begin += length
            document += 1
        window = np.concatenate(pieces).astype(np.int64)
        return {"index": item, "tokens": torch.from_numpy(window)}

    def document_spans(self) -> tuple[np.ndarray, np.ndarray]:
        if self._spans is None:
            ends = self._document_ends()
            if not len(ends) or ends[-1] != self.stop - self.start:
                ends = np.append(ends, self.stop - self.start)
            starts = np.concatenate([[0], ends[:-1]])
            self._spans = (starts + self.start, ends - starts)
        return self._spans

    def _document_ends(self) -> np.ndarray:
        """Where each end-of-text token ends its document, relative to `start`, read a slice at a time so that a
        corpus larger than memory never needs a mask of its size."""
        tokens = self.tokens()
        found = [
            np.flatnonzero(tokens[begin : min(begin + SCAN_TOKENS, self.stop)] == self.eos_token_id)
            + (begin - self.start)
            for begin in range(self.start, self.stop, SCAN_TOKENS)
        ]
        return np.concatenate([np.zeros(0, dtype=np.int64), *found]) + 1

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The documents in epoch `epoch`'s order, and where each ends in its stream."""
        if self._epoch is None or self._epoch[0] != epoch:
            _, lengths = self.document_spans()
            order = np.random.default_rng([self.seed, epoch, DOCUMENT_ORDER_STREAM]).permutation(len(lengths))
            self._epoch = (epoch, order, np.cumsum(lengths[order]))
        return self._epoch[1], self._epoch[2]


def split_train_val(
    token_file: TokenFile, block_size: int, val_fraction: float
) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Hold out the last `val_fraction` of the token stream for validation (none when it is 0)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = int(token_file.num_tokens * val_fraction)
    if val_fraction > 0 and num_val < block_size + 1:
        raise ValueError(
            f"the validation split ({val_fraction:g} of {token_file.num_tokens} tokens = {num_val}) is shorter than "
            f"one block of {block_size + 1} tokens: raise --val-fraction, lower --block-size or pass --val-data"
        )
    split = token_file.num_tokens - num_val
    train = TokenBlocks(token_file, block_size, 0, split)
    val = TokenBlocks(token_file, block_size, split, token_file.num_tokens) if num_val else None
    return train, val


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Inputs and already-shifted targets of a batch of windows."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


@dataclass(frozen=True)
class BatchRamp:
    """Micro-batches per optimizer step: `grad_accum` throughout, or, with `ramp_steps`, growing linearly from 1 at
    step 0 to `grad_accum` at step `ramp_steps`: a global batch that starts small (modded-nanogpt's batch-size
    schedule) while every micro-batch keeps its shape."""

    grad_accum: int
    ramp_steps: int = 0

    def micro_batches(self, step: int) -> int:
        if step >= self.ramp_steps:
            return self.grad_accum
        return 1 + (self.grad_accum - 1) * step // self.ramp_steps

    def micro_batches_before(self, step: int) -> int:
        ramped = min(step, self.ramp_steps)
        return sum(self.micro_batches(earlier) for earlier in range(ramped)) + (step - ramped) * self.grad_accum


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless per-rank micro-batches of block indices, starting at optimizer step `start_step`.

    Epoch e is the permutation drawn from (seed, e). Step s of an epoch uses its blocks
    [s * G, (s + 1) * G) with G = batch_size * grad_accum * num_processes; within them micro-batch m of rank r is
    the slice starting at ((m * num_processes) + r) * batch_size. So ranks never overlap, every rank gets the same
    number of batches (the remainder of an epoch is dropped), and the blocks of a step do not depend on how the
    global batch is split into processes and micro-batches. With `epoch_items`, block b of epoch e is yielded as
    e * num_blocks + b, the item `DocumentShuffledBlocks` reads it from.

    Put otherwise, an epoch is a row of micro-batch slots (batch_size x num_processes blocks each, steps_per_epoch x
    grad_accum of them), and each step takes the next slots. With `ramp_steps` (`BatchRamp`) the early steps take
    fewer: the slots come in the same order, grouped into steps differently, and a step may span two epochs.
    """

    def __init__(
        self,
        num_blocks: int,
        batch_size: int,
        grad_accum: int,
        num_processes: int,
        process_index: int,
        seed: int,
        start_step: int = 0,
        epoch_items: bool = False,
        ramp_steps: int = 0,
    ):
        self.global_batch = batch_size * grad_accum * num_processes
        if num_blocks < self.global_batch:
            raise ValueError(
                f"the training data has {num_blocks} blocks, fewer than one optimizer step needs "
                f"(batch_size {batch_size} x grad_accum {grad_accum} x {num_processes} processes = "
                f"{self.global_batch}): use more data or a smaller batch / block size"
            )
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.start_step = start_step
        self.epoch_items = epoch_items
        self.ramp = BatchRamp(grad_accum, ramp_steps)
        self.slots_per_epoch = num_blocks // self.global_batch * grad_accum

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)

    def __iter__(self) -> Iterator[list[int]]:
        slot_blocks = self.batch_size * self.num_processes
        step, slot = self.start_step, self.ramp.micro_batches_before(self.start_step)
        epoch, order = -1, None
        while True:
            for _ in range(self.ramp.micro_batches(step)):
                slot_epoch, slot_in_epoch = divmod(slot, self.slots_per_epoch)
                if slot_epoch != epoch:
                    epoch, order = slot_epoch, self.epoch_order(slot_epoch)
                    if self.epoch_items:  # the items of DocumentShuffledBlocks: the block of that epoch's stream
                        order = order + epoch * self.num_blocks
                begin = slot_in_epoch * slot_blocks + self.process_index * self.batch_size
                yield order[begin : begin + self.batch_size].tolist()
                slot += 1
            step += 1


def eval_batches(
    num_blocks: int, batch_size: int, num_processes: int, process_index: int, max_batches: int | None
) -> list[list[int]]:
    """The same validation blocks at every evaluation, split evenly (and disjointly) over the ranks."""
    per_rank = num_blocks // num_processes
    if max_batches is not None:
        per_rank = min(per_rank, max_batches * batch_size)
    if per_rank == 0:
        raise ValueError(
            f"the validation split has {num_blocks} blocks, fewer than the {num_processes} processes evaluating it"
        )
    mine = list(range(process_index, per_rank * num_processes, num_processes))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def make_loader(blocks: TokenBlocks, batch_sampler, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, whose state a resume restores.
    return torch.utils.data.DataLoader(
        blocks,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )
