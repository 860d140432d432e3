"""Issue 13: every user mistake gets a one-line answer naming config fields and the fix."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event

from configs import debug
from experiments.cli import run_or_exit
from jaxfl.privacy import accounting
from jaxfl.sweep import apply_overrides, run_sweep
from jaxfl.train import train_and_evaluate, warn_if_noise_dominated
from jaxfl.validate import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"rounds": 1, "num_clients": 4, "data.n_train": 240, "data.n_test": 100}
INTERNALS = ("min_size", "SecAggConfig", "CKKSParams", "medmnist_url", "is_3d", "Traceback")


def _config(**overrides):
    return apply_overrides(debug.get_config(), {**SMALL, **overrides})


def _launch(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.run", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def _error_line(stderr: str) -> str:
    """The launcher's error, after checking it is the only non-log line of stderr."""
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def _user_error(capsys, config, workdir) -> str:
    """What ``experiments.run`` prints for ``train_and_evaluate(config, workdir)``."""
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(train_and_evaluate, config, workdir)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error") and len(err.splitlines()) == 1, err
    assert not any(word in err for word in INTERNALS), err
    return err


# --------------------------------------------------------------------------- 13.1, 13.2, 13.10


def test_a_misspelled_field_in_a_config_file_is_refused(tmp_path):
    config_file = tmp_path / "typo.py"
    config_file.write_text(
        "from configs import debug\n\n\ndef get_config():\n    c = debug.get_config()\n"
        "    c.local.learnig_rate = 0.1\n    return c\n"
    )
    proc = _launch(f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2
    err = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith(("I", "W")))
    assert "config.local.learnig_rate is not a known field" in err
    assert "did you mean config.local.learning_rate?" in err and str(config_file) in err
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "config.json").exists()


def test_a_misspelled_sweep_config_fails_before_any_run(tmp_path):
    config = _config()
    config.num_clinets = 4
    calls = []
    with pytest.raises(ConfigError, match="did you mean config.num_clients"):
        run_sweep(config, ["rounds=1,2"], tmp_path, train_fn=lambda c, w: calls.append(w))
    assert calls == []


def test_a_misspelled_override_is_one_line(tmp_path):
    proc = _launch("--config=configs/debug.py", "--config.num_clinets=4", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert "'num_clinets'" in line and "'num_clients'" in line


def test_a_missing_config_file_is_one_line(tmp_path):
    proc = _launch("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert "cannot load --config=configs/nope.py" in _error_line(proc.stderr)


def test_debug_shows_the_traceback(tmp_path):
    proc = _launch("--config=configs/nope.py", f"--workdir={tmp_path}", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_lists_the_shipped_configs_and_print_config_prints_every_field():
    proc = _launch("--help")
    for name in ("debug", "bloodmnist_fedavg", "perfedavg_hetero"):
        assert f"  {name} " in proc.stdout + proc.stderr
    proc = _launch("--config=configs/debug.py", "--print_config", "--config.num_clients=3")
    assert proc.returncode == 0 and "num_clients: 3" in proc.stdout
    assert "secure_randomness: false" in proc.stdout


# --------------------------------------------------------------------------- 13.3, 13.6, 13.7


def _write_npz(path: Path, **arrays) -> None:
    with path.open("wb") as f:
        np.savez(f, **arrays)


def _splits(images_shape=(6, 28, 28), dtype=np.uint8, keys=("train", "val", "test")):
    out = {}
    for split in keys:
        out[f"{split}_images"] = np.zeros(images_shape, dtype)
        out[f"{split}_labels"] = np.zeros((images_shape[0], 1), np.int64)
    return out


@pytest.mark.parametrize(
    ("writer", "expected"),
    [
        (lambda p: p.write_bytes(b""), "could not read"),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "could not read"),
        (lambda p: _write_npz(p, **_splits(keys=("train", "val"))), "lacks keys"),
        (lambda p: _write_npz(p, **_splits(images_shape=(6, 28))), "2D images must be"),
        (lambda p: _write_npz(p, **_splits(dtype=np.float32)), "must be uint8"),
    ],
)
def test_a_bad_data_file_is_one_line(tmp_path, capsys, writer, expected):
    writer(tmp_path / "pneumoniamnist.npz")
    config = _config(**{"data.source": "medmnist", "data.name": "pneumoniamnist"})
    config.data.data_dir = str(tmp_path)
    err = _user_error(capsys, config, tmp_path / "run")
    assert expected in err and "pneumoniamnist.npz" in err and "zenodo" in err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dp.mode": "record", "dp.target_epsilon": 1e-4}, "config.dp.target_epsilon=0.0001"),
        ({"dp.mode": "record", "dp.delta": 0.05}, "config.dp.delta=0.05 >= 1/n"),
        ({"dp.mode": "local_update", "dp.delta": 0.5}, "config.dp.delta=0.5 >= 1/n"),
        ({"dp.mode": "user_level", "clients_per_round": 2}, "client_sampling='poisson'"),
        ({"partition.alpha": 1e-3, "num_clients": 40}, "config.partition.alpha"),
    ],
)
def test_privacy_and_partition_mistakes_are_one_line(tmp_path, capsys, overrides, expected):
    assert expected in _user_error(capsys, _config(**overrides), tmp_path / "run")


