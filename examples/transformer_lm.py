"""A small character-level transformer language model with the economy preset.

The corpus is English prose that ships with Python: the module docstrings of a few
standard-library modules (see :func:`examples._common.char_corpus`; nothing is
downloaded), about 11 500 characters, split 90/10 into training and held-out text. The
model predicts the next character from the previous ``T = 32``:

* ``nn.Embedding`` for the characters plus a learned positional embedding (a second
  ``nn.Embedding`` of the positions 0..T−1, looked up as an ``[N, T]`` batch: every
  layer's input needs the batch dimension first),
* two pre-norm ``nn.TransformerEncoderLayer`` blocks (``batch_first=True``, causal mask)
  with dropout 0.1 in the feed-forward and residual paths but 0 inside the attention:
  dropout on attention weights in train mode cannot be replayed per sample and the
  engine raises; dropout elsewhere is fine (the Cockpit replays the step's random
  state when it needs the model again),
* a final ``nn.LayerNorm`` and an output head tied to the embedding (the same
  parameter used twice: each sample's gradient is the sum over both uses; pass
  ``--untied`` for a separate head).

The loss is cross-entropy on the flattened ``[N·T, C]`` logits, the usual way to write it;
the Cockpit groups the ``N·T`` rows back into the ``N`` sequences of the batch, so a
"sample" (whose individual gradient the instruments see) is one sequence. It trains with
AdamW (lr 3e-3, batch 16). Attention runs on PyTorch's plain-math kernel
(``sdpa_kernel(SDPBackend.MATH)``): α differentiates the model in forward mode, which
the fused CPU attention kernels do not support.

What it shows: the engine's per-sample statistics work through Embedding, multi-head
attention, LayerNorm and weight tying, and the economy instruments read as for any
other model. Run it and open the dashboard::

    python -m examples.transformer_lm --logdir runs/transformer
    cockpit dashboard runs/transformer

How to read it (measured with the defaults, 300 steps, seed 0; vocabulary of 89
characters): the training loss falls from ln 89 ≈ 4.5 to about 2.5 nats per character and
the logged held-out ``val_loss`` follows it (4.3 → 2.8). The per-parameter gradient norms
are largest for the embedding (which is also the tied head), then the positional
embedding and the first layer's attention projections. AdamW's update size stays nearly
constant (about 0.2) while the distance from the initialization keeps growing (3 → 16):
the optimizer is still travelling, not settling. α is slightly negative at first (median
−0.27 over the first 100 steps) and near 0 later (+0.06). The norm and orthogonality
tests sit at about 0.9 from step 50 on (the norm test's threshold: one 32-character
sequence is a noisy sample of the language, and the suggested batch size is about the
current 16), the inner-product test at about 0.1. The gradient histogram stays inside
its range (no edge-bin mass). A greedy sample from the model is logged at the end; after
300 steps on 10 000 training characters expect frequent letters and spaces, not words.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cockpit import Cockpit

try:
    from examples import _common
except ImportError:  # run as a file: python examples/transformer_lm.py
    import _common  # type: ignore[no-redef]

log = logging.getLogger("examples.transformer_lm")

SEQ_LEN = 32


class CharTransformer(nn.Module):
    """Embedding + positions, pre-norm causal encoder layers, LayerNorm, tied head."""

    def __init__(
        self,
        vocab: int,
        d_model: int = 48,
        heads: int = 4,
        layers: int = 2,
        seq_len: int = SEQ_LEN,
        dropout: float = 0.1,
        tied: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        # Positions as an Embedding module, not a bare nn.Parameter on this module: the
        # engine has exact rules per layer type, and a parameter owned by the top-level
        # module would make it re-run the whole model per sample (torch.func fallback),
        # which is slow and impossible with dropout inside.
        self.pos = nn.Embedding(seq_len, d_model)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.TransformerEncoderLayer(
                d_model,
                heads,
                dim_feedforward=4 * d_model,
                dropout=dropout,
                batch_first=True,
                norm_first=True,
            )
            layer.self_attn.dropout = 0.0  # attention dropout cannot be replayed per sample
            self.layers.append(layer)
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's init; N(0, 1) makes the
        nn.init.normal_(self.pos.weight, std=0.02)  # tied head's first logits huge
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        mask = nn.Transformer.generate_square_subsequent_mask(seq_len)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, T, vocab]`` for character ids ``[N, T]``."""
        n, t = idx.shape
        # [N, T] positions: the engine needs the batch dimension first in every layer's input.
        positions = torch.arange(t, device=idx.device).expand(n, t)
        h = self.embed(idx) + self.pos(positions)
        mask = self.causal_mask[:t, :t]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


