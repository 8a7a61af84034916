"""The Mini-Gemini checkpoint converter (``python -m visionzip_tune convert mini-gemini``): tiny random models
written in MGM's ORIGINAL key layout and config format, converted, and compared with the source model and the
per-token MGM computation of test_mini_gemini.py; MGM-7B's geometry on the meta device; every refusal as one
paragraph."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import cli_error
from safetensors.torch import save_file
from test_mini_gemini import SPEC, TEXT, hr_pixels, input_ids, oracle, oracle_logits, oracle_tokens, tiny_mgm
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, LlamaConfig

from visionzip_tune import __main__ as cli
from visionzip_tune.models.mini_gemini.convert_mini_gemini import (
    clip_config_from_weights,
    convert_mini_gemini,
    sentencepiece_problem,
    convnext_config_from_weights,
    to_hf_key,
    to_mgm_key,
)
from visionzip_tune.errors import UserError
from visionzip_tune.models.mini_gemini.image_processing_mini_gemini import OPENAI_CLIP_MEAN
from visionzip_tune.models.mini_gemini.configuration_mini_gemini import MiniGeminiConfig
from visionzip_tune.models.mini_gemini.modeling_mini_gemini import MiniGeminiForConditionalGeneration
from visionzip_tune.demo.tiny import build_tokenizer


@pytest.fixture(scope="module")
def normal():
    return tiny_mgm(hd=False)


# ----------------------------------------------------------------------------------------------------------------
# The converter. Checkpoints are written in MGM's own key layout by the renaming below, written from MGM's code
# independently of the package's table.

_MGM_RENAMES = [
    (r"^model\.language_model\.", "model."),
    (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^model\.vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
    (r"^model\.vision_tower_aux\.embeddings\.patch_embeddings\.", "model.vision_tower_aux.vision_stem.0."),
    (r"^model\.vision_tower_aux\.embeddings\.layernorm\.", "model.vision_tower_aux.vision_stem.1."),
    (r"\.encoder\.stages\.(\d+)\.downsampling_layer\.", r".vision_stages.\1.downsample."),
    (r"\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r".vision_stages.\1.blocks.\2."),
    (r"\.layer_scale_parameter$", ".gamma"),
    (r"(blocks\.\d+)\.dwconv\.", r"\1.conv_dw."),
    (r"(blocks\.\d+)\.layernorm\.", r"\1.norm."),
    (r"(blocks\.\d+)\.pwconv1\.", r"\1.mlp.fc1."),
    (r"(blocks\.\d+)\.pwconv2\.", r"\1.mlp.fc2."),
]


def mgm_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under MGM's names, without the <image> row (MGM's vocabulary has no such token)."""
    state = {}
    for name, tensor in model.state_dict().items():
        for pattern, replacement in _MGM_RENAMES:
            name = re.sub(pattern, replacement, name)
        state[name] = tensor.clone()
    image_row = model.config.image_token_id
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert image_row == state[name].shape[0] - 1
        state[name] = state[name][:image_row].clone()
    return state


def mgm_config(model, **changes) -> dict:
    """An MGM ``config.json`` (a LlamaConfig plus mm_* keys, as MGMLlamaForCausalLM saves it) for ``model``."""
    text, vision = model.config.text_config, model.config.vision_config
    config = {
        "architectures": ["MGMLlamaForCausalLM"],
        "model_type": "mgm",
        "torch_dtype": "float32",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "vocab_size": model.config.image_token_id,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pretraining_tp": 1,
        "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
        "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
        "mm_hidden_size": vision.hidden_size,
        "mm_hidden_size_aux": sum(model.config.aux_vision_config.hidden_sizes),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "image_size_aux": model.config.image_size_aux,
        "image_grid": model.config.image_grid,
        "image_global": model.config.image_global,
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "optimize_vision_tower": False,
        "optimize_vision_tower_aux": False,
        "tokenizer_padding_side": "right",
    }
    return {**config, **changes}


