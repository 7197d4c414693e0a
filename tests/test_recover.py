"""MLflow unreachable while a trial logs: nothing is lost, `python -m tune.recover` replays it.

The unreachable server is real (an HTTP URI on a port nobody listens on); the replay goes to a
real sqlite store, and the replayed run is compared with what was logged.
"""

from __future__ import annotations

import json
import socket

import pytest

mlflow = pytest.importorskip("mlflow")

from tune.recover import count_pending, replay  # noqa: E402
from tune.recover import main as recover_main  # noqa: E402
from tune.tracking import PENDING_DIR, RunLogger  # noqa: E402


def _dead_uri() -> str:
    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def fast_failures(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(RunLogger, "attempts", 1)


def test_unreachable_server_spools_every_call_and_replay_restores_the_run(tmp_path, fast_failures):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = mlflow.MlflowClient(tracking_uri=store).create_experiment("exp")
    trial_dir = tmp_path / "trial"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "metrics.json").write_text('{"auroc": 0.9}')

    run = RunLogger.start(_dead_uri(), experiment_id, "trial-a", {"vpdm.trial_id": "a"}, spool_dir=trial_dir)
    assert run.pending and run.enabled  # the run could not be created: a pending id stands in
    run.log_params({"lr": 0.001, "k": 16})
    for epoch in (1, 2, 3):
        run.log_metrics({"loss": 1.0 / epoch, "note": "strings are dropped"}, step=epoch)
    run.set_tags({"vpdm.status": "completed"})
    run.log_artifacts(artifacts)
    (artifacts / "metrics.json").unlink()  # the trial's temporary folder is gone; the spool has a copy
    run.finish("FINISHED")
    assert run.failures == 8  # create, params, 3 x metrics, tags, artifacts, finish
    assert count_pending(tmp_path) == 8
    assert len(list((trial_dir / PENDING_DIR).glob("*.jsonl"))) == 1

    report = replay(tmp_path, tracking_uri=store)
    assert report.errors == []
    assert report.done == {"create_run": 1, "params": 1, "metrics": 3, "tags": 1, "artifacts": 1, "finish": 1}
    (real_id,) = report.created_runs.values()
    client = mlflow.MlflowClient(tracking_uri=store)
    got = client.get_run(real_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "trial-a"
    assert got.data.params == {"lr": "0.001", "k": "16"}
    assert got.data.tags["vpdm.trial_id"] == "a" and got.data.tags["vpdm.status"] == "completed"
    history = client.get_metric_history(real_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    local = client.download_artifacts(real_id, "metrics.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == {"auroc": 0.9}
    # replayed files are kept, renamed; a second replay logs nothing twice
    assert count_pending(tmp_path) == 0
    assert len(list((trial_dir / PENDING_DIR).glob("*.jsonl.replayed"))) == 1
    assert replay(tmp_path, tracking_uri=store).done == {}
    assert len(client.search_runs([experiment_id])) == 1


def test_a_run_that_loses_its_server_midway_keeps_the_rest(tmp_path, fast_failures):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment_id = client.create_experiment("exp")
    run = RunLogger.start(store, experiment_id, "trial-b", {}, spool_dir=tmp_path / "trial")
    run.log_metrics({"loss": 1.0}, step=1)
    run.tracking_uri, run._client = _dead_uri(), None  # the server goes away
    run.log_metrics({"loss": 0.5}, step=2)
    run.finish("FINISHED")
    assert run.failures == 2 and not run.pending
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1]

    assert recover_main([str(tmp_path), "--tracking-uri", store]) == 0
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "loss")) == [1, 2]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_resume_or_start_reuses_the_run_of_the_same_trial(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment_id = client.create_experiment("exp")
    tags = {"vpdm.sweep": "s", "vpdm.trial_id": "t1"}
    first = RunLogger.resume_or_start(store, experiment_id, "t1", tags, match=tags)
    first.finish("KILLED")
    again = RunLogger.resume_or_start(store, experiment_id, "t1", tags, match=tags)
    assert again.run_id == first.run_id
    assert client.get_run(again.run_id).info.status == "RUNNING"
    other = RunLogger.resume_or_start(
        store, experiment_id, "t2", {**tags, "vpdm.trial_id": "t2"}, match={**tags, "vpdm.trial_id": "t2"}
    )
    assert other.run_id != first.run_id
    assert len(client.search_runs([experiment_id])) == 2


def test_recover_refuses_a_missing_folder(tmp_path, capsys):
    assert recover_main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_rejected_call_does_not_take_the_logger_offline(tmp_path, fast_failures):
    """A refused value (here: changing a logged param) fails that call only; a local store is never
    treated as unreachable. Metric names MLflow would refuse (class 'grid#2') are made valid."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    run = RunLogger.start(store, client.create_experiment("exp"), "r", {}, spool_dir=tmp_path / "trial")
    run.log_params({"lr": 0.1})
    run.log_params({"lr": 0.2})  # MLflow refuses to change a param
    assert run.failures == 1
    run.log_metrics({"test/demo/grid#2/image_auroc": 0.5}, step=1)
    run.log_artifacts(tmp_path / "trial" / "mlflow-pending")
    assert run.failures == 1  # the calls after the refused one went through
    got = client.get_run(run.run_id).data.metrics
    assert got == {"test/demo/grid_2/image_auroc": 0.5}
    assert client.list_artifacts(run.run_id)


def test_a_resumed_run_logs_only_new_params_and_tags_the_changed_ones(tmp_path):
    """MLflow refuses to change a logged param: a trial or sweep reopened by --resume must not fail (nor be
    reported as an unreachable server) over the params its first attempt logged."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment_id = client.create_experiment("exp")
    tags = {"vpdm.sweep": "s1", "vpdm.trial_id": "t1"}
    first = RunLogger.start(store, experiment_id, "trial-t1", tags, spool_dir=tmp_path / "trial")
    first.log_params({"lr": 0.001, "workers": 2, "forwards": 40})
    first.finish("FAILED")

    again = RunLogger.resume_or_start(store, experiment_id, "trial-t1", tags, match=tags, spool_dir=tmp_path / "trial")
    assert again.run_id == first.run_id and again.resumed
    again.log_params({"lr": 0.001, "workers": 2, "forwards": 0, "epochs": 5})
    assert again.failures == 0 and count_pending(tmp_path) == 0
    run = client.get_run(first.run_id)
    assert run.data.params == {"lr": "0.001", "workers": "2", "forwards": "40", "epochs": "5"}
    assert run.data.tags["vpdm.resumed.changed_params"] == "forwards: 40 -> 0"
    # a fresh run logs every param as before
    other = RunLogger.start(store, experiment_id, "trial-t2", {"vpdm.trial_id": "t2"})
    other.log_params({"lr": 0.01})
    assert other.failures == 0 and client.get_run(other.run_id).data.params == {"lr": "0.01"}
