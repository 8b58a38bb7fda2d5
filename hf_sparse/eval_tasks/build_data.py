"""Regenerate the shipped task data from the embedded corpus's validation documents.

    python -m hf_sparse.eval_tasks.build_data

The data is generated once and stored in the repository (nextline.jsonl, heldout.jsonl,
data_info.json), not at run time: the standard library differs between Python versions,
and scores are only comparable across machines when every machine reads the same items.
Everything comes from documents of the corpus's validation split (a hash of the file's
path decides it, the same on every version), so no run on the embedded corpus trains on
it. Deterministic: the same corpus gives byte-identical files.
"""

import json
import logging
import os
import random
import sys

from ..embedded_corpus import embedded_corpus, embedded_corpus_fingerprint
from . import TASKS_DIR

NEXTLINE_ITEMS = 300
CONTEXT_LINES = 6
CHOICES = 4
HELDOUT_CHUNK_CHARS = 1500
HELDOUT_CHUNKS = 60
_MIN_LINE, _MAX_LINE = 8, 60


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _usable(line: str) -> bool:
    return _MIN_LINE <= len(line.strip()) and len(line) <= _MAX_LINE


def nextline_items(documents: list[str], count: int = NEXTLINE_ITEMS, seed: int = 0) -> list[dict]:
    """Multiple-choice items: `context` (CONTEXT_LINES lines of a document), `choices`
    (the line that follows, and CHOICES - 1 lines of *other* documents with the same
    indentation), `label` (the index of the true line)."""
    rng = random.Random(seed)
    lines = [doc.splitlines() for doc in documents]
    by_indent: dict[str, list[tuple[int, str]]] = {}
    for d, doc_lines in enumerate(lines):
        for line in doc_lines:
            if _usable(line):
                by_indent.setdefault(_indent(line), []).append((d, line))
    candidates = [
        (d, i)
        for d, doc_lines in enumerate(lines)
        for i in range(CONTEXT_LINES, len(doc_lines))
        if _usable(doc_lines[i]) and any(line.strip() for line in doc_lines[i - CONTEXT_LINES : i])
    ]
    rng.shuffle(candidates)
    items = []
    for d, i in candidates:
        true = lines[d][i]
        pool = sorted({line for doc, line in by_indent[_indent(true)] if doc != d and line != true})
        if len(pool) < CHOICES - 1:
            continue
        choices = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, true)
        items.append({"context": "\n".join(lines[d][i - CONTEXT_LINES : i]), "choices": choices, "label": label})
        if len(items) == count:
            break
    return items


def heldout_chunks(documents: list[str], count: int = HELDOUT_CHUNKS) -> list[dict]:
    """Pieces of at most HELDOUT_CHUNK_CHARS characters, cut at line ends, taken from the
    documents in turn so that every document contributes."""
    per_doc = []
    for doc in documents:
        pieces, current = [], ""
        for line in doc.splitlines(keepends=True):
            if current and len(current) + len(line) > HELDOUT_CHUNK_CHARS:
                pieces.append(current)
                current = ""
            current += line[:HELDOUT_CHUNK_CHARS]
        if current.strip():
            pieces.append(current)
        per_doc.append([p for p in pieces if p.strip()])
    chunks = []
    for round_ in range(max(map(len, per_doc), default=0)):
        chunks += [{"text": pieces[round_]} for pieces in per_doc if round_ < len(pieces)]
    return chunks[:count]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(out_dir: str = TASKS_DIR) -> dict:
    _, validation = embedded_corpus()
    nextline, heldout = nextline_items(validation), heldout_chunks(validation)
    _write_jsonl(os.path.join(out_dir, "nextline.jsonl"), nextline)
    _write_jsonl(os.path.join(out_dir, "heldout.jsonl"), heldout)
    info = {
        "source": "validation documents of the embedded corpus (hf_sparse.embedded_corpus)",
        "python": sys.version.split()[0],
        "corpus_fingerprint": embedded_corpus_fingerprint(),
        "validation_documents": len(validation),
        "nextline_items": len(nextline),
        "heldout_chunks": len(heldout),
    }
    with open(os.path.join(out_dir, "data_info.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return info


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    logging.getLogger(__name__).info("%s", json.dumps(main(), indent=2))  # what was written
