"""The paper's captioners: InternVL2 tiling and chat call, BLIP-2 / LLaVA-NeXT decoding, DeepSeek-VL's
LMDeploy prompt, and the offline model lookup. Small random models where transformers has the
architecture; recording stubs where upstream ran remote code or LMDeploy."""

from __future__ import annotations

import json
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from captioner import main
from tests import datagen
from tests.tiny_vlms import tiny_blip2_t5, tiny_llava_next
from utils.errors import UserError
from vlmdiff.captioning import PROMPTS, derive_vlm_name
from vlmdiff.data import load_captions, load_rgb
from vlmdiff.internvl import internvl_grid, internvl_tiles
from vlmdiff.vlm_backends import build_backend, default_backend, resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- InternVL2 tiling


def _reference_tiles(image: Image.Image, size: int = 448, max_num: int = 12) -> tuple[tuple[int, int], torch.Tensor]:
    """InternVL2's dynamic_preprocess + build_transform, written as plainly as its definition reads."""
    w, h = image.size
    candidates = []
    for count in range(1, max_num + 1):  # by number of tiles
        for i in range(1, max_num + 1):
            for j in range(1, max_num + 1):
                if i * j == count:
                    candidates.append((i, j))
    best, best_diff = (1, 1), None
    for i, j in candidates:
        diff = abs(w / h - i / j)
        if best_diff is None or diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and w * h > 0.5 * size * size * i * j:
            best = (i, j)
    i, j = best
    resized = image.resize((size * i, size * j), Image.BICUBIC)
    crops = []
    for row in range(j):
        for col in range(i):
            crops.append(resized.crop((col * size, row * size, (col + 1) * size, (row + 1) * size)))
    if len(crops) > 1:
        crops.append(image.resize((size, size), Image.BICUBIC))
    to_tensor = transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    return best, torch.stack([to_tensor(c) for c in crops])


@pytest.mark.parametrize(
    "size,grid",
    [
        ((100, 100), (1, 1)),  # small square: one tile, no thumbnail
        ((700, 700), (2, 2)),  # square tie: area > half of 2x2 tiles, not of 3x3
        ((1000, 1000), (3, 3)),  # square tie won by the larger grid
        ((1000, 300), (3, 1)),
        ((300, 1000), (1, 3)),
        ((896, 448), (2, 1)),
        ((2000, 150), (12, 1)),
        ((640, 480), None),
    ],
)
def test_internvl_tiling_matches_its_definition(size: tuple[int, int], grid: tuple[int, int] | None) -> None:
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref_grid, ref = _reference_tiles(image)
    assert internvl_grid(*size) == ref_grid
    if grid is not None:
        assert ref_grid == grid
    ours = internvl_tiles(image)
    n = ref_grid[0] * ref_grid[1]
    assert ours.shape == (n + (n > 1), 3, 448, 448) == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- InternVL2 remote code (stub)


class _StubInternVL:
    """Stands in for InternVL2's remote-code model: records how it is loaded and called."""

    def __init__(self) -> None:
        self.chats: list[tuple] = []

    def eval(self) -> _StubInternVL:
        return self

    def to(self, device: torch.device) -> _StubInternVL:
        self.device = device
        return self

    def chat(self, tokenizer, pixel_values, question, generation_config):
        self.chats.append((tokenizer, pixel_values, question, generation_config))
        return f" caption {len(self.chats)} "


def test_internvl_backend_loads_and_chats_as_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    model, tokenizer, loads = _StubInternVL(), object(), {}

    def model_from_pretrained(source, **kwargs):
        loads["model"] = (source, kwargs)
        return model

    def tokenizer_from_pretrained(source, **kwargs):
        loads["tokenizer"] = (source, kwargs)
        return tokenizer

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    folder = tmp_path / "models" / "InternVL2-8B"  # named like the hub id: the paper's captioner
    folder.mkdir(parents=True)
    assert default_backend(str(folder)) == "internvl" and derive_vlm_name(str(folder), "internvl") == "internvl"
    root = datagen.make_mvtec(
        tmp_path / "mvtec", classes=("bottle",), n_train=2, n_test_good=1, defects=("crack",), n_per_defect=1
    )
    main(["--data_set", "mvtec", "--data_path", str(root), "--vlm_model", str(folder), "--device", "cpu"])

    assert loads["model"] == (
        str(folder),
        {"torch_dtype": torch.bfloat16, "low_cpu_mem_usage": True, "trust_remote_code": True},
    )
    assert loads["tokenizer"] == (str(folder), {"trust_remote_code": True, "use_fast": False})
    assert len(model.chats) == 4  # one chat per image
    tok, pixels, question, config = model.chats[0]
    assert tok is tokenizer and question == "<image>\n" + PROMPTS["pd"]
    assert config == {"max_new_tokens": 1024, "do_sample": False}
    first = load_rgb(root / "bottle/train/good/000.png")
    assert pixels.dtype == torch.bfloat16 and torch.equal(pixels, internvl_tiles(first).to(torch.bfloat16))
    caps = load_captions(tmp_path / "mvtec_captions_internvl_pd", "train", "mvtec")
    assert sorted(caps.values()) == ["caption 1", "caption 2"]  # the files carry the name "internvl"


# ---------------------------------------------------------------- transformers-native models


def _record_generate(backend) -> list[dict]:
    calls: list[dict] = []
    original = backend.model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    backend.model.generate = generate
    return calls


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(n)]


