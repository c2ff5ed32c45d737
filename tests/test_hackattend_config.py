"""Validation and JSON round trip of `HackAttendConfig`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from attend_robust.hackattend import HackAttendConfig


def test_defaults_follow_the_paper():
    config = HackAttendConfig()
    assert config.alpha == 0.01
    assert config.max_layers is None
    assert config.max_heads is None
    assert (config.unit_ranking, config.layer_ranking, config.head_ranking) == ("gradient", "importance", "importance")
    assert config.protect_first_token is True
    assert config.max_length == 128


def test_every_field_has_help():
    for field in dataclasses.fields(HackAttendConfig):
        assert field.metadata.get("help"), field.name


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"alpha": -0.01}, "alpha must be in"),
        ({"max_layers": 0}, "max_layers must be a positive integer"),
        ({"max_heads": -2}, "max_heads must be a positive integer"),
        ({"max_heads": 2.5}, "max_heads must be a positive integer"),
        ({"query_batch_size": 0}, "query_batch_size must be a positive integer"),
        ({"max_length": True}, "max_length must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"unit_ranking": "gradients"}, "unit_ranking must be one of"),
        ({"layer_ranking": "score"}, "layer_ranking must be one of"),
        ({"head_ranking": None}, "head_ranking must be one of"),
    ],
)
def test_invalid_values_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        HackAttendConfig(**overrides)


@pytest.mark.parametrize("overrides", [{"alpha": "0.01"}, {"alpha": True}, {"protect_first_token": "yes"}])
def test_wrong_types_are_rejected(overrides):
    with pytest.raises(TypeError):
        HackAttendConfig(**overrides)


def test_resolve_fills_caps_from_model():
    resolved = HackAttendConfig().resolve(num_layers=6, num_heads=12)
    assert (resolved.max_layers, resolved.max_heads) == (6, 12)
    half = HackAttendConfig(max_layers=3, max_heads=6).resolve(num_layers=6, num_heads=12)
    assert (half.max_layers, half.max_heads) == (3, 6)


def test_resolve_rejects_caps_beyond_model():
    with pytest.raises(ValueError, match=r"max_layers=12 exceeds the model, which has 6 attention layers \(6 layers x 12"):
        HackAttendConfig(max_layers=12).resolve(num_layers=6, num_heads=12)
    with pytest.raises(ValueError, match="13"):
        HackAttendConfig(max_heads=13).resolve(num_layers=6, num_heads=12)


def test_json_round_trip(tmp_path):
    config = HackAttendConfig(alpha=0.05, max_layers=3, max_heads=6, unit_ranking="random", seed=4)
    path = tmp_path / "config.json"
    config.save(path)
    assert HackAttendConfig.load(path) == config


def test_load_warns_about_unknown_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"alpha": 0.02, "future_option": 1}))
    with pytest.warns(UserWarning, match="future_option"):
        config = HackAttendConfig.load(path)
    assert config.alpha == 0.02


def test_load_validates_values(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"alpha": 3}))
    with pytest.raises(ValueError, match="alpha"):
        HackAttendConfig.load(path)


def test_decision_fields_leave_out_batch_sizes():
    fields = HackAttendConfig().decision_fields()
    assert "query_batch_size" not in fields
    assert "forward_batch_size" not in fields
    assert "example_batch_size" not in fields
    assert HackAttendConfig(query_batch_size=1).decision_fields() == HackAttendConfig(query_batch_size=64).decision_fields()
