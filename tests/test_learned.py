"""The learned estimator: trains on a tiny table with a tiny random encoder, exports and reloads
exactly, refuses broken exports, and its Σ intervals cover held-out moves at the stated rate."""

import dataclasses
import json

import pytest
import safetensors.torch
import torch
from factories import random_table
from tiny_models import tiny_encoder_dir

from estimators.encoder import EncoderConfig, LoraSettings, TextEncoder
from estimators.learned import LearnedConfig, LearnedEstimator
from estimators.run_sets import sample_run_sets
from estimators.training import TrainSettings


def tiny_config(encoder_dir, cache, **train) -> LearnedConfig:
    settings = dict(max_depth=3, per_row=4, epochs=40, batch_size=64, lr=3e-3, patience=8, variance_epochs=3)
    settings.update(train)
    return LearnedConfig(
        encoder=EncoderConfig(name_or_path=str(encoder_dir), max_length=64, batch_size=32),
        hidden=16, layers=1, heads=2, dropout=0.0, train=TrainSettings(**settings), embedding_cache=str(cache),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    table = random_table(300, 4, seed=5)
    config = tiny_config(tiny_encoder_dir(root / "encoder"), root / "cache")
    estimator = LearnedEstimator(config).fit(table.train())
    return root, table, estimator


def states(n, k, seed=0):
    return sample_run_sets(n, k, 3, 2, torch.Generator().manual_seed(seed))


def test_predictions_are_probabilities_with_psd_covariances(trained):
    _, table, estimator = trained
    test = table.test()
    features = estimator.featurize(test)
    rows, run = states(test.n, test.k)
    est = estimator.predict(features, rows, run)
    assert est.quality.shape == (len(rows), 4) and bool(((est.quality > 0) & (est.quality < 1)).all())
    assert bool((est.cost > 0).all())
    assert bool((est.cov.diagonal(dim1=1, dim2=2)[run] == 0).all())
    assert float(torch.linalg.eigvalsh(est.cov).min()) > -1e-10


def test_export_and_load_round_trip_is_exact(trained, tmp_path):
    root, table, estimator = trained
    estimator.save(tmp_path / "export")
    loaded = LearnedEstimator.load(tmp_path / "export")
    test = table.test()
    rows, run = states(test.n, test.k, seed=1)
    a = estimator.predict(estimator.featurize(test), rows, run)
    b = loaded.predict(loaded.featurize(test), rows, run)
    assert torch.equal(a.quality, b.quality) and torch.equal(a.cov, b.cov) and torch.equal(a.cost, b.cost)
    assert estimator.net.move_gain is not None and torch.equal(loaded.net.move_gain, estimator.net.move_gain)


def test_an_export_without_move_gains_loads_with_the_moves_as_trained(trained, tmp_path):
    _, table, estimator = trained
    estimator.save(tmp_path / "e")
    weights = tmp_path / "e" / "estimator.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    del tensors["calibration.move_gain"]  # as written before the gains existed
    safetensors.torch.save_file(tensors, str(weights))
    loaded = LearnedEstimator.load(tmp_path / "e")
    assert loaded.net.move_gain is None
    test = table.test()
    rows, run = states(test.n, test.k, seed=3)
    gained = estimator.predict(estimator.featurize(test), rows, run).quality
    saved, estimator.net.move_gain = estimator.net.move_gain, None
    try:
        as_trained = estimator.predict(estimator.featurize(test), rows, run).quality
    finally:
        estimator.net.move_gain = saved
    assert torch.equal(loaded.predict(loaded.featurize(test), rows, run).quality, as_trained)
    assert not torch.equal(gained, as_trained)


def test_broken_exports_fail_at_load_with_clear_messages(trained, tmp_path):
    _, _, estimator = trained
    estimator.save(tmp_path / "e")
    (tmp_path / "e" / "estimator.safetensors").rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="estimator.safetensors is missing"):
        LearnedEstimator.load(tmp_path / "e")
    tensors = safetensors.torch.load_file(str(tmp_path / "weights"))
    name = "net.readout"
    tensors[name] = torch.zeros(3, 3)
    safetensors.torch.save_file(tensors, str(tmp_path / "e" / "estimator.safetensors"))
    with pytest.raises(ValueError, match="readout. has shape"):
        LearnedEstimator.load(tmp_path / "e")
    tensors["net.readout"] = estimator.net.readout.detach().clone()
    tensors["calibration.move_gain"] = torch.tensor([float("nan"), 1.0], dtype=torch.float64)
    safetensors.torch.save_file(tensors, str(tmp_path / "e" / "estimator.safetensors"))
    with pytest.raises(ValueError, match="move_gain must hold 2 finite gains"):
        LearnedEstimator.load(tmp_path / "e")
    meta = json.loads((tmp_path / "e" / "estimator.json").read_text())
    meta["version"] = 99
    (tmp_path / "e" / "estimator.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unsupported estimator format"):
        LearnedEstimator.load(tmp_path / "e")


