"""The embedded default corpus: the running Python's standard-library sources, split
into training and validation documents by a hash, so a run needs neither network nor data."""

import functools
import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass

logger = logging.getLogger(__name__)


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
        len(train),
        len(val),
        total / 1e6,
        root,
    )
    return train, val, digest.hexdigest()


def embedded_corpus() -> tuple[list[str], list[str]]:
    """(train_texts, val_texts) of the embedded default corpus; one document per file."""
    train, val, _ = _embedded_corpus_cached()
    return list(train), list(val)


def embedded_corpus_fingerprint() -> str:
    """Hash of the embedded corpus content and split; keys everything derived from it."""
    return _embedded_corpus_cached()[2]
