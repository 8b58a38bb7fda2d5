"""Weight 2:4 inside the Trainer and `train_hf.py`: the start-step / dense-tail schedule
(bit-for-bit dense outside the sparse phase), resume, the S-STE scale in checkpoints,
the original research flags as run-JSON aliases, and the bad-input rows of the README."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

import hf_sparse.training.callbacks.core
from hf_sparse import SparseLlamaForCausalLM, SparsityCallback, set_training_step
from hf_sparse.training.config.run_config import parse_run_config
from hf_sparse.model.weight_sparse import is_weight_sparse, sparse_weight_2to4, weight_2to4_scale
from tests.conftest import REPO_ROOT, assert_one_line_error, run_train_hf_script, tiny_config, tiny_training_args
from tests.test_telemetry import RandomTokens
from tests.test_train_hf import _write_config

TINY_MODEL = os.path.join(REPO_ROOT, "configs", "llama_tiny.json")

# 8 optimizer steps, 2:4 from step 2, the last 2 dense: steps 0-1 dense, 2-5 sparse, 6-7 dense
# (step = optimizer steps completed when the forward runs, as Trainer.state.global_step).
SCHEDULE = dict(weight_2by4=True, weight_2by4_start_step=2, sparse_dense_finetune_steps=2)
MAX_STEPS = 8
EXPECTED_ON = [False, False, True, True, True, True, False, False]


def _weight_on(model) -> bool:
    flags = {m.sparse_weight_on for m in model.modules() if is_weight_sparse(m)}
    assert len(flags) == 1, "every 2:4-weight linear follows the same schedule"
    return flags.pop()


# --- the schedule under a real Trainer -------------------------------------------------------


def _weights_this_step(model) -> dict:
    """The model's state as a plain dense model: every 2:4-weight linear's `weight` is the
    one its forward must use now, computed afresh from the dense master (the master
    itself while dense; scale·S(master) while sparse, with the scale the first sparse
    forward fixes if it is not fixed yet)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "2by4_scale" not in k}
    for name, module in model.named_modules():
        if is_weight_sparse(module) and module.sparse_weight_on:
            sparse = sparse_weight_2to4(module.weight.detach(), module.weight_sparse_method)[0]
            scale = module.weight_2by4_scale
            if scale == 0:
                scale = weight_2to4_scale(module.weight, sparse, module.weight_sparse_method)
            state[f"{name}.weight"] = sparse * scale
    return state


class _LockstepTrainer(Trainer):
    """Runs every training batch through a dense twin (weight_2by4=False) that holds the
    weights the schedule says this step's forward must use, and records whether loss,
    logits and gradients are equal.

    The twin sees the very batch, loss normalisation and step the Trainer uses, so a
    difference can only come from the forward the model actually ran."""

    def __init__(self, *args, twin, **kwargs):
        super().__init__(*args, **kwargs)
        self.twin = twin
        self.records = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self.twin.load_state_dict(_weights_this_step(model))
        set_training_step(self.twin, step, self.state.max_steps)
        self.twin.train().zero_grad(set_to_none=True)
        logits = {}
        hooks = [
            m.lm_head.register_forward_hook(lambda mod, inp, out, key=key: logits.__setitem__(key, out.detach()))
            for key, m in (("twin", self.twin), ("model", model))
        ]
        try:
            twin_loss = super().compute_loss(self.twin, dict(inputs), num_items_in_batch=num_items_in_batch)
            twin_loss.backward()
            # gradient_accumulation_steps=1: the grads after this call are this batch's only.
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            for hook in hooks:
                hook.remove()
        twin_params = dict(self.twin.named_parameters())
        self.records[step] = dict(
            on=_weight_on(model),
            loss=torch.equal(loss, twin_loss.detach()),
            logits=torch.equal(logits["model"], logits["twin"]),
            grads={name: (p.grad.clone(), twin_params[name].grad.clone()) for name, p in model.named_parameters()},
            scales={n: m.weight_2by4_scale.clone() for n, m in model.named_modules() if is_weight_sparse(m)},
        )
        return loss


