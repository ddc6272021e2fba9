import pytest
from pydantic import ValidationError

from service.process.settings import Settings, settings_from_cli


def test_defaults():
    settings = Settings()
    assert settings.device == "auto" and settings.model_path is None and settings.api_key is None


def test_environment_with_prefix(monkeypatch):
    monkeypatch.setenv("DETECTOR_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("DETECTOR_DEVICE", "cuda:1")
    settings = Settings()
    assert settings.max_batch_size == 16 and settings.device == "cuda:1"


def test_cli_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("DETECTOR_MAX_BATCH_SIZE", "16")
    settings = settings_from_cli(["--max-batch-size", "4", "--max-batch-wait-ms", "2.5", "--port", "9000"])
    assert (settings.max_batch_size, settings.max_batch_wait_ms, settings.port) == (4, 2.5, 9000)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"input_size": 300}, "multiple of 32"),
        ({"max_batch_size": 16, "max_queue": 8}, "must be >= max_batch_size"),
        ({"default_conf": 1.5}, "less than or equal to 1"),
        ({"runtime": "tensorrt"}, "runtime"),
        ({"compiled_dir": "/tmp/packages"}, "set runtime aotinductor .what compiled_dir alone meant before."),
        ({"runtime": "int8", "device": "cuda"}, "run on the CPU in float32: set device cpu or auto"),
        ({"runtime": {"a": "int8"}}, "a runtime per model needs models"),
        ({"models": {"a": "a.pt"}, "runtime": {"b": "int8"}}, "runtime names models that models does not serve: b"),
    ],
)
def test_nonsense_is_refused_with_a_message(values, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**values)


def test_public_view_masks_the_api_key():
    public = Settings(api_key="s3cret").public()
    assert public["api_key"] == "********" and "s3cret" not in str(public)
    assert Settings().public()["api_key"] is None


def test_runtime_for_every_model_or_per_model(monkeypatch):
    """One runtime for every model, or a JSON object naming some (the others run eager), from the environment."""
    assert Settings(runtime="openvino").runtime_for(None) == "openvino"
    monkeypatch.setenv("DETECTOR_MODELS", '{"a": "a.pt", "b": "b.pt"}')
    monkeypatch.setenv("DETECTOR_RUNTIME", '{"a": "int8"}')
    settings = Settings()
    assert (settings.runtime_for("a"), settings.runtime_for("b")) == ("int8", "eager")
    assert settings_from_cli(["--runtime", "aotinductor"]).runtime_for("b") == "aotinductor"


def test_runtimes_are_the_model_packages():
    """The setting offers exactly the runtimes model.compiled can run."""
    from typing import get_args

    from model.compiled import RUNTIMES
    from service.process.settings import Runtime

    assert get_args(Runtime) == RUNTIMES
