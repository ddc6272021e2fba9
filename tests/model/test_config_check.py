"""A corpus of hostile model configs, as bundles and as ultralytics ``.pt`` files: none runs, each is refused.

Every payload tries to create a marker file; the tests check the file never appears and the error names the file and
the offending key.
"""

import copy
import json
import shutil

import pytest
import torch

from model.build import build_model, load_config
from model.checkpoint import (
    DEFAULT_BUNDLE,
    METADATA_FILE,
    WEIGHTS_FILE,
    RefusedModel,
    file_sha256,
    import_checkpoint,
    load_bundle,
)
from model.config_check import ConfigError, check_config

RUN = "__import__('os').system('touch {marker}')"


def _with(path: tuple, value):
    """A change to the bundled config: set the item at ``path`` (keys and indexes) to ``value``."""

    def change(config: dict) -> None:
        target = config
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


# name -> (change to the bundled config, words the refusal must contain). ``{marker}`` becomes the marker's path.
HOSTILE = {
    "code in activation": (_with(("activation",), RUN + " or nn.SiLU()"), "'activation'"),
    "lambda in activation": (_with(("activation",), f"(lambda: {RUN})() or nn.SiLU()"), "'activation'"),
    "attribute chain in activation": (
        _with(("activation",), "nn.SiLU.__init__.__globals__['sys'].modules['os'].system('touch {marker}')"),
        "'activation'",
    ),
    "activation with arguments": (_with(("activation",), "nn.LeakyReLU(__import__('os'))"), "'activation'"),
    "code as a layer name": (_with(("backbone", 0, 2), RUN), "backbone[0] names layer"),
    "loader function as a layer": (_with(("backbone", 0, 2), "attempt_load_one_weight"), "backbone[0] names layer"),
    "torch.nn attribute chain as a layer": (_with(("head", 0, 2), "nn.modules.module.sys"), "head[0] names layer"),
    "code in an argument": (_with(("backbone", 0, 3), [64, RUN, 2]), "backbone[0] args[1]"),
    "dunder string argument": (_with(("head", 0, 3), ["__class__", 2, "nearest"]), "head[0] args[0]"),
    "nested lists in arguments": (_with(("backbone", 0, 3), [64, [[3]], 2]), "backbone[0] args[1]"),
    "absurd channels": (_with(("backbone", 0, 3), [10**9, 3, 2]), "backbone[0] args[0]"),
    "absurd repeats": (_with(("backbone", 2, 1), 10**6), "backbone[2] repeats"),
    "absurd depth": (lambda c: c["backbone"].extend([[-1, 1, "Conv", [64, 3, 1]]] * 200), "layers"),
    "absurd width": (_with(("scales", "n"), [0.33, 1000, 1024]), "'scales'"),
    "absurd class count": (_with(("nc",), 10**9), "'nc'"),
    "infinite number": (_with(("scales", "n"), [float("inf"), 0.25, 1024]), "'scales'"),
    "string class count": (_with(("nc",), "2"), "'nc'"),
    "row of the wrong shape": (_with(("backbone", 0), {"from": -1}), "backbone[0]"),
    "backbone of the wrong type": (_with(("backbone",), "Conv"), "'backbone'"),
    "from a later layer": (_with(("backbone", 2, 0), 7), "backbone[2] 'from'"),
    "head before the end": (_with(("backbone", 0, 2), "v10Detect"), "detection head"),
    "unknown key": (_with(("__reduce__",), RUN), "'__reduce__' is not allowed"),
    "akconv with absurd points": (_with(("backbone", 1, 3), [128, 10**5, 2]), "backbone[1]"),
}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "a model config ran code"


def hostile_config(name: str, marker) -> dict:
    change, _ = HOSTILE[name]
    config = copy.deepcopy(json.loads((DEFAULT_BUNDLE / METADATA_FILE).read_text())["config"])
    change(config)
    return json.loads(json.dumps(config, allow_nan=True).replace("{marker}", str(marker)))


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_config_is_refused_before_anything_is_built(name, marker):
    with pytest.raises(ConfigError, match=HOSTILE[name][1].replace("[", r"\[").replace("]", r"\]")):
        check_config(hostile_config(name, marker))
    with pytest.raises(ConfigError):
        build_model(hostile_config(name, marker))


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_config_in_a_bundle_is_refused_naming_the_file(name, marker, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(DEFAULT_BUNDLE / WEIGHTS_FILE, bundle / WEIGHTS_FILE)
    metadata = json.loads((DEFAULT_BUNDLE / METADATA_FILE).read_text())
    metadata["config"] = hostile_config(name, marker)
    metadata["weights_sha256"] = file_sha256(bundle / WEIGHTS_FILE)  # intact: the config alone is refused
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(RefusedModel, match="refused") as refused:
        load_bundle(bundle)
    assert str(bundle / METADATA_FILE) in str(refused.value)
    assert HOSTILE[name][1] in str(refused.value)


@pytest.fixture(scope="module")
def pickled_model():
    """A real DetectionModel to pickle (fp16, small), as ultralytics' trainer saves one."""
    return build_model("yolov10n-akconv").half()


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_config_in_a_pt_is_refused_naming_the_file(name, marker, tmp_path, pickled_model):
    pickled_model.yaml = hostile_config(name, marker)
    path = tmp_path / "best.pt"
    torch.save({"date": "2026-11-01T00:00:00", "ema": pickled_model, "train_args": {"imgsz": 64}}, path)
    with pytest.raises(RefusedModel, match="refused") as refused:
        import_checkpoint(path)
    assert str(path) in str(refused.value)
    assert HOSTILE[name][1] in str(refused.value)


def test_the_bundled_configs_and_every_listed_activation_build():
    for name in ("yolov10n-akconv", "yolov10s-akconv"):
        check_config(load_config(name))
    config = load_config("yolov10n-akconv")
    config["activation"] = "torch.nn.LeakyReLU(0.1)"
    model = build_model(config)
    assert isinstance(model.model[0].act, torch.nn.LeakyReLU) and model.model[0].act.negative_slope == 0.1
    assert isinstance(build_model("yolov10n-akconv").model[0].act, torch.nn.SiLU), "the next build is not affected"
