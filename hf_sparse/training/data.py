"""Pretraining data: sources, tokenizer, tokenization and packing into fixed-length blocks.

Three sources, one output shape (`{"input_ids": [...], "labels": [...]}`, every block exactly
`max_length` tokens, labels == input_ids because the model shifts them itself):

* the embedded default corpus (`EMBEDDED`): the standard library's own Python sources, so a
  run needs neither network nor downloaded data;
* local files (.json/.jsonl/.txt/.parquet, and gzip-compressed .json/.jsonl/.txt);
* a `datasets` hub dataset (the original recipe: `allenai/c4`, `en`), optionally streamed.

`datasets` is imported inside the functions that need it: the model code lives in this
package too and must load on a bare GPU box (and from a checkpoint) without it.
"""

import functools
import glob
import gzip
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast


logger = logging.getLogger(__name__)

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

# Documents tokenized and packed together per `map` batch. Packing concatenates within a
# batch, so at most `max_length - 1` tokens are dropped per this many documents.
PACK_BATCH_DOCS = 1000

# Bump when the packing output changes, so `datasets` cache files written by an older
# version are not reused.
_PACK_VERSION = 1


# DataArguments fields typed list[str] that take a single path as well (a one-item list).
PATH_LIST_FIELDS = ("train_files", "validation_files")


@dataclass
class DataArguments:
    """Data keys of `train_hf.py` (usable with `transformers.HfArgumentParser`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "`datasets` dataset to train on (hub id or local dataset dir), e.g. 'allenai/c4'. "
                  "With neither this nor train_files, the embedded default corpus is used."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of dataset_name, e.g. 'en' for allenai/c4."}
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local training files or glob patterns, one path or a list (.json, .jsonl, .txt, "
                  ".parquet, or .json.gz/.jsonl.gz/.txt.gz). .txt files hold one document per line."},
    )
    validation_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local validation files (same formats as train_files). Without them the "
                  "validation set is the 'validation' split of dataset_name or a "
                  "validation_split_percentage slice of the training documents."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer name or path for AutoTokenizer (the original recipe: 't5-base'). "
                  "None: a byte-level BPE trained on the embedded corpus (no network needed)."},
    )
    max_length: int = field(default=256, metadata={"help": "Tokens per packed training block."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream and tokenize lazily (datasets.IterableDataset); the Trainer then "
                  "needs max_steps."},
    )
    text_column: str = field(
        default="text", metadata={"help": "Column holding the document text (json/parquet/hub data)."}
    )
    validation_split_percentage: float = field(
        default=1.0,
        metadata={"help": "Percent of training documents held out for validation when no validation "
                  "files or split exist. Chosen by a hash of each document's text: stable "
                  "across runs and processes, streaming or not."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many validation blocks (the first ones)."}
    )
    tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Vocabulary size of the embedded tokenizer (tokenizer_name unset). "
                  "None: the model's vocab_size."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "Streaming only: blocks held in the buffer that shuffles the training "
                  "stream (0: no shuffling). Map-style datasets are shuffled by the Trainer."},
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


# --------------------------------------------------------------------------- validation


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
                blank = size > 0 and SUPPORTED_EXTENSIONS[ext] in _TEXT_LIKE_BUILDERS and _only_whitespace(
                    match, compressed=ext.endswith(".gz")
                )
            except (OSError, EOFError) as err:
                raise _data_error(key, f"{match!r} is not readable ({err.__class__.__name__}: {err})") from None
            if size == 0:
                raise _data_error(key, f"{match!r} is empty (0 bytes)")
            if blank:
                raise _data_error(key, f"{match!r} is empty (only whitespace)")
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
    if not 0 < args.validation_split_percentage < 100:
        raise _data_error(
            "validation_split_percentage", f"{args.validation_split_percentage} must be between 0 and 100 (exclusive)"
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
    if args.train_files:
        _resolve_files("train_files", args.train_files)
    if args.validation_files:
        _resolve_files("validation_files", args.validation_files)


# ---------------------------------------------------------------------------- hub access

# Seconds the connectivity probe waits for the hub. Only asked when a hub resource is named
# and missing from the local cache, so a reachable hub costs one quick request.
HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers one HEAD request within `timeout` seconds.

    Sent through huggingface_hub's own session (its proxy, SSL and endpoint settings), in a
    thread: name resolution ignores socket timeouts and can hang far longer on its own.
    """
    import threading

    from huggingface_hub import constants, get_session

    answers = []

    def probe():
        try:
            answers.append(get_session().head(constants.ENDPOINT, timeout=timeout).status_code < 500)
        except Exception:  # any failure to get an answer means "unreachable" here
            answers.append(False)

    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(answers and answers[0])