def test_blip2_flant5_decodes_with_lavis_defaults(tmp_path: Path) -> None:
    folder = tiny_blip2_t5(tmp_path / "tiny-blip2")
    assert default_backend("Salesforce/blip2-flan-t5-xxl") == default_backend("blip") == "blip"
    assert derive_vlm_name(str(folder), "blip") == "tinyblip2"  # another model keeps its own name
    backend = build_backend("blip", str(folder), PROMPTS["pd"], dtype="float32", device="cpu")
    assert type(backend.model).__name__ == "Blip2ForConditionalGeneration"
    assert backend.model.config.text_config.model_type == "t5"
    assert backend.text == PROMPTS["pd"]  # sent as is, as LAVIS does: no chat template
    calls = _record_generate(backend)
    captions = backend(_images(2), ["bottle"] * 2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    kwargs = calls[0]
    assert {
        k: kwargs[k]
        for k in (
            "do_sample",
            "num_beams",
            "max_new_tokens",
            "min_length",
            "repetition_penalty",
            "length_penalty",
            "num_return_sequences",
        )
    } == {
        "do_sample": False,
        "num_beams": 5,
        "max_new_tokens": 30,
        "min_length": 1,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "num_return_sequences": 1,
    }
    assert kwargs["pixel_values"].shape == (2, 3, 16, 16)


def test_llava_next_is_greedy_with_256_new_tokens(tmp_path: Path) -> None:
    folder = tiny_llava_next(tmp_path / "llama3-llava-next-8b-hf")  # named like the hub id
    assert default_backend(str(folder)) == "hf" and derive_vlm_name(str(folder), "hf") == "llava"
    backend = build_backend("hf", str(folder), PROMPTS["pa"], dtype="float32", device="cpu")
    assert type(backend.model).__name__ == "LlavaNextForConditionalGeneration"
    assert backend.text == f"USER: <image> {PROMPTS['pa']} ASSISTANT:"
    calls = _record_generate(backend)
    assert len(backend(_images(1), ["bottle"])) == 1
    assert {k: calls[0][k] for k in ("do_sample", "num_beams", "max_new_tokens")} == {
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": 256,
    }


# ---------------------------------------------------------------- DeepSeek-VL through LMDeploy (stub)


def _stub_lmdeploy(monkeypatch: pytest.MonkeyPatch) -> dict:
    seen: dict = {"calls": []}

    @dataclass
    class GenerationConfig:  # the fields of lmdeploy's GenerationConfig that matter here
        max_new_tokens: int = 512
        top_k: int = 40
        top_p: float = 0.8
        temperature: float = 0.8
        do_sample: bool = True

    def pipeline(source):
        seen["source"] = source

        def run(prompts, gen_config=None):
            seen["calls"].append((prompts, gen_config))
            return [types.SimpleNamespace(text=f" answer {i} ") for i in range(len(prompts))]

        return run

    lmdeploy = types.ModuleType("lmdeploy")
    lmdeploy.pipeline, lmdeploy.GenerationConfig = pipeline, GenerationConfig
    vl, constants = types.ModuleType("lmdeploy.vl"), types.ModuleType("lmdeploy.vl.constants")
    constants.IMAGE_TOKEN = "<IMAGE_TOKEN>"
    lmdeploy.vl, vl.constants = vl, constants
    for name, module in (("lmdeploy", lmdeploy), ("lmdeploy.vl", vl), ("lmdeploy.vl.constants", constants)):
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_deepseekvl_prompt_layout_and_greedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "deepseek-vl-1.3b-chat"
    folder.mkdir()
    monkeypatch.setitem(sys.modules, "lmdeploy", None)  # not installed: one clear line
    with pytest.raises(UserError, match="pip install lmdeploy"):
        build_backend("deepseekvl", str(folder), PROMPTS["pd"])
    seen = _stub_lmdeploy(monkeypatch)
    assert default_backend(str(folder)) == default_backend("deepseekvl") == "deepseekvl"
    backend = build_backend("deepseekvl", str(folder), PROMPTS["pd"])
    images = _images(2)
    assert backend(images, ["bottle"] * 2) == ["answer 0", "answer 1"]
    prompts, config = seen["calls"][0]
    assert seen["source"] == str(folder)
    assert prompts == [(PROMPTS["pd"] + " <IMAGE_TOKEN>", images[0]), (PROMPTS["pd"] + " <IMAGE_TOKEN>", images[1])]
    assert (config.top_k, config.do_sample, config.max_new_tokens) == (1, False, 512)


# ---------------------------------------------------------------- finding the model files


def test_model_not_on_disk_fails_in_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root = datagen.make_mvtec(
        tmp_path / "mvtec", classes=("bottle",), n_train=1, n_test_good=1, defects=("crack",), n_per_defect=1
    )
    for model in ("internvl", "blip", "llava", "someone/some-vlm"):
        start = time.monotonic()
        with pytest.raises(UserError) as err:
            main(["--data_set", "mvtec", "--data_path", str(root), "--vlm_model", model])
        assert time.monotonic() - start < 10
        msg = str(err.value)
        assert "\n" not in msg and "not on disk and the hub is offline" in msg
        assert "--vlm_model FOLDER" in msg and str(tmp_path / "hub") in msg
    for hub_id in ("OpenGVLab/InternVL2-8B", "deepseek-ai/deepseek-vl-1.3b-chat"):
        with pytest.raises(UserError, match="not on disk and the hub is offline") as err:
            resolve_model(hub_id)
        assert hub_id in str(err.value)

    # online but unreachable (a refused connection): the same kind of line, no retries
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(UserError, match="hub cannot be reached"):
        resolve_model("someone/some-vlm")
    assert time.monotonic() - start < 10

    # a complete snapshot in the cache is used without the hub
    repo = tmp_path / "hub" / "models--someone--some-vlm"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert Path(resolve_model("someone/some-vlm")) == snapshot.resolve()
    with pytest.raises(UserError, match="no such model folder"):
        resolve_model(str(tmp_path / "missing" / "model"))
