"""Sweeps end to end on real components: a local Ray, Ray Train workers, Ray Tune, MLflow on sqlite.

No mocks: one tiny sweep (2 trials x 2 Ray Train workers on the synthetic demo) feeds most
checks; a second test starts its own Ray head on loopback (non-default ports, a temp dir) and
submits ``jobs/sweep.py`` with ``ray job submit``, then stops that cluster and only that one.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from vpdm.data.demo import make_demo_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "vpdm-e2e"
# Waits are for events (a server answering, processes gone, resources back); the bound only stops a broken
# test, and is generous so that a machine loaded by other jobs is slow, not failing.
PATIENCE_S = 1800


def _wait_for(condition, what: str, *, timeout: float = PATIENCE_S, poll: float = 0.5, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if alive is not None and not alive():
            pytest.fail(f"gave up waiting for {what}: the process it depends on ended")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(poll)


@pytest.fixture(scope="module")
def sweep(tiny_demo, tmp_path_factory):
    """One real sweep: 2 trials x 2 Ray Train workers, 2 epochs, MLflow on a temporary sqlite file."""
    from tune.plan import SweepConfig
    from tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    saved = {
        k: os.environ.get(k)
        for k in ("VPDM_CACHE_DIR", "RAY_ADDRESS", "VPDM_FAULT_AFTER_EPOCH", "VPDM_FAULT_MARKER_DIR")
    }
    os.environ["VPDM_CACHE_DIR"] = str(root / "features")  # a fresh cache: the backbone must run once per image
    # Rank 0 of every trial dies once after epoch 1: Ray Train restarts the workers from that checkpoint.
    os.environ["VPDM_FAULT_AFTER_EPOCH"] = "1"
    os.environ["VPDM_FAULT_MARKER_DIR"] = str(root / "faults")
    os.environ.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="vr-")  # short: Ray's unix sockets live under it
    try:
        sc = SweepConfig(
            datasets=[f"demo:{tiny_demo}"],
            preset="tiny",
            trials=2,
            epochs=2,
            workers=2,
            threads_per_worker=1,
            max_concurrent=2,
            num_cpus=6,
            tracking_uri=f"sqlite:///{root}/mlflow.db",
            experiment="e2e-sweep",
            model_name=MODEL_NAME,
            storage=str(root / "runs"),
            ray_temp_dir=ray_tmp,
            verbose=0,
        )
        started = time.perf_counter()
        result = run_sweep(sc, progress=False)
        print(f"\nsweep took {time.perf_counter() - started:.1f}s\n{result.summary_text()}")
        yield result, root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _client(result):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=result.tracking_uri)


def test_sweep_runs_trials_and_picks_a_best_one(sweep):
    result, _ = sweep
    (d,) = result.datasets
    assert len(d.trials) == 2
    assert {t.status for t in d.trials} <= {"completed", "stopped"}
    assert d.best is not None and d.best.status == "completed"
    done = [t for t in d.trials if t.status == "completed"]
    best_value = max(t.metric for t in done)
    assert d.best.metric == best_value
    assert 0.0 <= d.best.test["image_auroc"] <= 1.0
    assert "mlflow ui --backend-store-uri sqlite:///" in result.summary_text()


def test_backbone_ran_once_per_image_for_the_whole_sweep(sweep):
    result, _ = sweep
    assert result.num_images == 2 * 8 + 2 * 6
    assert result.backbone_forwards == result.num_images  # fresh cache: exactly one forward per image
    assert result.trial_backbone_forwards == 0  # trials and Train workers only read features
    assert result.datasets[0].features.backbone_forwards == result.num_images


def test_mlflow_has_one_experiment_a_run_per_trial_with_metrics_and_artifacts(sweep):
    result, _ = sweep
    client = _client(result)
    exp = client.get_experiment_by_name("e2e-sweep")
    assert exp is not None and exp.experiment_id == result.experiment_id
    runs = client.search_runs([exp.experiment_id])
    trial_runs = [r for r in runs if r.data.tags.get("vpdm.role") != "sweep"]
    parents = [r for r in runs if r.data.tags.get("vpdm.role") == "sweep"]
    assert len(trial_runs) == 2 and len(parents) == 1
    assert {r.info.run_name for r in trial_runs} == {t.name for t in result.datasets[0].trials}
    for run in trial_runs:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["vpdm.sweep"] == result.sweep_id
        assert "search.train.lr" in run.data.params and "model.prototypes.num_prototypes" in run.data.params
        history = client.get_metric_history(run.info.run_id, "loss")
        status = next(t.status for t in result.datasets[0].trials if t.name == run.info.run_name)
        if status == "stopped":
            assert run.info.status == "KILLED" and [m.step for m in history] == [1]
            continue
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in history) == [1, 2]  # per-epoch metrics
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_pseudo_auroc")) == [1, 2]
        metrics = run.data.metrics
        for key in ("test/mean/image_auroc", "test/demo/grid/image_auroc", "test/demo/blobs/pixel_auroc"):
            assert 0.0 <= metrics[key] <= 1.0, key
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "metrics.json", "test_scores.csv", "plots"} <= top
        plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert "plots/roc.png" in plots
        overlays = client.list_artifacts(run.info.run_id, "plots/overlays")
        assert len(overlays) >= 4 and all(a.file_size > 1000 for a in overlays)
        assert run.data.tags["vpdm.model_uri"].startswith("models:/")


def test_checkpoints_every_epoch_through_ray_train(sweep):
    result, root = sweep
    train_dir = Path(result.storage_path) / "train"
    ckpts = sorted(train_dir.glob("*/checkpoint_*/model.pt"))
    assert ckpts, list(train_dir.rglob("*"))[:20]
    from vpdm.inference.checkpoint import read_checkpoint

    epochs = {read_checkpoint(p)["epoch"] for p in ckpts}
    assert epochs <= {1, 2} and 2 in epochs  # num_to_keep=2: both epochs of a completed trial


def test_a_crashed_worker_group_resumes_from_its_last_checkpoint(sweep):
    result, root = sweep
    client = _client(result)
    crashed = sorted(p.stem for p in (root / "faults").glob("*.crashed"))
    assert crashed, "the injected worker failure did not happen"
    for trial in result.datasets[0].trials:
        if trial.status != "completed":
            continue
        assert trial.name in crashed
        resumed = client.get_metric_history(trial.mlflow_run_id, "resumed_from_epoch")
        assert sorted((m.step, m.value) for m in resumed) == [(1, 0.0), (2, 1.0)]  # epoch 2 ran after a restart
        assert sorted(m.step for m in client.get_metric_history(trial.mlflow_run_id, "loss")) == [1, 2]


def test_champion_is_registered_with_alias_and_tags(sweep):
    result, _ = sweep
    d = result.datasets[0]
    assert d.registered_model == MODEL_NAME and d.registered_version == "1"
    version = _client(result).get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(version.version) == "1" and version.run_id == d.best.mlflow_run_id
    assert sorted(version.aliases) == ["challenger", "champion"]  # the first version of a name is champion
    assert version.tags["sweep"] == result.sweep_id and version.tags["dataset"] == d.name
    assert float(version.tags["metrics.val_pseudo_auroc"]) == pytest.approx(d.best.metric)
    assert "metrics.test_image_auroc" in version.tags
    assert version.tags["promotion.decision"] == "first version" and version.tags["promotion.sweep"] == result.sweep_id
    assert d.promotion is not None and d.promotion.promoted
    assert f"registry: {MODEL_NAME} v1 @champion: first version" in result.summary_text()


def test_the_driver_scores_a_registered_model_as_its_trial_did(sweep, tmp_path):
    """Promotion compares models with the trials' own metric: re-scored on the driver from the registry, on
    this sweep's validation data (rebuilt from the feature cache), the champion's metric is the value its
    trial reported from 2 Ray Train workers."""
    import mlflow

    from tune.features import build_bundle
    from tune.plan import SweepConfig
    from tune.registry import ValidationData, download_checkpoint, score_checkpoint
    from vpdm.config.values import to_dict
    from vpdm.features.backbone import FeatureExtractor
    from vpdm.inference.checkpoint import load_checkpoint

    result, _ = sweep
    d = result.datasets[0]
    mlflow.set_tracking_uri(result.tracking_uri)
    path = download_checkpoint(MODEL_NAME, "1", tmp_path)
    _, config, _ = load_checkpoint(path)
    defaults = SweepConfig()
    extractor = FeatureExtractor(config.backbone)
    bundle, _ = build_bundle(d.name, config, extractor, val_fraction=defaults.val_fraction, seed=defaults.seed)
    assert extractor.images_seen == 0  # the sweep's cached features
    validation = ValidationData(d.spec, to_dict(config.backbone), defaults.seed, defaults.val_fraction, lambda: bundle)
    assert score_checkpoint(path, validation, result.metric) == pytest.approx(d.best.metric, abs=1e-9)


def test_a_fresh_process_loads_the_champion_and_matches_the_trials_evaluation(sweep, tmp_path):
    result, _ = sweep
    client = _client(result)
    best = result.datasets[0].best
    scores_csv = client.download_artifacts(best.mlflow_run_id, "test_scores.csv", str(tmp_path))
    rows = list(csv.DictReader(open(scores_csv)))
    paths = [r["path"] for r in rows]
    code = (
        "import json, sys, mlflow\n"
        "from tune.mlflow_model import images_to_frame, load_detector_model\n"
        f"mlflow.set_tracking_uri({result.tracking_uri!r})\n"
        f"model = load_detector_model('models:/{MODEL_NAME}@champion')\n"
        "out = model.predict(images_to_frame(json.loads(sys.stdin.read())))\n"
        "cal = model.unwrap_python_model().detector.calibration\n"
        "print(json.dumps({'scores': out['score'].tolist(), 'errors': out['error'].tolist(),\n"
        "                  'labels': out['pred_label'].tolist(), 'categories': out['category'].tolist(),\n"
        "                  'method': cal.method, 'source': cal.source,\n"
        "                  'thresholds': {c: t.image_threshold for c, t in cal.classes.items()}}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(paths),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=PATIENCE_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == [None] * len(paths)
    np.testing.assert_allclose(out["scores"], [float(r["score"]) for r in rows], rtol=1e-4, atol=1e-5)
    # the trial calibrated the champion on its held-out normal images: it answers with decisions
    assert out["method"] == "quantile" and out["source"].startswith("sweep validation hold-out")
    assert set(out["thresholds"]) == {"demo/blobs", "demo/grid"}
    for score, label, category in zip(out["scores"], out["labels"], out["categories"]):
        assert label == int(score > out["thresholds"][category])
    run = client.get_run(best.mlflow_run_id)
    assert run.data.tags["vpdm.decision.calibration"].startswith("0.99 quantile of normal images")
    for key in ("test/mean/image_f1", "test/demo/grid/image_false_alarm_rate", "threshold/demo/grid/image"):
        assert key in run.data.metrics, key
    assert run.data.metrics["threshold/demo/grid/image"] == pytest.approx(out["thresholds"]["demo/grid"])
    assert 0.0 <= best.test["image_f1"] <= 1.0


# -- ray job submit against a private head node --------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> set[int]:
    """pids of every process below ``pid`` (Linux /proc), including ones in their own process groups."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(
    importlib.util.find_spec("aiohttp_cors") is None,
    reason="`ray job submit` needs the Ray dashboard: install ray[default] (the 'dist' extra)",
)
def test_ray_job_submit_runs_the_sweep_job_on_a_private_head_node(tiny_demo, tmp_path):
    """Also a multi-dataset sweep: 'a' = the demo, 'b' = the union of two demo sets, one model each."""
    other = make_demo_dataset(
        tmp_path / "other",
        classes=1,
        train_per_class=8,
        test_good_per_class=2,
        test_defect_per_class=2,
        size=64,
        seed=1,
    )
    gcs, dashboard, agent_http, agent_grpc, runtime_env, metrics, client = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="vrj-")  # short: Ray's unix sockets live under it
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),  # `python` in the job = this interpreter
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,  # a private token: ~/.ray is not touched
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "VPDM_CACHE_DIR": str(tmp_path / "features"),
    }
    for key in ("RAY_ADDRESS", "VPDM_FAULT_AFTER_EPOCH", "VPDM_FAULT_MARKER_DIR"):
        env.pop(key, None)
    head = subprocess.Popen(
        [
            str(Path(bindir) / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=4",
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"

    def head_answers() -> bool:
        try:
            urllib.request.urlopen(address + "/api/version", timeout=10).close()
            return True
        except urllib.error.HTTPError:
            return True  # the dashboard answers (401 without a token): it is up
        except OSError:
            return False

    try:
        if not head_answers():
            try:
                _wait_for(head_answers, "the Ray head", alive=lambda: head.poll() is None, poll=1)
            except pytest.fail.Exception as exc:
                pytest.fail(f"{exc}:\n" + (tmp_path / "head.log").read_text()[-3000:])
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        job = subprocess.run(
            [
                str(Path(bindir) / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(REPO),
                "--",
                "python",
                "jobs/sweep.py",
                "--data",
                f"a=demo:{tiny_demo}",
                "--data",
                f"b=demo:{tiny_demo},demo:{other}",
                "--preset",
                "tiny",
                "--trials",
                "1",
                "--epochs",
                "1",
                "--workers",
                "1",
                "--tracking-uri",
                uri,
                "--storage",
                str(tmp_path / "runs"),
                "--experiment",
                "job-sweep",
                "--quiet",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=PATIENCE_S,
            cwd=tmp_path,
        )
        log = job.stdout + job.stderr
        (tmp_path / "job.log").write_text(log)
        assert job.returncode == 0, log[-5000:]
        # default names, one registered model per dataset
        assert "succeeded" in log and "vpdm-a v1 @champion" in log and "vpdm-b v1 @champion" in log
        assert f"mlflow ui --backend-store-uri {uri}" in log
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        a = client.get_model_version_by_alias("vpdm-a", "champion")
        b = client.get_model_version_by_alias("vpdm-b", "champion")
        assert (a.tags["dataset"], b.tags["dataset"]) == ("a", "b")
        assert b.tags["data_spec"] == f"demo:{tiny_demo},demo:{other}"  # the union: one model
        (exp,) = [e for e in client.search_experiments() if e.name == "job-sweep"]
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`vpdm.dataset` = 'b'")
        path = client.download_artifacts(runs[0].info.run_id, "metrics.json", str(tmp_path))
        per_class = json.loads(Path(path).read_text())["test"]["per_class"]
        assert len(per_class) == 3  # 2 classes of the first set + 1 of the second
    finally:
        # Stop this cluster and only this one: its head process and everything below it.
        family = _descendants(head.pid)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=300)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=PATIENCE_S)
        deadline = time.monotonic() + 300  # a graceful stop first; then the stragglers are killed
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in family:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 300  # SIGKILL is certain; only its delivery takes time
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in family if _alive(p)]
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's Ray cluster still running: {left}"


def test_a_killed_trials_train_resources_are_released():
    """ASHA kills a trial with its Train controller; the controller's placement group must not stay
    reserved (the next trial would wait for those CPUs forever). The sweep's Tune callback frees it."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from tune.sweep import _release_callback

    ray_tmp = tempfile.mkdtemp(prefix="vr-")
    ray.init(num_cpus=3, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False)
    try:
        orphan = placement_group([{"CPU": 1}, {"CPU": 1}])
        ray.get(orphan.ready(), timeout=PATIENCE_S)
        assert ray.available_resources().get("CPU", 0) == 1

        class Trial:  # what Tune hands its callbacks: the trial's last result names the group
            trial_id = "t1"
            last_result = {"placement_group_id": orphan.id.hex(), "epoch": 1}

        _release_callback().on_trial_complete(0, [], Trial())
        assert placement_group_table()[orphan.id.hex()]["state"] == "REMOVED"
        _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 3, "the group's CPUs to come back", poll=0.2)
        assert ray.available_resources().get("CPU", 0) == 3
        _release_callback().on_trial_complete(0, [], Trial())  # already removed: nothing happens
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_local_ray_of_a_sweep_listens_on_loopback_only():
    """The embedded default's Ray: node address 127.0.0.1 and no socket of it on another interface."""
    import psutil
    import ray

    from tune.cluster import start_ray
    from tune.plan import SweepConfig

    ray_tmp = tempfile.mkdtemp(prefix="vl-")
    try:
        start_ray(SweepConfig(num_cpus=1, ray_temp_dir=ray_tmp, verbose=0))
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
        assert len(listening) >= 3  # GCS, raylet, object manager at least
        elsewhere = [(c.pid, c.laddr) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert not elsewhere, elsewhere
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