def _hub_repo_id(key: str, name: str) -> str | None:
    """The hub repo id that `name` stands for, or None when it is a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(os.path.expanduser(name)):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ValueError(
            f"{key}: {name!r} is neither an existing local path nor a Hugging Face Hub repo id ('name' or 'org/name')."
        ) from None
    return name


def _tokenizer_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    # What AutoTokenizer reads first; either one means the repo's tokenizer files were fetched.
    names = ("tokenizer_config.json", "tokenizer.json")
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)


def _dataset_cache_dirs(repo_id: str) -> tuple[str, str]:
    """(datasets' prepared-dataset folder, the hub cache's raw-files folder) of a hub dataset."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    parts = repo_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])  # how datasets names its cache folders
    prepared = os.path.join(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)), "___".join(parts))
    raw = os.path.join(constants.HF_HUB_CACHE, "datasets--" + repo_id.replace("/", "--"))
    return prepared, raw


def _dataset_cached(repo_id: str, config_name: str | None) -> bool:
    prepared, raw = _dataset_cache_dirs(repo_id)
    # datasets' offline fallback looks for <prepared>/<config>/<version>/<hash> folders.
    pattern = os.path.join(glob.escape(prepared), glob.escape(config_name) if config_name else "*", "*", "*")
    if any(os.path.isdir(path) for path in glob.glob(pattern)):
        return True
    snapshots = os.path.join(raw, "snapshots")  # files fetched (e.g. streamed) through the hub cache
    return os.path.isdir(snapshots) and bool(os.listdir(snapshots))


def _offline_reason(env_vars: tuple[str, ...]) -> str:
    """Which variable put the library in offline mode (the first one set, as users set one)."""
    for name in env_vars:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode: {name}=1"
    return "offline mode"


class _HubResource(NamedTuple):
    key: str  # the data argument that names it
    repo_id: str
    offline: bool  # the loading library's offline mode
    offline_vars: tuple[str, ...]  # the variables that set it
    cached: bool
    cache_dir: str
    local_alternative: str


def _hub_resources(args: DataArguments):
    """The hub repos that the tokenizer and dataset arguments name (local paths are not)."""
    import huggingface_hub

    if args.tokenizer_name is not None:
        repo_id = _hub_repo_id("tokenizer_name", args.tokenizer_name)
        if repo_id is not None:
            yield _HubResource(
                "tokenizer_name", repo_id, huggingface_hub.constants.HF_HUB_OFFLINE,
                ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"), _tokenizer_cached(repo_id),
                huggingface_hub.constants.HF_HUB_CACHE, "set tokenizer_name to a local tokenizer directory",
            )
    if args.dataset_name and not args.train_files:
        import datasets.config
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        # A builder name ("json", "parquet", ...) is code shipped with datasets, not a hub repo.
        if args.dataset_name in _PACKAGED_DATASETS_MODULES:
            return
        repo_id = _hub_repo_id("dataset_name", args.dataset_name)
        if repo_id is not None:
            yield _HubResource(
                "dataset_name", repo_id, datasets.config.HF_HUB_OFFLINE, ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
                _dataset_cached(repo_id, args.dataset_config_name), " or ".join(_dataset_cache_dirs(repo_id)),
                "train on local files with train_files (and validation_files)",
            )


