"""Distributed sweeps and MLflow tracking for VPDM (needs the ``dist`` extra: ray, mlflow, optuna).

Modules (import them directly; importing ``tune`` itself loads nothing heavy):

* ``tune.presets``: named search spaces and the paper's ablations, validated up front;
* ``tune.features``: backbone features once per sweep, packed for the Ray object store;
* ``tune.distributed``: the Ray Train worker loop (class-stratified sharding, DDP, checkpoints);
* ``tune.trial``: one Ray Tune trial = a TorchTrainer run + evaluation + MLflow logging;
* ``tune.plan``: ``SweepConfig`` and the checks of everything before any trial (``plan_sweep``);
* ``tune.cluster``: the Ray cluster: connect or start one, check it fits a trial;
* ``tune.sweep``: ``run_sweep`` (the entry point of ``jobs/sweep.py``), one Tuner per dataset;
* ``tune.results``: what a sweep returns and prints;
* ``tune.tracking``: tracking-URI checks and fault-tolerant MLflow logging;
* ``tune.mlflow_model``: VPDM as an MLflow pyfunc model: log, register, load;
* ``tune.registry``: safe promotion: a sweep's best is ``@challenger``, ``@champion`` moves only on evidence;
* ``tune.scaling``: throughput of W workers x T threads (scaling efficiency).
"""
