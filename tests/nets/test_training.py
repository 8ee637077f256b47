"""train_network: loss decreases, exact resume, files, SWA, optimiser protocol, registry."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nets.checkpoint import load_checkpoint, model_from_checkpoint
from nets.data import load_dataset, make_loader
from nets.models import get_model
from nets.optim.registry import available_optimizers, get_optimizer, register_optimizer
from nets.training import evaluate, train_network
from spectral.errors import NumericalError

SGD = {"lr": 0.05, "momentum": 0.9}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def run(tmp, digits, **kw):
    options = {
        "dataset": digits,
        "model": "SmallCNN",
        "optimizer_kwargs": dict(SGD),
        "batch_size": 128,
        "progress": False,
        "device": "cpu",
    }
    options.update(kw)
    return train_network(tmp, **options)


def test_one_epoch_lowers_the_training_loss(tmp_path, digits):
    net = get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8)
    loader = make_loader(digits.train_eval, 256, shuffle=False)
    before = evaluate(net, loader, torch.nn.CrossEntropyLoss())["loss"]
    result = run(tmp_path, digits, model=net, epochs=1)
    after = evaluate(result.model, loader, torch.nn.CrossEntropyLoss())["loss"]
    assert after < 0.9 * before
    assert result.model is net


def test_resume_is_bit_identical_and_files_are_safe(tmp_path, digits):
    rng_before = torch.get_rng_state()
    full = run(tmp_path / "full", digits, epochs=4, save_freq=2)
    assert torch.equal(rng_before, torch.get_rng_state())  # caller's global RNG untouched
    run(tmp_path / "part", digits, epochs=2, save_freq=2)
    resumed = run(tmp_path / "part", digits, epochs=4, save_freq=2, resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint-00004.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint-00004.pt", weights_only=True)
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(
            state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]
        )
    strip = ("epoch_time", "peak_memory_mb")

    def losses(stats):
        return [{k: v for k, v in e.items() if k not in strip} for e in stats]

    assert losses(full.stats) == losses(resumed.stats)
    assert [p.name for p in full.checkpoints] == [
        "checkpoint-00000.pt",
        "checkpoint-00002.pt",
        "checkpoint-00004.pt",
    ]
    # stats.json: one machine-readable file per run
    stats = json.loads((tmp_path / "part" / "stats.json").read_text())
    assert [e["epoch"] for e in stats["epochs"]] == [1, 2, 3, 4]
    assert stats["config"]["model"] == "SmallCNN" and stats["config"]["dataset"] == "digits"
    entry = stats["epochs"][-1]
    for key in ("lr", "train_loss", "train_acc", "train_top5", "test_loss", "test_acc"):
        assert isinstance(entry[key], float)
    assert entry["test_top5"] >= entry["test_acc"]
    assert entry["epoch_time"] > 0 and entry["peak_memory_mb"] > 0
    # Eq. 8 schedule over 4 epochs: lr0, lr0, lr0 (t=0.5), then 0.5+0.25 -> decayed
    assert [e["lr"] for e in stats["epochs"]][:3] == [0.05, 0.05, 0.05]
    assert stats["epochs"][3]["lr"] < 0.05
    model, ckpt = model_from_checkpoint(tmp_path / "part" / "checkpoint-00004.pt")
    assert ckpt["epoch"] == 4 and type(model).__name__ == "SmallCNN"


def test_batch_size_inside_optimizer_kwargs_and_eval_freq(tmp_path, digits):
    result = run(
        tmp_path,
        digits,
        model="MLP",
        model_kwargs={"hidden": (16,)},
        optimizer="adam",
        optimizer_kwargs={"lr": 1e-3, "batch_size": 512},
        epochs=2,
        eval_freq=2,
        save_freq=None,
        schedule="constant",
    )
    assert result.config["batch_size"] == 512 and result.config["optimizer_kwargs"] == {"lr": 0.001}
    assert result.stats[0]["test_loss"] is None and result.stats[1]["test_loss"] is not None
    assert [e["lr"] for e in result.stats] == [1e-3, 1e-3]
    assert [p.name for p in result.checkpoints] == ["checkpoint-00000.pt", "checkpoint-00002.pt"]
    ckpt = load_checkpoint(result.checkpoints[-1])
    assert ckpt["config"]["model_kwargs"] == {"hidden": [16]}


class _CurvatureSGD(torch.optim.SGD):
    """Records the curvature batches it gets, then does an SGD step."""

    curvature_step = True

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[tuple[int, ...]] = []

    def step(self, closure=None, curvature_batch=None, loss_fn=None):
        assert closure is not None and loss_fn is not None
        self.seen.append(tuple(curvature_batch[0].shape))
        loss = closure()
        super().step()
        return loss


def test_curvature_step_protocol(tmp_path, digits):
    net = get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(8,))
    opt = _CurvatureSGD(net.parameters(), lr=0.1)
    result = run(
        tmp_path,
        digits,
        model=net,
        optimizer=opt,
        optimizer_kwargs=None,
        epochs=1,
        batch_size=256,
        curvature_batch_size=32,
    )
    assert len(opt.seen) == (len(digits.train) + 255) // 256
    assert all(shape == (32, 1, 8, 8) for shape in opt.seen)
    assert result.stats[0]["train_loss"] > 0
    ckpt = load_checkpoint(result.checkpoints[-1])
    assert ckpt["rng_state"]["curvature_loader"].dtype == torch.uint8


def test_swa_saves_averaged_checkpoints_with_recomputed_bn(tmp_path, digits):
    result = run(tmp_path, digits, epochs=3, swa=True, swa_start=1, swa_lr=0.01, save_freq=None)
    assert [p.name for p in result.swa_checkpoints] == ["swa-00003.pt"]
    swa_model, ckpt = model_from_checkpoint(result.swa_checkpoints[0])
    assert ckpt["n_averaged"] == 3
    assert [e["lr"] for e in result.stats] == [0.05, 0.01, 0.01]
    bn = swa_model.features[1]
    assert bn.running_var.ne(1).all()  # statistics recomputed, not the initial ones
    assert result.stats[-1]["swa_test_acc"] is not None
    # SWA + resume: the running average continues exactly (checkpoint-2 holds it)
    options = {"swa": True, "swa_start": 1, "swa_lr": 0.01, "save_freq": None}
    run(tmp_path / "part", digits, epochs=2, **options)
    resumed = run(tmp_path / "part", digits, epochs=3, resume=True, **options)
    a = load_checkpoint(result.swa_checkpoints[0])
    b = load_checkpoint(resumed.swa_checkpoints[0])
    assert a["n_averaged"] == b["n_averaged"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert resumed.stats[-1]["swa_test_loss"] == result.stats[-1]["swa_test_loss"]


def test_objects_regression_and_errors(tmp_path):
    synthetic = load_dataset("synthetic", kind="teacher_student", n_train=64, n_test=32, dim=3)
    result = train_network(
        tmp_path / "reg",
        synthetic,
        model="MLP",
        optimizer_kwargs={"lr": 0.05},
        epochs=1,
        batch_size=16,
        progress=False,
        device="cpu",
        model_kwargs={"hidden": (8,)},
    )
    assert result.stats[0]["train_acc"] is None and result.config["loss"] == "MSELoss"

    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 2
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    net = torch.nn.Linear(4, 2)
    net.eval()  # a model in eval mode is trained in training mode
    result = train_network(
        tmp_path / "obj",
        loader,
        model=net,
        optimizer_kwargs={"lr": 0.1},
        epochs=1,
        progress=False,
        device="cpu",
        loss_fn=torch.nn.MultiMarginLoss(),  # a loss object
    )
    assert result.stats[0]["test_loss"] is None and result.config["model"] is None
    assert result.config["loss"] == "MultiMarginLoss" and net.training
    with pytest.raises(ValueError, match="registered model"):
        model_from_checkpoint(result.checkpoints[-1])

    with torch.no_grad():
        net.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"epoch 1, batch 0"):
        train_network(
            tmp_path / "nan",
            loader,
            model=net,
            optimizer_kwargs={"lr": 0.1},
            epochs=1,
            progress=False,
            device="cpu",
        )
    with pytest.raises(ValueError, match="Argument 'epochs'"):
        train_network(tmp_path, loader, model=net, epochs=0)
    with pytest.raises(ValueError, match=r"Argument 'optimizer'.*SGD"):
        train_network(tmp_path, loader, model=net, optimizer="NoSuchOptimizer", epochs=1)
    with pytest.raises(ValueError, match="Argument 'model'"):
        train_network(tmp_path, loader, model="MLP", epochs=1)
    with pytest.raises(ValueError, match="Argument 'resume'"):
        train_network(tmp_path / "empty", loader, model=net, epochs=1, resume=True)


def test_optimizer_registry():
    net = torch.nn.Linear(2, 1)
    assert {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad"} <= set(available_optimizers())
    opt = get_optimizer("adamw", net, lr=0.01, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.1

    def factory(model, **kwargs):
        return torch.optim.SGD(model.parameters(), **kwargs)

    register_optimizer("_test_registry_sgd", factory)
    register_optimizer("_test_registry_sgd", factory)  # same factory again: no-op
    assert isinstance(get_optimizer("_TEST_REGISTRY_SGD", net, lr=1.0), torch.optim.SGD)
    with pytest.raises(ValueError, match="Argument 'name'"):
        register_optimizer("_test_registry_sgd", lambda model, **kw: factory(model, **kw))
    with pytest.raises(TypeError, match="Argument 'factory'"):
        register_optimizer("_x", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Argument 'optimizer'"):
        get_optimizer(3, net)  # type: ignore[arg-type]


def test_resolve_device_auto_picks_cuda_when_available(monkeypatch):
    from nets.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("AUTO") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"Argument 'device'.*CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"Argument 'device'"):
        resolve_device("gpu-please")
    with pytest.raises(TypeError, match=r"Argument 'device'"):
        resolve_device(0)  # type: ignore[arg-type]


def test_resume_with_a_users_shuffling_dataloader_is_bit_identical(tmp_path):
    """A DataLoader without a generator shuffles from the global RNG: forked, seeded, saved."""
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    )

    def train(directory, epochs, **kw):
        net = get_model("MLP", num_classes=3, in_channels=4, input_size=1, hidden=(8,))
        return train_network(
            tmp_path / directory,
            DataLoader(data, batch_size=16, shuffle=True),
            model=net.eval(),
            optimizer_kwargs={"lr": 0.1, "momentum": 0.9},
            epochs=epochs,
            save_freq=1,
            progress=False,
            device="cpu",
            **kw,
        )

    full = train("full", 2)
    train("part", 1)
    resumed = train("part", 2, resume=True)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert full.stats[-1]["train_loss"] == resumed.stats[-1]["train_loss"]


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1])
def test_a_bad_learning_rate_is_refused_before_the_run(tmp_path, digits, lr):
    with pytest.raises(ValueError, match=r"'lr': expected a finite, non-negative learning rate"):
        run(tmp_path, digits, epochs=1, optimizer_kwargs={**SGD, "lr": lr})
    assert not any(tmp_path.glob("checkpoint-*.pt"))
    net = get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8)
    opt = torch.optim.SGD(net.parameters(), lr=float("nan"))
    with pytest.raises(ValueError, match=r"'optimizer': expected a finite, non-negative"):
        run(tmp_path, digits, epochs=1, model=net, optimizer=opt, optimizer_kwargs=None)
