"""K-FAC: factors against their definitions, the step against the Kronecker-inverse formula."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from nets.optim.kfac import KFAC, kfac_factors

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Sequential:
    torch_gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen, dtype=DT) * 0.7)
    return model


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=DT), torch.randint(0, 3, (n,), generator=gen)


def _direct_factors(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor
) -> list[tuple[np.ndarray, np.ndarray]]:
    """E[a a^T] and E[g g^T] from per-sample losses, one sample at a time (empirical Fisher)."""
    lin1, lin2 = model[0], model[2]
    sums = [
        [np.zeros((6, 6)), np.zeros((4, 4))],
        [np.zeros((5, 5)), np.zeros((3, 3))],
    ]
    for n in range(x.shape[0]):
        s1 = lin1(x[n : n + 1])
        h = torch.tanh(s1)
        s2 = lin2(h)
        loss_n = nn.functional.cross_entropy(s2, y[n : n + 1])  # l_n, one sample
        g1, g2 = torch.autograd.grad(loss_n, [s1, s2])
        for k, (a, g) in enumerate(((x[n], g1[0]), (h[0].detach(), g2[0]))):
            abar = torch.cat([a, torch.ones(1, dtype=DT)]).numpy()
            sums[k][0] += np.outer(abar, abar)
            sums[k][1] += np.outer(g.numpy(), g.numpy())
    return [(A / x.shape[0], G / x.shape[0]) for A, G in sums]


def test_linear_factors_equal_their_definitions_and_plain_equals_dedicated() -> None:
    x, y = _batch()
    expected = _direct_factors(_mlp(), x, y)

    # curvature-batch path (what train_network uses)
    model = _mlp()
    opt = KFAC(model, lr=0.1, fisher="empirical", kl_clip=None, momentum=0.0)
    opt.step(curvature_batch=(x, y), loss_fn=nn.CrossEntropyLoss())
    # plain loop path (hooks on the user's forward/backward)
    model_p = _mlp()
    opt_p = KFAC(model_p, lr=0.1, fisher="empirical", kl_clip=None, momentum=0.0)
    nn.functional.cross_entropy(model_p(x), y).backward()
    opt_p.step()
    for layer, (A_ref, G_ref) in zip((0, 2), expected):
        for o, m in ((opt, model), (opt_p, model_p)):
            A, G = o.factors(m[layer])
            np.testing.assert_allclose(A.numpy(), A_ref, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(G.numpy(), G_ref, rtol=1e-10, atol=1e-14)


def _pi_inverses(A: np.ndarray, G: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    pi = math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    root = math.sqrt(damping)
    A_d = A + pi * root * np.eye(A.shape[0])
    G_d = G + root / pi * np.eye(G.shape[0])
    return A_d, G_d


def test_step_equals_the_kronecker_inverse_formula() -> None:
    """p <- p - lr * G_d^{-1} [dW, db] A_d^{-1} with the pi-split damping, dense check."""
    x, y = _batch()
    damping, lr = 0.05, 0.3
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = KFAC(model, lr=lr, damping=damping, fisher="empirical", kl_clip=None, momentum=0.0)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for k, layer in enumerate((0, 2)):
        A, G = (t.numpy() for t in opt.factors(model[layer]))
        A_d, G_d = _pi_inverses(A, G, damping)
        M = np.concatenate([grads[2 * k].numpy(), grads[2 * k + 1].numpy()[:, None]], axis=1)
        # (A_d kron G_d)^{-1} vec(M), with the dense Kronecker product (column-major vec)
        vec = np.linalg.solve(np.kron(A_d, G_d), M.reshape(-1, order="F"))
        V = vec.reshape(M.shape, order="F")
        np.testing.assert_allclose(V, np.linalg.solve(G_d, M) @ np.linalg.inv(A_d), rtol=1e-9)
        W_new = model[layer].weight.detach().numpy()
        b_new = model[layer].bias.detach().numpy()
        np.testing.assert_allclose(W_new, before[2 * k].numpy() - lr * V[:, :-1], rtol=1e-10)
        np.testing.assert_allclose(b_new, before[2 * k + 1].numpy() - lr * V[:, -1], rtol=1e-10)


def test_kl_clip_scales_the_step() -> None:
    x, y = _batch()
    damping, lr, kappa = 0.05, 0.3, 1e-6

    def one_step(kl_clip: float | None) -> tuple[list[torch.Tensor], float]:
        model = _mlp()
        start = [p.detach().clone() for p in model.parameters()]
        opt = KFAC(model, lr=lr, damping=damping, fisher="empirical", kl_clip=kl_clip, momentum=0)
        nn.functional.cross_entropy(model(x), y).backward()
        vg = 0.0
        opt.step()
        for layer in (0, 2):
            m = model[layer]
            A, G = (t.numpy() for t in opt.factors(m))
            A_d, G_d = _pi_inverses(A, G, damping)
            M = np.concatenate([m.weight.grad.numpy(), m.bias.grad.numpy()[:, None]], axis=1)
            V = np.linalg.solve(G_d, M) @ np.linalg.inv(A_d)
            vg += float((V * M).sum())
        deltas = [p.detach() - s for p, s in zip(model.parameters(), start)]
        return deltas, vg

    free, vg = one_step(None)
    clipped, _ = one_step(kappa)
    nu = min(1.0, math.sqrt(kappa / (lr * lr * vg)))
    assert nu < 1.0
    for d_free, d_clip in zip(free, clipped):
        torch.testing.assert_close(d_clip, nu * d_free, rtol=1e-9, atol=1e-15)


def test_mc_fisher_matches_the_true_fisher_of_the_last_layer() -> None:
    """E over sampled labels of g g^T for cross-entropy is diag(p) - p p^T (per sample)."""
    x, _ = _batch(n=8)
    reps = 1500
    xr = x.repeat(reps, 1)
    model = _mlp()
    opt = KFAC(model, lr=0.1, fisher="mc", seed=3)
    opt.step(
        curvature_batch=(xr, torch.zeros(xr.shape[0], dtype=torch.long)),
        loss_fn=nn.CrossEntropyLoss(),
    )
    with torch.no_grad():
        p = torch.softmax(model[2](torch.tanh(model[0](x))), dim=1).numpy()
    G_true = np.mean([np.diag(pn) - np.outer(pn, pn) for pn in p], axis=0)
    _, G = opt.factors(model[2])
    np.testing.assert_allclose(G.numpy(), G_true, atol=0.1 * np.abs(G_true).max())


def test_mc_fisher_for_mse_has_the_output_hessian_scale() -> None:
    """l_n = |f_n - y_n|^2 / D has output Hessian (2/D) I, so E[g g^T] = (2/D) I."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(3, 2).to(DT)
    x = torch.randn(20000, 3, generator=gen, dtype=DT)
    opt = KFAC(lin, lr=0.1, fisher="mc")
    # the parameters do not matter: the gradient w.r.t. the output is the sampled noise
    opt.step(curvature_batch=(x, torch.zeros(20000, 2, dtype=DT)), loss_fn=nn.MSELoss())
    _, G = opt.factors(lin)
    np.testing.assert_allclose(G.numpy(), np.eye(2), atol=0.05)