def test_a_different_encoder_is_refused(trained, tmp_path):
    root, _, estimator = trained
    estimator.save(tmp_path / "e")
    other = TextEncoder(EncoderConfig(name_or_path=str(tiny_encoder_dir(tmp_path / "other", seed=9)), max_length=64))
    with pytest.raises(ValueError, match="not the one this estimator was trained with"):
        LearnedEstimator.load(tmp_path / "e", encoder=other)


def test_intervals_cover_held_out_moves_at_the_stated_rate(trained):
    """q̂ ± z σ should contain, for ~90 % of held-out (query, model, run set below the depth cap), the
    estimate the model gets once it has run: the move the router makes when it runs that model next."""
    _, table, estimator = trained
    test = table.test()
    features = estimator.featurize(test)
    rows, run = states(test.n, test.k, seed=2)
    keep = run.sum(1) < estimator.config.train.max_depth
    rows, run = rows[keep], run[keep]
    est = estimator.predict(features, rows, run)
    sigma = est.cov.diagonal(dim1=1, dim2=2).sqrt()
    inside = []
    for j in range(test.k):
        todo = ~run[:, j]
        after = run[todo].clone()
        after[:, j] = True
        moved = estimator.predict(features, rows[todo], after).quality[:, j]
        inside.append((moved - est.quality[todo, j]).abs() <= 1.6449 * sigma[todo, j])
    covered = torch.cat(inside).double().mean().item()
    assert abs(covered - estimator.config.coverage) <= 0.05, covered


def test_post_hoc_estimates_beat_ex_ante_on_run_models(trained):
    """Seeing a model's answer (its confidence) must sharpen the estimate of that model (Brier score)."""
    _, table, estimator = trained
    test = table.test()
    features = estimator.featurize(test)
    rows = torch.arange(test.n).repeat_interleave(test.k)
    run = torch.eye(test.k, dtype=torch.bool).repeat(test.n, 1)
    post = estimator.predict(features, rows, run).quality[run]
    ante = estimator.predict(features, rows, torch.zeros_like(run)).quality[run]
    truth = test.quality[rows][run]
    assert ((post - truth) ** 2).mean() < ((ante - truth) ** 2).mean()


