"""Pretraining data: the train and validation datasets from one of three sources.

Three sources, one output shape (`{"input_ids": [...], "labels": [...]}`, every block exactly
`max_length` tokens, labels == input_ids because the model shifts them itself):

* the embedded default corpus (`EMBEDDED`): the standard library's own Python sources, so a
  run needs neither network nor downloaded data;
* local files (.json/.jsonl/.txt/.parquet, and gzip-compressed .json/.jsonl/.txt);
* a `datasets` hub dataset (the original recipe: `allenai/c4`, `en`), optionally streamed.

The parts live beside this file: `data_args` (the keys and their checks), `hub_access`,
`embedded_corpus`, `tokenizer`, `packing`. `datasets` is imported inside the functions
that need it: importing it costs seconds, and `import hf_sparse` must stay light.
"""

import hashlib
import logging

from .data_args import SUPPORTED_EXTENSIONS, DataArguments, _extension, _resolve_files, validate_data_args
from .packing import _PACK_VERSION, PACK_BATCH_DOCS, _block_features, _embedded_datasets, _TokenizeAndPack
from .tokenizer import tokenizer_fingerprint

logger = logging.getLogger(__name__)


def _doc_in_validation(text, percentage: float) -> bool:
    # By content, not position: identical in streaming and map-style loading, in any order,
    # and duplicate documents cannot straddle the split.
    digest = hashlib.blake2b((text or "").encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < percentage / 100


def _split_by_hash(dataset, text_column: str, percentage: float):
    import datasets
    from datasets.fingerprint import Hasher

    if isinstance(dataset, datasets.IterableDataset):
        # Nothing to count ahead of time in a stream: a tiny stream may get no validation doc.
        def keep(batch, want_val):
            return [_doc_in_validation(t, percentage) == want_val for t in batch[text_column]]

        return (
            dataset.filter(keep, batched=True, fn_kwargs={"want_val": False}),
            dataset.filter(keep, batched=True, fn_kwargs={"want_val": True}),
        )

    _check_column(dataset, text_column)
    flags = []
    for batch in dataset.select_columns([text_column]).iter(batch_size=10_000):
        flags.extend(_doc_in_validation(t, percentage) for t in batch[text_column])
    val_idx = [i for i, v in enumerate(flags) if v]
    train_idx = [i for i, v in enumerate(flags) if not v]
    if not val_idx and len(train_idx) > 1:
        val_idx = [train_idx.pop()]
    logger.info(
        "Held out %d of %d documents (%.2f%%, by content hash) for validation",
        len(val_idx),
        len(flags),
        percentage,
    )
    base = Hasher.hash((dataset._fingerprint, "hash-split", percentage, text_column))
    return (
        dataset.select(train_idx, new_fingerprint=Hasher.hash((base, "train"))),
        dataset.select(val_idx, new_fingerprint=Hasher.hash((base, "val"))),
    )


def _check_column(dataset, text_column: str) -> None:
    names = dataset.column_names
    if names is not None and text_column not in names:
        raise ValueError(f"data argument text_column: column {text_column!r} not found; columns: {sorted(names)}")


def _load_files(key: str, files: list[str], streaming: bool, text_column: str):
    """(documents dataset, its text column) for local files."""
    import datasets

    files = _resolve_files(key, files)
    builder = SUPPORTED_EXTENSIONS[_extension(files[0])]
    kwargs = {"sample_by": "line", "keep_linebreaks": False} if builder == "text" else {}
    dataset = datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming, **kwargs)
    # The text builder always names its column "text", whatever text_column says.
    return dataset, ("text" if builder == "text" else text_column)


def _tokenize_and_pack(dataset, tokenizer, text_column: str, max_length: int):
    import datasets
    from datasets.fingerprint import Hasher

    _check_column(dataset, text_column)
    dataset = dataset.select_columns([text_column])
    fn = _TokenizeAndPack(tokenizer, text_column, max_length)
    common = dict(batched=True, batch_size=PACK_BATCH_DOCS, remove_columns=[text_column], features=_block_features())
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(fn, **common)
    # Explicit fingerprint: datasets would hash the function, and a tokenizer's pickled
    # state can change by merely being used (stale or missed caches). These inputs are
    # exactly what decides the output.
    fingerprint = Hasher.hash(
        (
            dataset._fingerprint,
            tokenizer_fingerprint(tokenizer),
            max_length,
            text_column,
            PACK_BATCH_DOCS,
            _PACK_VERSION,
        )
    )
    return dataset.map(fn, new_fingerprint=fingerprint, desc=f"Tokenizing and packing ({max_length} tokens)", **common)


def build_datasets(args: DataArguments, tokenizer, *, seed: int = 42):
    """(train_dataset, eval_dataset) of packed blocks `{"input_ids", "labels"}`; eval_dataset
    is None with validation_split_percentage 0 and no other validation data.

    `datasets.Dataset` objects, or `datasets.IterableDataset` ones with `args.streaming`
    (tokenized lazily; the training stream shuffled with `seed`).
    """
    import datasets

    validate_data_args(args)
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: packing needs one to separate documents")
    max_length = args.max_length

    if not args.dataset_name and not args.train_files:
        logger.info("No dataset given: using the embedded default corpus (Python standard library sources)")
        train, val = _embedded_datasets(tokenizer, max_length)
        if args.validation_split_percentage == 0:
            val = None  # no validation split, as asked
        if args.streaming:
            train = train.to_iterable_dataset()
            val = val.to_iterable_dataset() if val is not None else None
    else:
        if args.train_files:
            docs_train, train_column = _load_files("train_files", args.train_files, args.streaming, args.text_column)
            docs_val = val_column = None
        else:
            loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
            if "train" not in loaded:
                raise ValueError(
                    f"data argument dataset_name: {args.dataset_name!r} has no 'train' split ({list(loaded)})"
                )
            docs_train, train_column = loaded["train"], args.text_column
            docs_val = loaded["validation"] if "validation" in loaded else None
            val_column = args.text_column
        if args.validation_files:
            docs_val, val_column = _load_files(
                "validation_files", args.validation_files, args.streaming, args.text_column
            )
        elif docs_val is None and args.validation_split_percentage > 0:
            docs_train, docs_val = _split_by_hash(docs_train, train_column, args.validation_split_percentage)
            val_column = train_column
        train = _tokenize_and_pack(docs_train, tokenizer, train_column, max_length)
        val = _tokenize_and_pack(docs_val, tokenizer, val_column, max_length) if docs_val is not None else None

    if isinstance(train, datasets.IterableDataset):
        if args.shuffle_buffer_size > 0:
            # After packing: blocks (not documents) are shuffled, and shard order with them.
            train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        if args.max_eval_samples is not None and val is not None:
            val = val.take(args.max_eval_samples)
        return train, val

    if val is not None and args.max_eval_samples is not None and len(val) > args.max_eval_samples:
        val = val.select(range(args.max_eval_samples))
    if len(train) == 0:
        raise ValueError(f"training data yields no full block of max_length={max_length} tokens")
    if val is not None and len(val) == 0:
        logger.warning("Validation data yields no full block of max_length=%d tokens: evaluation is empty", max_length)
    logger.info(
        "Packed %d training and %s validation blocks of %d tokens",
        len(train),
        len(val) if val is not None else "no",
        max_length,
    )
    return train, val
