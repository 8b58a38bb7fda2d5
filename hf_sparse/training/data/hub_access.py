"""Hub resources named by the data keys (tokenizer_name, dataset_name): is the hub
reachable, is a copy in the local cache, and one clear error when neither holds."""

import glob
import os
from typing import NamedTuple

from .data_args import DataArguments

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
                "tokenizer_name",
                repo_id,
                huggingface_hub.constants.HF_HUB_OFFLINE,
                ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                _tokenizer_cached(repo_id),
                huggingface_hub.constants.HF_HUB_CACHE,
                "set tokenizer_name to a local tokenizer directory",
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
                "dataset_name",
                repo_id,
                datasets.config.HF_HUB_OFFLINE,
                ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
                _dataset_cached(repo_id, args.dataset_config_name),
                " or ".join(_dataset_cache_dirs(repo_id)),
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
