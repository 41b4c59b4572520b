"""Text encoders for text-conditioned experts: captions -> token embeddings the DiT cross-attends to.

Any sentence-transformers model (a folder with ``modules.json``: all-MiniLM, mpnet, a CLIP text tower exported by
sentence-transformers, ...) loaded from a local path, offline. Token embeddings (not only the pooled sentence
vector) feed the cross-attention, cut or padded to ``max_tokens`` with a mask; the pooled vector is returned too
(for the router). A model that is not there, or whose width is not what the run expects, stops with a one-line
error naming the path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import ConfigError


@dataclass
class TextBatch:
    tokens: torch.Tensor  # (B, L, D) float32, zero past each caption's length
    mask: torch.Tensor  # (B, L) bool, True = a real token
    pooled: torch.Tensor  # (B, D) the sentence embedding


class TextEncoder:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_tokens: int = 16,
                 expect_dim: int | None = None):
        path = Path(path)
        if not (path / "modules.json").is_file():
            raise ConfigError(f"text encoder {path}: not a sentence-transformers model folder (no modules.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the path; never from a hub
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
        self.model.eval()
        self.dim = int(self.model.get_sentence_embedding_dimension() or 0)
        if expect_dim is not None and self.dim != expect_dim:
            raise ConfigError(f"text encoder {path} gives {self.dim}-d embeddings but the run expects {expect_dim}")
        self.max_tokens, self.path = max_tokens, path

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> TextBatch:
        outs = self.model.encode(list(captions), output_value=None, convert_to_numpy=False,
                                 show_progress_bar=False)
        B, L = len(outs), self.max_tokens
        tokens = torch.zeros(B, L, self.dim)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for i, out in enumerate(outs):
            length = int(out["attention_mask"].sum()) if "attention_mask" in out else len(out["token_embeddings"])
            tok = out["token_embeddings"][: min(length, L)].float().cpu()  # (l, D): the batch's padding left out
            tokens[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = True
        pooled = torch.stack([out["sentence_embedding"].float().cpu() for out in outs])  # (B, D)
        return TextBatch(tokens, mask, pooled)