def test_training_resumes_where_it_stopped(tmp_path):
    table = random_table(80, 3, seed=6).train()
    encoder_dir = tiny_encoder_dir(tmp_path / "encoder")
    full = LearnedEstimator(tiny_config(encoder_dir, tmp_path / "c", epochs=2, patience=5)).fit(table)
    state = tmp_path / "state"
    LearnedEstimator(tiny_config(encoder_dir, tmp_path / "c", epochs=1, patience=5)).fit(table, state_dir=state)
    assert json.loads((state / "progress.json").read_text())["epoch"] == 1
    resumed = LearnedEstimator(tiny_config(encoder_dir, tmp_path / "c", epochs=2, patience=5))
    resumed.fit(table, state_dir=state)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]  # 0: the stage-0 regression
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_an_interrupt_while_saving_an_epoch_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT between an epoch's weights and its progress file: the resumed run still equals an
    uninterrupted one (it resumed epoch-2 weights as epoch 1's and trained them again)."""
    from estimators import training

    table = random_table(80, 3, seed=6).train()
    encoder_dir = tiny_encoder_dir(tmp_path / "encoder")
    config = tiny_config(encoder_dir, tmp_path / "c", epochs=3, patience=5)
    full = LearnedEstimator(config).fit(table)
    state = tmp_path / "state"
    write = training.atomic_write_json

    def interrupted(path, progress):
        if progress["epoch"] == 2:
            raise KeyboardInterrupt
        write(path, progress)
    monkeypatch.setattr(training, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        LearnedEstimator(config).fit(table, state_dir=state)
    monkeypatch.undo()
    resumed = LearnedEstimator(config).fit(table, state_dir=state)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_lora_fine_tuning_exports_its_adapter(tmp_path):
    table = random_table(60, 3, seed=7)
    config = tiny_config(tiny_encoder_dir(tmp_path / "encoder"), tmp_path / "c", epochs=1)
    config.finetune = True
    config.encoder.lora = LoraSettings(r=2, alpha=4)
    estimator = LearnedEstimator(config).fit(table.train())
    estimator.save(tmp_path / "e")
    names = safetensors.torch.load_file(str(tmp_path / "e" / "estimator.safetensors")).keys()
    assert any(n.startswith("lora.") for n in names)
    loaded = LearnedEstimator.load(tmp_path / "e")
    test = table.test()
    rows, run = states(test.n, test.k)
    a = estimator.predict(estimator.featurize(test), rows, run).quality
    b = loaded.predict(loaded.featurize(test), rows, run).quality
    torch.testing.assert_close(a, b)


def test_after_fine_tuning_each_query_is_embedded_once(tmp_path, monkeypatch):
    """Once training ends the tuned encoder is frozen: the passes that fit the move gains, Σ and its scale
    use one embedding per query instead of running the encoder for every state and run set."""
    from estimators import learned as learned_module

    table = random_table(60, 3, seed=7).train()
    config = tiny_config(tiny_encoder_dir(tmp_path / "encoder"), tmp_path / "c", epochs=1)
    config.finetune = True
    config.encoder.lora = LoraSettings(r=2, alpha=4)
    trained, encoded = [], []
    forward, train_quality = TextEncoder.forward, learned_module.train_quality

    def counting(self, input_ids, attention_mask):
        if trained:
            encoded.append(len(input_ids))
        return forward(self, input_ids, attention_mask)

    def marking(*args, **kwargs):
        history = train_quality(*args, **kwargs)
        trained.append(True)
        return history

    monkeypatch.setattr(TextEncoder, "forward", counting)
    monkeypatch.setattr(learned_module, "train_quality", marking)
    estimator = LearnedEstimator(config).fit(table)
    assert trained and estimator.posthoc and sum(encoded) == table.n


def test_cells_without_confidence_or_answer_give_finite_estimates(trained):
    """Serving tables leave unknown cells empty (None answers, NaN confidence): estimates stay finite."""
    _, table, estimator = trained
    test = table.test()
    test.confidence = test.confidence.clone()
    test.confidence[:, 1:] = float("nan")
    test.answers = [[row[0], None, None, None] for row in test.answers]
    rows, run = states(test.n, test.k, seed=3)
    est = estimator.predict(estimator.featurize(test), rows, run)
    assert bool(torch.isfinite(est.quality).all() and torch.isfinite(est.cov).all())


def test_without_answers_or_confidences_running_a_model_changes_no_estimate(tmp_path, monkeypatch):
    """Trained on a table with no answers, confidences or completion lengths (e.g. LLMRouter's), the post-hoc estimate of
    every state is the ex-ante one and Σ is 0: cascade routing cannot pay for runs that reveal nothing. The variance
    head, whose Σ would be zeroed anyway, is not fitted, and the estimator says it has no Σ."""
    import estimators.learned as learned

    def unwanted(*args, **kwargs):
        raise AssertionError("the variance head was fitted for an estimator whose Σ is 0")

    monkeypatch.setattr(learned, "train_variance", unwanted)
    table = random_table(200, 4, seed=6)
    table.answers, table.confidence, table.tokens_out = None, None, None
    config = tiny_config(tiny_encoder_dir(tmp_path / "encoder"), tmp_path / "cache", epochs=5)
    estimator = LearnedEstimator(config).fit(table.train())
    assert estimator.posthoc is False
    test = table.test()
    rows, run = states(test.n, test.k, seed=4)
    features = estimator.featurize(test)
    est = estimator.predict(features, rows, run)
    ex_ante = estimator.predict(features, rows, torch.zeros_like(run))
    assert bool(run.any()) and torch.equal(est.quality, ex_ante.quality)
    assert bool((est.cov == 0).all()) and estimator.uncertain is False
    estimator.save(tmp_path / "export")
    loaded = LearnedEstimator.load(tmp_path / "export")
    assert loaded.posthoc is False and loaded.uncertain is False
    assert loaded.correlation.dtype == torch.float64  # exported as a calibrated estimator's are
    again = loaded.predict(loaded.featurize(test), rows, run)
    assert torch.equal(again.quality, est.quality) and bool((again.cov == 0).all())
    assert json.loads((tmp_path / "export" / "estimator.json").read_text())["posthoc"] is False


def test_post_hoc_move_gains_of_zero_give_a_zero_sigma_not_a_crash(tmp_path, monkeypatch):
    """Where the answers turn out to say nothing (small tables, weak signals), the fitted gains of the moves
    are 0 and so is every held-back move: Σ is then 0 (its scale was 0/0 = NaN, and eigh failed on the
    moves' correlations)."""
    import estimators.learned as learned

    monkeypatch.setattr(learned, "fit_move_gains", lambda *a: torch.zeros(2, dtype=torch.float64))
    table = random_table(120, 4, seed=8)
    config = tiny_config(tiny_encoder_dir(tmp_path / "encoder"), tmp_path / "cache", epochs=2)
    estimator = LearnedEstimator(config).fit(table.train())
    # 0 up to float32 rounding of the moves (exactly 0 on some CPUs, ~1e-8 on others)
    assert estimator.posthoc and abs(estimator.scale) < 1e-6
    assert bool(torch.isfinite(estimator.correlation).all())
    test = table.test()
    rows, run = states(test.n, test.k, seed=5)
    est = estimator.predict(estimator.featurize(test), rows, run)
    assert bool(torch.isfinite(est.quality).all()) and float(est.cov.abs().max()) < 1e-10


def test_an_ensemble_averages_its_members_seeds_and_round_trips(tmp_path):
    """`ensemble: 3`: three estimators at seeds 0, 1, 2 on one encoder; the estimate is the mean of theirs
    (the first member is the single estimator of seed 0), and the export reloads exactly."""
    table = random_table(200, 4, seed=7)
    config = tiny_config(tiny_encoder_dir(tmp_path / "encoder"), tmp_path / "cache", epochs=6)
    single = LearnedEstimator(config).fit(table.train())
    ensemble = LearnedEstimator(dataclasses.replace(config, ensemble=3)).fit(table.train())
    assert [m.config.train.seed for m in ensemble.members] == [0, 1, 2]
    test = table.test()
    rows, run = states(test.n, test.k, seed=2)
    features = ensemble.featurize(test)
    estimate = ensemble.predict(features, rows, run)
    members = [m.predict(m.featurize(test), rows, run) for m in ensemble.members]
    assert torch.allclose(estimate.quality, torch.stack([m.quality for m in members]).mean(0))
    assert not torch.allclose(members[0].quality, members[1].quality)  # the seeds differ
    assert torch.equal(members[0].quality, single.predict(single.featurize(test), rows, run).quality)
    assert torch.equal(estimate.cost, members[0].cost) and torch.equal(estimate.cov, members[0].cov)
    ensemble.save(tmp_path / "export")
    loaded = LearnedEstimator.load(tmp_path / "export")
    again = loaded.predict(loaded.featurize(test), rows, run)
    assert len(loaded.members) == 3
    assert torch.equal(again.quality, estimate.quality) and torch.equal(again.cov, estimate.cov)


def test_an_ensemble_needs_a_frozen_encoder_and_at_least_one_member():
    with pytest.raises(ValueError, match="ensemble > 1 needs a frozen encoder"):
        LearnedConfig(finetune=True, ensemble=2)
    with pytest.raises(ValueError, match="is the number of estimators averaged, at least 1"):
        LearnedConfig(ensemble=0)
