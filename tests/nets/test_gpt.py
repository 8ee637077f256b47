"""gpt-tiny, the offline text dataset and next-token cross-entropy."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from curvops import GGNOperator, HessianOperator
from curvops.losses import sequence_cross_entropy
from curvops.testing import dense_ggn, dense_hessian
from nets.data import load_dataset, make_loader
from nets.data.text import (
    CORPUS_SHA256,
    TokenDataset,
    corpus_bytes,
    load_text_splits,
)
from nets.models import GPT, get_model, model_spec


def test_gpt_tiny_size_tied_head_and_shapes():
    net = get_model("gpt-tiny", num_classes=256, in_channels=1, input_size=64)
    assert isinstance(net, GPT)
    # tied: the head's weight is the embedding, listed once by parameters()
    assert net.lm_head.weight is net.transformer["wte"].weight
    total = sum(p.numel() for p in net.parameters())
    d, v, t, layers = 128, 256, 64, 2
    per_block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    assert total == v * d + t * d + layers * per_block + 2 * d == 437_760
    assert 0.4e6 < total < 0.6e6
    assert "lm_head.weight" not in dict(net.named_parameters())
    with torch.no_grad():
        assert net(torch.zeros(3, 10, dtype=torch.long)).shape == (3, 10, 256)
    assert model_spec(net)["model"] == "gpt-tiny"


def test_gpt_init_is_seeded_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = GPT(seed=3), GPT(seed=3), GPT(seed=4)
    assert torch.equal(before, torch.get_rng_state())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer["wte"].weight, c.transformer["wte"].weight)
    w = a.transformer["h"][0].attn.q_proj.weight.detach()
    assert 0.9 * 0.02 < float(w.std()) < 1.1 * 0.02  # 16384 draws of N(0, 0.02^2)
    proj = a.transformer["h"][0].attn.c_proj.weight.detach()
    assert 0.9 * 0.01 < float(proj.std()) < 1.1 * 0.01  # 0.02 / sqrt(2 * 2 layers)


def test_gpt_is_causal():
    net = GPT(11, 1, 8, n_layer=2, n_head=2, d_model=8, seed=0).double().eval()
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 11
    with torch.no_grad():
        fx, fy = net(x), net(y)
    assert torch.equal(fx[:, :5], fy[:, :5])  # the past never sees the future
    assert not torch.allclose(fx[:, 5:], fy[:, 5:])


def test_gpt_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"Argument 'd_model'.*n_head=3"):
        GPT(d_model=16, n_head=3)
    with pytest.raises(ValueError, match=r"Argument 'dropout'"):
        GPT(dropout=1.0)
    net = GPT(11, 1, 8, n_layer=1, n_head=2, d_model=8)
    with pytest.raises(ValueError, match=r"Argument 'input_ids'.*T <= 8"):
        net(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Argument 'input_ids'.*integer"):
        net(torch.zeros(1, 4))


def test_corpus_is_the_frozen_unicode_name_table():
    text = corpus_bytes()
    assert hashlib.sha256(text).hexdigest() == CORPUS_SHA256
    lines = text.decode("ascii").split("\n")
    assert len(lines) == 7952 and len(text) == 214_459
    assert lines[:3] == ["SPACE", "EXCLAMATION MARK", "QUOTATION MARK"]
    assert "LATIN CAPITAL LETTER A" in lines


def test_text_splits_are_fixed_disjoint_and_shifted():
    train, test = load_text_splits(seq_len=16)
    count = (len(corpus_bytes()) - 1) // 16
    assert len(train) + len(test) == count and len(test) == count // 10
    tokens = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
    x, y = test[0]  # sequence 9 of the corpus
    assert torch.equal(x, tokens[9 * 16 : 10 * 16]) and torch.equal(y, tokens[9 * 16 + 1 : 161])
    x, y = train[9]  # sequence 10 (9 went to the test set)
    assert torch.equal(x, tokens[160:176])
    again, _ = load_text_splits(seq_len=16)
    assert torch.equal(again.sequences, train.sequences)
    small_train, small_test = load_text_splits(seq_len=16, max_sequences=20)
    assert (len(small_train), len(small_test)) == (18, 2)
    with pytest.raises(ValueError, match=r"Argument 'max_sequences'"):
        load_text_splits(seq_len=16, max_sequences=5)
    with pytest.raises(ValueError, match=r"Argument 'sequences'"):
        TokenDataset(torch.zeros(3, 1, dtype=torch.long))


def test_load_dataset_text_and_its_batches():
    splits = load_dataset("text")
    assert (splits.name, splits.num_classes, splits.input_shape, splits.task) == (
        "text",
        256,
        (64,),
        "language_modeling",
    )
    x, y = next(iter(make_loader(splits.train, 4, shuffle=True, seed=0)))
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    net = get_model("gpt-tiny", splits.num_classes, splits.in_channels, splits.input_size)
    with torch.no_grad():
        loss = sequence_cross_entropy()(net(x), y)
    # near-uniform predictions at initialisation (logits of standard deviation
    # ~ 0.02 * sqrt(128) ~ 0.23): loss slightly above log 256, perplexity ~ 256
    assert math.log(256) < float(loss) < math.log(256) + 0.3


def test_next_token_cross_entropy_is_the_mean_over_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 3), generator=g)
    logp = torch.log_softmax(logits, dim=-1)
    want = -sum(logp[b, t, targets[b, t]] for b in range(2) for t in range(3)) / 6
    got = sequence_cross_entropy()(logits, targets)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match=r"Argument 'targets'.*\(2, 3\)"):
        sequence_cross_entropy()(logits, targets[:, :2])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_curvature_of_a_small_gpt_matches_dense_float64(mode):
    net = GPT(7, 1, 4, n_layer=1, n_head=2, d_model=4, seed=1).double()
    net.train(mode == "train")
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    data = (tokens[:, :-1], tokens[:, 1:])
    loss = sequence_cross_entropy()
    n = sum(p.numel() for p in net.parameters())
    v = torch.randn(n, 2, generator=g, dtype=torch.float64)
    for op_cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        op = op_cls(net, loss, data)
        assert op.shape == (n, n)  # the tied head counts once
        want = dense(net, loss, data) @ v
        torch.testing.assert_close(op @ v, want, rtol=1e-10, atol=1e-12)


def test_gpt_tiny_on_text_through_train_spectrum_stats_landscape_and_plots(tmp_path):
    """The workflow and the CLI on a language model: next-token loss and perplexity."""
    import json

    import matplotlib.pyplot as plt

    from nets.cli import main
    from nets.training import train_network
    from spectral.io import load_npz

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path / "run"
    try:
        result = train_network(
            run,
            dataset="text",
            model="gpt-tiny",
            model_kwargs={"n_layer": 1, "d_model": 32},
            dataset_kwargs={"max_sequences": 60},
            optimizer="Adam",
            optimizer_kwargs={"lr": 3e-3},
            epochs=2,
            batch_size=16,
            save_freq=2,
            device="cpu",
            progress=False,
        )
        first, last = result.stats[0], result.stats[-1]
        assert first["train_acc"] is None  # no class accuracy for a language model
        for entry in result.stats:  # perplexity = exp(mean next-token loss)
            assert entry["test_ppl"] == pytest.approx(math.exp(entry["test_loss"]), rel=1e-12)
        assert last["train_loss"] < first["train_loss"] < math.log(256) + 0.3
        logged = json.loads((run / "stats.json").read_text())
        assert "train_ppl" in json.dumps(logged)
        ckpt = run / "checkpoint-00002.pt"
        rc = main(
            ["spectrum", "--checkpoint", str(ckpt), "--iters", "4", "--subsample", "8",
             "--batch-size", "4", "--save-eigvec", "--no-progress"]
        )  # fmt: skip
        assert rc == 0
        spectrum = run / "spectra" / "spectrum-00002-hessian-lanczos.npz"
        assert load_npz(spectrum)["w"].shape == (4,)
        stats = run / "loss-stats.npz"
        rc = main(
            ["stats", str(ckpt), "--subsample", "8", "--batch-size", "4",
             "--out", str(stats), "--no-progress"]
        )  # fmt: skip
        assert rc == 0 and "loss_mean" in load_npz(stats)
        land = run / "landscape.npz"
        rc = main(
            ["landscape", "--checkpoint", str(ckpt), "--spectrum", str(spectrum),
             "--n-points", "3", "--num-directions", "1", "--subsample", "8",
             "--out", str(land), "--no-progress"]
        )  # fmt: skip
        assert rc == 0
        losses = load_npz(land)["train_loss"]
        assert losses.shape == (1, 3) and np.isfinite(losses).all()
        # the middle point is the checkpoint: its loss is the training loss of those samples
        assert losses[0, 1] < losses[0, 0] or losses[0, 1] < losses[0, 2]
        for what, path in (("spectrum", spectrum), ("landscape", land), ("training", run)):
            out = tmp_path / f"{what}.png"
            assert main(["plot", what, str(path), "--out", str(out)]) == 0
            assert out.stat().st_size > 0
    finally:
        torch.set_num_threads(threads)
        plt.close("all")


def test_demo_takes_gpt_tiny_and_refuses_other_models(tmp_path):
    from nets.demo import DemoSettings, run_demo

    settings = DemoSettings.language_model()
    assert (settings.model, settings.dataset, settings.optimizer) == ("gpt-tiny", "text", "Adam")
    assert not settings.diagonal and settings.subsample == 64
    with pytest.raises(ValueError, match=r"Argument 'model'.*'SmallCNN' or 'gpt-tiny'"):
        run_demo(tmp_path, model="VGG16", progress=False)