def test_mc_fisher_for_bce_has_the_output_hessian_scale() -> None:
    """l_n = (1/C) sum_c bce has output Hessian diag(s(1-s))/C; at zero logits 0.25/C I."""
    lin = nn.Linear(3, 4).to(DT)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    x = torch.randn(20000, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    opt = KFAC(lin, lr=0.1, fisher="mc")
    opt.step(curvature_batch=(x, torch.zeros(20000, 4, dtype=DT)), loss_fn=nn.BCEWithLogitsLoss())
    _, G = opt.factors(lin)
    np.testing.assert_allclose(G.numpy(), 0.25 / 4 * np.eye(4), atol=0.005)


def test_conv2d_factors_equal_the_patch_definition() -> None:
    """A = (1/N) sum_{n,t} a a^T over unfolded patches, G = (1/(N T)) sum_{n,t} g g^T."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2).to(DT)
    x = torch.randn(4, 2, 5, 5, generator=gen, dtype=DT)
    out = conv(x)
    loss = (out**2).mean()
    (gout,) = torch.autograd.grad(loss, out)
    A, G = kfac_factors(conv, x, gout, batch_size=4)
    xp = nn.functional.pad(x, (1, 1, 1, 1))
    N, T = 4, out.shape[2] * out.shape[3]
    A_ref = np.zeros((19, 19))
    G_ref = np.zeros((3, 3))
    for n in range(N):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                patch = xp[n, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1).numpy()
                a = np.concatenate([patch, [1.0]])
                A_ref += np.outer(a, a)
                g = N * gout[n, :, i, j].numpy()
                G_ref += np.outer(g, g)
    np.testing.assert_allclose(A.numpy(), A_ref / N, rtol=1e-12)
    np.testing.assert_allclose(G.numpy(), G_ref / (N * T), rtol=1e-12)
    # padding='same' (symmetric) is unfolded like the equivalent integer padding
    same = nn.Conv2d(2, 3, kernel_size=3, padding="same").to(DT)
    one = nn.Conv2d(2, 3, kernel_size=3, padding=1).to(DT)
    g = torch.ones(4, 3, 5, 5, dtype=DT)
    torch.testing.assert_close(kfac_factors(same, x, g, 4)[0], kfac_factors(one, x, g, 4)[0])


def test_curvature_pass_leaves_batchnorm_buffers_and_grads_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    x = torch.randn(6, 1, 6, 6, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    opt = KFAC(model, lr=0.01)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    buffers = [b.clone() for b in model.buffers()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt._dedicated_pass((x, y), nn.CrossEntropyLoss())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_intervals_and_running_average() -> None:
    x, y = _batch()
    x2, y2 = _batch(seed=7)
    model = _mlp()
    opt = KFAC(
        model, lr=0.01, fisher="empirical", stat_decay=0.5, factor_update_freq=2, inv_update_freq=3
    )
    loss = nn.CrossEntropyLoss()
    batches = [(x, y), (x2, y2), (x2, y2)]
    history = []
    for xb, yb in batches:
        opt.zero_grad()
        loss(model(xb), yb).backward()
        opt.step(curvature_batch=(xb, yb), loss_fn=loss)
        A, _ = opt.factors(model[0])
        history.append((A.clone(), opt.damped_inverses(model[0])[0].clone()))
    assert torch.equal(history[0][0], history[1][0])  # step 1: no factor update
    # step 2: A = 0.5 A_0 + 0.5 A(x2)
    A_x2 = torch.cat([x2, torch.ones(16, 1, dtype=DT)], 1)
    torch.testing.assert_close(history[2][0], 0.5 * history[0][0] + 0.5 * A_x2.T @ A_x2 / 16)
    assert torch.equal(history[0][1], history[2][1])  # inverses only at step 0 and 3


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_resumes_bit_identically_with_mc_sampling() -> None:
    x, y = _batch(n=32)
    loss = nn.CrossEntropyLoss()
    kwargs = {"lr": 0.05, "factor_update_freq": 2, "inv_update_freq": 3, "seed": 5}

    def run(model: nn.Module, opt: KFAC, steps: range) -> None:
        for s in steps:
            idx = torch.arange(8) + 8 * (s % 4)
            opt.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            opt.step(curvature_batch=(x[idx], y[idx]), loss_fn=loss)

    model = _mlp()
    opt = KFAC(model, **kwargs)  # type: ignore[arg-type]
    run(model, opt, range(5))
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    run(model, opt, range(5, 11))

    model2 = _mlp(seed=9)
    model2.load_state_dict(saved_model)
    opt2 = KFAC(model2, **kwargs)  # type: ignore[arg-type]
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, range(5, 11))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_errors() -> None:
    model = _mlp()
    with pytest.raises(TypeError, match="'model'"):
        KFAC(list(model.parameters()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'fisher'"):
        KFAC(model, fisher="exact")
    opt = KFAC(model, fisher="mc")
    with pytest.raises(ValueError, match="'curvature_batch'"):
        opt.step()
    x, y = _batch()
    with pytest.raises(ValueError, match="'loss_fn'"):
        opt.step(curvature_batch=(x, y), loss_fn=nn.NLLLoss())


@pytest.mark.parametrize("dedicated", [True, False])
def test_in_place_activation_after_a_layer_does_not_change_its_factors(dedicated: bool) -> None:
    """G is built from dL/ds of the layer's own output, even if ReLU(inplace=True) follows."""
    x, y = _batch()

    def factors(inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = _mlp()
        model[1] = nn.ReLU(inplace=inplace)
        opt = KFAC(model, lr=0.1, fisher="empirical", kl_clip=None, momentum=0.0)
        if dedicated:
            opt.step(curvature_batch=(x, y), loss_fn=nn.CrossEntropyLoss())
        else:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return opt.factors(model[0])

    (A0, G0), (A1, G1) = factors(False), factors(True)
    assert torch.equal(A0, A1)
    torch.testing.assert_close(G1, G0, rtol=1e-12, atol=1e-15)
    assert float(G0.abs().max()) > 0


def test_dilated_bias_free_conv_factors_and_grouped_conv_on_plain_gradients() -> None:
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(2, 3, kernel_size=2, dilation=2, padding=1, bias=False).to(DT)
    x = torch.randn(3, 2, 5, 5, generator=gen, dtype=DT)
    out = conv(x)
    (gout,) = torch.autograd.grad((out**3).mean(), out)
    A, G = kfac_factors(conv, x, gout, batch_size=3)
    xp = nn.functional.pad(x, (1, 1, 1, 1))
    A_ref, G_ref = np.zeros((8, 8)), np.zeros((3, 3))
    for n in range(3):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                a = xp[n, :, i : i + 3 : 2, j : j + 3 : 2].reshape(-1).numpy()  # no bias column
                A_ref += np.outer(a, a)
                g = 3 * gout[n, :, i, j].numpy()
                G_ref += np.outer(g, g)
    T = out.shape[2] * out.shape[3]
    np.testing.assert_allclose(A.numpy(), A_ref / 3, rtol=1e-12)
    np.testing.assert_allclose(G.numpy(), G_ref / (3 * T), rtol=1e-12)

    # a grouped convolution is not Kronecker-factored: momentum-free SGD on its gradient
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).to(DT)
    xb = torch.randn(4, 2, 5, 5, generator=gen, dtype=DT)
    yb = torch.randint(0, 3, (4,), generator=gen)
    opt = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None)
    assert opt._layers == [model[2], model[4]]
    before = [p.detach().clone() for p in model[0].parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(xb), yb).backward()
    grads = [p.grad.clone() for p in model[0].parameters()]
    opt.step(curvature_batch=(xb, yb), loss_fn=nn.CrossEntropyLoss())
    for p, p0, g in zip(model[0].parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g, rtol=1e-14, atol=1e-15)
    assert opt.factors(model[2])[0].shape == (4 * 9, 4 * 9)


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: nn.Module):
    """[dl_n/dW, dl_n/db] (out x (in*k*k + 1)) for each sample, one at a time."""
    rows = []
    for n in range(x.shape[0]):
        loss_n = nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
        gw, gb = torch.autograd.grad(loss_n, [layer.weight, layer.bias])
        rows.append(torch.cat([gw.reshape(gw.shape[0], -1), gb[:, None]], dim=1))
    return rows


