"""Deployment recipes: the SLURM job script, and the manifests parse with the settings the docs
describe."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue")
    cluster_module = load(ROOT / "deploy" / "slurm" / "cluster.py")
    cluster = cluster_module.make_cluster(
        queue="normal", account="lab", memory="8GiB", walltime="01:00:00",
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p normal" in script and "#SBATCH -A lab" in script
    assert "#SBATCH -t 01:00:00" in script and "#SBATCH --job-name=nbdask" in script
    assert "tcp://127.0.0.1:" in script and "--nthreads 1" in script
    assert "#SBATCH --cpus-per-task=1" in script and "#SBATCH --mem=8G" in script
    assert "--memory-limit 8.00GiB" in script
    assert "--lifetime 55m" in script and "--lifetime-stagger 4m" in script


def test_manifests_use_tls_and_matching_memory_limits():
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "daskjob.yaml").read_text())
    worker = job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]
    assert "--memory-limit" in worker["args"] and "8GiB" in worker["args"]
    assert worker["resources"]["limits"]["memory"] == "8Gi"
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    assert "--protocol tls" in compose["services"]["scheduler"]["command"]
    assert compose["services"]["worker"]["environment"]["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
