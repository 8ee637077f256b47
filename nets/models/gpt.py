"""A tiny GPT: token + position embedding, causal self-attention blocks, tied head.

``gpt-tiny`` (the defaults: 2 blocks, width 128, 4 heads, byte vocabulary of 256,
context 64) has 437,760 parameters.  Module names follow Hugging Face's GPT-2
(``transformer.wte``, ``transformer.h.0.attn.q_proj``, ``transformer.h.0.mlp.c_fc``,
``transformer.ln_f``, ``lm_head``), so name patterns such as
``"transformer.h.*.attn.*"`` select the same kind of parameters in both.  The
output layer's weight *is* the token embedding (``lm_head.weight is
transformer.wte.weight``): ``model.parameters()`` lists it once.

Each block is pre-LayerNorm,

.. math::
    h \\leftarrow h + \\mathrm{Attn}(\\mathrm{LN}_1(h)), \\qquad
    h \\leftarrow h + \\mathrm{MLP}(\\mathrm{LN}_2(h)),

with causal scaled dot-product attention
:math:`\\mathrm{softmax}(QK^\\top/\\sqrt{d_h} + M)V` per head (:math:`M` masks the future)
and a GELU MLP of width :math:`4d`.  The logits are :math:`\\mathrm{LN}_f(h)\\,W_e^\\top`.

Initialisation (GPT-2's, drawn from a :class:`torch.Generator` seeded with ``seed``;
the global RNG is untouched): linear and embedding weights :math:`\\mathcal N(0, 0.02^2)`,
the residual output projections :math:`\\mathcal N(0, 0.02^2/(2L))`, biases 0,
LayerNorm weight 1 and bias 0.

>>> import torch
>>> net = GPT(seed=0)
>>> net(torch.zeros(2, 5, dtype=torch.long)).shape
torch.Size([2, 5, 256])
>>> sum(p.numel() for p in net.parameters())
437760
>>> net.lm_head.weight is net.transformer.wte.weight
True
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from nets.models._common import check_positive_int
from spectral.errors import argument_error

__all__ = ["GPT", "gpt_tiny"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate Q, K, V and output projections.

    The projections are separate ``Linear`` layers so that per-projection curvature
    blocks are parameter selections; head ``h`` owns rows ``h*d_h:(h+1)*d_h`` of
    ``q_proj``/``k_proj``/``v_proj`` and columns ``h*d_h:(h+1)*d_h`` of ``c_proj``.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` -> ``(B, T, d)``."""
        b, t, d = x.shape
        h = self.n_head

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        out: torch.Tensor = self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class MLP(nn.Module):
    """``Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d)``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` -> ``(B, T, d)``."""
        out: torch.Tensor = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return out


class Block(nn.Module):
    """Pre-LayerNorm transformer block (attention, then MLP, each with a residual)."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` -> ``(B, T, d)``."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model with a tied output layer.

    Parameters
    ----------
    num_classes:
        Vocabulary size :math:`V` (256 for the byte-level ``text`` dataset).
    in_channels:
        Unused (accepted for the signature of :func:`nets.models.get_model`).
    input_size:
        Context length :math:`T_{\\max}` (number of position embeddings).
    n_layer, n_head, d_model:
        Blocks, attention heads and width (``d_model`` divisible by ``n_head``).
    dropout:
        Attention and residual dropout probability in training mode (default 0).
    seed:
        Seed of the initialisation.

    Raises
    ------
    ValueError
        Non-positive sizes, ``d_model`` not divisible by ``n_head`` or a dropout
        outside ``[0, 1)``.

    Examples
    --------
    >>> import torch
    >>> net = GPT(seed=0)   # gpt-tiny
    >>> tied = net.lm_head.weight is net.transformer.wte.weight
    >>> net(torch.zeros(2, 5, dtype=torch.long)).shape, tied
    (torch.Size([2, 5, 256]), True)
    """

    def __init__(
        self,
        num_classes: int = 256,
        in_channels: int = 1,
        input_size: int = 64,
        *,
        n_layer: int = 2,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        vocab = check_positive_int("num_classes", num_classes, minimum=2)
        check_positive_int("in_channels", in_channels)
        self.block_size = check_positive_int("input_size", input_size)
        check_positive_int("n_layer", n_layer)
        check_positive_int("n_head", n_head)
        check_positive_int("d_model", d_model)
        if d_model % n_head:
            raise argument_error("d_model", f"a multiple of n_head={n_head}", d_model)
        if not 0.0 <= float(dropout) < 1.0:
            raise argument_error("dropout", "a probability in [0, 1)", dropout)
        self.vocab_size = vocab
        with torch.device("meta"):  # no memory, no random numbers drawn
            self.transformer = nn.ModuleDict(
                {
                    "wte": nn.Embedding(vocab, d_model),
                    "wpe": nn.Embedding(self.block_size, d_model),
                    "drop": nn.Dropout(float(dropout)),
                    "h": nn.ModuleList(
                        [Block(d_model, n_head, float(dropout)) for _ in range(n_layer)]
                    ),
                    "ln_f": nn.LayerNorm(d_model),
                }
            )
            self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.to_empty(device="cpu")
        self.lm_head.weight = cast(nn.Embedding, self.transformer["wte"]).weight  # tied
        self._init_weights(int(seed), n_layer)

    @torch.no_grad()
    def _init_weights(self, seed: int, n_layer: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.lm_head:
                std = residual_std if name.endswith("c_proj") else 0.02
                module.weight.normal_(0.0, std, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for token ids ``(B, T)`` with ``T <= input_size``.

        Raises
        ------
        ValueError
            If ``input_ids`` is not a ``(B, T)`` integer tensor with ``T`` within the
            context length.
        """
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype.is_floating_point
            or input_ids.shape[1] > self.block_size
        ):
            raise argument_error(
                "input_ids",
                f"integer token ids of shape (B, T) with T <= {self.block_size}",
                input_ids,
            )
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        x = self.transformer["wte"](input_ids) + self.transformer["wpe"](positions)
        x = self.transformer["drop"](x)
        for block in cast(nn.ModuleList, self.transformer["h"]):
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.transformer["ln_f"](x))
        return logits


def gpt_tiny(
    num_classes: int = 256, in_channels: int = 1, input_size: int = 64, **kwargs: Any
) -> GPT:
    """``gpt-tiny``: :class:`GPT` with its defaults (2 blocks, width 128, 4 heads)."""
    return GPT(num_classes, in_channels, input_size, **kwargs)
