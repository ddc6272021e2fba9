import logging

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import LOGGER

from model.akconv import AKConv
from model.build import ConfigError, akconv_layers, build_model, fuse_for_inference, load_config


@pytest.fixture(scope="module")
def nano():
    return build_model("yolov10n-akconv")


def test_akconv_at_backbone_layers_1_and_3(nano):
    assert [layer.i for layer in akconv_layers(nano)] == [1, 3]
    assert all(layer.indexing == "ij" for layer in akconv_layers(nano))
    assert nano.model[1].type == "model.akconv.AKConv"
    assert (nano.model[1].conv[0].in_channels, nano.model[1].conv[0].out_channels) == (16, 32)
    assert (nano.model[3].conv[0].in_channels, nano.model[3].conv[0].out_channels) == (32, 64)
    assert nano.model[1].conv[1].eps == 1e-3, "ultralytics' BatchNorm settings apply to AKConv too"


def test_seed_model_matches_the_seed_facts():
    """The seed README: the seed's config at scale s builds with 8,011,656 parameters."""
    model = build_model("yolov10s-akconv", indexing="xy")
    assert sum(p.numel() for p in model.parameters()) == 8_011_656
    assert model.yaml["scale"] == "s"
    assert all(layer.indexing == "xy" for layer in akconv_layers(model))


def test_scale_and_nc_overrides():
    model = build_model("yolov10s-akconv", scale="s", nc=5)
    assert model.model[-1].nc == 5
    with pytest.raises(ConfigError, match="scale 'n'"):
        build_model("yolov10s-akconv", scale="n")


def test_unknown_config_names_the_bundled_ones():
    with pytest.raises(ConfigError, match="yolov10n-akconv"):
        build_model("yolov99-nothing")


def test_plain_ultralytics_models_are_untouched(nano):
    plain = DetectionModel("yolov10n.yaml", nc=2, verbose=False)
    assert not akconv_layers(plain)
    assert plain.model[1].type == "ultralytics.nn.modules.conv.Conv"


def test_training_forward_returns_both_heads(nano):
    nano.train()
    out = nano(torch.rand(2, 3, 64, 64))
    assert set(out) == {"one2many", "one2one"}


def test_inference_runs_the_one_to_one_head_without_nms():
    model = build_model("yolov10n-akconv")
    model.eval()
    with torch.no_grad():
        unfused = model(torch.rand(1, 3, 64, 64))[0]
    assert unfused.shape[1] == 4 + 2, "plain eval decodes the one-to-many head for NMS"
    detector = fuse_for_inference(model)
    head = model.model[-1]
    assert head.end2end and head.cv2 is None and head.one2one_cv2 is not None
    assert all(isinstance(layer.conv[1], torch.nn.Identity) for layer in akconv_layers(model))
    with torch.no_grad():
        out = detector(torch.rand(3, 3, 160, 128))  # 420 anchors
    assert out.shape == (3, 300, 6)
    scores = out[..., 4]
    assert torch.all(scores[:, :-1] >= scores[:, 1:]), "rows are sorted by score"
    assert set(out[..., 5].unique().tolist()) <= {0.0, 1.0}


def test_fused_one_to_one_head_equals_the_unfused_one_to_one_head():
    model = build_model("yolov10n-akconv").eval()
    model.end2end = True
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        unfused = model(images)[0]
        fused = fuse_for_inference(model)(images)
    torch.testing.assert_close(fused, unfused, rtol=1e-3, atol=1e-3)


def test_akconv_is_a_model_module():
    assert issubclass(AKConv, torch.nn.Module)


def test_the_verbose_build_prints_one_summary_with_the_akconv_rows():
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    LOGGER.addHandler(handler)
    try:
        build_model("yolov10n-akconv", verbose=True)
    finally:
        LOGGER.removeHandler(handler)
    printed = "\n".join(lines)
    assert printed.count("summary") == 1
    assert printed.count("model.akconv.AKConv") == 2, "the layer table shows the real layers, not placeholders"


def test_a_models_activation_never_reaches_the_next_model_built_in_the_process():
    """Several models in one process (DETECTOR_MODELS): ultralytics' ``Conv.default_act`` is global, so a config's
    activation must apply to its own model only, whichever is built first."""
    from ultralytics.nn.modules.conv import Conv

    before = Conv.default_act
    relu_config = load_config("yolov10n-akconv") | {"activation": "nn.ReLU()"}
    relu = build_model(relu_config)
    silu = build_model("yolov10n-akconv")

    def activations(model):  # of the convolutions that have one (some are built with act=False: Identity)
        return {type(module.act) for module in model.modules() if isinstance(module, Conv)} - {torch.nn.Identity}

    assert activations(relu) == {torch.nn.ReLU} and activations(silu) == {torch.nn.SiLU}
    assert Conv.default_act is before