def write_checkpoint(directory, state, config, *, shards: int = 1, fmt: str = "safetensors"):
    """An MGM checkpoint directory: config.json, weights (``shards`` files with an index, or one file), and the
    tokenizer of the tiny LLM without ``<image>``."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    build_tokenizer(media_tokens=()).save_pretrained(directory)
    names = sorted(state)
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i in range(shards):
        part = {name: state[name].contiguous() for name in names[i::shards]}
        filename = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}"
        save_file(part, directory / filename) if fmt == "safetensors" else torch.save(part, directory / filename)
        weight_map.update({name: filename for name in part})
    if shards > 1:
        (directory / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _assert_converted_like(source, tokenizer, out):
    """The converted directory loads through the Auto classes and gives the logits of the straightforward MGM
    computation with the checkpoint's weights (test_mini_gemini.oracle_logits)."""
    converted = AutoModelForImageTextToText.from_pretrained(out).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert type(converted) is MiniGeminiForConditionalGeneration
    assert converted.config.image_token_id == loaded_tokenizer.convert_tokens_to_ids("<image>")
    assert converted.config.image_token_id == source.config.image_token_id  # first id after MGM's vocabulary
    assert converted.config.text_config.vocab_size % 64 == 0
    assert processor.crop_size["height"] == source.config.image_size_aux
    assert list(processor.image_mean) == list(OPENAI_CLIP_MEAN)
    ids, pixels = input_ids(source, tokenizer), hr_pixels(source)
    assert torch.equal(
        loaded_tokenizer(TEXT.format(image="<image>"), return_tensors="pt").input_ids,
        tokenizer(TEXT.format(image="<image>"), return_tensors="pt").input_ids,
    )
    with torch.no_grad():
        got = converted(input_ids=ids, pixel_values=pixels).logits
        expected = oracle_logits(source, ids, pixels)
    vocabulary = source.config.image_token_id  # MGM's rows; the <image> row and padding are new
    torch.testing.assert_close(got[..., :vocabulary], expected[..., :vocabulary], rtol=0, atol=1e-5)
    return converted