def check_hub_resources(args: DataArguments) -> None:
    """Refuse, before anything is loaded, a hub tokenizer or dataset that cannot be had.

    A `tokenizer_name`/`dataset_name` that is not a local path names a hub repo. When the
    hub is known to be unreachable (offline mode, or the probe gets no answer) and the
    local cache has no copy, transformers/datasets would retry for about a minute and end
    in a multi-screen OSError; this says so at once, in one line naming the key. A cached
    copy is fine, offline too. Only a resource missing from the cache, outside offline
    mode, costs a connectivity probe (`hub_reachable`, asked once).
    """
    from huggingface_hub import constants

    reachable = None
    for resource in _hub_resources(args):
        if resource.cached:
            continue
        if resource.offline:
            why = f"the hub is unreachable ({_offline_reason(resource.offline_vars)})"
            then = "the cache then serves it, HF_HUB_OFFLINE=1 included"
        else:
            if reachable is None:
                reachable = hub_reachable()
            if reachable:
                continue
            why = f"the hub ({constants.ENDPOINT}) is unreachable (no answer within {HUB_PROBE_TIMEOUT_S:g} s)"
            then = "then HF_HUB_OFFLINE=1 uses the cached copy without connection attempts"
        raise ValueError(
            f"{resource.key}: {resource.repo_id!r} is a Hugging Face Hub repo, {why}, and the local cache "
            f"({resource.cache_dir}) has no copy of it; download it once where the hub is reachable ({then}), "
            f"or {resource.local_alternative}."
        )


# ----------------------------------------------------------------------- embedded corpus


@dataclass(frozen=True)
class EmbeddedCorpus:
    """How the embedded default corpus is drawn from the running Python's standard library.

    Python sources are real, varied text (code, docstrings, comments) that exists wherever
    this code runs. The exact files differ between Python versions, which is why caches
    are keyed by `embedded_corpus_fingerprint()` rather than by this description.
    """

    version: int = 1
    max_bytes: int = 6_000_000
    validation_percent: int = 5
    # Tests repeat the library's own code; idlelib/lib2to3 carry large test suites; the
    # `encodings` package is mostly generated codec tables (1.4 MB) that teach nothing.
    excluded_dirs: frozenset = frozenset(
        {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3", "encodings"}
    )

    @property
    def root(self) -> str:
        return sysconfig.get_paths()["stdlib"]


EMBEDDED = EmbeddedCorpus()


def _stable_unit(key: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode("utf-8")).digest()[:8], "big")


@functools.lru_cache(maxsize=1)
def _embedded_corpus_cached() -> tuple[tuple[str, ...], tuple[str, ...], str]:
    spec = EMBEDDED
    root = spec.root
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in spec.excluded_dirs)
        for name in filenames:
            if name.endswith(".py"):
                candidates.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    candidates.sort()

    # Fill the byte budget in a hash order of the paths rather than alphabetically: an
    # alphabetical prefix would stop around "l" and miss half the library's variety.
    chosen = {}
    total = 0
    for rel in sorted(candidates, key=lambda r: _stable_unit(r, "select")):
        try:
            with open(os.path.join(root, rel), "rb") as handle:
                raw = handle.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip() or total + len(raw) > spec.max_bytes:
            continue
        chosen[rel] = text
        total += len(raw)
    if len(chosen) < 2:
        raise RuntimeError(f"embedded corpus: found {len(chosen)} usable .py files under {root!r}")

    paths = sorted(chosen)
    is_val = {rel: _stable_unit(rel, "split") % 100 < spec.validation_percent for rel in paths}
    if not any(is_val.values()):
        is_val[min(paths, key=lambda r: _stable_unit(r, "split"))] = True
    if all(is_val.values()):
        is_val[max(paths, key=lambda r: _stable_unit(r, "split"))] = False
    train = tuple(chosen[r] for r in paths if not is_val[r])
    val = tuple(chosen[r] for r in paths if is_val[r])

    digest = hashlib.sha256(f"embedded-v{spec.version}".encode())
    for rel in paths:
        digest.update(f"\0{'val' if is_val[rel] else 'train'}\0{rel}\0".encode())
        digest.update(chosen[rel].encode("utf-8"))
    logger.info(
        "Embedded corpus: %d train / %d validation documents, %.1f MB from %s",
        len(train), len(val), total / 1e6, root,
    )
    return train, val, digest.hexdigest()


