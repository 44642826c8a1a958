import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import glade.training.data as data_module
from glade.training.pretrain_config import PretrainConfig
from glade.tiny import byte_level_tokenizer
from glade.training.data import (
    BatchRamp,
    DocumentShuffledBlocks,
    StepBatchSampler,
    TokenBlocks,
    eval_batches,
    model_inputs,
    resolve_text_source,
    split_train_val,
    token_dtype,
    tokenize_to_cache,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DOCS = ["First document.", "Second one, with ünïcödé.", "", "Third\n\nand last."]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": doc, "id": i}) + "\n" for i, doc in enumerate(DOCS)))
    return path


def expected_tokens(tokenizer, docs):
    ids = []
    for doc in docs:
        if doc:
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_documents_are_tokenized_once_each_followed_by_eos(jsonl, tmp_path):
    tokenizer = byte_level_tokenizer()
    token_file = tokenize_to_cache(resolve_text_source([str(jsonl)]), tokenizer, tmp_path / "cache", show_progress=False)
    assert token_file.dtype == "uint16"
    assert token_file.tokens().tolist() == expected_tokens(tokenizer, DOCS)
    assert token_file.num_documents == 3  # the empty one is skipped
    assert token_file.num_bytes == sum(len(d.encode()) for d in DOCS)


@pytest.fixture(params=["gpt2", "trained"])
def byte_level_bpe(request, bpe_tokenizer_dir):
    path = FIXTURES / "gpt2-tokenizer" if request.param == "gpt2" else bpe_tokenizer_dir
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_long_documents_are_encoded_in_pieces_with_the_same_ids(byte_level_bpe, shakespeare, tmp_path, monkeypatch):
    text = shakespeare.read_text()[:40_000]
    text = text[:15_000] + "<|endoftext|>\n" + text[15_000:30_000] + "\n<|endoftext|>" + text[30_000:]
    pieces = data_module.split_at_newlines(text, 500)
    assert "".join(pieces) == text and len(pieces) > 40
    assert all(a[-1] != "\n" and b[0] == "\n" and not b[1].isspace() for a, b in zip(pieces, pieces[1:]))
    assert data_module.splits_exactly_at_newlines(byte_level_bpe)

    monkeypatch.setattr(data_module, "PIECE_CHARS", 500)
    monkeypatch.setattr(data_module, "ENCODE_CHARS", 2_000)  # several encode calls per document
    path = tmp_path / "book.txt"
    path.write_text(text)
    token_file = tokenize_to_cache(resolve_text_source([str(path)]), byte_level_bpe, tmp_path / "cache", show_progress=False)
    assert token_file.tokens().tolist() == expected_tokens(byte_level_bpe, [text])
    assert token_file.num_documents == 1


def test_tokenizers_that_a_cut_could_change_are_encoded_whole(bpe_tokenizer_dir):
    spec = json.loads((bpe_tokenizer_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # each piece would gain a leading space
    prefixed = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert not data_module.splits_exactly_at_newlines(prefixed)
    stripped = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    stripped.add_special_tokens({"additional_special_tokens": [AddedToken("<sep>", rstrip=True)]})
    assert not data_module.splits_exactly_at_newlines(stripped)
    assert [ids for ids, _ in data_module.encode_in_pieces(["a\nb" * 10], prefixed, None)] == [
        prefixed("a\nb" * 10, add_special_tokens=False)["input_ids"]]


def test_streaming_gives_the_same_tokens(jsonl, tmp_path):
    tokenizer = byte_level_tokenizer()
    source = resolve_text_source([str(jsonl)])
    streamed = tokenize_to_cache(source, tokenizer, tmp_path / "a", streaming=True, show_progress=False)
    loaded = tokenize_to_cache(source, tokenizer, tmp_path / "b", streaming=False, show_progress=False)
    np.testing.assert_array_equal(streamed.tokens(), loaded.tokens())


def test_a_text_file_is_one_document_and_parquet_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = byte_level_tokenizer()
    text = tmp_path / "a.txt"
    text.write_text("line one\nline two\n")
    token_file = tokenize_to_cache(resolve_text_source([str(text)]), tokenizer, tmp_path / "c", show_progress=False)
    assert token_file.tokens().tolist() == expected_tokens(tokenizer, ["line one\nline two\n"])

    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["alpha", "beta"]}), parquet)
    token_file = tokenize_to_cache(resolve_text_source([str(parquet)], text_column="body"), tokenizer, tmp_path / "c",
                                   show_progress=False)
    assert token_file.tokens().tolist() == expected_tokens(tokenizer, ["alpha", "beta"])


