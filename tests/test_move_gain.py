"""The gains of the learned estimator's post-hoc moves: fitted so a move is as large as it is informative,
applied by the network as ex-ante + gain · (post-hoc − ex-ante)."""

import pytest
import torch
from torch import nn

from estimators.features import answer_features
from estimators.network import NetConfig, QualityNet, move_gains
from estimators.training import QualityData, TrainSettings, fit_move_gains


class MovesFromTheData(nn.Module):
    """A stand-in network: logit 0 with nothing run; once a run set is known, a run model's logit is the
    row's true logit (`prior`) and a model not run gets pure noise (`calibrated`)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = QualityNet(NetConfig(embed_dim=4, n_models=3, hidden=8, layers=0))

    def forward(self, batch: dict, run: torch.Tensor):
        moved = torch.where(run, batch["prior"], batch["calibrated"])
        return torch.where(run.any(1, keepdim=True), moved, torch.zeros_like(moved)), None


def test_an_informative_move_keeps_its_size_and_a_noise_move_is_shrunk_away():
    gen = torch.Generator().manual_seed(0)
    n, k = 3000, 3
    truth_logit = 2.0 * torch.randn(n, k, generator=gen)
    quality = torch.bernoulli(torch.sigmoid(truth_logit), generator=gen)
    noise = 2.0 * torch.randn(n, k, generator=gen)
    data = QualityData(answer_features(None, None, n, k), quality, torch.zeros(n, dtype=torch.long),
                       truth_logit, truth_logit, noise, embedding=torch.zeros(n, 4))
    gain = fit_move_gains(MovesFromTheData(), data, torch.arange(n), TrainSettings(max_depth=2, batch_size=512))
    assert gain.shape == (2,)
    assert abs(float(gain[1]) - 1.0) <= 0.15, gain  # the run model's move is its true logit
    assert float(gain[0]) <= 0.1, gain  # the others' moves are noise


def test_the_network_applies_the_gain_to_each_post_hoc_move():
    torch.manual_seed(0)
    k, b = 4, 6
    net = QualityNet(NetConfig(embed_dim=5, n_models=k, hidden=8, layers=1, heads=2, dropout=0.0)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the readouts start at zero: make every part move the logits
    answers = answer_features([["a", "b", "a", None]] * b, torch.randn(b, k).clamp(max=0), b, k)
    inputs = dict(embedding=torch.randn(b, 5), answers=answers, prior=torch.randn(b, k), calibrated=torch.randn(b, k))
    run = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        ante, _ = net(run=torch.zeros_like(run), **inputs)
        post, hidden = net(run=run, **inputs)
        net.move_gain = torch.tensor([0.25, 1.5], dtype=torch.float64)
        gated, gated_hidden = net(run=run, **inputs)
        given = net(run=run, ante=ante, **inputs)[0]  # ex-ante logits computed once for several run sets
    expected = ante + move_gains(net.move_gain, run).float() * (post - ante)
    assert torch.allclose(gated, expected, atol=1e-6)
    assert torch.equal(gated[0], post[0])  # nothing run: the ex-ante logits, whatever the gain
    assert torch.allclose(gated[2, 0], ante[2, 0] + 0.25 * (post[2, 0] - ante[2, 0]), atol=1e-6)  # not run
    assert torch.allclose(gated[2, 1], ante[2, 1] + 1.5 * (post[2, 1] - ante[2, 1]), atol=1e-6)  # run
    assert torch.equal(gated_hidden, hidden) and torch.equal(given, gated)
    assert not torch.allclose(gated[1:], post[1:])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")  # torch's note, as in fit_shallow
def test_the_wide_regression_on_sparse_raw_features_equals_the_dense_standardized_one():
    """Stage 0 fits the wide regression on a sparse matrix of raw features (standardization folded into
    the weights, zeros skipped); its logits and their gradients must be the dense path's."""
    from estimators.network import wide_features
    from estimators.run_sets import sample_run_sets

    gen = torch.Generator().manual_seed(3)
    n, k, n_sources = 64, 5, 3
    answers = [[str(int(x)) for x in row] for row in torch.randint(0, 3, (n, k), generator=gen)]
    confidence = -torch.rand(n, k, generator=gen) * 3
    features = answer_features(answers, confidence, n, k)
    rows, run = sample_run_sets(n, k, 3, 2, gen)
    source = torch.randint(0, n_sources + 1, (n,), generator=gen)
    calibrated, prior = torch.randn(n, k, generator=gen), torch.randn(n, k, generator=gen)
    wide = wide_features(features.rows(rows), run, calibrated[rows], prior[rows], source[rows], n_sources)
    base = torch.randn(len(rows), k, generator=gen)
    net = QualityNet(NetConfig(embed_dim=4, n_models=k, hidden=8, layers=0, n_sources=n_sources))
    with torch.no_grad():
        net.wide.weight.normal_(generator=gen)
        net.wide.bias.normal_(generator=gen)
        net.wide_mean.copy_(wide.mean(0))
        net.wide_scale.copy_(wide.std(0).clamp(min=1e-3))
    assert float((wide == 0).float().mean()) > 0.5  # the case the sparse path is for
    grads = []
    for matrix in (wide, wide.to_sparse_csr()):
        net.zero_grad()
        logits = net.shallow(matrix, base, run)
        logits.square().sum().backward()
        grads.append((logits.detach(), net.wide.weight.grad.clone(), net.wide.bias.grad.clone()))
    for dense, sparse in zip(*grads):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