def embedded_corpus() -> tuple[list[str], list[str]]:
    """(train_texts, val_texts) of the embedded default corpus; one document per file."""
    train, val, _ = _embedded_corpus_cached()
    return list(train), list(val)


def embedded_corpus_fingerprint() -> str:
    """Hash of the embedded corpus content and split; keys everything derived from it."""
    return _embedded_corpus_cached()[2]


# ------------------------------------------------------------------------------ tokenizer

EMBEDDED_EOS_TOKEN = "<|endoftext|>"
EMBEDDED_PAD_TOKEN = "<pad>"
MIN_EMBEDDED_VOCAB_SIZE = 256 + 2
# Bump when training settings change so older cached tokenizers are not picked up.
_EMBEDDED_TOKENIZER_VERSION = 1
# transformers' own "no limit" value: packing never needs truncation warnings.
_NO_MAX_LENGTH = int(1e30)


def cache_root() -> str:
    """Where hf_sparse caches derived artifacts: $HF_SPARSE_CACHE or ~/.cache/hf_sparse."""
    return os.environ.get("HF_SPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_sparse")


def _train_embedded_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    train_texts, _ = embedded_corpus()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EMBEDDED_EOS_TOKEN, EMBEDDED_PAD_TOKEN],
        # Every byte in the base vocabulary: any text encodes, no unknown token ever needed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(train_texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EMBEDDED_EOS_TOKEN,
        bos_token=EMBEDDED_EOS_TOKEN,
        unk_token=EMBEDDED_EOS_TOKEN,
        pad_token=EMBEDDED_PAD_TOKEN,
        model_max_length=_NO_MAX_LENGTH,
    )


def _load_cached_tokenizer(path: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.eos_token != EMBEDDED_EOS_TOKEN or tokenizer.pad_token != EMBEDDED_PAD_TOKEN:
        raise ValueError(f"special tokens are {tokenizer.eos_token!r}/{tokenizer.pad_token!r}")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{len(tokenizer)} tokens for vocab_size {vocab_size}")
    return tokenizer


def _embedded_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    if vocab_size < MIN_EMBEDDED_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is below {MIN_EMBEDDED_VOCAB_SIZE}, the embedded tokenizer's minimum "
            "(256 byte tokens + 2 special tokens)"
        )
    root = cache_root()
    name = f"embedded_tokenizer_v{_EMBEDDED_TOKENIZER_VERSION}_{vocab_size}_{embedded_corpus_fingerprint()[:16]}"
    final = os.path.join(root, name)
    if os.path.isdir(final):
        try:
            tokenizer = _load_cached_tokenizer(final, vocab_size)
            logger.debug("Loaded embedded tokenizer from %s", final)
            return tokenizer
        except Exception as err:  # a damaged cache must not stop training: rebuild it
            logger.warning("Ignoring damaged tokenizer cache %s (%s); rebuilding it", final, err)
            _remove_dir_atomically(final)

    tokenizer = _train_embedded_tokenizer(vocab_size)
    logger.info("Trained the embedded byte-level BPE tokenizer (%d tokens)", len(tokenizer))
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root)
    except OSError as err:
        logger.warning("Cannot cache the embedded tokenizer under %s (%s); using it uncached", root, err)
        return tokenizer
    try:
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            # Atomic: other processes (ranks) see no directory or a complete one. If one of
            # them got there first, the rename fails on the non-empty target; theirs wins.
            os.replace(tmp, final)
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Everyone loads what is on disk, so all ranks use byte-identical tokenizers.
    return _load_cached_tokenizer(final, vocab_size)


