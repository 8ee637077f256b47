"""Hugging Face models as clients (issue 15 item 9): tiny random GPT-2, BERT and Llama.

Configs are built locally (no download), a few hundred to a thousand parameters in
float64.  Hessian, GGN and Fisher products are checked against the dense float64
references of :mod:`curvops.testing` in train and eval mode, with an
``attention_mask`` that pads some sequences; padded tokens change nothing.
Dropout probabilities are 0 here (train mode then differs from eval only in the
module flags); the dropout-off contract is tested with the determinism module.
"""

from __future__ import annotations

import contextlib
import random
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator, transformer_blocks
from curvops.losses import sequence_cross_entropy
from curvops.testing import dense_fisher, dense_ggn, dense_hessian

transformers = pytest.importorskip("transformers")

VOCAB, T, WIDTH = 7, 5, 4
RTOL = 1e-10  # float64 products against float64 dense references


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """HF initialises from torch's global RNG: fork it so the test leaves it as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def gpt2(attn: str) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=6,
        n_embd=WIDTH,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation=attn,
    )
    with _seeded(0):
        return transformers.GPT2LMHeadModel(config).double()


def llama(attn: str) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=6,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention
        max_position_embeddings=6,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation=attn,
    )
    with _seeded(1):
        model = transformers.LlamaForCausalLM(config).double()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so they matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_own_dtype, module)
    return model


def _rms_norm_in_own_dtype(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm without its cast to float32 (HF rounds the input to float32 whatever
    the model's dtype, which would make a float64 Llama only float32-accurate and no
    test of the curvature's exactness); the same formula otherwise."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def bert(attn: str) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=6,
        max_position_embeddings=6,
        type_vocab_size=1,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    with _seeded(2):
        return transformers.BertForSequenceClassification(config).double()


#: Next-token cross-entropy, mean over the tokens that are not ignored (-100).
token_loss = sequence_cross_entropy()


def lm_batch(pad_left: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two sequences; sequence 0 has 2 padded positions (left or right), sequence 1 none
    of its own but its last 2 targets ignored, so both count 3 tokens."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    pad = slice(0, 2) if pad_left else slice(T - 2, T)
    mask[0, pad] = 0
    targets = torch.randint(0, VOCAB, (2, T), generator=g)
    targets[0, pad] = -100
    targets[1, T - 2 :] = -100
    return {"input_ids": ids, "attention_mask": mask}, targets


def cls_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, VOCAB, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor([0, 2, 1])


def with_other_padding(batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> Any:
    """The same batch with different token ids where the mask is 0."""
    inputs, targets = batch
    ids = inputs["input_ids"].clone()
    ids[inputs["attention_mask"] == 0] = (ids[inputs["attention_mask"] == 0] + 3) % VOCAB
    return {**inputs, "input_ids": ids}, targets


CASES: dict[str, tuple[Callable[[str], nn.Module], Callable[..., Any], Any]] = {
    "gpt2": (gpt2, lambda: lm_batch(pad_left=True), token_loss),
    "llama": (llama, lambda: lm_batch(pad_left=False), token_loss),
    "bert": (bert, cls_batch, nn.CrossEntropyLoss()),
}


def reference_tolerance(ref: np.ndarray) -> float:
    """Absolute tolerance per unit of ``|x|_1`` against a dense float64 reference."""
    return 1e-12 * float(np.abs(ref).max())


# both modes and both attention implementations, without running all four combinations;
# Llama's eager attention takes its softmax in float32 (HF), so Llama runs SDPA in both
SETTINGS = [("train", "sdpa"), ("eval", "eager")]


@pytest.mark.parametrize(("mode", "attn"), SETTINGS, ids=["-".join(s) for s in SETTINGS])
@pytest.mark.parametrize("name", list(CASES))
def test_hessian_and_ggn_match_dense_float64_with_padding(name, mode, attn):
    build, make_batch, loss = CASES[name]
    attn = "sdpa" if name == "llama" else attn
    model = build(attn).train(mode == "train")
    batch = make_batch()
    n = sum(p.numel() for p in model.parameters())
    assert 150 < n < 5000
    X = np.random.default_rng(0).standard_normal((n, 2))
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        op = cls(model, loss, batch)
        assert op.shape == (n, n)  # GPT-2's tied head counted once
        ref = dense(model, loss, batch).numpy()
        got = op.matmat(X)
        tol = reference_tolerance(ref) * np.abs(X).sum(0).max()
        np.testing.assert_allclose(got, ref @ X, rtol=RTOL, atol=tol)
        # padded tokens change nothing
        other = cls(model, loss, with_other_padding(batch)).matmat(X)
        np.testing.assert_allclose(other, got, rtol=1e-12, atol=1e-13 * np.abs(got).max())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_fisher_matches_dense_float64_with_padding(name, mode):
    build, make_batch, loss = CASES[name]
    attn = "sdpa" if name == "llama" else "eager"
    model = build(attn).train(mode == "train")
    batch = make_batch()
    kinds = ["empirical", "mc"] if name == "bert" else ["empirical"]  # mc: a recognised loss
    n = sum(p.numel() for p in model.parameters())
    X = np.random.default_rng(1).standard_normal((n, 2))
    for kind in kinds:
        op = FisherOperator(model, loss, batch, kind=kind, seed=3)
        ref = dense_fisher(model, loss, batch, kind=kind, seed=3).numpy()
        tol = reference_tolerance(ref) * np.abs(X).sum(0).max()
        np.testing.assert_allclose(op.matmat(X), ref @ X, rtol=RTOL, atol=tol)


def test_truncating_a_right_padded_sequence_gives_the_same_curvature():
    # a causal LM on [x1 x2 x3 pad pad] with the pads ignored is the LM on [x1 x2 x3]
    model = gpt2("eager").eval()
    inputs, targets = lm_batch(pad_left=False)
    padded = ({k: v[:1] for k, v in inputs.items()}, targets[:1])
    short = ({k: v[:1, :3] for k, v in inputs.items()}, targets[:1, :3])
    n = sum(p.numel() for p in model.parameters())
    X = np.random.default_rng(2).standard_normal((n, 2))
    for cls in (HessianOperator, GGNOperator):
        a, b = cls(model, token_loss, padded).matmat(X), cls(model, token_loss, short).matmat(X)
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13 * np.abs(b).max())


def test_transformer_blocks_know_the_hf_layouts():
    labels = list(transformer_blocks(gpt2("eager"), heads=2))
    assert "transformer.h.0.attn.c_attn (k, head 1)" in labels
    assert "transformer.h.0.attn.c_proj (attn out)" in labels
    assert "transformer.h.0.mlp (mlp)" in labels
    assert "lm_head" not in " ".join(labels)  # tied to transformer.wte
    labels = list(transformer_blocks(bert("eager")))
    assert "bert.encoder.layer.0.attention.self.query (q)" in labels
    assert "bert.encoder.layer.0.attention.output.dense (attn out)" in labels
    assert "bert.encoder.layer.0.attention.output.LayerNorm (norm)" in labels
    labels = list(transformer_blocks(llama("eager")))
    assert "model.layers.0.mlp (mlp)" in labels
    assert "model.layers.0.input_layernorm (norm)" in labels
    assert "model.embed_tokens (embedding)" in labels and "lm_head" in labels


def wav2vec2_config(layers: int = 1, layerdrop: float = 0.0, masking: float = 0.0) -> Any:
    """A tiny wav2vec 2.0 for CTC (weight-normalised positional convolution), no dropout;
    ``masking`` is the SpecAugment probability of time steps and features."""
    return transformers.Wav2Vec2Config(
        vocab_size=VOCAB,
        hidden_size=4,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=6,
        conv_dim=(4, 4),
        conv_stride=(3, 2),
        conv_kernel=(4, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=layerdrop,
        mask_time_prob=masking,
        mask_time_length=2,
        mask_feature_prob=masking,
        mask_feature_length=1,
    )


def test_wav2vec2_weight_normalised_positional_convolution():
    """wav2vec 2.0's positional convolution is weight-normalised: PyTorch's fused
    weight-norm kernel has wrong second derivatives (its Hessian was 0.25 % off here);
    the product must equal central differences of the model's own (right) gradient.
    """
    config = wav2vec2_config()
    with _seeded(5):
        model = transformers.Wav2Vec2ForCTC(config).double().eval()
    assert any("parametrizations.weight" in n for n, _ in model.named_parameters())
    g = torch.Generator().manual_seed(6)
    wav = torch.randn(2, 60, generator=g, dtype=torch.float64)
    with torch.no_grad():
        frames = model(wav).logits.shape[1]
    y = torch.randint(0, VOCAB, (2, frames), generator=g)
    loss = sequence_cross_entropy()
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=g, dtype=torch.float64)
    h = 1e-5  # central differences: O(h^2) + O(eps/h), about 1e-7 relative here

    saved = [p.detach().clone() for p in params]

    def gradient_at(step: float) -> torch.Tensor:
        with torch.no_grad():
            for p, part in zip(params, torch.split(v, [p.numel() for p in params])):
                p.add_(step * part.view_as(p))
        grads = torch.autograd.grad(loss(model(wav).logits, y), params)
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)
        return torch.cat([t.reshape(-1) for t in grads])

    fd = ((gradient_at(h) - gradient_at(-h)) / (2 * h)).numpy()
    H = HessianOperator(model, loss, ({"input_values": wav}, y), output_fn=lambda o: o.logits)
    assert np.linalg.norm(H @ v.numpy() - fd) <= 1e-5 * np.linalg.norm(fd)


def bart(layerdrop: float) -> nn.Module:
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=4,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=6,
        decoder_ffn_dim=6,
        max_position_embeddings=8,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=layerdrop,
        decoder_layerdrop=layerdrop,
        use_cache=False,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    with _seeded(7):
        return transformers.BartForConditionalGeneration(config).double()


@pytest.mark.parametrize("name", ["wav2vec2", "wav2vec2-specaugment", "bart"])
def test_layerdrop_and_specaugment_are_off_inside_products(name):
    """LayerDrop skips whole layers at random in training mode and SpecAugment masks the
    features with numpy's generator: products were those of a random subnetwork (16 %
    off for wav2vec 2.0) or differed between two operators (by 160 %) and advanced the
    caller's numpy stream.  They now equal those without, the settings are put back and
    the caller's streams are untouched."""
    g = torch.Generator().manual_seed(8)
    if name.startswith("wav2vec2"):
        masking = name.endswith("specaugment")

        def build(p):
            config = wav2vec2_config(4, 0.0 if masking else p, 0.6 if masking else 0.0)
            with _seeded(5):
                model = transformers.Wav2Vec2ForCTC(config).double()
            if masking:  # the same parameters (SpecAugment's mask embedding), no masking
                model.config.mask_time_prob = model.config.mask_feature_prob = p
            return model

        inputs = {"input_values": torch.randn(2, 120, generator=g, dtype=torch.float64)}
    else:
        build = bart
        ids = torch.randint(3, VOCAB, (2, 5), generator=g)
        inputs = {"input_ids": ids, "decoder_input_ids": ids}
    noisy, clean = build(0.6).train(), build(0.0).train()
    clean.load_state_dict(noisy.state_dict())
    with torch.no_grad():
        frames = clean(**inputs).logits.shape[1]
    batch = (inputs, torch.randint(0, VOCAB, (2, frames), generator=g))
    loss = sequence_cross_entropy()
    X = np.random.default_rng(3).standard_normal((sum(p.numel() for p in noisy.parameters()), 2))

    def settings():
        return {k: v for k, v in vars(noisy.config).items() if "layerdrop" in k or "_prob" in k}

    before = settings()
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002 - the caller's global stream
    python_state = random.getstate()
    for cls in (HessianOperator, GGNOperator):
        got = cls(noisy, loss, batch, output_fn=lambda o: o.logits).matmat(X)
        want = cls(clean, loss, batch, output_fn=lambda o: o.logits).matmat(X)
        np.testing.assert_array_equal(got, want)
    assert 0.6 in before.values() and settings() == before
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # noqa: NPY002
    assert random.getstate() == python_state


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradient_checkpointing_changes_no_product(name, reentrant):
    """``gradient_checkpointing_enable()`` only trades memory for time.  Its blocks
    recompute their forward passes in later backward passes, outside the product's
    settings: before its flags were turned off during products, this Llama's Hessian was
    5e-4 and its GGN 9e-4 off (float64, no error) and GPT-2's products failed with a
    ``CheckpointError`` (or, reentrant, refused every layer as untracked)."""
    build, make_batch, loss = CASES[name]
    plain = build("sdpa").train()
    checkpointed = build("sdpa").train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable({"use_reentrant": reentrant})
    batch = make_batch()
    X = np.random.default_rng(6).standard_normal((sum(p.numel() for p in plain.parameters()), 2))
    for cls in (HessianOperator, GGNOperator):
        got = cls(checkpointed, loss, batch).matmat(X)
        np.testing.assert_array_equal(got, cls(plain, loss, batch).matmat(X))
    assert checkpointed.is_gradient_checkpointing
    layers = [m for m in checkpointed.modules() if "gradient_checkpointing" in vars(m)]
    assert layers and all(m.gradient_checkpointing for m in layers)


