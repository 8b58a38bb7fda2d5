"""Tokenizers: a named one (hub id or local folder) or, by default, a byte-level BPE
trained locally on the embedded corpus and cached (no network needed)."""

import hashlib
import json
import logging
import os
import shutil
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ...model.env_knobs import env_value
from .data_args import MIN_EMBEDDED_VOCAB_SIZE
from ...embedded_corpus import embedded_corpus, embedded_corpus_fingerprint

logger = logging.getLogger(__name__)


EMBEDDED_EOS_TOKEN = "<|endoftext|>"
EMBEDDED_PAD_TOKEN = "<pad>"
# Bump when training settings change so older cached tokenizers are not picked up.
_EMBEDDED_TOKENIZER_VERSION = 1
# transformers' own "no limit" value: packing never needs truncation warnings.
_NO_MAX_LENGTH = int(1e30)


def cache_root() -> str:
    """Where hf_sparse caches derived artifacts: $HF_SPARSE_CACHE or ~/.cache/hf_sparse."""
    return env_value("HF_SPARSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_sparse")


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


# How transformers 5.24 loaded a tokenizer, which it keeps among the init arguments that
# save_pretrained writes to tokenizer_config.json: a tokenizer saved from an offline run
# would ask for local files only wherever it is loaded next (the hub included).
LOADER_ARGUMENTS = (
    "local_files_only", "is_local", "cache_dir", "force_download", "proxies", "token", "revision", "subfolder",
    "trust_remote_code", "_commit_hash",
)  # fmt: skip


def drop_loader_arguments(tokenizer):
    """Forget how `tokenizer` was loaded, so its saved config carries none of it."""
    for key in LOADER_ARGUMENTS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


# Files a tokenizer (slow or fast, any family) may consist of.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# Those a tokenizer can load from (the others only add to one).
_LOADABLE_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
)  # fmt: skip


def check_tokenizer_folder(tokenizer_name: str | None) -> None:
    """A local tokenizer_name must be a folder with a tokenizer in it. AutoTokenizer on an
    empty or model-only folder fails after the hub checks, with a traceback whose last line
    blames sentencepiece or tiktoken. Raises ValueError (one line)."""
    if tokenizer_name is None:
        return
    path = os.path.expanduser(tokenizer_name)
    if os.path.isfile(path):
        raise ValueError(
            f"tokenizer_name: {tokenizer_name!r} is a file; give the folder that holds the tokenizer's files "
            "(tokenizer.json, tokenizer_config.json, ...)."
        )
    if not os.path.isdir(path):
        return  # a hub id (checked with the hub access), or a missing path (said there too)
    names = os.listdir(path)
    if set(names) & set(_LOADABLE_TOKENIZER_FILES) or any(name.endswith((".model", ".tiktoken")) for name in names):
        return
    raise ValueError(
        f"tokenizer_name: {tokenizer_name!r} is a folder without a tokenizer in it (none of "
        f"{', '.join(_LOADABLE_TOKENIZER_FILES)}); give a folder that a tokenizer was saved to (a finished run's "
        "output_dir holds one), a hub id such as 't5-base', or no tokenizer_name for the embedded tokenizer."
    )


def load_tokenizer(tokenizer_name: str | None, vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer with eos and pad tokens set.

    `tokenizer_name`: hub id or local directory for `AutoTokenizer`. None: the embedded
    byte-level BPE with `vocab_size` tokens (at most), trained on the embedded corpus once
    and cached under `cache_root()`.
    """
    if tokenizer_name is None:
        return drop_loader_arguments(_embedded_tokenizer(vocab_size))
    tokenizer = drop_loader_arguments(AutoTokenizer.from_pretrained(tokenizer_name))
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
            tokenizer_name,
            len(tokenizer),
            vocab_size,
            vocab_size,
        )
    return tokenizer


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
