"""The distributed engines as a user launches them: `accelerate launch` with the shipped
configs/accelerate/*.yaml on this CPU-only machine (DDP over gloo, DeepSpeed when it is
installed), FSDP2's sharding done by hand on CPU (accelerate's FSDP needs GPUs), and the
up-front checks of train_hf.py for launches that cannot work or silently run one process.

The launch-environment checks run in-process on the environment accelerate's own launcher
functions build for a command line: the exact variables a launched script would see,
without paying for a launch."""

import importlib.util
import json
import logging
import os
import random
import signal
import sys

import pytest
from tests import processes  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE_CONFIGS = os.path.join(REPO_ROOT, "configs", "accelerate")
TINY_MODEL = os.path.join(REPO_ROOT, "configs", "llama_tiny.json")
QUICKSTART = os.path.join(REPO_ROOT, "configs", "quickstart.json")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _accelerate_yaml(name):
    return os.path.join(ACCELERATE_CONFIGS, name)


def _data_files(tmp_path):
    """A few KB of text: tokenising the embedded corpus would cost each rank seconds."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = random.Random(0)
    paths = []
    for name, docs in (("train.jsonl", 120), ("valid.jsonl", 10)):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) for _ in range(docs)))
        paths.append(str(path))
    return paths


def _quickstart_overrides(tmp_path, max_steps):
    """configs/quickstart.json shrunk to seconds: the tiny model, 32-token blocks, 2:4 from
    step 1, a checkpoint and an eval at step 2."""
    train, valid = _data_files(tmp_path)
    return [
        "--model_config",
        TINY_MODEL,
        "--train_files",
        json.dumps([train]),
        "--validation_files",
        json.dumps([valid]),
        "--max_length",
        "32",
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        "4",
        "--max_eval_samples",
        "8",
        "--activation_dense_warmup_steps",
        "1",
        "--logging_steps",
        "1",
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
        "--warmup_steps",
        "0",
        "--report_to",
        "[]",
        "--disable_tqdm",
        "true",
        "--output_dir",
        str(tmp_path / "run"),
    ]


def _launch(accelerate_args, train_args, timeout=300, probe_dir=None):
    """`accelerate launch ... train_hf.py configs/quickstart.json ...`, through this interpreter
    (`python -m accelerate.commands.launch` is the `accelerate launch` CLI), so that a
    virtual environment's packages (deepspeed) are the ones launched. With `probe_dir`,
    train_hf's command line runs under tests/dist_exit_probe.py, which records there how
    each rank ended."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = [os.path.join(REPO_ROOT, "tests", "dist_exit_probe.py"), str(probe_dir)] if probe_dir else [
        os.path.join(REPO_ROOT, "train_hf.py")]  # fmt: skip
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *accelerate_args,
        "--main_process_port",
        "0",
        *script,
        QUICKSTART,
        *train_args,
    ]
    proc = processes.run(cmd, cwd=REPO_ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _train_rows(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return state, [row for row in state["log_history"] if "loss" in row]


def _assert_telemetry(rows):
    """Per-layer activation/2:4 and weight telemetry in every training row, as test_distributed
    checks for torchrun (the cross-rank pooling itself is checked exactly by test_telemetry)."""
    for row in rows:
        for layer in (0, 1):
            assert 0.0 < row[f"sparsity_relu/layer_{layer}"] < 1.0
            assert 0.0 <= row[f"sparsity_24/layer_{layer}"] < 1.0
        assert "weight_sparsity/layer_0/mlp_up_proj" in row


def test_accelerate_ddp_yaml_two_cpu_processes_preempted_and_resumed(tmp_path):
    """ddp.yaml with --num_processes 2 on CPU: world size 2 (gloo), telemetry in every
    log_history row. SIGTERM to `accelerate launch` (which passes it on): both ranks stop
    after the same step and exit 143 on their own, nothing holding the process group at
    exit (tests/dist_exit_probe.py runs train_hf's command line and records that), one
    complete checkpoint written by both ranks, the marker; accelerate launch itself exits 1.
    The same command again (resume_from_checkpoint "auto") resumes it to the end."""
    from hf_sparse.training.callbacks.checkpoints import last_complete_checkpoint
    from hf_sparse.training.callbacks.preemption import read_preemption_marker
    from tests.test_distributed import PROBE, _assert_nothing_holds_a_group, _records

    ddp = ["--config_file", _accelerate_yaml("ddp.yaml"), "--num_processes", "2"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *ddp, "--main_process_port", "0", PROBE,
               str(tmp_path), QUICKSTART, *_quickstart_overrides(tmp_path, max_steps=40),
               "--resume_from_checkpoint", "auto"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with processes.Launched(command, env=env) as first:
        first.wait_for(lambda text: text.count("'loss'") >= 3, 180, "3 log rows")
        os.kill(first.pid, signal.SIGTERM)
        first.wait_tree(60, "ranks after SIGTERM")
        assert first.wait(30) == 1, first.output[-4000:]
    assert first.output.count("world_size=2") == 2  # both ranks, one job
    assert "ONE process" not in first.output
    records = _records(tmp_path)
    assert [records[r]["exit_code"] for r in ("0", "1")] == [143, 143], records
    _assert_nothing_holds_a_group(records)
    run = tmp_path / "run"
    checkpoint = last_complete_checkpoint(str(run))
    assert read_preemption_marker(str(run))["checkpoint"] == checkpoint
    step = int(checkpoint.rsplit("-", 1)[1])
    # One RNG state per rank: the checkpoint really comes from a two-process run.
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(os.listdir(checkpoint))
    rows = [row for row in json.loads(open(os.path.join(checkpoint, "trainer_state.json")).read())["log_history"]
            if "loss" in row]  # fmt: skip
    assert [row["step"] for row in rows] == list(range(1, step + 1))
    _assert_telemetry(rows)

    second = processes.run(command, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resume_from_checkpoint=auto: resuming from {checkpoint}" in second.stderr
    state, resumed = _train_rows(run)
    assert state["global_step"] == 40
    assert [row["step"] for row in resumed] == list(range(1, 41))
    assert resumed[:step] == rows  # the history before the checkpoint is carried over unchanged
    _assert_telemetry(resumed[step:])
    assert (run / "model.safetensors").exists() and read_preemption_marker(str(run)) is None


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_accelerate_deepspeed_two_cpu_processes(tmp_path, zero_stage):
    """deepspeed_zero2.yaml (and ZeRO-3 through --zero_stage 3) on CPU: precision (fp32 here)
    and batch values come from the run JSON (the yaml's 'no'/`auto`); world size 2,
    activation telemetry, a checkpoint and a final model.safetensors.
    (The first DeepSpeed run on a machine JIT-compiles its CPU shared-memory comm op, ~2 min.)"""
    deepspeed = ["--config_file", _accelerate_yaml("deepspeed_zero2.yaml"), "--num_processes", "2"]
    if zero_stage == 3:
        deepspeed += ["--zero_stage", "3"]
    proc = _launch(deepspeed, _quickstart_overrides(tmp_path, max_steps=2), timeout=600, probe_dir=tmp_path)
    assert proc.stderr.count("world_size=2") == 2
    # DeepSpeed's engine (kept alive by its gradient hooks) and its own group references are
    # released too: nothing holds a process group into interpreter teardown. Not under
    # ZeRO-3: deepspeed 0.19.8 leaves its partitioning state on the model after the engine's
    # destroy() (zero.Init closures on every parameter, hook classes on every module, the top
    # module on a module-level stack), and with it the engine and these groups (README).
    from tests.test_distributed import _assert_nothing_holds_a_group, _records

    records = _records(tmp_path)
    assert [records[r]["exit_code"] for r in ("0", "1")] == [0, 0]
    if zero_stage == 2:
        _assert_nothing_holds_a_group(records)
    for record in records.values():  # what train_hf itself controls, under every stage
        assert record["holders"]["registry"] == [] and record["holders"]["function_defaults"] == []
        assert "Trainer" not in record["holders"]["run_objects"]
    _, rows = _train_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [1, 2]
    _assert_telemetry(rows)
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def test_fsdp2_fully_shard_telemetry_and_gradients(tmp_path):
    """fsdp2.yaml's sharding on CPU (`fully_shard` per decoder layer + root, gloo): weight
    sparsity per original matrix from the DTensor shards, pooled activation/2:4 counts and
    every gradient equal the unwrapped model's, dense and low-rank."""
    out = tmp_path / "result.json"
    proc = processes.run(
        [
            *processes.TORCHRUN,
            os.path.join(REPO_ROOT, "tests", "fsdp2_worker.py"),
            str(out),
        ],
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    for variant, matrices in (("full", 6), ("low_rank", 12)):
        result = results[variant]
        assert result["all_dtensors"] and result["sharded"], variant
        expected, got = result["expected"], result["got"]
        assert set(got) == set(expected)
        assert any(key.startswith("sparsity_24/") for key in got)
        weight_keys = [key for key in got if key.startswith("weight_sparsity/")]
        assert len(weight_keys) == 2 * matrices
        assert all(0.2 < got[key] < 0.4 for key in weight_keys)  # ~30% zeros planted in each matrix
        assert got == pytest.approx(expected, abs=1e-12), variant
        assert max(result["grad_errors"].values()) < 1e-5, (variant, result["grad_errors"])


# ------------------------------------------------------------------ up-front launch checks


def _launched_env(monkeypatch, tmp_path, launch_args):
    """Put into os.environ what `accelerate launch <launch_args> train_hf.py` gives the script
    (built by accelerate's own launcher code; no process is started)."""
    from accelerate.commands import launch as accelerate_launch
    from accelerate.utils import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    # A user's default accelerate config must not leak into a launch without --config_file,
    # nor an earlier launch's (or an outer torchrun's) variables into this one.
    monkeypatch.setattr(accelerate_launch, "default_config_file", str(tmp_path / "no_default_config.yaml"))
    for name in [*os.environ]:
        if name.startswith(("ACCELERATE_", "FSDP_", "MASTER_")) or name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.delenv(name)
    args = accelerate_launch.launch_command_parser().parse_args([*launch_args, "train_hf.py", "run.json"])
    args, _, _ = accelerate_launch._validate_launch_command(args)
    if args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
        # torchrun adds these per rank.
        env.update(WORLD_SIZE=str(args.num_processes), RANK="0", LOCAL_RANK="0")
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    for name, value in env.items():
        if name.startswith(("ACCELERATE_", "FSDP_", "MASTER_")) or name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            monkeypatch.setenv(name, value)
    return env


def _run_json(tmp_path, **overrides):
    path = tmp_path / "run.json"
    config = {"model_config": TINY_MODEL, "max_length": 32, "output_dir": str(tmp_path / "out"), "report_to": []}
    path.write_text(json.dumps({**config, **overrides}))
    return str(path)


def test_single_process_accelerate_launch_warns(monkeypatch, tmp_path, caplog):
    """`accelerate launch --num_processes 2` without a config file on a machine without
    several GPUs runs ONE process: train_hf.py says so and how to get two."""
    from hf_sparse.training.config.launch_checks import check_launch_environment
    from hf_sparse.training.config.run_config import parse_run_config

    _launched_env(monkeypatch, tmp_path, ["--num_processes", "2"])
    with caplog.at_level(logging.WARNING, logger="hf_sparse.training.config.launch_checks"):
        run = parse_run_config([_run_json(tmp_path)])
    assert run.training_args.world_size == 1
    warning = " ".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    assert "accelerate launch started ONE process (world_size 1)" in warning
    assert "--config_file configs/accelerate/ddp.yaml --num_processes 2" in warning
    assert "torchrun --nproc_per_node 2 train_hf.py" in warning

    # --cpu runs one process whatever the machine has (DESIGN §4): the same warning.
    caplog.clear()
    env = _launched_env(monkeypatch, tmp_path, ["--cpu", "--num_processes", "2"])
    with caplog.at_level(logging.WARNING, logger="hf_sparse.training.config.launch_checks"):
        check_launch_environment({}, env)
    assert "ONE process" in caplog.text and "--cpu" in caplog.text

    # One process asked for, or a real multi-process launch: no warning.
    for launch_args in (
        ["--num_processes", "1"],
        ["--config_file", _accelerate_yaml("ddp.yaml"), "--num_processes", "2"],
    ):
        caplog.clear()
        env = _launched_env(monkeypatch, tmp_path, launch_args)
        with caplog.at_level(logging.WARNING, logger="hf_sparse.training.config.launch_checks"):
            check_launch_environment({}, env)
        assert "ONE process" not in caplog.text, launch_args


@pytest.mark.parametrize("yaml_name, version", [("fsdp.yaml", "1"), ("fsdp2.yaml", "2")])
def test_fsdp_yaml_without_gpu_fails_up_front_in_one_line(monkeypatch, tmp_path, yaml_name, version):
    """The FSDP configs need GPUs: one `train_hf.py: error:` line before data and model are
    built, instead of accelerate's error in every rank (FSDP1) or a silent fall-back to
    plain DDP on CPU (FSDP2)."""
    import hf_sparse.training.config.launch_checks as launch_checks
    import hf_sparse.training.config.run_args as run_args
    import hf_sparse.training.config.run_config as run_config

    env = _launched_env(monkeypatch, tmp_path, ["--config_file", _accelerate_yaml(yaml_name), "--num_processes", "2"])
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == version
    monkeypatch.setattr(launch_checks, "accelerator_available", lambda: False)  # also on a GPU machine
    with pytest.raises(run_args.LaunchError) as err:
        run_config.parse_run_config([_run_json(tmp_path)])
    message = str(err.value)
    assert "\n" not in message
    assert f"FSDP (distributed_type: FSDP, fsdp_version {version}), which needs GPUs" in message
    assert "configs/accelerate/ddp.yaml" in message and "torchrun --nproc_per_node 2" in message


def test_accelerate_mixed_precision_must_match_the_run_json(monkeypatch, tmp_path):
    """The run JSON decides precision: an accelerate bf16 (config or --mixed_precision) it does
    not ask for is refused up front (DeepSpeed would stop every rank on it; DDP would
    silently autocast); the shipped yamls leave precision to the run JSON."""
    import hf_sparse.training.config.launch_checks as launch_checks
    import hf_sparse.training.config.run_args as run_args
    import hf_sparse.training.config.run_config as run_config

    ddp = ["--config_file", _accelerate_yaml("ddp.yaml"), "--num_processes", "2"]
    env = _launched_env(monkeypatch, tmp_path, [*ddp, "--mixed_precision", "bf16"])
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with pytest.raises(run_args.LaunchError, match=r"mixed_precision is 'bf16' .* bf16=False; .*\"bf16\": true"):
        run_config.parse_run_config([_run_json(tmp_path)])
    launch_checks.check_launch_environment({"bf16": True}, env)  # asked for by the run JSON: fine
    with pytest.raises(run_args.LaunchError, match="fp16=False"):
        launch_checks.check_launch_environment({"bf16": True}, dict(env, ACCELERATE_MIXED_PRECISION="fp16"))


def test_shipped_accelerate_yamls():
    """What the yamls promise: precision from the run JSON, one FSDP unit per decoder layer,
    a final model the Trainer can write, DeepSpeed batch values filled from the run JSON."""
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {
        name: load_config_from_file(_accelerate_yaml(name))
        for name in ("ddp.yaml", "fsdp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml")
    }
    assert {name: config.mixed_precision for name, config in configs.items()} == dict.fromkeys(configs, "no")
    for name, version in (("fsdp.yaml", 1), ("fsdp2.yaml", 2)):
        fsdp = configs[name].fsdp_config
        assert fsdp["fsdp_version"] == version
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "SparseLlamaDecoderLayer"
        # Trainer.save_model writes nothing under SHARDED_STATE_DICT.
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    deepspeed = configs["deepspeed_zero2.yaml"].deepspeed_config
    assert deepspeed["zero_stage"] == 2
    assert deepspeed["gradient_accumulation_steps"] == "auto" and deepspeed["gradient_clipping"] == "auto"
