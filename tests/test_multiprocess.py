"""The training recipe launched as 2 CPU processes (torchrun, gloo): they share the work and publish one
export in the single-process format, with the same test AUCs up to noise, and write the embedding cache
once; resume state saved under another number of processes is discarded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from router_train import CascadeRouter, distributed
from router_train import train as recipe

ROOT = Path(__file__).resolve().parents[1]


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 --standalone -m router_train.train --config CONFIG ARGS`, 1 thread each."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")  # CPU processes (gloo) on a GPU machine too
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "router_train.train", "--config", str(config), "--threads", "1", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def two_processes(tiny_export, tmp_path_factory):
    """The recipe of `tiny_export` (trained in one process) run again in 2 processes, with an embedding
    cache; returns (single-process export, 2-process export, the run's stderr, the cache directory)."""
    root = tmp_path_factory.mktemp("multiprocess")
    config = yaml.safe_load((tiny_export.parent.parent / "tiny.yaml").read_text())
    config["output_dir"] = str(root / "checkpoints")
    config["estimator"]["embedding_cache"] = str(root / "cache")
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    done = torchrun(root / "tiny.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    return tiny_export, root / "checkpoints" / "tiny", done.stderr, root / "cache"


def test_two_processes_publish_one_export_like_one_process(two_processes):
    single, multi, stderr, _ = two_processes
    assert stderr.count("data: ") == 1 and "in 2 processes" in stderr  # the main process alone reports
    checkpoints = multi.parent
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tiny.versions", "tiny"]  # no state left behind
    assert len(list((checkpoints / ".tiny.versions").iterdir())) == 1
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    got, want = (json.loads((run / "manifest.json").read_text()) for run in (multi, single))
    assert sorted(got) == sorted(want) and sorted(got["files"]) == sorted(want["files"])
    assert got["models"] == want["models"] and got["budgets"] == want["budgets"]
    assert {mode: len(fits) for mode, fits in got["strategies"].items()} == {
        mode: len(fits) for mode, fits in want["strategies"].items()}
    router = CascadeRouter.load(multi)
    decisions = router.route_batch(["what is two plus two", "the capital of france"])
    assert len(decisions) == 2 and all(d.next_model in got["models"] + [None] for d in decisions)


def test_two_processes_share_the_training_and_match_its_aucs(two_processes):
    single, multi, _, _ = two_processes
    got, want = (json.loads((run / "metrics.json").read_text()) for run in (multi, single))
    history, alone = got["estimator"]["history"], want["estimator"]["history"]
    # before any step both score the same held-back states: the processes' shares add up to all of them
    assert history[0]["val_loss"] == pytest.approx(alone[0]["val_loss"], abs=1e-6)
    # then each process took half of every batch (one process doing all of it gave identical losses)
    assert history[1]["train_loss"] != alone[1]["train_loss"]
    for method, value in got["auc"].items():
        low, high = want["auc_ci"][method]
        assert low <= value <= high, (method, value, (low, high))


def test_the_embedding_cache_is_written_once(two_processes):
    _, _, _, cache = two_processes
    files = sorted(cache.iterdir())
    assert [p.suffix for p in files] == [".safetensors", ".safetensors"]  # training and test queries, no temp files


def test_resume_state_of_another_process_count_is_discarded(tmp_path):
    state = tmp_path / ".run.partial"
    fingerprint = {"config": "c", "data": "d", "processes": 1}
    (state / "train").mkdir(parents=True)
    (state / "fingerprint.json").write_text(json.dumps({"config": "c", "data": "d"}))  # saved before processes
    (state / "train" / "progress.json").write_text(json.dumps({"epoch": 3}))
    messages = []
    recipe.resume_state(state, fingerprint, messages.append)
    assert (state / "train").exists() and "resuming training from the checkpoint after epoch 3" in messages[0]
    recipe.resume_state(state, dict(fingerprint, processes=2), messages.append)
    assert not (state / "train").exists() and "the number of processes changed" in messages[1]


def test_more_processes_than_gpus_is_refused_naming_the_fix(monkeypatch, capsys):
    """Two processes on a machine that sees one GPU: a one-line error before any process group is made
    (NCCL would stop both with "Duplicate GPU detected")."""
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--config", str(ROOT / "configs" / "default.yaml")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "2 processes on this machine but 1 GPU(s) visible" in error and "--nproc_per_node" in error
    assert "CUDA_VISIBLE_DEVICES" in error and not distributed.dist.is_initialized()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per GPU on each of two machines: allowed
    distributed.check_gpus_per_process()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a launcher that does not say: not refused
    distributed.check_gpus_per_process()