def _remove_dir_atomically(path: str) -> None:
    trash = f"{path}.trash{os.getpid()}"
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def load_tokenizer(tokenizer_name: str | None, vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer with eos and pad tokens set.

    `tokenizer_name`: hub id or local directory for `AutoTokenizer`. None: the embedded
    byte-level BPE with `vocab_size` tokens (at most), trained on the embedded corpus once
    and cached under `cache_root()`.
    """
    if tokenizer_name is None:
        return _embedded_tokenizer(vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning("Tokenizer %s has neither pad nor eos token", tokenizer_name)
        else:
            # Packed blocks never need padding; the pad token only has to exist for collators.
            tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > vocab_size:
        # Not an error: t5-base has 32100 entries for the recipe's 32000-row embedding, the
        # 100 extra sentinel tokens never come out of plain text.
        logger.warning(
            "Tokenizer %s has %d tokens, more than the model's vocab_size %d; ids >= %d must not occur",
            tokenizer_name, len(tokenizer), vocab_size, vocab_size,
        )
    return tokenizer


def tokenizer_from_args(args: DataArguments, model_vocab_size: int) -> PreTrainedTokenizerFast:
    """`load_tokenizer` with the DataArguments' rule: tokenizer_vocab_size or the model's."""
    return load_tokenizer(args.tokenizer_name, args.tokenizer_vocab_size or model_vocab_size)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids; keys cached tokenized data."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Call-time settings that transformers toggles per call; they do not change ids here.
        state.pop("truncation", None)
        state.pop("padding", None)
        payload = json.dumps(state, sort_keys=True)
    else:
        from datasets.fingerprint import Hasher

        payload = Hasher.hash(tokenizer)
    payload += f"|{type(tokenizer).__name__}|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# -------------------------------------------------------------------------------- packing


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


# ---------------------------------------------------------------------------- data sources


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
        len(val_idx), len(flags), percentage,
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
        (dataset._fingerprint, tokenizer_fingerprint(tokenizer), max_length, text_column, PACK_BATCH_DOCS, _PACK_VERSION)
    )
    return dataset.map(fn, new_fingerprint=fingerprint, desc=f"Tokenizing and packing ({max_length} tokens)", **common)


def build_datasets(args: DataArguments, tokenizer, *, seed: int = 42):
    """(train_dataset, eval_dataset) of packed blocks `{"input_ids", "labels"}`.

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
        if args.streaming:
            train, val = train.to_iterable_dataset(), val.to_iterable_dataset()
    else:
        if args.train_files:
            docs_train, train_column = _load_files("train_files", args.train_files, args.streaming, args.text_column)
            docs_val = val_column = None
        else:
            loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, streaming=args.streaming)
            if "train" not in loaded:
                raise ValueError(f"data argument dataset_name: {args.dataset_name!r} has no 'train' split ({list(loaded)})")
            docs_train, train_column = loaded["train"], args.text_column
            docs_val = loaded["validation"] if "validation" in loaded else None
            val_column = args.text_column
        if args.validation_files:
            docs_val, val_column = _load_files("validation_files", args.validation_files, args.streaming, args.text_column)
        elif docs_val is None:
            docs_train, docs_val = _split_by_hash(docs_train, train_column, args.validation_split_percentage)
            val_column = train_column
        train = _tokenize_and_pack(docs_train, tokenizer, train_column, max_length)
        val = _tokenize_and_pack(docs_val, tokenizer, val_column, max_length)

    if isinstance(train, datasets.IterableDataset):
        if args.shuffle_buffer_size > 0:
            # After packing: blocks (not documents) are shuffled, and shard order with them.
            train = train.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        if args.max_eval_samples is not None:
            val = val.take(args.max_eval_samples)
        return train, val

    if args.max_eval_samples is not None and len(val) > args.max_eval_samples:
        val = val.select(range(args.max_eval_samples))
    if len(train) == 0:
        raise ValueError(f"training data yields no full block of max_length={max_length} tokens")
    if len(val) == 0:
        logger.warning("Validation data yields no full block of max_length=%d tokens: evaluation is empty", max_length)
    logger.info(
        "Packed %d training and %d validation blocks of %d tokens", len(train), len(val), max_length
    )
    return train, val