def test_dense_before_start_and_in_tail_bit_for_bit(tmp_path):
    """Steps outside [start, max_steps - tail) give the dense model's logits, loss and
    gradients exactly; steps inside give those of the dense model holding this step's
    2:4 weights, with the straight-through gradient (scale · dL/dW̃) on the masters."""
    model = SparseLlamaForCausalLM(tiny_config(weight_2by4_scope="all", **SCHEDULE))
    twin = SparseLlamaForCausalLM(tiny_config(weight_2by4=False))
    args = tiny_training_args(tmp_path, max_steps=MAX_STEPS, logging_steps=MAX_STEPS)
    trainer = _LockstepTrainer(
        model=model, args=args, train_dataset=RandomTokens(64), callbacks=[SparsityCallback()], twin=twin
    )
    trainer.train()

    assert [trainer.records[s]["on"] for s in range(MAX_STEPS)] == EXPECTED_ON
    for step, on in enumerate(EXPECTED_ON):
        record = trainer.records[step]
        assert record["loss"] and record["logits"], step
        for name, (grad, twin_grad) in record["grads"].items():
            module = name.rsplit(".", 1)[0]
            if on and module in record["scales"]:
                # A 2:4 master: the twin's gradient w.r.t. the 2:4 weight, times the scale.
                torch.testing.assert_close(grad, twin_grad * record["scales"][module], rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(grad, twin_grad), (step, name)


# --- resume: switch steps and the S-STE scale --------------------------------------------------


class _RecordSchedule(TrainerCallback):
    """Flag in force at each step (read after SparsityCallback set it) and layer 0's
    up_proj scale after each step."""

    def __init__(self):
        self.on, self.scale_after, self.losses = {}, {}, {}
        self.scale_at_begin = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.scale_at_begin = model.model.layers[0].mlp.up_proj.weight_2by4_scale.clone()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.on[state.global_step] = _weight_on(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.scale_after[state.global_step] = model.model.layers[0].mlp.up_proj.weight_2by4_scale.clone()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def _schedule_run(output_dir, resume=None):
    torch.manual_seed(0)
    model = SparseLlamaForCausalLM(tiny_config(**SCHEDULE))
    recorder = _RecordSchedule()
    # The full run leaves a checkpoint after every step, so a resume can start inside each
    # phase; resumed runs save nothing (they would overwrite the full run's checkpoints).
    save = dict(save_strategy="steps", save_steps=1) if resume is None else dict(save_strategy="no")
    args = tiny_training_args(output_dir, max_steps=MAX_STEPS, **save)
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64), callbacks=[SparsityCallback(), recorder])
    trainer.train(resume_from_checkpoint=resume)
    return recorder


def _checkpoint_scale_and_weight(folder):
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    prefix = "model.layers.0.mlp.up_proj."
    return tensors[prefix + "weight_2by4_scale"], tensors[prefix + "weight"]


def test_switch_steps_and_scale_survive_resume(tmp_path):
    run_dir = tmp_path / "run"
    full = _schedule_run(run_dir)
    assert [full.on[s] for s in range(MAX_STEPS)] == EXPECTED_ON

    # The scale is 0 (unset) until the first sparse step (step 2), then fixed from the
    # weights that step saw (checkpoint-2's) and never recomputed, through the dense tail.
    assert full.scale_after[1] == 0 and full.scale_after[2] == 0
    fixed = full.scale_after[3]
    weight_2 = _checkpoint_scale_and_weight(run_dir / "checkpoint-2")[1]
    assert torch.equal(fixed, weight_2to4_scale(weight_2, sparse_weight_2to4(weight_2, "s_ste")[0], "s_ste"))
    assert all(torch.equal(full.scale_after[s], fixed) for s in range(3, MAX_STEPS + 1))

    # Resume inside the sparse phase: the checkpoint carries the fixed scale, and the
    # resumed run uses it as saved; recomputing from the restored weights would differ.
    saved_scale, weight_3 = _checkpoint_scale_and_weight(run_dir / "checkpoint-3")
    assert torch.equal(saved_scale, fixed)
    recomputed = weight_2to4_scale(weight_3, sparse_weight_2to4(weight_3, "s_ste")[0], "s_ste")
    assert not torch.equal(recomputed, fixed)
    resumed = _schedule_run(run_dir, resume=str(run_dir / "checkpoint-3"))
    assert torch.equal(resumed.scale_at_begin, fixed)
    assert [resumed.on[s] for s in range(3, MAX_STEPS)] == EXPECTED_ON[3:]
    assert all(torch.equal(resumed.scale_after[s], fixed) for s in range(4, MAX_STEPS + 1))
    for step in range(4, MAX_STEPS + 1):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5)

    # Resume before the start step: the switch and the scale it fixes are the full run's.
    early = _schedule_run(run_dir, resume=str(run_dir / "checkpoint-1"))
    assert torch.equal(early.scale_at_begin, torch.zeros(()))
    assert [early.on[s] for s in range(1, MAX_STEPS)] == EXPECTED_ON[1:]
    torch.testing.assert_close(early.scale_after[3], fixed, rtol=1e-6, atol=0)