def test_levit_cached_attention_biases_in_eval_mode():
    """LeViT caches ``attention_biases[:, idxs]`` in a dict in eval mode: building an
    operator filled it and every product read it, so the Hessian rows of the biases
    were exactly zero (no error).  Now equal to torch's double backward with the cache
    cleared, and the model's cache is left as it was."""
    config = transformers.LevitConfig(
        num_labels=3,
        image_size=64,
        patch_size=16,
        hidden_sizes=[8, 8, 8],
        num_attention_heads=[2, 2, 2],
        depths=[1, 1, 1],
        key_dim=[2, 2, 2],
        mlp_ratio=[1, 1, 1],
        attention_ratio=[1, 1, 1],
        down_ops=[["Subsample", 2, 2, 1, 1, 2], ["Subsample", 2, 2, 1, 1, 2]],
    )
    with _seeded(0):
        model = transformers.LevitForImageClassification(config).double().eval()
        with torch.no_grad():  # biases that matter: the initial ones are zero
            for name, p in model.named_parameters():
                p.add_(torch.randn_like(p) * (1.0 if "attention_biases" in name else 0.1))
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y, loss = torch.tensor([0, 2]), nn.CrossEntropyLoss()
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    assert caches and all(c == {} for c in caches)
    H = HessianOperator(model, loss, ({"pixel_values": x}, y))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = (H @ v).numpy()
    assert all(c == {} for c in caches)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model(pixel_values=x).logits, y), params, create_graph=True)
    parts = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    reference = torch.cat([t.reshape(-1) for t in torch.autograd.grad(grads, params, parts)])
    for c in caches:  # the reference filled them (with gradients on)
        c.clear()
    np.testing.assert_allclose(
        got, reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max())
    )
    offsets = np.cumsum([0] + [p.numel() for p in params])
    biases = [i for i, (n, _) in enumerate(model.named_parameters()) if "attention_biases" in n]
    assert max(np.abs(got[offsets[i] : offsets[i + 1]]).max() for i in biases) > 1e-8
