"""Checks of the world around a run, before anything is built: the launcher
(accelerate/torchrun environment), reporting integrations and W&B credentials, hub access.
"""

import logging
import os

import torch

from ..data.data_args import DataArguments
from ..data.hub_access import check_hub_resources
from .run_args import ConfigError, LaunchError

logger = logging.getLogger(__name__)


def check_hub_access(data_args: DataArguments) -> None:
    """The hub tokenizer/dataset of a parsed run can be had (see `data.check_hub_resources`).

    Separate from `parse_run_config`, which needs neither the hub nor its cache (the shipped
    hub recipes parse offline): train_hf.py calls it next, before anything is loaded.
    """
    try:
        check_hub_resources(data_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def accelerator_available() -> bool:
    """Whether a device that accelerate's FSDP can shard onto exists (not CPU, not MPS)."""
    if not torch.accelerator.is_available():
        return False
    return torch.accelerator.current_accelerator().type != "mps"


def _env_true(env, name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


# What `accelerate launch` exports to the script: ACCELERATE_MIXED_PRECISION always,
# ACCELERATE_USE_CPU only from its single-process launcher, WORLD_SIZE only from the
# torchrun-based ones (DDP, FSDP, DeepSpeed), ACCELERATE_USE_FSDP with an FSDP config.
_TWO_PROCESSES_ON_CPU = (
    "`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 train_hf.py CONFIG.json` "
    "or `torchrun --nproc_per_node 2 train_hf.py CONFIG.json`"
)


def check_elastic_restarts(env) -> None:
    """`torchrun --max-restarts N` (or `accelerate launch --max_restarts N`) with the
    rendezvous store shared with the training group (torch elastic's default): the restarted
    ranks read the previous attempt's addresses from that store, and the new gloo/NCCL group
    then hangs or fails to connect (pytorch/pytorch#135712; here: a restart that hung in
    init_process_group). Refused up front, naming the one setting that fixes it."""
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if restarts.isdigit() and int(restarts) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise LaunchError(
            f"the launcher restarts failed ranks (max restarts {restarts}) and shares its rendezvous store with the "
            "training process group, so a restarted group reads the previous attempt's addresses and hangs or fails "
            "to connect (pytorch/pytorch#135712); launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
            "environment (each attempt then gets a store of its own), e.g. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "torchrun --max-restarts 2 ..."
        )


def check_launch_environment(data: dict, env=None) -> None:
    """Refuse (one line, before any data or model is built) what accelerate would only fail
    on later in every rank, and warn when `accelerate launch` silently runs one process.

    - An FSDP accelerate config on a machine without GPUs: once data and model are built,
      FSDP1's plugin raises in every rank, and FSDP2 quietly trains plain DDP instead (the
      CPU fall-back, `use_cpu`, wins over the FSDP config).
    - An accelerate mixed precision (config file or --mixed_precision) that the run JSON
      does not ask for: the run JSON's `bf16`/`fp16` keys decide precision. DeepSpeed stops
      every rank on the mismatch; DDP/FSDP would silently autocast a run configured fp32.
    - `accelerate launch --num_processes N` without a config file (or with --cpu) starts ONE
      process on a machine without several GPUs; its single-process launcher still exports
      MASTER_ADDR for N > 1, which is how we know more were asked for.
    """
    env = os.environ if env is None else env
    check_elastic_restarts(env)
    if _env_true(env, "ACCELERATE_USE_FSDP") and not accelerator_available():
        version = env.get("FSDP_VERSION", "1")
        raise LaunchError(
            f"the accelerate config asks for FSDP (distributed_type: FSDP, fsdp_version {version}), which needs "
            f"GPUs, and this machine has none; on CPU train with several processes through {_TWO_PROCESSES_ON_CPU} "
            "(DDP over gloo), or DeepSpeed (configs/accelerate/deepspeed_zero2.yaml)."
        )
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision in ("bf16", "fp16") and data.get(precision) is not True:
        raise LaunchError(
            f"accelerate's mixed_precision is {precision!r} (accelerate config file or --mixed_precision) but the run "
            f"config has {precision}={data.get(precision, False)!r}; precision is set in the run JSON: add "
            f"\"{precision}\": true to it (or --{precision} true), or set mixed_precision: 'no' in the accelerate config."
        )
    # (An MPI launch, `--mpirun_hostfile`, does run N processes: they see MPI's size variables.)
    mpi = any(name in env for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    single_process_launcher = "ACCELERATE_USE_CPU" in env and "WORLD_SIZE" not in env and not mpi
    if single_process_launcher and "MASTER_ADDR" in env:
        gpus = torch.cuda.device_count()
        why = (
            "accelerate's CPU mode (--cpu or use_cpu: true) starts one process"
            if _env_true(env, "ACCELERATE_USE_CPU")
            else (
                "without a config file accelerate starts several processes only on several GPUs, and this machine "
                f"has {gpus or 'none'}"
            )
        )
        logger.warning(
            "accelerate launch started ONE process (world_size 1) although --num_processes > 1 was asked for: %s. "
            "For two processes on CPU use %s. This run continues as a single process.",
            why,
            _TWO_PROCESSES_ON_CPU,
        )


def check_reporting_integrations(report_to: list[str]) -> None:
    """Fail now, not when the Trainer builds its callbacks after the data and model are ready."""
    from transformers import integrations

    requested = [name for name in (report_to or []) if name not in ("all", "none")]
    if not requested:
        return
    unknown = [name for name in requested if name not in integrations.INTEGRATION_TO_CALLBACK]
    if unknown:
        raise ConfigError(
            f"report_to: {', '.join(map(repr, unknown))} is not a reporting integration; choose from "
            f"{', '.join(map(repr, integrations.INTEGRATION_TO_CALLBACK))}."
        )
    installed = integrations.get_available_reporting_integrations()
    missing = [name for name in requested if name not in installed]
    if missing:
        raise ConfigError(
            f"report_to: {', '.join(map(repr, missing))} requested but not installed (pip install "
            f"{' '.join(missing)}); installed integrations: {installed or 'none'}."
        )
    if "wandb" in requested:
        check_wandb_credentials()


_WANDB_QUIET_MODES = ("offline", "dryrun", "disabled")


def wandb_credentials_missing() -> str | None:
    """The W&B host for which no API key can be found, or None when wandb.init() will not
    need one (offline/disabled mode) or will find one. No network: wandb's own lookup order,
    read the way wandb reads it: WANDB_MODE (env, then the settings files that `wandb
    offline` writes), WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE, then the netrc entry that
    `wandb login` writes for the host (WANDB_BASE_URL or the settings' base_url)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in _WANDB_QUIET_MODES:
        return None
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth
        from wandb.sdk.wandb_settings import Settings

        # A fresh Settings, not wandb's process-wide singleton: that one is frozen at the
        # first wandb call, and this must see the environment as it is now.
        settings = Settings(quiet=True)  # no "Loading settings from ..." line
        config_dir = os.environ.get("WANDB_CONFIG_DIR")
        settings.settings_system = os.path.join(
            os.path.expanduser(config_dir) if config_dir else os.path.expanduser(os.path.join("~", ".config", "wandb")),
            "settings",
        )
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        if str(settings.mode).lower() in _WANDB_QUIET_MODES or settings.api_key:
            return None
        if read_netrc_auth(host=settings.base_url):
            return None
        return settings.base_url
    except Exception as err:  # wandb internals moved or a settings file is odd: let wandb decide
        logger.debug("wandb credential lookup skipped: %s", err)
        return None


def check_wandb_credentials() -> None:
    """`report_to: ["wandb"]` without a key fails in wandb.init(), after data and model are
    built (UsageError: No API key configured), or prompts in a terminal."""
    host = wandb_credentials_missing()
    if host is not None:
        raise ConfigError(
            f"report_to: 'wandb' needs a W&B API key and none is configured for {host} (WANDB_API_KEY, or the "
            "~/.netrc entry that 'wandb login' writes); run 'wandb login' or set WANDB_API_KEY, or log offline with "
            "WANDB_MODE=offline (upload later with 'wandb sync'), or drop 'wandb' from report_to."
        )
