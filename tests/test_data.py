"""hf_sparse.training.data: embedded corpus, embedded tokenizer, packing, file/streaming sources,
argument validation. CPU only, no network."""

import dataclasses
import gzip
import json
import os
import random
import shutil
import sys
import time

import pytest

from hf_sparse.training.data import data as D
from hf_sparse.training.data import data_args, packing
from hf_sparse import embedded_corpus as corpus
from hf_sparse.training.data import tokenizer as tokenizer_module
from tests import processes  # noqa: E402


VOCAB = 1024
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_sparse_cache"))


@pytest.fixture(autouse=True)
def isolated_caches(shared_cache, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_SPARSE_CACHE", shared_cache)
    # datasets reads its cache location from config at call time.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


@pytest.fixture(scope="module")
def tok(shared_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_SPARSE_CACHE", shared_cache)
        return tokenizer_module.load_tokenizer(None, VOCAB)


def _docs(n, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta import def class return self lambda é ∑ 42\n".split(" ")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _write_jsonl(path, docs, column="text"):
    with open(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({column: doc, "meta": 1}) + "\n")
    return str(path)


def _expected_blocks(tok, docs, max_length):
    flat = []
    for doc in docs:
        if doc:
            flat += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    return [flat[i : i + max_length] for i in range(0, len(flat) - max_length + 1, max_length)]


def _small_tokenizer(docs):
    """A second, different tokenizer, trained in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


def _ids(dataset):
    return [row["input_ids"] for row in dataset]


# ------------------------------------------------------------------ embedded corpus


def test_embedded_corpus_deterministic_nonempty_split():
    train, val = corpus.embedded_corpus()
    assert len(train) > 50 and len(val) >= 1
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.15
    total = sum(len(t.encode("utf-8")) for t in train + val)
    assert 3_000_000 < total <= corpus.EMBEDDED.max_bytes
    fingerprint = corpus.embedded_corpus_fingerprint()
    corpus._embedded_corpus_cached.cache_clear()
    assert corpus.embedded_corpus() == (train, val)
    assert corpus.embedded_corpus_fingerprint() == fingerprint
    # Callers get copies: mutating them must not change the corpus.
    train.clear()
    assert len(corpus.embedded_corpus()[0]) > 50


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    root = tmp_path / "stdlib"
    files = {
        "a.py": "import os\n" * 50,
        "pkg/b.py": "def f():\n    return 1\n" * 40,
        "pkg/sub/c.py": "class C:\n    pass\n" * 30,
        "z.py": "x = 1\n" * 60,
        "test/t.py": "TEST = 1\n",
        "pkg/tests/t2.py": "TEST = 2\n",
        "idlelib/i.py": "IDLE = 1\n",
        "lib2to3/l.py": "L = 1\n",
        "site-packages/pkg/s.py": "SITE = 1\n",
        "encodings/cp1.py": "TABLE = 1\n",
        "blank.py": "   \n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes(b"# caf\xe9\n")
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    corpus._embedded_corpus_cached.cache_clear()
    yield files
    corpus._embedded_corpus_cached.cache_clear()


def test_embedded_corpus_selection_rules(fake_stdlib):
    train, val = corpus.embedded_corpus()
    wanted = {fake_stdlib[r] for r in ("a.py", "pkg/b.py", "pkg/sub/c.py", "z.py")}
    assert set(train) | set(val) == wanted
    assert train and val and not set(train) & set(val)
    # Sorted-path order within each split.
    order = [fake_stdlib[r] for r in ("a.py", "pkg/b.py", "pkg/sub/c.py", "z.py")]
    assert train == [t for t in order if t in train]


def test_embedded_corpus_byte_cap(fake_stdlib, monkeypatch):
    monkeypatch.setattr(corpus, "EMBEDDED", dataclasses.replace(corpus.EMBEDDED, max_bytes=1500))
    train, val = corpus.embedded_corpus()
    total = sum(len(t) for t in train + val)
    assert 0 < total <= 1500
    assert len(train) + len(val) < 4 and train and val


# ------------------------------------------------------------------------ tokenizer


def test_embedded_tokenizer_fits_vocab_and_roundtrips(tok, shared_cache):
    assert 256 < len(tok) <= VOCAB
    assert tok.eos_token == EOS and tok.bos_token == EOS and tok.pad_token == "<pad>"
    assert tok.eos_token_id is not None and tok.pad_token_id not in (None, tok.eos_token_id)
    assert tok.model_max_length >= 10**9
    text = "def café(x):\n    return x ** 2  # ∑ ok\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert max(ids) < VOCAB and tok.decode(ids) == text
    # Trained on code: common code is compressed well below one token per byte.
    train, _ = corpus.embedded_corpus()
    assert len(tok.encode(train[0], add_special_tokens=False)) < 0.5 * len(train[0].encode())
    cached = [n for n in os.listdir(shared_cache) if n.startswith(f"embedded_tokenizer_v1_{VOCAB}_")]
    assert len(cached) == 1 and corpus.embedded_corpus_fingerprint()[:16] in cached[0]
    assert not [n for n in os.listdir(shared_cache) if "tmp" in n]


def test_embedded_tokenizer_second_call_uses_cache(tok, monkeypatch):
    def no_training(vocab_size):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(tokenizer_module, "_train_embedded_tokenizer", no_training)
    start = time.perf_counter()
    again = tokenizer_module.load_tokenizer(None, VOCAB)
    assert time.perf_counter() - start < 2.0
    assert again.get_vocab() == tok.get_vocab()
    assert again.eos_token_id == tok.eos_token_id


def test_embedded_tokenizer_lost_race_uses_winner(tok, shared_cache, tmp_path, monkeypatch):
    """Another process finishing first: its directory wins and is what we return."""
    other_cache = tmp_path / "other_cache"
    monkeypatch.setenv("HF_SPARSE_CACHE", str(other_cache))
    winner = next(n for n in os.listdir(shared_cache) if n.startswith(f"embedded_tokenizer_v1_{VOCAB}_"))

    def train_while_other_rank_finishes(vocab_size):
        trained = tok  # stands in for a fresh training run (saves its cost)
        shutil.copytree(os.path.join(shared_cache, winner), other_cache / winner)
        config_path = other_cache / winner / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["model_max_length"] = 4242  # marks the winner's copy
        config_path.write_text(json.dumps(config))
        return trained

    monkeypatch.setattr(tokenizer_module, "_train_embedded_tokenizer", train_while_other_rank_finishes)
    result = tokenizer_module.load_tokenizer(None, VOCAB)
    assert result.model_max_length == 4242
    assert sorted(os.listdir(other_cache)) == [winner]  # no temp dir left behind


def test_embedded_tokenizer_default_cache_location(tok, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_SPARSE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    trained = []
    monkeypatch.setattr(
        tokenizer_module, "_train_embedded_tokenizer", lambda vocab_size: trained.append(vocab_size) or tok
    )
    first = tokenizer_module.load_tokenizer(None, VOCAB)
    second = tokenizer_module.load_tokenizer(None, VOCAB)
    assert trained == [VOCAB]  # the second call found the cache
    assert first.get_vocab() == second.get_vocab() == tok.get_vocab()
    entries = os.listdir(tmp_path / ".cache" / "hf_sparse")
    assert [e for e in entries if e.startswith(f"embedded_tokenizer_v1_{VOCAB}_")]


def test_embedded_tokenizer_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_module.load_tokenizer(None, 100)


def test_named_tokenizer_gets_pad_from_eos(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=EOS)
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path / "tk")
    loaded = tokenizer_module.load_tokenizer(str(tmp_path / "tk"), VOCAB)
    assert loaded.pad_token == EOS and loaded.pad_token_id == loaded.eos_token_id


# -------------------------------------------------------------------------- packing


def test_packing_matches_hand_computation(tok, tmp_path):
    docs = ["hello world", "foo bar baz", "", "x = 1\ny = 2", "the end"]
    train = _write_jsonl(tmp_path / "train.jsonl", docs)
    with open(tmp_path / "train.jsonl", "a") as handle:
        handle.write(json.dumps({"text": None, "meta": 2}) + "\n")
    val = _write_jsonl(tmp_path / "val.jsonl", ["validation text here"] * 3)

    flat = []
    for doc in docs:
        if doc:
            flat += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    max_length = next(n for n in range(len(flat) // 3, 1, -1) if len(flat) % n)
    expected = [flat[i : i + max_length] for i in range(0, len(flat) - len(flat) % max_length, max_length)]
    assert len(expected) >= 3

    args = data_args.DataArguments(train_files=train, validation_files=val, max_length=max_length)
    train_ds, val_ds = D.build_datasets(args, tok)
    assert _ids(train_ds) == expected
    assert all(row["labels"] == row["input_ids"] for row in train_ds)
    assert all(len(b) == max_length for b in _ids(val_ds)) and len(val_ds) >= 1
    # Documents are separated by EOS inside blocks.
    assert sum(b.count(tok.eos_token_id) for b in _ids(train_ds)) >= 3


def test_pack_token_ids_drops_only_the_tail():
    blocks = packing.pack_token_ids([[1, 2, 3], [4], [5, 6]], eos_token_id=0, max_length=3)
    assert blocks == [[1, 2, 3], [0, 4, 0], [5, 6, 0]]
    assert packing.pack_token_ids([[1, 2, 3], [4]], eos_token_id=0, max_length=4) == [[1, 2, 3, 0]]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "txt", "parquet", "jsonl.gz"])
def test_local_formats(tok, tmp_path, fmt):
    import gzip

    import datasets

    docs = _docs(40)
    docs = [d.replace("\n", " ").strip() or "x" for d in docs]  # .txt: one document per line
    path = tmp_path / f"train.{fmt}"
    column = "content"
    if fmt == "json":
        path.write_text(json.dumps([{column: d} for d in docs]))
    elif fmt == "jsonl":
        _write_jsonl(path, docs, column)
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps({column: d}) + "\n" for d in docs)
    elif fmt == "txt":
        path.write_text("\n".join(docs[:20]) + "\n\n" + "\n".join(docs[20:]) + "\n")
    else:
        datasets.Dataset.from_dict({column: docs, "n": list(range(len(docs)))}).to_parquet(str(path))
    val = _write_jsonl(tmp_path / "val.jsonl", docs[:10], column)

    args = data_args.DataArguments(train_files=[str(path)], validation_files=[val], max_length=16, text_column=column)
    train_ds, val_ds = D.build_datasets(args, tok)
    assert isinstance(train_ds, datasets.Dataset)
    assert train_ds.column_names == ["input_ids", "labels"]
    assert _ids(train_ds) == _expected_blocks(tok, docs, 16)
    assert _ids(val_ds) == _expected_blocks(tok, docs[:10], 16)


def test_missing_text_column_is_clear(tok, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _docs(10), column="body")
    with pytest.raises(ValueError, match="text_column"):
        D.build_datasets(data_args.DataArguments(train_files=train, max_length=8), tok)


def test_validation_split_percentage_is_deterministic_and_disjoint(tok, tmp_path):
    import datasets

    docs = [f"document number {i}: " + d for i, d in enumerate(_docs(400, seed=1))]
    dataset = datasets.Dataset.from_dict({"text": docs})
    train_docs, val_docs = D._split_by_hash(dataset, "text", 10.0)
    train_set, val_set = set(train_docs["text"]), set(val_docs["text"])
    assert not train_set & val_set and train_set | val_set == set(docs)
    assert 15 <= len(val_set) <= 70
    assert train_docs["text"] == [d for d in docs if d in train_set]  # order kept

    path = _write_jsonl(tmp_path / "train.jsonl", docs)
    args = data_args.DataArguments(train_files=path, max_length=16, validation_split_percentage=10.0)
    first = D.build_datasets(args, tok)
    second = D.build_datasets(args, tok)
    assert _ids(first[1]) == _ids(second[1]) == _expected_blocks(tok, val_docs["text"], 16)
    assert _ids(first[0]) == _expected_blocks(tok, train_docs["text"], 16)


def test_tiny_split_still_has_validation(tok, tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", _docs(3, seed=5))
    train_ds, val_ds = D.build_datasets(data_args.DataArguments(train_files=path, max_length=2), tok)
    assert len(train_ds) > 0 and len(val_ds) > 0


def test_cache_not_stale_across_max_length_and_tokenizer(tok, tmp_path):
    docs = _docs(60, seed=2)
    train = _write_jsonl(tmp_path / "train.jsonl", docs)
    val = _write_jsonl(tmp_path / "val.jsonl", docs[:5])
    for max_length in (8, 16, 8):
        train_ds, _ = D.build_datasets(
            data_args.DataArguments(train_files=train, validation_files=val, max_length=max_length), tok
        )
        assert _ids(train_ds) == _expected_blocks(tok, docs, max_length)
    other = _small_tokenizer(docs)
    train_ds, _ = D.build_datasets(
        data_args.DataArguments(train_files=train, validation_files=val, max_length=8), other
    )
    assert _ids(train_ds) == _expected_blocks(other, docs, 8) != _expected_blocks(tok, docs, 8)


def test_max_eval_samples_caps_map_style(tok, tmp_path):
    docs = _docs(60, seed=3)
    args = data_args.DataArguments(
        train_files=_write_jsonl(tmp_path / "t.jsonl", docs),
        validation_files=_write_jsonl(tmp_path / "v.jsonl", docs),
        max_length=8,
        max_eval_samples=5,
    )
    _, val_ds = D.build_datasets(args, tok)
    assert _ids(val_ds) == _expected_blocks(tok, docs, 8)[:5]


# ------------------------------------------------------------------------ streaming


def test_streaming_matches_map_style(tok, tmp_path):
    import datasets

    docs = _docs(300, seed=4)
    train = _write_jsonl(tmp_path / "train.jsonl", docs)
    val = _write_jsonl(tmp_path / "val.jsonl", docs[:50])
    base = dict(train_files=train, validation_files=val, max_length=32)
    map_train, map_val = D.build_datasets(data_args.DataArguments(**base), tok)

    s_train, s_val = D.build_datasets(data_args.DataArguments(**base, streaming=True, shuffle_buffer_size=0), tok)
    assert isinstance(s_train, datasets.IterableDataset) and isinstance(s_val, datasets.IterableDataset)
    assert _ids(s_train) == _ids(map_train)
    assert _ids(s_val) == _ids(map_val)
    assert all(row["labels"] == row["input_ids"] for row in s_train)

    shuffled, capped = D.build_datasets(
        data_args.DataArguments(**base, streaming=True, max_eval_samples=3), tok, seed=7
    )
    shuffled_ids = _ids(shuffled)
    assert shuffled_ids != _ids(map_train)  # shuffled...
    assert sorted(shuffled_ids) == sorted(_ids(map_train))  # ...but the same blocks
    again, _ = D.build_datasets(data_args.DataArguments(**base, streaming=True), tok, seed=7)
    assert _ids(again) == shuffled_ids  # reproducible from the seed
    assert _ids(capped) == _ids(map_val)[:3]


def test_streaming_hash_split_matches_map_style(tok, tmp_path):
    docs = [f"doc {i} " + d for i, d in enumerate(_docs(200, seed=6))]
    path = _write_jsonl(tmp_path / "train.jsonl", docs)
    base = dict(train_files=path, max_length=16, validation_split_percentage=10.0)
    map_train, map_val = D.build_datasets(data_args.DataArguments(**base), tok)
    s_train, s_val = D.build_datasets(data_args.DataArguments(**base, streaming=True, shuffle_buffer_size=0), tok)
    assert len(map_val) > 0
    assert _ids(s_val) == _ids(map_val)
    assert _ids(s_train) == _ids(map_train)


# ------------------------------------------------------------------------- embedded


def test_embedded_default_build(tok):
    import datasets

    packing._EMBEDDED_CACHE.clear()
    train_ds, val_ds = D.build_datasets(data_args.DataArguments(max_length=128), tok)
    assert isinstance(train_ds, datasets.Dataset) and isinstance(val_ds, datasets.Dataset)
    assert len(train_ds) > 1000 and len(val_ds) > 20
    first = train_ds[:3]
    assert all(len(b) == 128 for b in first["input_ids"]) and first["labels"] == first["input_ids"]

    train_texts, val_texts = corpus.embedded_corpus()
    flat = []
    for text in train_texts:
        flat += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        if len(flat) >= 3 * 128:
            break
    assert first["input_ids"] == [flat[i : i + 128] for i in (0, 128, 256)]
    val_flat = tok.encode(val_texts[0], add_special_tokens=False) + [tok.eos_token_id]
    assert val_ds[0]["input_ids"] == (val_flat + tok.encode(val_texts[1], add_special_tokens=False))[:128]

    # Cached in-process, and on disk for later processes; keyed by max_length.
    start = time.perf_counter()
    assert D.build_datasets(data_args.DataArguments(max_length=128), tok)[0][5] == train_ds[5]
    packing._EMBEDDED_CACHE.clear()
    again, _ = D.build_datasets(data_args.DataArguments(max_length=128), tok)
    assert time.perf_counter() - start < 1.5
    assert again[7] == train_ds[7]
    short, _ = D.build_datasets(data_args.DataArguments(max_length=64), tok)
    assert short[0]["input_ids"] == flat[:64] and short[1]["input_ids"] == flat[64:128]


def test_embedded_default_streaming(tok):
    import datasets

    map_train, map_val = D.build_datasets(data_args.DataArguments(max_length=128), tok)
    s_train, s_val = D.build_datasets(data_args.DataArguments(max_length=128, streaming=True, max_eval_samples=4), tok)
    assert isinstance(s_train, datasets.IterableDataset)
    assert _ids(s_val) == map_val[:4]["input_ids"]
    assert sum(1 for _ in s_train) == len(map_train)


def test_determinism_across_processes(tok, shared_cache):
    """Another interpreter (other hash seed, as another rank would be) gets the same data.

    The same (costly) interpreter also checks that importing hf_sparse.training.data and
    hf_sparse.training.evaluation pulls in neither `datasets`, `evaluate` (seconds to import) nor
    `wandb`: model code shares the package and must run without them.
    """
    train_ds, _ = D.build_datasets(data_args.DataArguments(max_length=64), tok)
    code = (
        "import json, sys\n"
        "from hf_sparse import embedded_corpus as corpus\n"
        "from hf_sparse.training import evaluation\n"
        "from hf_sparse.training.data import data as D, data_args\n"
        "from hf_sparse.training.data import tokenizer as tokenizer_module\n"
        "print(json.dumps(sorted(m for m in ('datasets', 'evaluate', 'wandb') if m in sys.modules)))\n"
        f"tok = tokenizer_module.load_tokenizer(None, {VOCAB})\n"
        "train, val = D.build_datasets(data_args.DataArguments(max_length=64), tok)\n"
        "print(json.dumps([corpus.embedded_corpus_fingerprint(), train[0]['input_ids'], train[len(train) - 1]['input_ids'], len(val)]))\n"
    )
    env = dict(os.environ, HF_SPARSE_CACHE=shared_cache, PYTHONHASHSEED="12345")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = processes.run([sys.executable, "-c", code], env=env, cwd=repo, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    *_, imported, result = out.strip().splitlines()
    assert json.loads(imported) == []
    fingerprint, first, last, n_val = json.loads(result)
    _, val_ds = D.build_datasets(data_args.DataArguments(max_length=64), tok)
    assert fingerprint == corpus.embedded_corpus_fingerprint()
    assert first == train_ds[0]["input_ids"] and last == train_ds[len(train_ds) - 1]["input_ids"]
    assert n_val == len(val_ds)


# ----------------------------------------------------------------------- validation


def test_data_arguments_accept_single_paths():
    args = data_args.DataArguments(train_files="a.jsonl", validation_files=("b.jsonl", "c.jsonl"))
    assert args.train_files == ["a.jsonl"] and args.validation_files == ["b.jsonl", "c.jsonl"]
    assert data_args.DataArguments(train_files=[]).train_files is None


def test_data_arguments_with_hf_argument_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(data_args.DataArguments)
    (args,) = parser.parse_args_into_dataclasses(["--train_files", "a.json", "b.json", "--max_length", "64"])
    assert args.train_files == ["a.json", "b.json"] and args.max_length == 64
    (args,) = parser.parse_dict({"train_files": "x.jsonl", "streaming": True})
    assert args.train_files == ["x.jsonl"] and args.streaming is True


def _good_file(tmp_path, name="good.jsonl"):
    return _write_jsonl(tmp_path / name, ["some text"])


def _bad_cases(tmp_path):
    good = _good_file(tmp_path)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n\t \n")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "lines.txt").write_text("a line\n")
    (tmp_path / "adir.jsonl").mkdir()
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "utf16.jsonl").write_text('{"text": "some text"}\n', encoding="utf-16")
    (tmp_path / "binary.txt").write_bytes(b"text then \xff\xd8\xff\xe0 JFIF" * 10)
    with gzip.open(tmp_path / "latin1.txt.gz", "wb") as handle:
        handle.write("caf\xe9 au lait\n".encode("latin-1"))
    p = str(tmp_path)
    return {
        "missing": (dict(train_files=f"{p}/nope.jsonl"), "train_files", "does not exist"),
        "missing_glob": (dict(train_files=f"{p}/*.nothing"), "train_files", "matches no file"),
        "empty": (dict(train_files=f"{p}/empty.jsonl"), "train_files", "empty"),
        "empty_parquet": (dict(train_files=f"{p}/empty.parquet"), "train_files", "empty"),
        "blank": (dict(train_files=good, validation_files=f"{p}/blank.txt"), "validation_files", "whitespace"),
        "extension": (dict(train_files=f"{p}/data.csv"), "train_files", ".json, .jsonl, .txt, .parquet"),
        "directory": (dict(train_files=f"{p}/adir.jsonl"), "train_files", "directory"),
        "both_sources": (dict(train_files=good, dataset_name="allenai/c4"), "train_files", "dataset_name"),
        "validation_only": (dict(validation_files=good), "validation_files", "without train_files"),
        "max_length": (dict(max_length=1), "max_length", "at least 2"),
        "split_pct": (dict(validation_split_percentage=-1), "validation_split_percentage", "at least 0"),
        "split_pct_100": (dict(validation_split_percentage=100), "validation_split_percentage", "below 100"),
        "max_eval": (dict(max_eval_samples=0), "max_eval_samples", "at least 1"),
        "vocab": (dict(tokenizer_vocab_size=100), "tokenizer_vocab_size", "258"),
        "mixed": (dict(train_files=[good, f"{p}/lines.txt"]), "train_files", "mixes file formats"),
        "utf16": (
            dict(train_files=f"{p}/utf16.jsonl"),
            "train_files",
            "utf16.jsonl': it is UTF-16 text (byte-order mark)",
        ),
        "binary": (dict(train_files=f"{p}/binary.txt"), "train_files", "not UTF-8 text (byte 0xff at offset 10"),
        "latin1_gz": (dict(train_files=f"{p}/latin1.txt.gz"), "train_files", "not UTF-8 text (byte 0xe9 at offset 3"),
    }


CASES = [
    "missing",
    "missing_glob",
    "empty",
    "empty_parquet",
    "blank",
    "extension",
    "directory",
    "both_sources",
    "validation_only",
    "max_length",
    "split_pct",
    "max_eval",
    "vocab",
    "mixed",
    "utf16",
    "binary",
    "latin1_gz",
    "split_pct_100",
]


@pytest.mark.parametrize("case", CASES)
def test_validate_data_args_rejects(tmp_path, case):
    kwargs, key, fragment = _bad_cases(tmp_path)[case]
    with pytest.raises(ValueError) as info:
        data_args.validate_data_args(data_args.DataArguments(**kwargs))
    message = str(info.value)
    assert key in message and "\n" not in message
    if fragment:
        assert fragment in message


def test_validate_data_args_unreadable(tmp_path, monkeypatch):
    path = _good_file(tmp_path)
    real_open = open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == path:
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, *args, **kwargs)

    # Tests may run as root, where chmod 000 does not stop reads.
    monkeypatch.setattr(data_args, "open", guarded_open, raising=False)
    with pytest.raises(ValueError, match=r"train_files: .*not readable"):
        data_args.validate_data_args(data_args.DataArguments(train_files=path))


def test_validate_data_args_accepts_good_inputs(tmp_path):
    good = _good_file(tmp_path)
    other = _good_file(tmp_path, "other.json")
    data_args.validate_data_args(data_args.DataArguments())
    data_args.validate_data_args(data_args.DataArguments(train_files=[good, other], validation_files=good))
    data_args.validate_data_args(data_args.DataArguments(train_files=str(tmp_path / "*.json*")))
    data_args.validate_data_args(
        data_args.DataArguments(dataset_name="allenai/c4", dataset_config_name="en", validation_files=good)
    )


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_name_path_uses_its_validation_split(tok, tmp_path, streaming):
    """The dataset_name route (hub ids in real runs) exercised offline with a local dataset folder."""
    docs = _docs(120, seed=8)
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", docs[:100])
    _write_jsonl(folder / "validation.jsonl", docs[100:])
    args = data_args.DataArguments(dataset_name=str(folder), max_length=16, streaming=streaming, shuffle_buffer_size=0)
    train_ds, val_ds = D.build_datasets(args, tok)
    assert _ids(train_ds) == _expected_blocks(tok, docs[:100], 16)
    assert _ids(val_ds) == _expected_blocks(tok, docs[100:], 16)


def test_dataset_name_without_validation_split_is_hash_split(tok, tmp_path):
    docs = [f"doc {i} " + d for i, d in enumerate(_docs(150, seed=9))]
    folder = tmp_path / "train_only"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", docs)
    args = data_args.DataArguments(dataset_name=str(folder), max_length=16, validation_split_percentage=20.0)
    train_ds, val_ds = D.build_datasets(args, tok)
    val_docs = [d for d in docs if D._doc_in_validation(d, 20.0)]
    assert 10 < len(val_docs) < 60
    assert _ids(val_ds) == _expected_blocks(tok, val_docs, 16)
    assert _ids(train_ds) == _expected_blocks(tok, [d for d in docs if d not in val_docs], 16)


def test_validation_split_percentage_zero_means_no_validation_split(tok, tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", [f"document number {i} " * 20 for i in range(40)])
    whole, _ = D.build_datasets(
        data_args.DataArguments(train_files=path, max_length=16, validation_split_percentage=1), tok
    )
    train, val = D.build_datasets(
        data_args.DataArguments(train_files=path, max_length=16, validation_split_percentage=0), tok
    )
    assert val is None and len(train) >= len(whole)  # every document trains
    _, embedded_val = D.build_datasets(data_args.DataArguments(max_length=64, validation_split_percentage=0), tok)
    assert embedded_val is None