@pytest.mark.parametrize("stat_decay", [0.0, 0.5])
def test_ekfac_scalings_are_the_fisher_diagonal_in_the_kronecker_eigenbasis(
    stat_decay: float,
) -> None:
    """S = mean_n (U_G^T grad_n U_A)^2 (blended with K-FAC's lambda_G lambda_A^T after a
    basis update), and the step is U_G [(U_G^T M U_A) / (S + damping)] U_A^T."""
    from nets.optim.kfac import EKFAC

    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    ).to(DT)
    x = torch.randn(6, 2, 4, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=gen)
    damping, lr = 0.1, 0.2
    layers = (model[0], model[3])
    before = [p.detach().clone() for p in model.parameters()]
    per_sample = {id(m): _per_sample_grads(model, x, y, m) for m in layers}
    opt = EKFAC(
        model, lr=lr, damping=damping, fisher="empirical", stat_decay=stat_decay, kl_clip=None
    )
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step(curvature_batch=(x, y), loss_fn=nn.CrossEntropyLoss())
    for k, layer in enumerate(layers):
        A, G = opt.factors(layer)
        U_A, U_G, S = opt.eigenbasis(layer)
        lam_a, lam_g = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G)
        torch.testing.assert_close(A @ U_A, U_A * lam_a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(G @ U_G, U_G * lam_g, rtol=1e-9, atol=1e-12)
        S_batch = torch.stack([(U_G.T @ g @ U_A) ** 2 for g in per_sample[id(layer)]]).mean(0)
        kfac_diagonal = torch.outer(lam_g.clamp_min(0), lam_a.clamp_min(0))
        expected_S = stat_decay * kfac_diagonal + (1 - stat_decay) * S_batch
        torch.testing.assert_close(S, expected_S, rtol=1e-9, atol=1e-14)
        if stat_decay == 0.0:
            # the diagonal of the dense per-sample Fisher in the basis U_A (x) U_G
            vecs = torch.stack([g.T.reshape(-1) for g in per_sample[id(layer)]])  # vec = col-major
            fisher = vecs.T @ vecs / vecs.shape[0]
            basis = torch.kron(U_A, U_G)
            diag = torch.diagonal(basis.T @ fisher @ basis)
            torch.testing.assert_close(S.T.reshape(-1), diag, rtol=1e-9, atol=1e-14)
        M = torch.cat(
            [grads[2 * k].reshape(grads[2 * k].shape[0], -1), grads[2 * k + 1][:, None]], 1
        )
        V = U_G @ ((U_G.T @ M @ U_A) / (S + damping)) @ U_A.T
        W_new = torch.cat(
            [layer.weight.detach().reshape(M.shape[0], -1), layer.bias.detach()[:, None]], 1
        )
        W_old = torch.cat([before[2 * k].reshape(M.shape[0], -1), before[2 * k + 1][:, None]], 1)
        torch.testing.assert_close(W_new, W_old - lr * V, rtol=1e-10, atol=1e-13)


def test_ekfac_state_dict_resumes_bit_identically() -> None:
    from nets.optim import get_optimizer

    x, y = _batch(n=32)
    loss = nn.CrossEntropyLoss()
    kwargs = {"lr": 0.05, "factor_update_freq": 2, "inv_update_freq": 3, "seed": 5}

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for s in steps:
            idx = torch.arange(8) + 8 * (s % 4)
            opt.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            opt.step(curvature_batch=(x[idx], y[idx]), loss_fn=loss)

    model = _mlp()
    opt = get_optimizer("ekfac", model, **kwargs)
    run(model, opt, range(4))
    saved_model, saved_opt = _roundtrip(model.state_dict()), _roundtrip(opt.state_dict())
    assert "S" in saved_opt["state"][0] and "U_A" in saved_opt["state"][0]
    run(model, opt, range(4, 9))
    model2 = _mlp(seed=9)
    model2.load_state_dict(saved_model)
    opt2 = get_optimizer("EKFAC", model2, **kwargs)
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, range(4, 9))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="'module'"):
        opt2.damped_inverses(model2[0])  # E-KFAC has an eigenbasis, not K-FAC inverses
