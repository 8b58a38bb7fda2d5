"""N:M would-drop telemetry beside 2:4 (`sparsity_nm/4:8/...`, `sparsity_nm/8:16/...`): the count
against an independent reference (top-N of each M consecutive features, by sorting), on the
dense warm-up and inside the 2:4 op (plain and cuSPARSELt layouts, eager and compiled stages),
the nesting drop(8:16) <= drop(4:8) <= drop(2:4) per layer and window, the switch, the report."""

import json

import pytest
import torch
from transformers import Trainer

from hf_sparse import SparseLlamaForCausalLM, SparsityCallback, add_callbacks
from hf_sparse.model.select_2to4 import NM_PATTERNS, count_2to4_stats, nm_would_drop
from hf_sparse.model.sparse_ffn import relu2_2to4_ffn
from tests.conftest import tiny_config, tiny_training_args
from tests.cslt_emulator import emulated_cusparselt  # noqa: F401  (fixture)
from tests.test_telemetry import RandomTokens


def reference_would_drop(y: torch.Tensor, n: int, m: int) -> int:
    """Non-zeros outside the N largest of every M consecutive features (last dim), found by
    sorting each group; a last group shorter than M keeps its N largest too."""
    rows = y.reshape(-1, y.shape[-1])
    dropped = 0
    for start in range(0, rows.shape[1], m):
        group = rows[:, start : start + m]
        order = group.abs().argsort(dim=1, descending=True, stable=True)
        outside = torch.ones_like(group, dtype=torch.bool).scatter_(1, order[:, : min(n, group.shape[1])], False)
        dropped += int(((group != 0) & outside).sum())
    return dropped