def test_record_level_delta_is_checked_against_every_client():
    from jaxfl.privacy.plan import plan_privacy

    config = _config(**{"dp.mode": "record", "dp.delta": 0.01})
    # 1/50 > 0.01, but the clients with 200 examples have 1/n = 0.005 <= delta.
    with pytest.raises(ConfigError, match="largest client's 200"):
        plan_privacy(config, np.array([50, 200, 200]), 3)


def test_workdir_mistakes_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert "is a file" in _user_error(capsys, _config(), afile)
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write" in _user_error(capsys, _config(), locked / "run")


def test_an_empty_workdir_is_refused_and_writes_nothing(tmp_path):
    proc = _launch(f"--config={ROOT / 'configs' / 'debug.py'}", "--workdir=", cwd=tmp_path)
    assert proc.returncode == 2 and "the workdir is empty" in _error_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_dataset_name_lists_the_valid_ones():
    config = _config(**{"data.source": "medmnist", "data.name": "foomnist"})
    with pytest.raises(ConfigError, match="'foomnist' is not a MedMNIST dataset.*bloodmnist"):
        validate_config(config)


# --------------------------------------------------------------------------- 13.4


@pytest.mark.parametrize(
    ("secagg", "expected"),
    [
        ({"threshold": 20.0}, "threshold t=20 must satisfy"),
        ({"threshold": 1.5}, "a share count must be a whole number"),
        ({"neighbours": 3, "threshold": 0.66}, "config.secure.secagg.neighbours=3 must be even"),
    ],
)
def test_secure_aggregation_is_validated_before_training(secagg, expected):
    config = _config(**{"num_clients": 8, "secure.aggregator": "secagg"})
    for key, value in secagg.items():
        config.secure.secagg[key] = value
    with pytest.raises(ConfigError, match=expected) as info:
        validate_config(config)
    assert not any(word in str(info.value) for word in INTERNALS)


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_a_fix(tmp_path):
    bad = _config(**{"dp.mode": "local_update", "dp.target_epsilon": 1e-4})  # unreachable
    with pytest.raises(ConfigError):
        train_and_evaluate(bad, tmp_path)
    assert (tmp_path / "config.json").exists()
    fixed = _config(**{"dp.mode": "local_update", "dp.target_epsilon": 8.0})
    assert train_and_evaluate(fixed, tmp_path)["round"] == 1


# --------------------------------------------------------------------------- 13.8, 13.9


def test_accountant_convergence_warnings_are_counted_not_logged(caplog):
    accounting.take_convergence_warnings()
    event = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0))
    with caplog.at_level(logging.WARNING):
        accounting.epsilon(event, 1e-5)
    assert "failed to converge" not in caplog.text
    assert accounting.take_convergence_warnings() > 0
    assert accounting.take_convergence_warnings() == 0


def test_a_noise_dominated_plan_is_announced(caplog):
    from jaxfl.privacy.plan import plan_privacy

    config = _config(**{"dp.mode": "local_update", "dp.target_epsilon": 6.0})
    plan = plan_privacy(config, np.array([60] * 4), 4)
    params = {"w": np.zeros((1000, 100))}
    with caplog.at_level(logging.INFO):
        ratio = warn_if_noise_dominated(plan, config, np.array([60] * 4), params)
    assert ratio > 1 and "barely learn" in caplog.text and "config.num_clients" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ratio = warn_if_noise_dominated(plan, config, np.array([60] * 4), {"w": np.zeros(1)})
    assert ratio < 1 and "barely learn" not in caplog.text  # negative control


# --------------------------------------------------------------------------- 13.11, 13.12


def test_plain_log_lines_carry_an_eta_and_a_finished_run_says_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        train_and_evaluate(_config(rounds=2), tmp_path)
    assert "round 1/2" in caplog.text and "ETA" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_and_evaluate(_config(rounds=2), tmp_path)
    assert "already holds all 2 rounds" in caplog.text and "rounds 3..2" not in caplog.text
