"""The two training tasks of bench train that look like real training (issue 17): a byte-level
causal transformer on the text of Python's standard library, and a residual CNN with BatchNorm
on MNIST-1D.  Nothing is downloaded: the text is the ``.py`` files of the running Python's own
standard library.

stdlib-lm: the ``.py`` files under ``sysconfig.get_paths()['stdlib']`` (site-packages left out),
sorted by path, read in that order until ``STDLIB_BYTES`` bytes; every ``VALIDATION_EVERY``-th
file goes to validation, the rest to training (split by file, so that no file is in both).
Each split is one byte stream cut into windows of ``CONTEXT + 1`` bytes (``CONTEXT`` inputs, the
next byte of each as its label).  The text differs between Python versions: results name theirs.

docs-lm (a development case): the prose of ``pydoc_data/topics.py`` (the help() topics of
Python's documentation; not among the files stdlib-lm reads, which stop at ~1.5 MB, in the first
letters of the sorted paths), the string values of its ``topics`` dict sorted by name, UTF-8,
up to ``DOCS_BYTES`` (all ~466 kB in 3.11); every ``VALIDATION_EVERY``-th topic to validation
(the topics' sizes vary: in 3.11 the validation topics are 7 short ones, 10.9 kB), the same
windows.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
import sysconfig
from typing import Iterable

import torch
from torch import nn

STDLIB_BYTES = 1_500_000
DOCS_BYTES = 600_000  # more than the topics hold (~466 kB in 3.11): all of them
VALIDATION_EVERY = 10
CONTEXT = 64
VOCAB = 256
EVAL_WINDOWS = 256  # training and validation windows the evaluations run on


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    return sorted(path for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if "site-packages" not in path)


def windows(stream: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of the stream: inputs [N, CONTEXT] and next-byte labels."""
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8).long()
    n = (len(data) - 1) // CONTEXT
    x = data[:n * CONTEXT].view(n, CONTEXT)
    y = data[1:n * CONTEXT + 1].view(n, CONTEXT)
    return x.contiguous(), y.contiguous()


def split_by_document(documents: Iterable[tuple[str, bytes]],
                      limit: int) -> tuple[bytes, bytes, dict]:
    """Every ``VALIDATION_EVERY``-th of the (name, text) ``documents`` to validation, the rest to
    training, read in order until ``limit`` bytes: (training bytes, validation bytes, how many
    documents and bytes were read and the last one's name)."""
    train, validation, read = [], [], 0
    for i, (name, text) in enumerate(documents):
        (validation if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(text)
        read += len(text)
        if read >= limit:
            break
    return b"".join(train), b"".join(validation), {"documents": i + 1, "bytes": read, "last": name}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def stdlib_text() -> tuple[bytes, bytes, dict]:
    """(training bytes, validation bytes, what was read)."""
    files = stdlib_files()
    train, validation, read = split_by_document(((path, _read(path)) for path in files),
                                                STDLIB_BYTES)
    info = {"python": sys.version.split()[0], "files": read["documents"], "of_files": len(files),
            "bytes": read["bytes"],
            "last_file": os.path.relpath(read["last"], sysconfig.get_paths()["stdlib"])}
    return train, validation, info


@functools.lru_cache(maxsize=None)
def docs_text() -> tuple[bytes, bytes, dict]:
    """(training bytes, validation bytes, what was read): the topics of pydoc_data/topics.py,
    sorted by name, each topic's text UTF-8 encoded."""
    from pydoc_data import topics

    names = sorted(topics.topics)
    train, validation, read = split_by_document(
        ((name, topics.topics[name].encode()) for name in names), DOCS_BYTES)
    info = {"python": sys.version.split()[0], "topics": read["documents"],
            "of_topics": len(names), "bytes": read["bytes"], "last_topic": read["last"],
            "file": os.path.relpath(topics.__file__, sysconfig.get_paths()["stdlib"])}
    return train, validation, info


class CausalTransformer(nn.Module):
    """Byte-level causal transformer: token and position embeddings, pre-LN encoder layers
    (``nn.TransformerEncoderLayer``: ``nn.MultiheadAttention`` and a GELU MLP) under a causal
    mask, a final LayerNorm and a linear head (not tied to the embedding).  ``forward`` returns
    the logits as [batch, VOCAB, time], the layout ``F.cross_entropy`` takes with [batch, time]
    labels."""

    def __init__(self, d_model: int = 96, layers: int = 3, heads: int = 4,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Parameter(torch.randn(context, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position[:t]
        for layer in self.layers:
            x = layer(x, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x)).transpose(1, 2)


def docs_transformer() -> CausalTransformer:
    """docs-lm's model: CausalTransformer at d 64, 2 layers, 4 heads (~0.45x stdlib-lm's step)."""
    return CausalTransformer(d_model=64, layers=2, heads=4)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1x1 convolution and BN where the shape changes),
    then ReLU."""

    def __init__(self, channels_in: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels_in, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.skip = (nn.Identity() if stride == 1 and channels_in == channels else
                     nn.Sequential(nn.Conv1d(channels_in, channels, 1, stride=stride, bias=False),
                                   nn.BatchNorm1d(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def mnist1d_resnet() -> nn.Module:
    """A stem convolution and three residual blocks (32, 32, 64 channels; length 40, 40, 20)
    with BatchNorm, global average pooling, a linear head."""
    return nn.Sequential(nn.Unflatten(1, (1, 40)),
                         nn.Conv1d(1, 32, 5, padding=2, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         ResidualBlock(32, 32), ResidualBlock(32, 64, stride=2),
                         ResidualBlock(64, 64), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(64, 10))


class MNIST1DTransformer(nn.Module):
    """MNIST-1D as a sequence: each of the 40 floats a token (a ``Linear(1, d)`` value embedding
    plus an ``nn.Embedding`` of its position), pre-LN ``nn.TransformerEncoderLayer``s (no mask:
    every token sees the whole signal), a final LayerNorm, the mean over positions, a linear
    head.  A development case with LayerNorm, embeddings and ``nn.MultiheadAttention`` (the
    layers K-FAC-type methods capture or leave to their fallback step); a step costs ~15x the
    MNIST-1D CNN's, so its case has a budget in steps (bench/train.py)."""

    def __init__(self, d_model: int = 32, layers: int = 2, heads: int = 4,
                 feedforward: int = 64, length: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.value = nn.Linear(1, d_model)
        self.position = nn.Embedding(length, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=feedforward, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)
        self.register_buffer("positions", torch.arange(length), persistent=False)

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        """[batch, length] signals -> [batch, classes] logits."""
        x = self.value(signals.unsqueeze(-1)) + self.position(self.positions)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))
