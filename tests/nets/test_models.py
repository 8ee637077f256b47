"""Model zoo: parameter counts, forward shapes on 8x8 and 32x32, seeded init, errors."""

from __future__ import annotations

import pytest
import torch

from nets.models import (
    MLP,
    VGG,
    LeNet5,
    PreResNet,
    SmallCNN,
    WideResNet,
    available_models,
    get_model,
    model_spec,
)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg16_cifar100_has_the_papers_parameter_count():
    assert count(get_model("VGG16", num_classes=100)) == 15_291_300


def test_vgg_bn_adds_two_parameters_per_channel():
    channels = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512
    assert count(get_model("VGG16BN", num_classes=100)) == 15_291_300 + 2 * channels


def test_vgg16_forward_on_32x32():
    net = get_model("vgg16", num_classes=100).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_vgg_refuses_8x8_with_a_clear_error():
    with pytest.raises(ValueError, match=r"input_size.*32"):
        get_model("VGG11", num_classes=10, in_channels=1, input_size=8)
    net = VGG(11)
    with pytest.raises(ValueError, match=r"32x32"):
        net(torch.zeros(1, 3, 16, 16))


def test_known_parameter_counts():
    # classic LeNet-5 on 32x32 grey-scale images, 10 classes
    assert count(LeNet5(10, 1, 32)) == 61_706
    assert count(SmallCNN(10, 1, 8)) == 1_946
    assert count(MLP(10, 1, 8, hidden=(16,))) == 64 * 16 + 16 + 16 * 10 + 10
    # WRN-28-10 for CIFAR-10: the bias-free original has 36,479,194 parameters; the SWA
    # code (and ours) adds conv biases: 10,096 more
    assert count(get_model("WideResNet28x10", num_classes=10)) == 36_479_194 + 10_096
    assert count(get_model("PreResNet20", num_classes=10)) == 272_282


SMALL_MODELS = ["MLP", "LeNet5", "SmallCNN", "PreResNet8", "PreResNet20"]


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_forward_shapes_on_both_input_sizes(name, channels, size):
    net = get_model(name, num_classes=7, in_channels=channels, input_size=size)
    out = net(torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_deep_resnets_and_wide_resnet_forward_shapes():
    assert PreResNet(56, 10, 1, 8)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert count(PreResNet(110, 10)) > count(PreResNet(56, 10))
    small_wrn = WideResNet(10, 2, num_classes=5, in_channels=3)
    assert small_wrn(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    assert small_wrn(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


def test_every_registered_name_builds():
    names = available_models()
    assert {"VGG16", "VGG16BN", "PreResNet110", "WideResNet28x10", "MLP", "LeNet5"} <= set(names)
    for name in names:
        if name.startswith(("VGG", "WideResNet")):
            continue  # built in the dedicated tests above (large)
        assert isinstance(
            get_model(name, num_classes=3, in_channels=2, input_size=8), torch.nn.Module
        )


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a = get_model("PreResNet8", num_classes=10, in_channels=1, input_size=8, seed=3)
    b = get_model("PreResNet8", num_classes=10, in_channels=1, input_size=8, seed=3)
    c = get_model("PreResNet8", num_classes=10, in_channels=1, input_size=8, seed=4)
    assert torch.equal(before, torch.get_rng_state())
    for (_, pa), (_, pb), (_, _pc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items()
    ):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    # he-normal convolutions: std sqrt(2 / (9 * 16))
    std = a.conv1.weight.detach().std().item()
    assert 0.5 * (2 / 144) ** 0.5 < std < 1.5 * (2 / 144) ** 0.5


def test_model_spec_records_the_construction_arguments():
    net = get_model("mlp", num_classes=4, in_channels=1, input_size=8, hidden=(5,), seed=2)
    spec = model_spec(net)
    assert spec == {
        "model": "MLP",
        "num_classes": 4,
        "in_channels": 1,
        "input_size": 8,
        "model_kwargs": {"hidden": (5,)},
        "model_seed": 2,
    }


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match=r"Argument 'model'.*VGG16"):
        get_model("ResNet9000")
    with pytest.raises(TypeError, match=r"Argument 'model'"):
        get_model(16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Argument 'depth'"):
        PreResNet(21)
    with pytest.raises(ValueError, match=r"Argument 'num_classes'"):
        get_model("MLP", num_classes=0)
    with pytest.raises(ValueError, match=r"Argument 'input_size'"):
        LeNet5(10, 1, 10)
    with pytest.raises(ValueError, match=r"Argument 'x'.*3, H, W"):
        SmallCNN(10, 3, 8)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"Argument 'activation'"):
        MLP(activation="swish")


@pytest.mark.parametrize(
    "name",
    # WRN: small one above; gpt-tiny takes token ids (tests/nets/test_gpt.py)
    [n for n in available_models() if n not in ("WideResNet28x10", "gpt-tiny")],
)
def test_every_registered_model_on_8x8_and_32x32_or_a_clear_error(name):
    for channels, size in ((1, 8), (3, 32)):
        if name.startswith("VGG") and size != 32:
            with pytest.raises(ValueError, match=r"Argument 'input_size'.*32.*8x8"):
                get_model(name, num_classes=5, in_channels=channels, input_size=size)
            continue
        net = get_model(name, num_classes=5, in_channels=channels, input_size=size).eval()
        with torch.no_grad():
            assert net(torch.zeros(2, channels, size, size)).shape == (2, 5), (name, size)
        with pytest.raises(ValueError, match=r"Argument 'x'"):
            net(torch.zeros(2, channels + 1, size, size))  # wrong number of channels