# --- end to end through train_hf.py ------------------------------------------------------------


def _write_run(tmp_path, **overrides):
    """test_train_hf's tiny run JSON, without evaluation steps or checkpoints."""
    return _write_config(tmp_path, **{"eval_strategy": "no", "save_strategy": "no", **overrides})


def test_train_hf_start_step_and_dense_tail_end_to_end(tmp_path, monkeypatch):
    """The run JSON's schedule reaches the model through train_hf.py's SparsityCallback;
    the finished model (run with a dense tail) loads dense, as it ended."""
    import train_hf

    seen = {}
    original = hf_sparse.training.callbacks.core.set_training_step

    def recording(model, step, max_steps=None):
        original(model, step, max_steps)
        seen[step] = (_weight_on(model), max_steps)

    monkeypatch.setattr(hf_sparse.training.callbacks.core, "set_training_step", recording)
    config = _write_run(
        tmp_path, max_steps=MAX_STEPS, logging_steps=1, flip_rate=True,
        enable_2to4_sparse=True, weight_2by4_start_step=2, sparse_dense_finetune_steps=2,
    )  # fmt: skip
    train_hf.main([config])

    assert [seen[s] for s in range(MAX_STEPS)] == [(on, MAX_STEPS) for on in EXPECTED_ON]
    with open(tmp_path / "run" / "trainer_state.json") as handle:
        rows = [row for row in json.load(handle)["log_history"] if "loss" in row]
    assert len(rows) == MAX_STEPS and all("flip_rate/mean" in row for row in rows)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert final.config.weight_2by4 and final.config.sparse_dense_finetune_steps == 2
    assert _weight_on(final) is False


# --- the run JSON: aliases, flip_rate, the shipped config ------------------------------------


def _parse(tmp_path, *cli, **overrides):
    return parse_run_config([_write_run(tmp_path, **overrides), *cli])


@pytest.mark.parametrize(
    "keys, weight_2by4, scope",
    [
        (dict(enable_2to4_sparse=True), True, "mlp"),
        (dict(enable_2to4_sparse=True, weight_2by4=True), True, "mlp"),  # agreeing: fine
        (dict(enable_2to4_sparse=True, attn_2by4=True), True, "all"),
        (dict(enable_2to4_sparse=True, mlp_2by4=False, attn_2by4=True), True, "attn"),
        (dict(weight_2by4=True, mlp_2by4=True, attn_2by4=False), True, "mlp"),
        (dict(weight_2by4=True, attn_2by4=True, weight_2by4_scope="all"), True, "all"),
        (dict(mlp_2by4=False, attn_2by4=False), False, "mlp"),  # no weight 2:4: nothing to target
    ],
)
def test_original_flags_are_aliases(tmp_path, keys, weight_2by4, scope):
    config = _parse(tmp_path, **keys).model_config
    assert (config.weight_2by4, config.weight_2by4_scope) == (weight_2by4, scope)


def test_aliases_and_new_keys_from_the_command_line(tmp_path):
    run = _parse(
        tmp_path, "--enable_2to4_sparse", "--attn_2by4", "true", "--flip_rate", "--weight_sparse_method", "ste",
        "--weight_grad_mvue", "true", "--weight_masked_decay", "0.0002", "--activation_2by4", "true",
        "--activation_dense_finetune", "true", "--sparse_dense_finetune_steps", "1", "--weight_2by4_start_step", "1",
    )  # fmt: skip
    config = run.model_config
    assert (config.weight_2by4, config.weight_2by4_scope, config.weight_sparse_method) == (True, "all", "ste")
    assert config.weight_grad_mvue and config.weight_masked_decay == 0.0002 and config.activation_dense_finetune
    assert (config.weight_2by4_start_step, config.sparse_dense_finetune_steps) == (1, 1)
    assert run.script_args.flip_rate is True
    assert _parse(tmp_path).script_args.flip_rate is False  # off by default


