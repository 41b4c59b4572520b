"""Text encoders for text-conditioned experts: captions -> token embeddings the DiT cross-attends to.

Kinds (``TextEncoderConfig.kind``), all loaded offline from a local folder or a store URI (copied to a local
cache first):
- ``sentence-transformers``: any sentence-transformers model (a folder with ``modules.json``: all-MiniLM, mpnet,
  ...); pooled = the model's sentence embedding;
- ``clip``: a transformers ``CLIPTextModel`` folder (``config.json`` + weights + tokenizer files); pooled = its
  pooler output (the end-of-text token), as Stable Diffusion / PixArt read it;
- ``t5``: a transformers ``T5EncoderModel`` folder; pooled = the mean of the caption's token embeddings.
Token embeddings (not only the pooled vector) feed the cross-attention, cut or padded to ``max_tokens`` with a
mask; the pooled vector is returned too (for the router). A model that is not there, or whose width is not what
the run expects, stops with a one-line error naming the path.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from .errors import ConfigError

KINDS = ("sentence-transformers", "clip", "t5")


@dataclass
class TextBatch:
    tokens: torch.Tensor  # (B, L, D) float32, zero past each caption's length
    mask: torch.Tensor  # (B, L) bool, True = a real token
    pooled: torch.Tensor  # (B, D) the sentence embedding


def local_folder(uri: str, what: str = "text encoder") -> Path:
    """A model folder on this machine: a local path / file:// URI as is, an s3:// prefix copied once into
    ``$DDM_CACHE_DIR`` (default: the temp dir) under a name derived from the URI."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else uri)
    from .store import open_store

    store = open_store(uri)
    keys = store.list("")
    if not keys:
        raise ConfigError(f"{what} {uri}: nothing stored there")
    root = Path(os.environ.get("DDM_CACHE_DIR", tempfile.gettempdir())) / "ddm-models" / \
        hashlib.sha256(uri.encode()).hexdigest()[:16]
    for key in keys:
        if not (root / key).is_file():
            store.get_file(key, root / key)
    return root


class TextEncoder:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_tokens: int = 16,
                 expect_dim: int | None = None, kind: str = "sentence-transformers"):
        if kind not in KINDS:
            raise ConfigError(f"text encoder kind {kind!r} is not one of {', '.join(KINDS)}")
        where = str(path)
        path = local_folder(where) if isinstance(path, str) else path
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the path; never from a hub
        self.kind, self.device, self.path = kind, torch.device(device), path
        if kind == "sentence-transformers":
            if not (path / "modules.json").is_file():
                raise ConfigError(f"text encoder {where}: not a sentence-transformers model folder (no modules.json)")
            from sentence_transformers import SentenceTransformer

            self.model: Any = SentenceTransformer(str(path), device=str(device), local_files_only=True)
            width = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            self.dim = int(width() or 0)
        else:
            if not (path / "config.json").is_file():
                raise ConfigError(f"text encoder {where}: not a transformers {kind} model folder (no config.json)")
            from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

            cls = CLIPTextModel if kind == "clip" else T5EncoderModel
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                self.model = cls.from_pretrained(str(path), local_files_only=True).to(self.device)
            except (OSError, ValueError, KeyError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"text encoder {where}: cannot load a {kind} model: {first}") from None
            self.dim = int(self.model.config.hidden_size if kind == "clip" else self.model.config.d_model)
        self.model.eval()
        if expect_dim is not None and self.dim != expect_dim:
            raise ConfigError(f"text encoder {where} gives {self.dim}-d embeddings but the run expects "
                              f"{expect_dim} (textEncoder.width / the experts' text_dim)")
        self.max_tokens = max_tokens

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> TextBatch:
        if self.kind == "sentence-transformers":
            return self._encode_st(captions)
        return self._encode_hf(captions)

    def _encode_st(self, captions: Sequence[str], chunk: int = 256) -> TextBatch:
        # preprocess + forward, not encode(output_value=None): that one splits every output per caption, and
        # releases that add a non-tensor output ("modality": "text") fail there with IndexError
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # tokenize: before 6.x
        L, parts = self.max_tokens, []
        for start in range(0, len(captions), chunk):  # bounded memory, as encode()'s own batches were
            features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                        for k, v in prepare(list(captions[start:start + chunk])).items()}
            out = self.model(features)
            mask = out["attention_mask"][:, :L].bool().cpu()  # (b, l): l, the chunk's longest caption, up to L
            tokens = out["token_embeddings"][:, :L].float().cpu() * mask[..., None]  # (b, l, D), zero past each
            pad = L - mask.shape[1]
            parts.append((F.pad(tokens, (0, 0, 0, pad)), F.pad(mask, (0, pad)), out["sentence_embedding"].float().cpu()))
        tokens, mask, pooled = (torch.cat(p) for p in zip(*parts))  # (B, L, D), (B, L), (B, D)
        return TextBatch(tokens, mask, pooled)

    def _encode_hf(self, captions: Sequence[str]) -> TextBatch:
        enc = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        mask = enc["attention_mask"].bool().cpu()  # (B, L)
        tokens = out.last_hidden_state.float().cpu() * mask[..., None]  # (B, L, D), zero past each caption
        if self.kind == "clip":
            pooled = out.pooler_output.float().cpu()  # (B, D)
        else:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return TextBatch(tokens, mask, pooled)