def test_convert_sharded_safetensors_with_named_tower_dir(normal, tmp_path):
    """Both towers in the checkpoint; CLIP geometry from the local tower directory the config names (its 4 heads of
    16 could not be read from the weights), ConvNeXt's from the weights."""
    model, tokenizer = normal
    tower_dir = tmp_path / "towers" / "clip-tiny"
    model.config.vision_config.save_pretrained(tower_dir)
    state = mgm_state(model)
    assert {  # MGM's layout, as its checkpoints name the weights
        "model.mm_projector.0.weight",
        "model.vlm_uni_query_projector.1.bias",
        "model.embed_tokens.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
        "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding",
        "model.vision_tower_aux.vision_stem.0.weight",
        "model.vision_tower_aux.vision_stages.1.downsample.1.weight",
        "model.vision_tower_aux.vision_stages.2.blocks.1.gamma",
        "model.vision_tower_aux.vision_stages.0.blocks.0.mlp.fc2.bias",
    } <= set(state)
    checkpoint = write_checkpoint(tmp_path / "mgm", state, mgm_config(model, mm_vision_tower=str(tower_dir)), shards=3)
    out = convert_mini_gemini(checkpoint, tmp_path / "out")
    converted = _assert_converted_like(model, tokenizer, out)
    pixels = hr_pixels(model)
    with torch.no_grad():
        features = converted.model.get_image_features(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(features, oracle_tokens(oracle(converted, pixels)), rtol=0, atol=2e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mgm", "out", "towers"]  # no temporary directory left


def test_convert_single_bin_hd_geometry_from_weights(tmp_path):
    """HD layout, one .bin file, no tower directory: CLIP geometry read from the weight shapes (64-wide heads)."""
    model, tokenizer = tiny_mgm(hd=True, spec=dataclasses.replace(SPEC, vision_hidden=128, vision_heads=2))
    checkpoint = write_checkpoint(tmp_path / "mgm", mgm_state(model), mgm_config(model), fmt="bin")
    out = convert_mini_gemini(checkpoint, tmp_path / "out")
    converted = _assert_converted_like(model, tokenizer, out)
    assert (converted.config.image_grid, converted.config.image_global, converted.config.image_seq_length) == (
        2,
        True,
        320,
    )


def test_convert_towers_from_clip_dir_and_open_clip_file(normal, tmp_path):
    """A checkpoint without tower weights: --clip (a transformers CLIP save, vision_model.* keys next to a text
    tower) and --convnext (LAION's open_clip file, visual.trunk.* next to the rest of a CLIP model)."""
    model, tokenizer = normal
    state = mgm_state(model)
    clip_prefix, aux_prefix = "model.vision_tower.vision_tower.", "model.vision_tower_aux."
    clip_dir = tmp_path / "clip"
    model.config.vision_config.save_pretrained(clip_dir)
    clip_state = {k.removeprefix(clip_prefix): v for k, v in state.items() if k.startswith(clip_prefix)}
    clip_state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)
    save_file(clip_state, clip_dir / "model.safetensors")
    open_clip = {
        k.replace(aux_prefix + "vision_", "visual.trunk."): v for k, v in state.items() if k.startswith(aux_prefix)
    }
    open_clip.update(
        {
            "visual.trunk.head.norm.weight": torch.ones(64),
            "visual.head.mlp.fc1.weight": torch.zeros(2, 64),
            "logit_scale": torch.ones(()),
        }
    )
    torch.save({"state_dict": open_clip}, tmp_path / "open_clip_pytorch_model.bin")
    without_towers = {k: v for k, v in state.items() if not k.startswith((clip_prefix, aux_prefix))}
    checkpoint = write_checkpoint(tmp_path / "mgm", without_towers, mgm_config(model), shards=2)
    with pytest.raises(UserError, match=r"no CLIP tower weights .* pass --clip"):
        convert_mini_gemini(checkpoint, tmp_path / "out")
    out = convert_mini_gemini(
        checkpoint, tmp_path / "out", clip=clip_dir, convnext=tmp_path / "open_clip_pytorch_model.bin"
    )
    _assert_converted_like(model, tokenizer, out)
    with pytest.raises(UserError, match="already exists"):
        convert_mini_gemini(checkpoint, out, clip=clip_dir, convnext=tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(UserError, match="already holds the CLIP tower's weights"):
        convert_mini_gemini(
            write_checkpoint(tmp_path / "full", state, mgm_config(model)), tmp_path / "out2", clip=clip_dir
        )


def test_real_geometry_names_and_size():
    """MGM-7B's geometry (CLIP ViT-L/14-336, ConvNeXt-L at 768 px, Vicuna-7B), built on the meta device: every weight
    has an MGM name that maps back, the tower geometry is recovered from the MGM-named shapes alone, and the size is
    7.27 B parameters, which matches the ~14.5 GB of MGM-7B's bf16 shards."""
    llm = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    config = MiniGeminiConfig(text_config=llm)
    with torch.device("meta"):
        model = MiniGeminiForConditionalGeneration(config)
    state = model.state_dict()
    shapes = {to_mgm_key(name): tuple(t.shape) for name, t in state.items()}
    assert None not in shapes and {to_hf_key(name) for name in shapes} == set(state)
    assert shapes["model.vision_tower_aux.vision_stages.2.blocks.26.mlp.fc1.weight"] == (3072, 768)
    assert shapes["model.vlm_uni_aux_projector.1.weight"] == (1024, 2880)
    clip = clip_config_from_weights(
        {
            k.removeprefix("model.vision_tower.vision_tower.vision_model."): v
            for k, v in shapes.items()
            if k.startswith("model.vision_tower.vision_tower.")
        }
    )
    convnext = convnext_config_from_weights(
        {
            k.removeprefix("model.vision_tower_aux."): v
            for k, v in shapes.items()
            if k.startswith("model.vision_tower_aux.")
        }
    )
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "hidden_act",
    ):
        assert getattr(clip, key) == getattr(config.vision_config, key), key
    assert (convnext.hidden_sizes, convnext.depths, convnext.patch_size) == ([192, 384, 768, 1536], [3, 3, 27, 3], 4)
    assert sum(p.numel() for p in model.parameters()) == 7_266_093_504


@pytest.fixture
def good_checkpoint(normal, tmp_path):
    """(state, config) of a valid MGM checkpoint of the tiny model, whose CLIP geometry is in a local tower dir."""
    model, _ = normal
    tower_dir = tmp_path / "clip-tiny"
    model.config.vision_config.save_pretrained(tower_dir)
    return mgm_state(model), mgm_config(model, mm_vision_tower=str(tower_dir))


def _bad_checkpoints(state, config):
    """name -> (state, config, text the error must contain)."""
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}
    extra = {**state, "model.vision_resampler.weight": torch.zeros(2)}
    transposed = {**state, "model.mm_projector.2.weight": state["model.mm_projector.2.weight"][:, :5].t().clone()}
    return {
        "missing": (missing, config, "missing (1): model.layers.1.mlp.down_proj.weight"),
        "extra": (extra, config, "unexpected (1): model.vision_resampler.weight"),
        "shape": (transposed, config, "model.mm_projector.2.weight [5, 64] vs [64, 64]"),
        "projector": (
            state,
            {**config, "mm_projector_type": "linear"},
            "mm_projector_type='linear' (expected 'mlp2x_gelu')",
        ),
        "feature": (state, {**config, "mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
    }


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "projector", "feature"])
def test_convert_errors_name_the_keys(good_checkpoint, tmp_path, capsys, case):
    state, config, message = _bad_checkpoints(*good_checkpoint)[case]
    checkpoint = write_checkpoint(tmp_path / "mgm", state, config)
    out = tmp_path / "converted"
    code = cli.main(["convert", "mini-gemini", "--checkpoint", str(checkpoint), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    paragraph = err[err.index("error: ") :].strip()
    assert message in " ".join(paragraph.split())
    assert "\n\n" not in paragraph
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 20), "model.safetensors as a safetensors file"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weights: expected one of model.safetensors"),
        (lambda d: (d / "config.json").write_text("{"), "cannot read"),
        (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer: expected tokenizer.json or tokenizer.model"),
    ],
    ids=["corrupt-weights", "no-weights", "corrupt-config", "no-tokenizer"],
)
def test_convert_refuses_unreadable_checkpoints(good_checkpoint, tmp_path, capsys, damage, message):
    checkpoint = write_checkpoint(tmp_path / "mgm", *good_checkpoint)
    damage(checkpoint)
    out = tmp_path / "converted"
    assert message in cli_error(
        ["convert", "mini-gemini", "--checkpoint", str(checkpoint), "--output", str(out)], capsys
    )
    assert not out.exists()


