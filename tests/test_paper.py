"""The paper's MLP task: gradients against a numpy reference, one GD step, both phases, lane independence."""

import math

import numpy as np
import pytest
import torch

from fractal_vmap import paper
from fractal_vmap.errors import UserError
from fractal_vmap.fractal import convergence_measure
from fractal_vmap.paper import (
    ACTIVATIONS,
    DEFAULT_VIEW,
    PaperConfig,
    init_params,
    lane_loss_and_grads,
    loss,
    make_data,
    num_points,
    paper_grid,
    sigmoid_,
    phase_lanes,
    train_paper_lanes,
    vmap_loss_and_grads,
)

GRADS = [lane_loss_and_grads, vmap_loss_and_grads]


def reference_loss_and_grads(W0, W1, x, y, activation):
    """One network in numpy float64, gradients derived by hand from the plain formula."""
    n = W0.shape[0]
    z = x @ W0 / math.sqrt(n)
    if activation == "tanh":
        h = np.tanh(math.sqrt(2) * z)
        dh_dz = math.sqrt(2) * (1 - h * h)
    elif activation == "relu":
        h = math.sqrt(2) * np.maximum(z, 0)
        dh_dz = math.sqrt(2) * (z > 0)
    else:
        h, dh_dz = z, np.ones_like(z)
    r = h @ W1 / n - y
    dout = 2 * r / len(x)
    gW1 = h.T @ dout / n
    gW0 = x.T @ (dout @ W1.T / n * dh_dz) / math.sqrt(n)
    return float(np.mean(r * r)), gW0, gW1


def random_lanes(L, n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "W0": scale * torch.randn(L, n, n, dtype=torch.float64, generator=g),
        "W1": scale * torch.randn(L, n, 1, dtype=torch.float64, generator=g),
    }


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss_and_grads", GRADS)
def test_lane_grads_match_numpy_reference(activation, loss_and_grads):
    cfg = PaperConfig(width=6, activation=activation, seed=3)
    x, y = make_data(cfg)
    params = random_lanes(7, 6, 2.0, seed=1)
    losses, grads = loss_and_grads(params, x, y, cfg)
    assert losses.shape == (7,) and grads["W0"].shape == (7, 6, 6) and grads["W1"].shape == (7, 6, 1)
    for i in range(7):
        ref_loss, gW0, gW1 = reference_loss_and_grads(
            params["W0"][i].numpy(), params["W1"][i].numpy(), x.numpy(), y.numpy(), activation
        )
        # float64 rounding of a different summation order: measured <= 1.1e-15 relative to the largest entry
        assert abs(losses[i].item() - ref_loss) <= 1e-13 * ref_loss
        for got, ref in ((grads["W0"][i].numpy(), gW0), (grads["W1"][i].numpy(), gW1)):
            assert np.abs(got - ref).max() <= 1e-13 * np.abs(ref).max()


def test_loss_is_the_plain_formula_and_data_sizes():
    cfg = PaperConfig()
    p, (x, y) = init_params(cfg), make_data(cfg)
    assert p["W0"].shape == (8, 8) and p["W1"].shape == (8, 1) and p["W0"].dtype == torch.float64
    assert x.shape == (72, 8) and y.shape == (72, 1)  # 8*8 + 8 = 72 parameters, one point each
    assert num_points(PaperConfig(activation="identity", data_multiple=2)) == 16  # identity: width x multiple
    ref = reference_loss_and_grads(p["W0"].numpy(), p["W1"].numpy(), x.numpy(), y.numpy(), "tanh")[0]
    assert loss(p, x, y, cfg).item() == pytest.approx(ref, rel=1e-14)
    # the seed decides everything; another seed draws other weights and data
    assert torch.equal(init_params(cfg)["W0"], p["W0"]) and torch.equal(make_data(cfg)[0], x)
    assert not torch.equal(init_params(PaperConfig(seed=1))["W0"], p["W0"])
    assert not torch.equal(make_data(PaperConfig(seed=1))[1], y)


