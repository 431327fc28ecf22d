"""Loading: original checkpoints through every class, what a saved checkpoint ships as remote code, the package's
import graph, fast failures on bad paths and configs, and a light `import modeling_mico`."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import tiny_config_kwargs
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoProcessor,
)
from transformers.dynamic_module_utils import get_relative_import_files

from modeling_mico import MiCoConfig, MiCoForConditionalGeneration, MiCoForPreTraining, MiCoModel, MiCoProcessor
from modeling_mico.convert_original import load_original_checkpoint


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "modeling_mico"
PARITY = ROOT / "tests" / "fixtures" / "parity"
OPTIONAL_BACKENDS = ("decord", "soundfile", "av", "matplotlib")
# What `import modeling_mico` must not import where installed: soundfile is left out because Transformers' own
# `processing_utils` (needed to register the processor classes) imports it whenever it is installed.
NOT_IMPORTED = ("decord", "av", "matplotlib")
# Modules a checkpoint must never ship, nor the modeling code import: conversion, preprocessing and consumers.
NOT_MODEL_CODE = ("convert", "processing", "feature_extraction", "data", "evaluation", "retrieval", "captioning")
MODEL_CODE = ("configuration_mico", "modeling_mico", "modeling_mico_text")

# Start of a script that cannot import the package (as where it is not installed).
BLOCK_PACKAGE = """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_mico" or name.startswith("modeling_mico."):
                raise ImportError("the package must not be imported")
    sys.meta_path.insert(0, Block())
"""

AUTO_CLASSES = {
    AutoModel: MiCoModel,
    AutoModelForPreTraining: MiCoForPreTraining,
    AutoModelForImageTextToText: MiCoForConditionalGeneration,
}


def run_python(*parts: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the script made of `parts` (each dedented) in a fresh interpreter, offline, with its own Hugging Face
    cache."""
    script = "".join(textwrap.dedent(part) for part in parts)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=cwd)


def relative_imports(module: Path) -> set[str]:
    """Package modules `module` imports relatively, at module level or inside functions (as Transformers'
    `custom_object_save` sees them)."""
    imports = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imports |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return imports - {"__init__"}


def hub_cache_repo(cache: Path, repo_id: str, files: Path) -> None:
    """Lay `files` out in `cache` as the Hub client stores a download of `repo_id` (branch `main`)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)


def value_of(model: torch.nn.Module, suffix: str) -> torch.Tensor:
    """The tensor of `model` whose name ends with `suffix`, whatever the weight layout (`mico.` prefix or not)."""
    (tensor,) = [value for name, value in model.state_dict().items() if name == suffix or name.endswith("." + suffix)]
    return tensor


# --------------------------------------------------------------------------------------------------------------------
# Import graph and what a checkpoint ships
# --------------------------------------------------------------------------------------------------------------------


def test_import_graph_is_acyclic_and_model_code_imports_no_consumer():
    modules = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    graph = {name: relative_imports(path) & set(modules) for name, path in modules.items()}
    visiting, done = [], set()

    def visit(name: str) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting[visiting.index(name) :], name])}"
        if name in done:
            return
        visiting.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    for name in MODEL_CODE:
        if name not in graph:
            continue
        reached, pending = set(), [name]
        while pending:
            for dependency in graph[pending.pop()] - reached:
                reached.add(dependency)
                pending.append(dependency)
        assert not [dep for dep in reached if any(word in dep for word in NOT_MODEL_CODE)], (name, sorted(reached))
    shipped = {Path(path).stem for path in get_relative_import_files(str(PACKAGE / "modeling_mico.py"))}
    assert "configuration_mico" in shipped
    assert not [name for name in shipped if any(word in name for word in NOT_MODEL_CODE)], shipped


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny model saved with `save_pretrained` (its remote code included) and the outputs to expect from it."""
    directory = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = MiCoModel(MiCoConfig(**tiny_config_kwargs())).eval()
    model.save_pretrained(directory / "model")
    with torch.no_grad():
        features = model.get_video_features(torch.ones(1, 2, 3, 56, 56))
    torch.save(features.pooler_output, directory / "expected.pt")
    return directory