@pytest.mark.slow  # a fresh interpreter: ~5 s of imports
def test_convert_error_exit_status_through_python_m(good_checkpoint, tmp_path):
    state, config, message = _bad_checkpoints(*good_checkpoint)["projector"]
    checkpoint = write_checkpoint(tmp_path / "mgm", state, config)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "visionzip_tune",
            "convert",
            "mini-gemini",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and message in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_tokenizer_model_without_sentencepiece_names_the_extra(good_checkpoint, tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "mgm", *good_checkpoint)
    (checkpoint / "tokenizer.json").unlink()
    (checkpoint / "tokenizer.model").write_bytes(b"never read")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "sentencepiece" else find_spec(name))
    with pytest.raises(UserError, match=r"tokenizer.model and no tokenizer.json.*visionzip-tune\[sentencepiece\]"):
        convert_mini_gemini(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_model_with_a_reader_protobuf_cannot_load_says_what_to_install(
    good_checkpoint, tmp_path, monkeypatch
):
    checkpoint = write_checkpoint(tmp_path / "mgm", *good_checkpoint)
    (checkpoint / "tokenizer.json").unlink()
    (checkpoint / "tokenizer.model").write_bytes(b"never read")
    import_module = importlib.import_module

    def protobuf_too_old(name: str):  # what protobuf 6 raises on sentencepiece 0.2.3's reader (gencode 7.36.1)
        if name == "sentencepiece.sentencepiece_model_pb2":
            raise RuntimeError("Detected incompatible Protobuf Gencode/Runtime versions: gencode 7.36.1 runtime 6.33.6")
        return import_module(name)

    monkeypatch.setattr(importlib, "import_module", protobuf_too_old)
    with pytest.raises(
        UserError, match=r"gencode 7.36.1 runtime 6.33.6\): pip install -U protobuf.*sentencepiece<0.2.3"
    ):
        convert_mini_gemini(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sentencepiece_tokenizer_model(good_checkpoint, tmp_path):
    """A checkpoint with only a sentencepiece tokenizer.model (Vicuna's case) converts to the same token ids."""
    sentencepiece = pytest.importorskip("sentencepiece")
    assert sentencepiece_problem() is None  # CI installs a sentencepiece whose reader loads beside its protobuf

    checkpoint = write_checkpoint(tmp_path / "mgm", *good_checkpoint)
    (checkpoint / "tokenizer.json").unlink()
    model_file = tmp_path / "spm.model"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([TEXT.format(image="a red circle"), "What shape is in the image? yes no"] * 20),
        model_prefix=str(model_file.with_suffix("")),
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    (checkpoint / "tokenizer.model").write_bytes(model_file.read_bytes())
    vicuna = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
    }
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(vicuna))  # as in Vicuna-v1.5 / MGM repositories
    out = convert_mini_gemini(checkpoint, tmp_path / "out")
    converted = AutoTokenizer.from_pretrained(out)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    text = "What shape is in the image?"
    assert converted(text).input_ids == [1, *processor.encode(text)]
    image_id = processor.get_piece_size()  # the first id after the sentencepiece vocabulary
    assert converted.convert_tokens_to_ids("<image>") == image_id
    assert converted("USER: <image>\nyes").input_ids.count(image_id) == 1