def test_the_cache_is_reused_and_invalidated_by_changes(jsonl, tmp_path, monkeypatch, bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = byte_level_tokenizer()
    cache = tmp_path / "cache"
    first = tokenize_to_cache(resolve_text_source([str(jsonl)]), tokenizer, cache, show_progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("the dataset was read again although its tokens are cached")

    with monkeypatch.context() as patch:
        patch.setattr(data_module, "load_documents", fail)
        again = tokenize_to_cache(resolve_text_source([str(jsonl)]), tokenizer, cache, show_progress=False)
    assert again == first

    other_tokenizer = tokenize_to_cache(resolve_text_source([str(jsonl)]), AutoTokenizer.from_pretrained(bpe_tokenizer_dir),
                                        cache, show_progress=False)
    assert other_tokenizer.key != first.key
    jsonl.write_text(json.dumps({"text": "changed"}) + "\n")
    changed = tokenize_to_cache(resolve_text_source([str(jsonl)]), tokenizer, cache, show_progress=False)
    assert changed.key != first.key
    assert changed.tokens().tolist() == expected_tokens(tokenizer, ["changed"])


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(257) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == token_dtype(200_000) == "uint32"


def test_bad_sources_fail_early_with_their_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file .*missing.txt does not exist"):
        resolve_text_source([str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="matches no files"):
        resolve_text_source([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        resolve_text_source([str(tmp_path / "empty.txt")])
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(ValueError, match=r"unsupported data file type \['.csv'\]"):
        resolve_text_source([str(tmp_path / "a.csv")])
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="must share one format"):
        resolve_text_source([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    assert resolve_text_source(["roneneldan/TinyStories"], split="validation").kind == "hub"
    (tmp_path / "empty.txt").unlink()
    assert resolve_text_source([str(tmp_path / "*.txt")]).locations == (str(tmp_path / "a.txt"),)


def test_missing_column_and_empty_dataset_are_named(tmp_path):
    tokenizer = byte_level_tokenizer()
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"content": "hello", "id": 1}) + "\n")
    with pytest.raises(ValueError, match="text column 'text' not found .* its columns are: content, id"):
        tokenize_to_cache(resolve_text_source([str(data)]), tokenizer, tmp_path / "c", show_progress=False)
    data.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="has no text in column 'text' \\(empty dataset\\)"):
        tokenize_to_cache(resolve_text_source([str(data)]), tokenizer, tmp_path / "c", show_progress=False)
    assert not [p for p in (tmp_path / "c").iterdir() if p.suffix == ".bin"]  # nothing half-written is left


def test_a_dataset_folder_is_read_with_datasets(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text(json.dumps({"text": "from a folder"}) + "\n")
    tokenizer = byte_level_tokenizer()
    source = resolve_text_source([str(folder)])
    assert source.kind == "folder"
    token_file = tokenize_to_cache(source, tokenizer, tmp_path / "c", show_progress=False)
    assert token_file.tokens().tolist() == expected_tokens(tokenizer, ["from a folder"])


@pytest.fixture
def counting_tokens(tmp_path):
    """A token file holding 0, 1, 2, ...: positions are visible in the values."""
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return data_module.TokenFile(path=path, dtype="uint16", num_tokens=1000, num_documents=1, num_bytes=0, key="k")


def test_blocks_make_every_token_after_the_first_a_target_exactly_once(counting_tokens):
    blocks = TokenBlocks(counting_tokens, block_size=16)
    assert len(blocks) == (1000 - 1) // 16
    inputs = model_inputs({"tokens": torch.stack([blocks[i]["tokens"] for i in range(len(blocks))])}, "cpu")
    assert inputs["input_ids"].shape == inputs["labels"].shape == (len(blocks), 16)
    assert inputs["labels"].flatten().tolist() == list(range(1, 1 + 16 * len(blocks)))
    torch.testing.assert_close(inputs["labels"][:, :-1], inputs["input_ids"][:, 1:])


def test_validation_is_the_held_out_end_of_the_stream(counting_tokens):
    train, val = split_train_val(counting_tokens, block_size=10, val_fraction=0.1)
    train_targets = {t for i in range(len(train)) for t in train[i]["tokens"][1:].tolist()}
    val_tokens = {t for i in range(len(val)) for t in val[i]["tokens"].tolist()}
    assert min(val_tokens) == 900 and max(val_tokens) <= 999
    assert not train_targets & val_tokens
    assert split_train_val(counting_tokens, 10, 0.0)[1] is None
    with pytest.raises(ValueError, match="shorter than one block of 101 tokens"):
        split_train_val(counting_tokens, block_size=100, val_fraction=0.05)


def take(sampler, micro_batches):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(micro_batches)]


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_ranks_get_disjoint_equal_shards_that_match_one_process(grad_accum):
    num_blocks, batch, world, steps = 50, 2, 2, 8  # 8 steps cross an epoch boundary (50 // 12 = 4 per epoch)
    per_rank = [take(StepBatchSampler(num_blocks, batch, grad_accum, world, rank, seed=3), steps * grad_accum)
                for rank in range(world)]
    single = take(StepBatchSampler(num_blocks, batch * world, grad_accum, 1, 0, seed=3), steps * grad_accum)
    steps_per_epoch = num_blocks // (batch * grad_accum * world)
    for step in range(steps):
        micro = slice(step * grad_accum, (step + 1) * grad_accum)
        ranks = [sorted(i for b in per_rank[r][micro] for i in b) for r in range(world)]
        assert len(ranks[0]) == len(ranks[1]) == batch * grad_accum
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == sorted(i for b in single[micro] for i in b)
    for epoch in range(steps // steps_per_epoch):
        seen = [i for r in range(world) for b in per_rank[r][epoch * steps_per_epoch * grad_accum:
                                                            (epoch + 1) * steps_per_epoch * grad_accum] for i in b]
        assert len(seen) == len(set(seen)) == steps_per_epoch * batch * grad_accum * world  # no block twice
    first, second = [set(i for b in per_rank[0][e * steps_per_epoch * grad_accum:(e + 1) * steps_per_epoch * grad_accum]
                         for i in b) for e in (0, 1)]
    assert first != second  # each epoch is reshuffled


def test_a_sampler_started_at_step_k_continues_the_same_sequence():
    full = take(StepBatchSampler(40, 2, 2, 2, 1, seed=7), 20)
    resumed = take(StepBatchSampler(40, 2, 2, 2, 1, seed=7, start_step=6), 8)
    assert resumed == full[12:20]


def test_too_little_data_for_one_step_is_an_error():
    with pytest.raises(ValueError, match="the training data has 10 blocks, fewer than one optimizer step needs"):
        StepBatchSampler(10, 4, 2, 2, 0, seed=0)


EOS = 999


@pytest.fixture
def documents_file(tmp_path):
    """Documents of different lengths, each a run of its own number ending with EOS; the last has no EOS."""
    lengths = [5, 17, 3, 40, 9, 26, 11]
    documents = [[number + 1] * (length - 1) + [EOS] for number, length in enumerate(lengths)]
    documents[-1] = documents[-1][:-1]
    tokens = np.array([token for document in documents for token in document], dtype=np.uint16)
    path = tmp_path / "documents.bin"
    tokens.tofile(path)
    token_file = data_module.TokenFile(path=path, dtype="uint16", num_tokens=len(tokens), num_documents=len(lengths),
                                       num_bytes=0, key="d")
    return token_file, documents


def as_documents(stream: list[int]) -> list[list[int]]:
    """A stream cut back into documents: after each EOS, and where the number of a run changes."""
    cut, current = [], []
    for token in stream:
        if current and current[-1] != EOS and token != current[-1] and token != EOS:
            cut.append(current)
            current = []
        current.append(token)
        if token == EOS:
            cut.append(current)
            current = []
    return cut + ([current] if current else [])


def test_each_epoch_reads_every_document_whole_in_its_own_order(documents_file, monkeypatch):
    token_file, documents = documents_file
    monkeypatch.setattr(data_module, "SCAN_TOKENS", 7)  # documents' ends are found a slice at a time
    blocks = DocumentShuffledBlocks(token_file, block_size=8, eos_token_id=EOS, seed=1)
    assert len(blocks) == len(TokenBlocks(token_file, block_size=8))
    orders = []
    for epoch in range(3):
        windows = [blocks[epoch * len(blocks) + index]["tokens"].tolist() for index in range(len(blocks))]
        for before, after in zip(windows, windows[1:]):
            assert before[-1] == after[0]  # consecutive windows share one token, as TokenBlocks' do
        stream = windows[0] + [token for window in windows[1:] for token in window[1:]]
        # The stream is the documents in some order, cut short only by the partial last block.
        whole = as_documents(stream)
        order = [document[0] - 1 if document[0] != EOS else None for document in whole]
        assert all(document == documents[number] for document, number in zip(whole[:-1], order[:-1]))
        assert documents[order[-1]][: len(whole[-1])] == whole[-1]
        # Every document once; the dropped tail (under one block) can hide at most the last one.
        assert len(set(order)) == len(order) >= len(documents) - 1
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2]  # a new order every epoch
    again = DocumentShuffledBlocks(token_file, block_size=8, eos_token_id=EOS, seed=1)
    assert torch.equal(again[len(blocks) + 3]["tokens"], blocks[len(blocks) + 3]["tokens"])  # drawn from the seed


def test_a_batch_ramp_grows_linearly_from_one_micro_batch_to_grad_accum():
    ramp = BatchRamp(grad_accum=4, ramp_steps=6)
    counts = [ramp.micro_batches(step) for step in range(9)]
    assert counts == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert [ramp.micro_batches_before(step) for step in range(9)] == [sum(counts[:step]) for step in range(9)]
    assert [BatchRamp(3).micro_batches(step) for step in range(3)] == [3, 3, 3]


@pytest.mark.parametrize("world", [1, 2])
def test_a_ramped_sampler_takes_the_same_micro_batches_grouped_into_smaller_first_steps(world):
    ramped = StepBatchSampler(40, 2, 3, world, world - 1, seed=4, ramp_steps=5)
    plain = StepBatchSampler(40, 2, 3, world, world - 1, seed=4)
    counts = [ramped.ramp.micro_batches(step) for step in range(12)]
    assert counts[:5] == [1, 1, 1, 2, 2] and set(counts[5:]) == {3}
    assert take(ramped, sum(counts)) == take(plain, sum(counts))  # the same slots, epochs crossed mid-step too
    # Started at a step, it continues where the ramp had got to.
    resumed = StepBatchSampler(40, 2, 3, world, world - 1, seed=4, ramp_steps=5, start_step=4)
    assert take(resumed, 9) == take(plain, sum(counts[:4]) + 9)[sum(counts[:4]):]


def test_a_ramp_without_accumulation_is_refused(base_options):
    with pytest.raises(ValueError, match="--batch-ramp-steps ramps the micro-batches per step up to --grad-accum"):
        PretrainConfig(**base_options, max_steps=4, batch_ramp_steps=2)


def test_the_sampler_names_each_epochs_blocks_for_the_shuffled_stream():
    plain = take(StepBatchSampler(12, 2, 1, 1, 0, seed=5), 12)
    tagged = take(StepBatchSampler(12, 2, 1, 1, 0, seed=5, epoch_items=True), 12)
    assert [[item % 12 for item in batch] for batch in tagged] == plain  # the same blocks of each epoch
    assert [{item // 12 for item in batch} for batch in tagged] == [{0}] * 6 + [{1}] * 6


def test_eval_batches_are_disjoint_and_the_same_size_on_every_rank():
    ranks = [eval_batches(23, 4, 3, r, max_batches=None) for r in range(3)]
    flat = [sorted(i for b in batches for i in b) for batches in ranks]
    assert [len(f) for f in flat] == [7, 7, 7]
    assert len(set().union(*map(set, flat))) == 21
    assert [len(b) for b in ranks[0]] == [4, 3]
    assert sum(len(b) for b in eval_batches(100, 4, 1, 0, max_batches=2)) == 8
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        eval_batches(2, 4, 3, 0, None)


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
@pytest.mark.parametrize("name, content", [
    ("latin1.txt", "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n".encode("latin-1")),
    ("binary.txt", bytes(range(256)) * 4),
    ("latin1.jsonl", json.dumps({"text": "Caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n"),
], ids=["latin1-text", "binary-text", "latin1-jsonl"])
def test_a_file_that_is_not_utf8_is_named(name, content, streaming, tmp_path):
    good = tmp_path / f"good{Path(name).suffix}"
    good.write_text(json.dumps({"text": "fine"}) + "\n" if name.endswith(".jsonl") else "fine\n")
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=rf"data file {bad} is not UTF-8 text \(a binary file, or text in another "
                                         r"encoding such as Latin-1\)"):
        tokenize_to_cache(resolve_text_source([str(good), str(bad)]), byte_level_tokenizer(), tmp_path / "cache",
                          streaming=streaming, show_progress=False)


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_a_jsonl_line_without_the_text_column_is_named_not_skipped(tmp_path, streaming):
    # The check pretraining shares with glade train-tokenizer, whose tests cover the other broken lines.
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text(json.dumps({"text": "fine"}) + "\n")
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    source = resolve_text_source([str(good), str(bad)])
    with pytest.raises(ValueError, match=rf"text column 'text' not found in data file {bad} line 2; its columns are: "
                                         r"title \(choose one with --text-column\)"):
        tokenize_to_cache(source, byte_level_tokenizer(), tmp_path / "cache", streaming=streaming, show_progress=False)
    # Blank lines are no records, as datasets reads them.
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n  \n" + json.dumps({"text": "too"}) + "\n")
    token_file = tokenize_to_cache(resolve_text_source([str(good), str(bad)]), byte_level_tokenizer(), tmp_path / "cache",
                                   streaming=streaming, show_progress=False)
    assert token_file.num_documents == 3


@pytest.mark.parametrize("metadata", ["not json at all", "[1, 2]", json.dumps({"num_tokens": 3})])
def test_damaged_cache_metadata_is_named(metadata, jsonl, tmp_path):
    tokenizer, cache = byte_level_tokenizer(), tmp_path / "cache"
    token_file = tokenize_to_cache(resolve_text_source([str(jsonl)]), tokenizer, cache, show_progress=False)
    meta = cache / f"{token_file.key}.json"
    meta.write_text(metadata)
    with pytest.raises(ValueError, match=rf"the token cache entry {meta} is damaged \(.+\): delete it and "
                                         rf"{token_file.key}.bin to tokenize again"):
        tokenize_to_cache(resolve_text_source([str(jsonl)]), tokenizer, cache, show_progress=False)


def other_eos(tokenizer):
    """The same vocabulary and merges, but documents end with another token."""
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(len(tokenizer) - 1)
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    return tokenizer


def other_merges(tokenizer):
    """The same vocabulary size and end-of-text token, but different ids for the same text."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:-200]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token=tokenizer.eos_token)


@pytest.mark.slow
@pytest.mark.parametrize("change", [other_eos, other_merges])
def test_a_cache_entry_of_another_tokenizer_is_not_used(change, bpe_tokenizer_dir, shakespeare, tmp_path):
    source, cache = resolve_text_source([str(shakespeare)]), tmp_path / "cache"
    tokenize_to_cache(source, AutoTokenizer.from_pretrained(bpe_tokenizer_dir), cache, show_progress=False)
    other = change(AutoTokenizer.from_pretrained(bpe_tokenizer_dir))
    assert len(other) == 512
    tokens = tokenize_to_cache(source, other, cache, show_progress=False).tokens()
    assert tokens.tolist() == expected_tokens(other, [shakespeare.read_text()])
    assert len(list(cache.glob("*.bin"))) == 2
