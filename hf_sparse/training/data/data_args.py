"""The data keys of `train_hf.py` (`DataArguments`) and their checks: paths, formats
and values, all before anything is loaded."""

import codecs
import glob
import gzip
import os
from dataclasses import dataclass, field

# File suffix -> `datasets` builder. Gzip variants matter for the real recipe: C4 shards
# are distributed as .json.gz.
SUPPORTED_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".parquet": "parquet",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".txt.gz": "text",
}
_TEXT_LIKE_BUILDERS = ("json", "text")


# The smallest vocabulary of the embedded tokenizer: its 256 byte tokens plus EOS and pad.
MIN_EMBEDDED_VOCAB_SIZE = 256 + 2

# DataArguments fields typed list[str] that take a single path as well (a one-item list).
PATH_LIST_FIELDS = ("train_files", "validation_files")


@dataclass
class DataArguments:
    """Data keys of `train_hf.py` (usable with `transformers.HfArgumentParser`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "`datasets` dataset to train on (hub id or local dataset dir), e.g. 'allenai/c4'. "
            "With neither this nor train_files, the embedded default corpus is used."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of dataset_name, e.g. 'en' for allenai/c4."}
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local training files or glob patterns, one path or a list (.json, .jsonl, .txt, "
            ".parquet, or .json.gz/.jsonl.gz/.txt.gz). .txt files hold one document per line."
        },
    )
    validation_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local validation files (same formats as train_files). Without them the "
            "validation set is the 'validation' split of dataset_name or a "
            "validation_split_percentage slice of the training documents."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer name or path for AutoTokenizer (the original recipe: 't5-base'). "
            "None: a byte-level BPE trained on the embedded corpus (no network needed)."
        },
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per packed training block."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream and tokenize lazily (datasets.IterableDataset); the Trainer then needs max_steps."},
    )
    text_column: str = field(
        default="text", metadata={"help": "Column holding the document text (json/parquet/hub data)."}
    )
    validation_split_percentage: float = field(
        default=1.0,
        metadata={
            "help": "Percent of training documents held out for validation when no validation "
            "files or split exist. Chosen by a hash of each document's text: stable "
            "across runs and processes, streaming or not. 0: no validation split (evaluation "
            "then needs validation_files, or eval_strategy 'no')."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many validation blocks (the first ones)."}
    )
    tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of the embedded tokenizer (tokenizer_name unset). None: the model's vocab_size."
        },
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={
            "help": "Streaming only: blocks held in the buffer that shuffles the training "
            "stream (0: no shuffling). Map-style datasets are shuffled by the Trainer."
        },
    )

    def __post_init__(self):
        # A single path is the common case on the command line and in JSON configs.
        for key in PATH_LIST_FIELDS:
            value = getattr(self, key)
            if isinstance(value, (str, os.PathLike)):
                value = [value]
            elif value is not None:
                value = list(value)
            setattr(self, key, [os.fspath(v) for v in value] if value else None)


def _data_error(key: str, message: str) -> ValueError:
    return ValueError(f"data argument {key}: {message}")


def _extension(path: str) -> str | None:
    lower = path.lower()
    # Longest suffix first, so "x.jsonl.gz" is not taken for an unsupported ".gz".
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return None


def _only_whitespace(path: str, compressed: bool) -> bool:
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        # Stops at the first non-blank chunk: normal files cost one read.
        while chunk := handle.read(1 << 16):
            if chunk.strip():
                return False
    return True


# Bytes of a text file decoded up front: enough to catch a file in the wrong encoding (which
# `datasets` would otherwise report as a long chained traceback mid-load), cheap for a shard.
_ENCODING_PROBE_BYTES = 1 << 20
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)  # fmt: skip


def _encoding_problem(path: str, compressed: bool) -> str | None:
    """Why the start of a text file is not UTF-8 (None when it is)."""
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        head = handle.read(_ENCODING_PROBE_BYTES)
    for bom, name in _BOMS:  # UTF-32 LE starts with the UTF-16 LE mark: longest first
        if head.startswith(bom):
            return f"it is {name} text (byte-order mark); convert it to UTF-8, e.g. iconv -f {name} -t UTF-8"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at the end is fine
    except UnicodeDecodeError as err:
        return (f"it is not UTF-8 text (byte 0x{head[err.start]:02x} at offset {err.start} does not decode; "
                "binary data or another encoding); convert it to UTF-8")  # fmt: skip
    return None


def _resolve_files(key: str, paths: list[str]) -> list[str]:
    """Expanded, checked file list for `key`; raises a one-line ValueError naming `key`."""
    resolved = []
    for raw in paths:
        path = os.path.expanduser(raw)
        if os.path.exists(path):
            matches = [path]
        elif glob.has_magic(path):
            # Sorted: glob order is filesystem order, and block order must be reproducible.
            matches = sorted(glob.glob(path))
            if not matches:
                raise _data_error(key, f"pattern {raw!r} matches no file")
        else:
            raise _data_error(key, f"file {raw!r} does not exist")
        for match in matches:
            if os.path.isdir(match):
                raise _data_error(key, f"{match!r} is a directory, expected a data file")
            ext = _extension(match)
            if ext is None:
                supported = ", ".join(SUPPORTED_EXTENSIONS)
                raise _data_error(key, f"{match!r} has an unsupported extension; supported: {supported}")
            try:
                size = os.path.getsize(match)
                with open(match, "rb") as handle:
                    handle.read(1)
                blank = (
                    size > 0
                    and SUPPORTED_EXTENSIONS[ext] in _TEXT_LIKE_BUILDERS
                    and _only_whitespace(match, compressed=ext.endswith(".gz"))
                )
            except (OSError, EOFError) as err:
                raise _data_error(key, f"{match!r} is not readable ({err.__class__.__name__}: {err})") from None
            if size == 0:
                raise _data_error(key, f"{match!r} is empty (0 bytes)")
            if blank:
                raise _data_error(key, f"{match!r} is empty (only whitespace)")
            if SUPPORTED_EXTENSIONS[ext] in _TEXT_LIKE_BUILDERS:
                problem = _encoding_problem(match, compressed=ext.endswith(".gz"))
                if problem:
                    raise _data_error(key, f"{match!r}: {problem}")
            resolved.append(match)
    builders = {SUPPORTED_EXTENSIONS[_extension(p)] for p in resolved}
    if len(builders) > 1:
        # One `load_dataset` call per split takes one builder.
        raise _data_error(key, f"mixes file formats ({', '.join(sorted(builders))}); use one format per split")
    return resolved


def validate_data_args(args: DataArguments) -> None:
    """Fail fast, before any loading, with one line naming the offending key."""
    if args.max_length < 2:
        raise _data_error("max_length", f"{args.max_length} is too small; a block needs at least 2 tokens")
    if args.train_files and args.dataset_name:
        raise _data_error(
            "train_files", f"given together with dataset_name={args.dataset_name!r}; give one source of training data"
        )
    if args.validation_files and not args.train_files and not args.dataset_name:
        raise _data_error(
            "validation_files",
            "given without train_files or dataset_name; the embedded corpus has its own validation split",
        )
    if args.dataset_config_name and not args.dataset_name:
        raise _data_error("dataset_config_name", "given without dataset_name")
    if not 0 <= args.validation_split_percentage < 100:
        raise _data_error(
            "validation_split_percentage",
            f"{args.validation_split_percentage} must be at least 0 (0: no validation split) and below 100",
        )
    if args.max_eval_samples is not None and args.max_eval_samples < 1:
        raise _data_error("max_eval_samples", f"{args.max_eval_samples} must be at least 1 (or None for all)")
    if args.shuffle_buffer_size < 0:
        raise _data_error("shuffle_buffer_size", f"{args.shuffle_buffer_size} must be >= 0")
    if not args.text_column:
        raise _data_error("text_column", "must be a non-empty column name")
    if (
        args.tokenizer_name is None
        and args.tokenizer_vocab_size is not None
        and args.tokenizer_vocab_size < MIN_EMBEDDED_VOCAB_SIZE
    ):
        raise _data_error(
            "tokenizer_vocab_size",
            f"{args.tokenizer_vocab_size} is below {MIN_EMBEDDED_VOCAB_SIZE} "
            "(256 byte tokens + 2 special tokens of the embedded tokenizer)",
        )
    from .tokenizer import check_tokenizer_folder  # tokenizer imports this module

    check_tokenizer_folder(args.tokenizer_name)
    if args.train_files:
        _resolve_files("train_files", args.train_files)
    if args.validation_files:
        _resolve_files("validation_files", args.validation_files)