@torch.no_grad()
def held_out_loss(model: nn.Module, ids: torch.Tensor, batches: int = 4, seed: int = 0) -> float:
    """Mean next-character cross-entropy on fixed windows of held-out text (eval mode)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    try:
        for _ in range(batches):
            x, y = _common.char_windows(ids, 32, SEQ_LEN, gen)
            logits = model(x)
            total += float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
    finally:
        model.train(was_training)
    return total / batches


@torch.no_grad()
def sample(model: nn.Module, corpus: _common.CharCorpus, prompt: str, length: int = 80) -> str:
    """Greedy continuation of ``prompt`` (characters outside the vocabulary are dropped)."""
    was_training = model.training
    model.eval()
    index = {c: i for i, c in enumerate(corpus.vocab)}
    ids = [index[c] for c in prompt if c in index] or [0]
    try:
        for _ in range(length):
            x = torch.tensor([ids[-SEQ_LEN:]])
            ids.append(int(model(x)[0, -1].argmax()))
    finally:
        model.train(was_training)
    return corpus.decode(ids)


def main(argv: list[str] | None = None) -> dict:
    """Train the character LM with the economy preset; return the run and key numbers."""
    p = _common.parser(__doc__, steps=300, logdir="runs/transformer")
    p.add_argument("--untied", action="store_true", help="separate output head")
    args = p.parse_args(argv)
    _common.setup_logging()
    run = _common.fresh_run(args.logdir, "char-transformer", args.overwrite)
    torch.manual_seed(args.seed)
    corpus = _common.char_corpus()
    split = int(0.9 * len(corpus.ids))
    train_ids, val_ids = corpus.ids[:split], corpus.ids[split:]
    vocab = len(corpus.vocab)
    model = CharTransformer(vocab, tied=not args.untied)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    tags = {"example": "transformer_lm", "tied": not args.untied, "vocab": vocab}
    with (
        Cockpit(model, loss_fn, opt, instruments="economy", logdir=run, tags=tags) as cockpit,
        # α differentiates the model forward-mode (torch.func.jvp); the fused CPU attention
        # kernels have no forward-mode derivative in torch 2.13, the plain-math kernel has.
        sdpa_kernel(SDPBackend.MATH),
    ):
        for step in range(args.steps):
            x, y = _common.char_windows(train_ids, 16, SEQ_LEN, gen)
            opt.zero_grad()
            logits = model(x)  # [N, T, C]
            loss = loss_fn(logits.flatten(0, 1), y.flatten())  # on [N·T, C]
            with cockpit.step(step, loss):
                loss.backward()
            opt.step()
            if step % 25 == 0 or step == args.steps - 1:
                cockpit.log(step, val_loss=held_out_loss(model, val_ids))
    latest = cockpit.latest()
    text = sample(model, corpus, "The ")
    log.info(
        "%d steps, vocabulary %d (ln %.2f): training loss %.3f, held-out loss %.3f, alpha %.2f, "
        "norm test %.2f",
        args.steps,
        vocab,
        math.log(vocab),
        latest["loss"],
        latest["user.val_loss"],
        latest.get("alpha", float("nan")),
        latest.get("norm_test", float("nan")),
    )
    log.info("greedy sample: %r", text)
    log.info("view the run with: cockpit dashboard %s", args.logdir)
    return {
        "root": args.logdir,
        "run": run,
        "latest": latest,
        "vocab": vocab,
        "val_loss": latest["user.val_loss"],
        "sample": text,
    }


if __name__ == "__main__":
    main()
