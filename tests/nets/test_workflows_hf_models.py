"""The nets workflows on models with dict inputs and structured outputs (Hugging Face style).

``compute_loss_stats``, ``build_loss_landscape`` and ``compute_eigenspectrum`` take the batch
and output forms the curvature operators take (:mod:`curvops.model_io`): a DataLoader of
``({"input_ids", "attention_mask"}, labels)`` batches with ``-100`` padding, a tiny random
GPT-2 returning a ``ModelOutput`` and a tiny plain model returning a dict (its scores chosen
with ``output_fn=``).  The numbers are checked against losses computed here by hand (the mean
over counted tokens) and, for the plain model, against ``numpy.linalg.eigvalsh`` of the dense
float64 Hessian of the flattened parameters.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from curvops.losses import sequence_cross_entropy
from nets import build_loss_landscape, compute_eigenspectrum, compute_loss_stats

VOCAB, T, N = 11, 6, 6


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded sequences: ids, attention mask and next-token labels (-100: not counted)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    lengths = torch.tensor([6, 3, 5, 2, 6, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids * mask  # padded ids are 0 (never seen by counted positions)
    labels = torch.full((N, T), -100)
    labels[:, :-1] = ids[:, 1:]
    labels[mask.roll(-1, 1).bool().logical_not() | ~mask.bool()] = -100  # next token padded
    labels[:, -1] = -100
    return ids, mask, labels


class Tokens(Dataset[Any]):
    def __init__(self) -> None:
        self.ids, self.mask, self.labels = _tokens()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


def loader() -> DataLoader[Any]:
    return DataLoader(Tokens(), batch_size=2)  # 3 batches with unequal counted tokens


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        use_cache=False,
    )  # fmt: skip
    with _seeded(0):
        return transformers.GPT2LMHeadModel(config).double().eval()


class DictLM(nn.Module):
    """Keyword inputs, a dict output: ``{"features", "scores"}`` (no ``logits`` key)."""

    def __init__(self) -> None:
        super().__init__()
        with _seeded(1):
            self.emb = nn.Embedding(VOCAB, 2)
            self.head = nn.Linear(2, VOCAB)
        self.double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
        e = self.emb(input_ids) * attention_mask[..., None]
        context = e.cumsum(dim=1) / torch.arange(1, input_ids.shape[1] + 1)[None, :, None]
        h = torch.tanh(e + context)
        return {"features": h, "scores": self.head(h)}


select_scores = operator.itemgetter("scores")


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, select: Any) -> Any:
    return select(model(input_ids=ids, attention_mask=mask))


def hand_loss(model: nn.Module, select: Callable[[Any], torch.Tensor]) -> tuple[float, list[Any]]:
    """The mean next-token loss over the counted tokens of all batches, and per batch
    ``(mean loss, counted tokens)``, computed without the workflows."""
    total, count, per_batch = 0.0, 0, []
    with torch.no_grad():
        for inputs, labels in loader():
            logits = _logits(model, inputs["input_ids"], inputs["attention_mask"], select)
            nll = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
            counted = labels.reshape(-1) != -100
            s, c = float(nll[counted].sum()), int(counted.sum())
            total, count = total + s, count + c
            per_batch.append((s / c, c))
    return total / count, per_batch


def flat_loss(model: nn.Module, select: Callable[[Any], torch.Tensor]) -> Any:
    """The mean loss over all counted tokens as a function of the flat parameters."""
    named = list(model.named_parameters())
    ids, mask, labels = _tokens()

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts, start = {}, 0
        for name, p in named:
            parts[name] = theta[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        out = torch.func.functional_call(
            model, parts, (), {"input_ids": ids, "attention_mask": mask}
        )
        return F.cross_entropy(select(out).reshape(-1, VOCAB), labels.reshape(-1))

    return f, torch.cat([p.detach().reshape(-1) for _, p in named])


LOGITS = operator.attrgetter("logits")


def test_gpt2_loss_stats_match_the_mean_over_counted_tokens() -> None:
    model = gpt2()
    ref, per_batch = hand_loss(model, LOGITS)
    stats = compute_loss_stats(
        loader(), model=model, loss_fn=sequence_cross_entropy(), device="cpu", frobenius_probes=1
    )
    assert stats["loss_mean"][0] == pytest.approx(ref, rel=1e-12)
    assert stats["train_loss"][0] == pytest.approx(ref, rel=1e-12)
    losses = np.array([b[0] for b in per_batch])
    weights = np.array([b[1] for b in per_batch], dtype=np.float64)
    weights /= weights.sum()
    assert stats["loss_var"][0] == pytest.approx(float(weights @ (losses - ref) ** 2), rel=1e-9)
    # the mean gradient is the gradient of the loss over all counted tokens
    f, theta0 = flat_loss(model, LOGITS)
    theta = theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta)
    assert stats["grad_mean_norm_sq"][0] == pytest.approx(float(g @ g), rel=1e-10)
    assert int(stats["num_samples"][0]) == N and int(stats["num_batches"][0]) == 3
    assert np.isfinite(stats["frobenius_norm_sq"][0]) and np.isnan(stats["train_acc"][0])
    # output_fn= is passed to the statistics and the metrics alike
    again = compute_loss_stats(
        loader(), model=model, loss_fn=sequence_cross_entropy(), device="cpu",
        frobenius_probes=0, output_fn=LOGITS,
    )  # fmt: skip
    assert again["loss_mean"][0] == stats["loss_mean"][0]
    assert again["grad_mean_norm_sq"][0] == stats["grad_mean_norm_sq"][0]


def test_gpt2_landscape_centre_and_a_point_match_the_hand_computed_loss() -> None:
    model = gpt2()
    ref, _ = hand_loss(model, LOGITS)
    P = sum(p.numel() for p in model.parameters())
    direction = np.random.default_rng(0).standard_normal(P) / np.sqrt(P)
    land = build_loss_landscape(
        loader(), model=model, loss_fn=sequence_cross_entropy(), device="cpu",
        directions=[direction], dist=0.5, n_points=3,
    )  # fmt: skip
    assert land.checkpoint_loss == pytest.approx(ref, rel=1e-12)
    assert land.train_loss[0, 1] == pytest.approx(ref, rel=1e-12)
    f, theta0 = flat_loss(model, LOGITS)
    with torch.no_grad():
        at_end = float(f(theta0 + 0.5 * torch.as_tensor(direction)))
    assert land.train_loss[0, 2] == pytest.approx(at_end, rel=1e-10)
    assert np.isnan(land.train_acc).all()


def test_gpt2_eigenspectrum_takes_output_fn() -> None:
    model = gpt2()
    kwargs: dict[str, Any] = {
        "model": model, "loss_fn": sequence_cross_entropy(), "device": "cpu",
        "lanczos_iters": 3, "curvature_matrix": "ggn",
    }  # fmt: skip
    plain = compute_eigenspectrum(loader(), **kwargs)
    chosen = compute_eigenspectrum(loader(), output_fn=LOGITS, **kwargs)
    np.testing.assert_array_equal(chosen.values, plain.values)
    assert chosen.config["output_fn"] == "operator.attrgetter('logits')"


def test_dict_model_eigenspectrum_equals_the_dense_hessian_eigenvalues() -> None:
    model = DictLM()
    f, theta0 = flat_loss(model, select_scores)
    H = torch.autograd.functional.hessian(f, theta0).numpy()
    exact = np.linalg.eigvalsh(H)
    P = theta0.numel()
    result = compute_eigenspectrum(
        loader(), model=model, loss_fn=sequence_cross_entropy(), device="cpu",
        lanczos_iters=P - 4, output_fn=select_scores,
    )  # fmt: skip
    ritz = np.sort(result.values)
    scale = np.abs(exact).max()
    assert abs(ritz[-1] - exact[-1]) <= 1e-8 * scale
    assert abs(ritz[-2] - exact[-2]) <= 1e-8 * scale
    assert abs(ritz[0] - exact[0]) <= 1e-8 * scale
    # without output_fn the dict's first tensor ("features", 2 columns) is taken: refused
    with pytest.raises(ValueError, match=r"model's 2 output classes"):
        compute_eigenspectrum(
            loader(), model=model, loss_fn=sequence_cross_entropy(), device="cpu", lanczos_iters=2
        )


def test_dict_model_loss_stats_and_landscape_match_dense_references() -> None:
    model = DictLM()
    ref, _ = hand_loss(model, select_scores)
    f, theta0 = flat_loss(model, select_scores)
    H = torch.autograd.functional.hessian(f, theta0).numpy()
    z = np.random.default_rng(4).standard_normal(theta0.numel())
    zu = z / np.linalg.norm(z)
    stats = compute_loss_stats(
        loader(), model=model, loss_fn=sequence_cross_entropy(), device="cpu",
        direction=z, frobenius_probes=2, seed=1, output_fn=select_scores,
    )  # fmt: skip
    assert stats["loss_mean"][0] == pytest.approx(ref, rel=1e-12)
    assert stats["train_loss"][0] == pytest.approx(ref, rel=1e-12)
    assert stats["hess_mu"][0] == pytest.approx(float(zu @ H @ zu), rel=1e-9)
    Hz = H @ zu
    assert stats["hess_mean_norm_sq"][0] == pytest.approx(float(Hz @ Hz), rel=1e-9)
    R = np.random.default_rng(1).choice(np.array([-1.0, 1.0]), size=(theta0.numel(), 2))
    assert stats["frobenius_norm_sq"][0] == pytest.approx(
        float(((H @ R) ** 2).sum(0).mean()), rel=1e-9
    )
    land = build_loss_landscape(
        loader(), model=model, loss_fn=sequence_cross_entropy(), device="cpu",
        random_directions=1, dist=0.25, n_points=3, output_fn=select_scores,
    )  # fmt: skip
    assert land.checkpoint_loss == pytest.approx(ref, rel=1e-12)
    assert land.config["output_fn"] == "operator.itemgetter('scores')"


class DictBN(nn.Module):
    """Keyword inputs through BatchNorm, a dict output with ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        with _seeded(2):
            self.lin = nn.Linear(3, 4)
            self.bn = nn.BatchNorm1d(4)
            self.out = nn.Linear(4, 3)
        self.double()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.out(torch.tanh(self.bn(self.lin(x) * scale)))}