@pytest.mark.parametrize("loss_and_grads", GRADS)
def test_one_gd_step_matches_reference(loss_and_grads):
    cfg = PaperConfig(width=5, steps=2, seed=2)
    lr0 = torch.tensor([0.3, 2.0, 0.05])
    lr1 = torch.tensor([1.5, 0.1, 7.0])
    offset = torch.tensor([0.0, -0.4, 1.3])
    losses = train_paper_lanes(cfg, lr0, lr1, offset, loss_and_grads=loss_and_grads)
    p, (x, y) = init_params(cfg), make_data(cfg)
    for i in range(3):
        W0, W1 = p["W0"].numpy() + offset[i].item(), p["W1"].numpy()
        l0, gW0, gW1 = reference_loss_and_grads(W0, W1, x.numpy(), y.numpy(), "tanh")
        l1 = reference_loss_and_grads(W0 - lr0[i].item() * gW0, W1 - lr1[i].item() * gW1, x.numpy(), y.numpy(), "tanh")[
            0
        ]
        # one step of float64 rounding differences: measured <= 2.1e-16 relative
        assert losses[0, i].item() == pytest.approx(l0, rel=1e-13)
        assert losses[1, i].item() == pytest.approx(l1, rel=1e-13)


def test_default_view_has_both_phases():
    cfg = PaperConfig()
    values = np.logspace(*DEFAULT_VIEW, 12)
    m = convergence_measure(paper_grid(cfg, values, values).permute(1, 2, 0).numpy())
    assert m.shape == (12, 12)
    assert m[0, 0] < 0  # tiny learning rates: the loss creeps down
    assert m[-1, -1] > 0  # huge ones: it blows up
    assert 0.1 < (m < 0).mean() < 0.9


@pytest.mark.parametrize("loss_and_grads", GRADS)
def test_diverging_lane_leaves_others_bit_equal(loss_and_grads):
    cfg = PaperConfig(width=6, steps=40)
    lr0 = torch.tensor([0.5, 3.0, 1e7, 10.0])
    lr1 = torch.tensor([2.0, 0.7, 1e7, 30.0])
    with_bad = train_paper_lanes(cfg, lr0, lr1, loss_and_grads=loss_and_grads)
    bad = with_bad[:, 2]
    first = int(torch.nonzero(~torch.isfinite(bad))[0])
    assert first < cfg.steps - 1 and torch.isnan(bad[first + 1 :]).all()  # it diverged, then it stopped
    keep = [0, 1, 3]
    without = train_paper_lanes(cfg, lr0[keep], lr1[keep], loss_and_grads=loss_and_grads)
    assert torch.isfinite(without).all()
    torch.testing.assert_close(with_bad[:, keep], without, rtol=0, atol=0)


@pytest.mark.parametrize(
    "loss_and_grads,dtype",
    [(lane_loss_and_grads, "float64"), (vmap_loss_and_grads, "float64"), (lane_loss_and_grads, "float32")],
)
def test_lanes_do_not_depend_on_their_company(loss_and_grads, dtype):
    """A lane's numbers are the same alone, among 5, and in chunks of 2 (bit for bit, NaNs included)."""
    cfg = PaperConfig(width=6, steps=30, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    lr0 = 10 ** (4 * torch.rand(5, generator=g, dtype=torch.float64) - 1)  # 0.1 .. 1000: both phases
    lr1 = 10 ** (4 * torch.rand(5, generator=g, dtype=torch.float64) - 1)
    together = train_paper_lanes(cfg, lr0, lr1, loss_and_grads=loss_and_grads)
    for chunk, workers in ((2, 1), (2, 3)):  # chunks one after another, and side by side on 3 threads
        chunked = train_paper_lanes(cfg, lr0, lr1, chunk=chunk, loss_and_grads=loss_and_grads, workers=workers)
        torch.testing.assert_close(chunked, together, rtol=0, atol=0, equal_nan=True)
    for i in range(5):
        alone = train_paper_lanes(cfg, lr0[i : i + 1], lr1[i : i + 1], loss_and_grads=loss_and_grads)
        torch.testing.assert_close(alone[:, 0], together[:, i], rtol=0, atol=0, equal_nan=True)


def test_hand_and_vmap_trainers_agree_where_training_is_tame():
    cfg = PaperConfig(activation="relu", steps=100)
    lr0 = torch.tensor([0.01, 0.1, 0.3])
    lr1 = torch.tensor([0.02, 0.5, 1.0])
    a = train_paper_lanes(cfg, lr0, lr1, loss_and_grads=lane_loss_and_grads)
    b = train_paper_lanes(cfg, lr0, lr1, loss_and_grads=vmap_loss_and_grads)
    assert torch.isfinite(a).all() and (a[-1] < a[0]).all()  # tame: every lane trains
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)  # 100 steps of 1-ulp differences: measured <= 4.1e-16