def test_quickstart_weight24_parses():
    run = parse_run_config(
        [os.path.join(REPO_ROOT, "configs", "quickstart_weight24.json"), "--output_dir", "/tmp/hf_sparse_q24_parse"]
    )
    config = run.model_config
    assert (config.weight_2by4, config.weight_2by4_scope, config.weight_sparse_method) == (True, "mlp", "s_ste")
    # The best row of `recipe_ablation.py --long` (benchmarks/README.md): masked decay 0.2, no dense tail.
    assert (config.weight_masked_decay, config.sparse_dense_finetune_steps) == (0.2, 0)
    assert run.script_args.flip_rate is True


# --- bad input: one line on stderr, before anything is built or written ----------------------


MODEL_FILES = {
    # A SwiGLU model whose down_proj reads 66 features: 66 does not split into groups of 4.
    "ODD": dict(squ_relu="silu", intermediate_size=66),
    # A model file that itself turns weight 2:4 on (the run JSON's flags then target nothing).
    "W24": dict(weight_2by4=True),
}


def _model_file(tmp_path, name):
    with open(TINY_MODEL) as handle:
        model = json.load(handle)
    model.update(MODEL_FILES[name])
    path = tmp_path / f"{name.lower()}_model.json"
    path.write_text(json.dumps(model))
    return str(path)


BAD_INPUTS = [
    (
        dict(weight_2by4=True, squ_relu="silu", model_config="ODD"),
        r"weight_2by4=True needs every targeted input width divisible by 4, but down_proj has input width 66",
    ),
    (
        dict(weight_2by4=True, loro_scope="mlp", loro_mlp_rank=6),
        r"weight_2by4=True needs every targeted input width divisible by 4, but mlp weight_out has input width 6",
    ),
    (
        dict(weight_2by4=True, weight_2by4_scope="ffn"),
        r"weight_2by4_scope='ffn' is not valid; choose one of 'mlp', 'attn', 'all'\.",
    ),
    (
        dict(weight_2by4=True, weight_sparse_method="sr_ste"),
        r"weight_sparse_method='sr_ste' is not valid; choose one of 's_ste', 'ste'\.",
    ),
    (
        dict(weight_2by4=True, sparse_dense_finetune_steps=10),
        r"sparse_dense_finetune_steps=10 is larger than max_steps=4; use sparse_dense_finetune_steps <= 4\.",
    ),
    (
        dict(weight_2by4=True, weight_2by4_start_step=2, sparse_dense_finetune_steps=2),
        r"weight_2by4_start_step=2 and sparse_dense_finetune_steps=2 leave no sparse step in max_steps=4",
    ),
    (
        dict(sparse_dense_finetune_steps=2, max_steps=-1, num_train_epochs=1),
        r"sparse_dense_finetune_steps=2 needs max_steps > 0",
    ),
    (dict(weight_2by4_start_step=-1), r"weight_2by4_start_step=-1 must be >= 0\."),
    (dict(sparse_dense_finetune_steps=-3), r"sparse_dense_finetune_steps=-3 must be >= 0\."),
    (dict(weight_masked_decay=-0.1), r"weight_masked_decay=-0.1 must be >= 0\."),
    (dict(enable_2to4_sparse="yes"), r"enable_2to4_sparse: expected bool, got 'yes' \(str\)\."),
    (
        dict(enable_2to4_sparse=True, weight_2by4=False),
        r"enable_2to4_sparse=True conflicts with weight_2by4=False .*give one of them\.",
    ),
    (
        dict(weight_2by4=True, attn_2by4=True, weight_2by4_scope="mlp"),
        r"mlp_2by4=True, attn_2by4=True \(scope 'all'\) conflicts with weight_2by4_scope='mlp'",
    ),
    (
        dict(enable_2to4_sparse=True, mlp_2by4=False),
        r"mlp_2by4=False and attn_2by4=False leave weight_2by4 with no matrix to sparsify",
    ),
    (
        dict(mlp_2by4=False, attn_2by4=False, model_config="W24"),
        r"mlp_2by4=False and attn_2by4=False leave weight_2by4 with no matrix to sparsify",
    ),
    (dict(flip_rate="on"), r"flip_rate: expected bool, got 'on' \(str\)\."),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_weight_2by4_input_is_one_line(tmp_path, monkeypatch, capsys, overrides, message):
    """Through the script's own `__main__` (in process: no interpreter start per row)."""
    if overrides.get("model_config") in MODEL_FILES:
        overrides = dict(overrides, model_config=_model_file(tmp_path, overrides["model_config"]))
    code = run_train_hf_script(monkeypatch, _write_run(tmp_path, **overrides))
    assert_one_line_error(code, capsys, message)
    assert not (tmp_path / "run").exists()