def test_dict_inputs_with_refresh_bn_and_dict_batches_refused_by_name() -> None:
    g = torch.Generator().manual_seed(6)
    x, scale = torch.randn(8, 3, generator=g), 1.0 + torch.rand(8, 1, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    batches = [({"x": x[i : i + 4], "scale": scale[i : i + 4]}, y[i : i + 4]) for i in (0, 4)]
    data = DataLoader(batches, batch_size=None)
    model = DictBN().eval()
    with torch.no_grad():
        out = model(x=x.double(), scale=scale.double())["logits"]
    ref = float(F.cross_entropy(out, y))
    acc = 100.0 * float((out.argmax(1) == y).double().mean())
    land = build_loss_landscape(
        data, model=model, device="cpu", random_directions=1, dist=0.1, n_points=3,
        refresh_bn=True,
    )  # fmt: skip
    assert land.checkpoint_loss == pytest.approx(ref, rel=1e-12)
    assert land.checkpoint_acc == pytest.approx(acc)
    assert np.isfinite(land.train_loss).all()
    # a DataLoader of dict batches: the operators' error, naming the argument and batch
    bad = DataLoader([{"x": x, "label": y}], batch_size=None)
    with pytest.raises(ValueError, match=r"'dataset \(batch 0\)'.*'label'"):
        build_loss_landscape(bad, model=model, device="cpu", random_directions=1, n_points=3)
