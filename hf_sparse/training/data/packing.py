"""Tokenization and packing of documents into fixed-length blocks
(`{"input_ids": [...], "labels": [...]}`, every block exactly `max_length` tokens)."""

import logging
import os
import tempfile

import numpy as np

from ...embedded_corpus import embedded_corpus, embedded_corpus_fingerprint
from .tokenizer import cache_root, tokenizer_fingerprint

logger = logging.getLogger(__name__)

# Documents tokenized and packed together per `map` batch. Packing concatenates within a
# batch, so at most `max_length - 1` tokens are dropped per this many documents.
PACK_BATCH_DOCS = 1000

# Bump when the packing output changes, so `datasets` cache files written by an older
# version are not reused.
_PACK_VERSION = 1


def _tokenize(tokenizer, texts) -> list[list[int]]:
    # Empty documents are skipped: they would only add a lone EOS.
    texts = [t for t in texts if t]
    if not texts:
        return []
    return tokenizer(
        texts,
        add_special_tokens=False,  # EOS is appended here; BOS/EOS post-processors would double it
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,  # documents longer than model_max_length are expected: they get split
    )["input_ids"]


def _concat_with_eos(documents, eos_token_id: int) -> list[int]:
    flat: list[int] = []
    for ids in documents:
        flat.extend(ids)
        flat.append(eos_token_id)
    return flat


def pack_token_ids(documents, eos_token_id: int, max_length: int) -> list[list[int]]:
    """Documents (token id lists) each followed by EOS, concatenated, cut into blocks of
    exactly `max_length`; the incomplete tail is dropped."""
    flat = _concat_with_eos(documents, eos_token_id)
    usable = len(flat) - len(flat) % max_length
    return [flat[i : i + max_length] for i in range(0, usable, max_length)]


class _TokenizeAndPack:
    """Batched `map` function: a batch of documents in, packed blocks out."""

    def __init__(self, tokenizer, text_column: str, max_length: int):
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.max_length = max_length
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, batch):
        if self.text_column not in batch:
            raise ValueError(
                f"data argument text_column: column {self.text_column!r} not found; columns: {sorted(batch)}"
            )
        blocks = pack_token_ids(_tokenize(self.tokenizer, batch[self.text_column]), self.eos_token_id, self.max_length)
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def _block_features():
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids})


def _blocks_to_dataset(flat_ids: np.ndarray, max_length: int, fingerprint: str):
    import datasets
    import pyarrow as pa

    # Straight from numpy to Arrow: ~5x faster than Dataset.from_dict on python lists.
    usable = len(flat_ids) - len(flat_ids) % max_length
    values = pa.array(flat_ids[:usable].astype(np.int32, copy=False), type=pa.int32())
    offsets = pa.array(np.arange(0, usable + 1, max_length, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, values)
    # An explicit fingerprint spares datasets from hashing the whole table.
    return datasets.Dataset(pa.table({"input_ids": column, "labels": column}), fingerprint=fingerprint)


def _embedded_token_ids(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation token ids of the embedded corpus, EOS after each document.

    Tokenizing the 6 MB corpus takes ~2 s; the result is cached on disk per tokenizer so
    that later processes (every rank, every run) pay ~10 ms instead.
    """
    name = f"embedded_tokens_v{_PACK_VERSION}_{embedded_corpus_fingerprint()[:16]}_{tokenizer_fingerprint(tokenizer)[:16]}.npz"
    path = os.path.join(cache_root(), name)
    try:
        with np.load(path) as cached:
            return cached["train"], cached["validation"]
    except FileNotFoundError:
        pass
    except Exception as err:  # damaged cache: recompute and overwrite
        logger.warning("Ignoring damaged token cache %s (%s)", path, err)

    train_texts, val_texts = embedded_corpus()
    eos = tokenizer.eos_token_id
    train, val = (
        np.asarray(_concat_with_eos(_tokenize(tokenizer, texts), eos), dtype=np.int32)
        for texts in (train_texts, val_texts)
    )
    try:
        os.makedirs(cache_root(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=cache_root())
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, train=train, validation=val)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # atomic: concurrent readers see no file or a whole one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as err:
        logger.warning("Cannot cache embedded token ids under %s (%s)", cache_root(), err)
    return train, val


# Packed embedded datasets of this process, keyed by corpus, tokenizer and max_length.
_EMBEDDED_CACHE: dict[tuple[str, str, int], tuple] = {}


def _embedded_datasets(tokenizer, max_length: int):
    key = (embedded_corpus_fingerprint(), tokenizer_fingerprint(tokenizer), max_length)
    if key not in _EMBEDDED_CACHE:
        from datasets.fingerprint import Hasher

        train_ids, val_ids = _embedded_token_ids(tokenizer)
        _EMBEDDED_CACHE[key] = (
            _blocks_to_dataset(train_ids, max_length, Hasher.hash(("embedded-train", _PACK_VERSION) + key)),
            _blocks_to_dataset(val_ids, max_length, Hasher.hash(("embedded-validation", _PACK_VERSION) + key)),
        )
    return _EMBEDDED_CACHE[key]