def test_float32_follows_float64_where_tame():
    lr = torch.tensor([0.05, 0.2])
    f64 = train_paper_lanes(PaperConfig(steps=50), lr, lr)
    f32 = train_paper_lanes(PaperConfig(steps=50, dtype="float32"), lr, lr)
    torch.testing.assert_close(f32, f64, rtol=1e-5, atol=0)  # float32 rounding over 50 steps: measured <= 1.7e-7


def test_phase_lanes_axes():
    lr0, lr1, off = phase_lanes("lr_vs_lr", [1.0, 2.0], [10.0, 20.0, 30.0])
    assert lr0.tolist() == [10, 20, 30, 10, 20, 30] and lr1.tolist() == [1, 1, 1, 2, 2, 2] and not off.any()
    lr0, lr1, off = phase_lanes("offset_vs_lr", [1.0, 2.0], [-0.5, 0.5])
    assert lr0.tolist() == lr1.tolist() == [1, 1, 2, 2] and off.tolist() == [-0.5, 0.5, -0.5, 0.5]


def test_bad_settings_are_user_errors():
    for bad in (PaperConfig(activation="gelu"), PaperConfig(dtype="bfloat16"), PaperConfig(data_multiple=0.001)):
        with pytest.raises(UserError):
            train_paper_lanes(bad, torch.ones(2), torch.ones(2))
    with pytest.raises(UserError):
        phase_lanes("lr_vs_offset", [1.0], [1.0])


def test_sigmoid_rounds_a_value_the_same_wherever_it_sits():
    """torch.sigmoid rounds elements outside whole vectors with another formula; sigmoid_ never leaves any over."""
    g = torch.Generator().manual_seed(0)
    candidates = 8 * torch.randn(4096, dtype=torch.float64, generator=g)
    vector_path = torch.sigmoid(candidates)  # 4096 elements: whole vectors, one thread
    scalar_path = torch.cat([torch.sigmoid(c.view(1)) for c in candidates])  # one element: the scalar formula
    hard = candidates[vector_path != scalar_path]  # values torch itself rounds by path (~2.6% on AVX-512)
    values = torch.cat([hard, candidates[:40]])
    alone = torch.cat([sigmoid_(v.view(1).clone()) for v in values])
    for before, after in ((0, 0), (5, 3), (16, 0), (40000, 11), (70001, 0)):  # up to several pieces of GRAIN - block
        t = torch.cat(
            [
                torch.randn(before, dtype=torch.float64, generator=g),
                values,
                torch.randn(after, dtype=torch.float64, generator=g),
            ]
        )
        assert torch.equal(sigmoid_(t)[before : before + len(values)], alone)
    torch.testing.assert_close(alone, torch.sigmoid(values), rtol=4.5e-16, atol=0)  # sigmoid, to 2 ulps


def test_training_leaves_the_thread_count_as_it_was():
    threads = torch.get_num_threads()
    train_paper_lanes(PaperConfig(width=4, steps=3), torch.ones(5), torch.ones(5), chunk=2, workers=2)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "lrs",
    [
        [
            (0.3, 2.0),
            (1e6, 1e6),
            (2.0, 0.5),
            (3e5, 10.0),
            (5.0, 5.0),
            (1e4, 1e5),
            (0.05, 30.0),
        ],  # some lanes stop early
        [(1e6, 1e6), (0.5, 1.0), (3e5, 2e5)],  # one lane left alone: it keeps a stopped companion
    ],
)
def test_dropping_stopped_lanes_changes_no_number(monkeypatch, lrs):
    cfg = PaperConfig(width=6, steps=60)
    lr0, lr1 = torch.tensor(lrs, dtype=torch.float64).T
    compacted = train_paper_lanes(cfg, lr0, lr1)
    bad = ~torch.isfinite(compacted)
    first_bad = torch.where(bad.any(0), bad.float().argmax(0), cfg.steps)
    assert (first_bad < cfg.steps - paper.COMPACT_EVERY).any()  # some lanes stopped early enough to be dropped
    assert (first_bad == cfg.steps).any()  # and some went on
    monkeypatch.setattr(paper, "COMPACT_EVERY", 10**9)
    full = train_paper_lanes(cfg, lr0, lr1)
    torch.testing.assert_close(compacted, full, rtol=0, atol=0, equal_nan=True)