def _sparse_activation(t: int, f: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """ReLU²-like values with many exact zeros, some ties, and whole-zero groups."""
    g = torch.Generator().manual_seed(seed)
    y = torch.relu(torch.randn(t, f, generator=g)).square()
    y[:, : min(8, f)] = y[:, :1]  # ties within a group
    y[0] = 0.0  # an all-zero row
    return y.to(dtype)


@pytest.mark.parametrize("f", [16, 32, 20, 36, 4, 48])
@pytest.mark.parametrize("compiled", [False, True])
def test_would_drop_matches_the_sorting_reference(f, compiled):
    y = _sparse_activation(6, f, seed=f)
    count = torch.compile(nm_would_drop, fullgraph=True) if compiled else nm_would_drop
    got = count(y.reshape(6, f // 4, 4).unbind(-1))
    assert got.dtype == torch.int64 and got.tolist() == [reference_would_drop(y, n, m) for n, m in NM_PATTERNS]


def test_planar_members_count_like_consecutive_ones():
    """The op's plain path stores member k of group j at column k·F/4 + j: same counts."""
    t, f = 5, 32
    y = _sparse_activation(t, f, seed=1)
    planar = y.view(t, f // 4, 4).permute(0, 2, 1).reshape(t, f)  # feature 4j+k -> column k·F/4+j
    assert (
        nm_would_drop(planar.view(t, 4, f // 4).unbind(1)).tolist()
        == nm_would_drop(y.view(t, f // 4, 4).unbind(-1)).tolist()
    )


def test_dense_warmup_counts_into_nm_stats():
    y = _sparse_activation(8, 32, seed=2, dtype=torch.float64)
    stats, nm = torch.zeros(3, dtype=torch.float64), torch.zeros(len(NM_PATTERNS), dtype=torch.float64)
    count_2to4_stats(y, stats, nm_stats=nm)
    assert nm.tolist() == [reference_would_drop(y, n, m) for n, m in NM_PATTERNS]
    assert stats[2] == reference_would_drop(y, 2, 4)


def _op_counts(x, w_up, w_down, method, gemms=None):
    stats = torch.zeros(3, dtype=torch.float64)
    nm = torch.zeros(len(NM_PATTERNS), dtype=torch.float64)
    relu2_2to4_ffn(x, w_up, w_down, method=method, stats=stats, nm_stats=nm, gemms=gemms)
    return stats, nm


@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold"])
@pytest.mark.parametrize("stages", ["eager", "compiled"])
def test_the_2to4_op_counts_what_n_m_would_drop(method, stages, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_COMPILE_STAGES", "1" if stages == "compiled" else "0")
    torch.manual_seed(0)
    x, w_up, w_down = torch.randn(16, 24), torch.randn(48, 24), torch.randn(24, 48)
    stats, nm = _op_counts(x, w_up, w_down, method)
    y2 = torch.relu(x @ w_up.t()).square()
    assert nm.tolist() == [reference_would_drop(y2, n, m) for n, m in NM_PATTERNS]
    assert stats[2] == reference_would_drop(y2, 2, 4)
    assert nm[1] <= nm[0] <= stats[2]


def test_the_cusparselt_layout_counts_the_same(emulated_cusparselt):  # noqa: F811
    torch.manual_seed(0)
    x, w_up, w_down = (torch.randn(32, 32, dtype=torch.bfloat16), torch.randn(64, 32, dtype=torch.bfloat16),
                       torch.randn(32, 64, dtype=torch.bfloat16))  # fmt: skip
    plain = _op_counts(x, w_up, w_down, "naive", gemms="plain")  # planar feature order
    kernel = _op_counts(x, w_up, w_down, "naive")  # the emulated cuSPARSELt back-end: consecutive groups
    assert [t.tolist() for t in plain] == [t.tolist() for t in kernel]
    y1 = torch.relu(x @ w_up.t()).float()  # zeros of y2 = zeros of relu(y1)
    assert kernel[1][0] > 0 and kernel[1].tolist() == [reference_would_drop(y1, n, m) for n, m in NM_PATTERNS]


def test_nm_stats_are_refused_without_stats_or_with_the_wrong_length():
    x, w_up, w_down = torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match="nm_stats"):
        relu2_2to4_ffn(x, w_up, w_down, nm_stats=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="nm_stats"):
        relu2_2to4_ffn(x, w_up, w_down, stats=torch.zeros(3, dtype=torch.float64),
                       nm_stats=torch.zeros(3, dtype=torch.float64))  # fmt: skip


def _train(tmp_path, nm_metrics=True, max_steps=4, **config_overrides):
    torch.manual_seed(0)
    values = dict(activation_2by4=True, activation_dense_warmup_steps=2)
    model = SparseLlamaForCausalLM(tiny_config(**{**values, **config_overrides}))
    trainer = Trainer(model=model, args=tiny_training_args(tmp_path / "run", max_steps=max_steps),
                      train_dataset=RandomTokens(64))  # fmt: skip
    add_callbacks(trainer, SparsityCallback(nm_metrics=nm_metrics))
    trainer.train()
    return trainer, model


def test_logged_in_the_loss_row_and_nested_per_layer_and_window(tmp_path):
    """Steps 1-2 dense (would drop), 3-4 2:4: every training row has both patterns for every
    layer, and what the more permissive pattern drops never exceeds the stricter one's."""
    trainer, _ = _train(tmp_path)
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == 4
    for row in rows:
        for i in range(2):
            d24, d48, d816 = (row[f"sparsity_24/layer_{i}"], row[f"sparsity_nm/4:8/layer_{i}"],
                              row[f"sparsity_nm/8:16/layer_{i}"])  # fmt: skip
            assert 0.0 <= d816 <= d48 <= d24 < 1.0, row
        means = [row[f"sparsity_nm/{n}:{m}/mean_across_layers"] for n, m in NM_PATTERNS]
        assert means == pytest.approx([sum(row[f"sparsity_nm/{n}:{m}/layer_{i}"] for i in range(2)) / 2
                                       for n, m in NM_PATTERNS])  # fmt: skip
        assert means[1] < means[0] < row["sparsity_24/mean_across_layers"]


def test_switched_off_nothing_is_counted_or_logged(tmp_path):
    trainer, model = _train(tmp_path, nm_metrics=False, max_steps=2)
    assert not any(k.startswith("sparsity_nm/") for row in trainer.state.log_history for k in row)
    assert not any(layer.mlp.count_nm_stats for layer in model.model.layers)
    assert any("sparsity_24/layer_0" in row for row in trainer.state.log_history)


def test_not_counted_without_activation_2by4(tmp_path):
    model = SparseLlamaForCausalLM(tiny_config())
    assert not any(layer.mlp.count_nm_stats for layer in model.model.layers)


def test_no_host_sync_off_logging_steps(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    from tests.conftest import callback_training_step, host_sync_calls

    for warmup in (100, 0):  # the dense path's count, then the 2:4 op's
        model = SparseLlamaForCausalLM(tiny_config(activation_2by4=True, activation_dense_warmup_steps=warmup)).train()
        callback = SparsityCallback()
        args, state, control = tiny_training_args(tmp_path), TrainerState(max_steps=4), TrainerControl()
        ids = torch.randint(0, 128, (2, 16))
        callback.on_train_begin(args, state, control, model=model)
        callback_training_step(callback, args, state, control, model, ids)
        assert host_sync_calls(monkeypatch, lambda: callback_training_step(callback, args, state, control, model,
                                                                           ids)) == []  # fmt: skip
        state.log_history.append({"loss": 1.0, "step": 0})
        logs = {"loss": 1.0}
        syncs = host_sync_calls(monkeypatch, lambda: callback.on_log(args, state, control, logs=logs, model=model))
        assert syncs == ["tolist"] and "sparsity_nm/8:16/layer_1" in logs


def test_the_report_plots_and_summarises_the_patterns(tmp_path):
    from hf_sparse import report

    trainer, _ = _train(tmp_path)
    run = tmp_path / "run"
    (run / "trainer_state.json").write_text(json.dumps({"log_history": trainer.state.log_history}))
    series = report.sparsity_series(trainer.state.log_history)
    assert list(series["drop_nm"]) == ["4:8", "8:16"] and len(series["drop_nm"]["8:16"]) == 4
    result = report.write_report(str(run))
    assert "4:8 would-drop rate: last" in result["summary"] and "8:16 would-drop rate: last" in result["summary"]


def test_the_run_key_and_the_metrics_are_documented(tmp_path, monkeypatch, capsys):
    import os

    from tests.conftest import REPO_ROOT, run_train_hf_script

    assert run_train_hf_script(monkeypatch, "--help") in (None, 0)
    assert "  nm_sparsity_metrics (bool, default true)" in capsys.readouterr().out
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert "`nm_sparsity_metrics`" in readme and "`sparsity_nm/4:8/layer_{i}`, `sparsity_nm/8:16/layer_{i}`" in readme


@pytest.mark.parametrize("enabled", [True, False])
def test_train_hf_passes_the_switch_to_the_callback(tmp_path, enabled):
    from hf_sparse.training.config.run_config import parse_run_config
    from hf_sparse.training.run import build_trainer
    from tests.test_train_hf import _write_config

    run = parse_run_config(
        [_write_config(tmp_path, squ_relu="relu2", activation_2by4=True, nm_sparsity_metrics=enabled)]
    )
    trainer, _ = build_trainer(run, None)
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SparsityCallback))
    assert callback.nm_metrics is enabled