def test_saved_checkpoint_ships_only_configuration_and_modeling_code(saved):
    code = {path.name for path in (saved / "model").glob("*.py")}
    assert {"configuration_mico.py", "modeling_mico.py"} <= code
    assert not [name for name in code if any(word in name for word in NOT_MODEL_CODE)], code
    auto_map = json.loads((saved / "model" / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_mico.MiCoConfig",
        "AutoModel": "modeling_mico.MiCoModel",
        "AutoModelForPreTraining": "modeling_mico.MiCoForPreTraining",
        "AutoModelForImageTextToText": "modeling_mico.MiCoForConditionalGeneration",
        "AutoModelForZeroShotImageClassification": "modeling_mico.MiCoForZeroShotClassification",
        "AutoModelForImageClassification": "modeling_mico.MiCoForImageClassification",
        "AutoModelForVideoClassification": "modeling_mico.MiCoForVideoClassification",
        "AutoModelForAudioClassification": "modeling_mico.MiCoForAudioClassification",
    }


def test_remote_code_loads_without_the_package_or_optional_backends(saved):
    """A fresh interpreter that can import neither `modeling_mico` nor decord / soundfile / av / matplotlib loads the
    saved directory with `trust_remote_code=True` into every Auto class, and refuses an original checkpoint with the
    advice to install the package."""
    script = f"""
        for name in {OPTIONAL_BACKENDS!r}:
            sys.modules[name] = None  # `import name` raises ImportError
        import torch
        from transformers import AutoModel, AutoModelForImageTextToText, AutoModelForPreTraining
        directory = {str(saved / "model")!r}
        model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            features = model.get_video_features(torch.ones(1, 2, 3, 56, 56))
        torch.testing.assert_close(features.pooler_output, torch.load({str(saved / "expected.pt")!r}))
        for auto_class in (AutoModelForPreTraining, AutoModelForImageTextToText):
            head = auto_class.from_pretrained(directory, trust_remote_code=True)
            assert type(head).__module__.startswith("transformers_modules"), type(head).__module__
            print(type(head).__name__)
        try:
            type(model).from_pretrained({str(PARITY / "hub")!r})
        except OSError as error:
            assert "pip install mico-transformers" in str(error), error
        else:
            raise AssertionError("an original checkpoint loaded without the package")
        print("remote ok")
    """
    result = run_python(BLOCK_PACKAGE, script, cwd=saved)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["MiCoForPreTraining", "MiCoForConditionalGeneration", "remote", "ok"]


def test_processor_remote_code_still_loads(tmp_path):
    """The processor's own save ships the processing modules (its business) and loads without the package."""
    MiCoProcessor().save_pretrained(tmp_path / "processor")
    script = f"""
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path / "processor")!r}, trust_remote_code=True)
        print(type(processor).__name__, processor(text=["a dog"], return_tensors="pt")["input_ids"].shape[0])
    """
    result = run_python(BLOCK_PACKAGE, script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["MiCoProcessor", "1"]


def test_every_auto_class_is_registered():
    assert type(AutoConfig.for_model("mico")) is MiCoConfig
    for auto_class, model_class in AUTO_CLASSES.items():
        assert auto_class._model_mapping[MiCoConfig] is model_class
    config = MiCoConfig(**tiny_config_kwargs())
    assert type(AutoModel.from_config(config)) is MiCoModel
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    assert PROCESSOR_MAPPING[MiCoConfig] is MiCoProcessor
    assert MiCoConfig in IMAGE_PROCESSOR_MAPPING and MiCoConfig in FEATURE_EXTRACTOR_MAPPING
    assert AutoProcessor and AutoImageProcessor and AutoFeatureExtractor  # the Auto classes the package registers with


# --------------------------------------------------------------------------------------------------------------------
# Original checkpoints through every class
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_state() -> dict[str, torch.Tensor]:
    return load_original_checkpoint(PARITY / "hub")[1]


def check_loaded(model: torch.nn.Module, expected_class: type, state: dict[str, torch.Tensor]) -> None:
    assert type(model) is expected_class and not model.training and model.dtype == torch.float32
    for key in ("temperature", "itm_head.classifier.weight", "vision_model.embeddings.position_embedding"):
        assert torch.equal(value_of(model, key), value_of_state(state, key)), key
    if expected_class is not MiCoModel:
        assert torch.equal(value_of(model, "lm_head.dense.weight"), value_of_state(state, "lm_head.dense.weight"))


def value_of_state(state: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    (tensor,) = [value for name, value in state.items() if name == suffix or name.endswith("." + suffix)]
    return tensor


@pytest.mark.parametrize("layout", ["hub", "repo"])
def test_original_layouts_load_through_auto_and_head_classes(layout, converted_state):
    for auto_class, model_class in AUTO_CLASSES.items():
        check_loaded(auto_class.from_pretrained(PARITY / layout), model_class, converted_state)
        check_loaded(model_class.from_pretrained(str(PARITY / layout)), model_class, converted_state)


def test_original_hub_repository_loads_from_the_hub_cache(tmp_path, converted_state):
    """A Hub repository id in the original layout (here served offline from a cache laid out as the Hub client
    writes it) loads through `AutoModel` and a head class."""
    hub_cache_repo(tmp_path / "cache", "someone/mico-original", PARITY / "hub")
    options = {"cache_dir": tmp_path / "cache"}
    check_loaded(AutoModel.from_pretrained("someone/mico-original", **options), MiCoModel, converted_state)
    model = MiCoForConditionalGeneration.from_pretrained("someone/mico-original", **options)
    check_loaded(model, MiCoForConditionalGeneration, converted_state)


def test_mico_hub_repository_loads_from_the_hub_cache(saved, tmp_path):
    """A converted (MiCo) repository id served offline from the cache: the config.json read that tells it from an
    original checkpoint is answered by the cache, like every other file of the load."""
    hub_cache_repo(tmp_path / "cache", "someone/mico", saved / "model")
    expected = torch.load(saved / "expected.pt")
    for loader in (AutoModel, MiCoModel):
        model = loader.from_pretrained("someone/mico", cache_dir=tmp_path / "cache").eval()
        with torch.no_grad():
            features = model.get_video_features(torch.ones(1, 2, 3, 56, 56))
        torch.testing.assert_close(features.pooler_output, expected)


def test_loading_options_reach_transformers_loading():
    model, info = MiCoModel.from_pretrained(
        PARITY / "hub", dtype=torch.bfloat16, attn_implementation="eager", output_loading_info=True
    )
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert not info["missing_keys"] and not info["mismatched_keys"]


# --------------------------------------------------------------------------------------------------------------------
# Errors: at once, by name, with their cause
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["runs/tny", "./x", "/abs/nowhere/x", "~/no-such-mico-dir", "../no-such-mico-dir"])
@pytest.mark.parametrize("loader", [MiCoModel, MiCoForConditionalGeneration, AutoModel, AutoModelForPreTraining])
def test_a_mistyped_local_path_fails_at_once(name, loader, tmp_path, monkeypatch):
    """With the Hub client online (no network here: asking the Hub would retry for a minute), a name that can only be
    a local path and does not exist is refused at once."""
    (tmp_path / "work" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=f"^no such directory: {name}$"):
        loader.from_pretrained(name)
    assert time.monotonic() - start < 2


def test_a_corrupted_config_surfaces_its_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "mico", ')
    with pytest.raises(OSError, match=r"broken/config.json is not a valid JSON file") as raised:
        MiCoModel.from_pretrained(tmp_path / "broken")
    assert isinstance(raised.value.__cause__, json.JSONDecodeError)
    with pytest.raises(OSError, match=r"broken/config.json.*not a valid JSON file"):
        AutoModel.from_pretrained(tmp_path / "broken")
    # an original checkpoint whose config.json is broken, or not an object
    original = tmp_path / "original"
    shutil.copytree(PARITY / "hub", original)
    (original / "config.json").write_text("{")
    for loader in (MiCoModel, AutoModel):
        with pytest.raises(OSError, match=r"original/config.json is not a valid JSON file"):
            loader.from_pretrained(original)
    (original / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"original/config.json must hold a JSON object, not a list"):
        AutoModel.from_pretrained(original)


def test_a_directory_that_is_no_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is neither a MiCo checkpoint nor an original one \(config.json"):
        MiCoModel.from_pretrained(tmp_path)


def test_original_checkpoint_errors_are_not_swallowed(tmp_path):
    """A Hub-layout directory whose weights are unreadable fails with the weights' own error, not a fallback."""
    original = tmp_path / "original"
    shutil.copytree(PARITY / "hub", original)
    (original / "mico_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="mico_pytorch_model.safetensors is not a valid safetensors file") as raised:
        AutoModel.from_pretrained(original)
    assert isinstance(raised.value.__cause__, json.JSONDecodeError)
    assert load_file(PARITY / "hub" / "mico_pytorch_model.safetensors")  # the fixture itself is intact


# --------------------------------------------------------------------------------------------------------------------
# A light import
# --------------------------------------------------------------------------------------------------------------------


def test_import_needs_no_optional_backend_and_loads_no_consumer_module(tmp_path):
    """`import modeling_mico` works with decord, soundfile, av and matplotlib unimportable, imports none of them when
    they are installed (but soundfile, see `NOT_IMPORTED`), leaves the training and evaluation modules for first use,
    and builds a model."""
    check = f"""
        import sys
        import modeling_mico
        from modeling_mico import MiCoConfig, MiCoModel
        loaded = [name for name in {NOT_IMPORTED!r} if sys.modules.get(name) is not None]
        assert not loaded, loaded
        consumers = [name for name in ("data", "evaluation", "retrieval", "captioning", "annotations")
                     if "modeling_mico." + name in sys.modules]
        assert not consumers, consumers
        model = MiCoModel(MiCoConfig.from_preset("tiny"))
        print(type(model).__name__, type(modeling_mico.retrieval).__name__)
    """
    blocked = f"import sys\nfor name in {OPTIONAL_BACKENDS!r}:\n    sys.modules[name] = None\n"
    environment = {"PYTHONPATH": str(ROOT)}
    for parts in ((check,), (blocked, check)):
        result = run_python(*parts, cwd=tmp_path, env=environment)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == ["MiCoModel", "module"]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
