"""Adding a knob is one registry entry and its apply function: a toy knob registered here
reaches the CLI, search spaces, the accuracy key, the build and the dashboard with no other edit."""
import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from dse.core import knobs
from dse.core.build import build_recognizer
from dse.core.config import TrialConfig, add_config_arguments, config_from_args
from dse.core.errors import ConfigError
from dse.search.space import parse_space

# imported before a toy knob is registered, as in a real run: its module-level baseline holds
# only the registered knobs
import dashboard_study  # noqa: E402,F401  (imported for that side effect)


def scale_joiner(loaded, config):
    """The toy transform (architecture stage): scales the joiner's output layer by ``toy_gain``."""
    with torch.no_grad():
        loaded.model.joiner.linear.weight.mul_(config.toy_gain)
    return dataclasses.replace(loaded, info=dict(loaded.info, toy_gain=config.toy_gain))


@pytest.fixture
def toy_knob():
    knobs.register(knobs.Transform("toy", "architecture", scale_joiner, order=90, knobs=(
        knobs.Knob("toy_gain", "float", 1.0, "scale of the joiner's output weights (a test knob)",
                   range=(0.25, 4.0), weights=True),)))
    yield knobs.KNOBS["toy_gain"]
    knobs.unregister("toy")


def test_toy_knob_is_a_flag(toy_knob, tiny):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    assert "--toy-gain" in p.format_help()
    config = config_from_args(p.parse_args(["--toy-gain", "2"]), tiny)
    assert config.toy_gain == 2.0 and TrialConfig().toy_gain == 1.0
    with pytest.raises(SystemExit):
        p.parse_args(["--toy-gain", "many"])


def test_toy_knob_in_a_space_and_its_checks(toy_knob):
    data = {"objectives": [{"metric": "wer", "direction": "minimize"}],
            "params": {"toy_gain": {"choices": [1.0, 2.0]}}}
    space = parse_space(data, Path("toy.yaml"))
    assert space.grid() == {"toy_gain": [1.0, 2.0]}
    with pytest.raises(ConfigError, match="params.toy_gain.*must be a number in"):
        parse_space(dict(data, params={"toy_gain": {"choices": [9.0]}}), Path("toy.yaml"))
    with pytest.raises(ConfigError, match="toy_gain=9.0"):
        TrialConfig(toy_gain=9.0)


def test_toy_knob_changes_the_accuracy_and_weights_keys(toy_knob):
    a, b = TrialConfig(), TrialConfig(toy_gain=2.0)
    assert a.accuracy_key() != b.accuracy_key() and a.weights_key() != b.weights_key()
    assert TrialConfig.from_json(b.to_json()) == b


def test_toy_knob_is_applied_by_the_build(toy_knob, tiny):
    plain = build_recognizer(tiny, TrialConfig(beam_width=1))
    scaled = build_recognizer(tiny, TrialConfig(beam_width=1, toy_gain=2.0))
    assert scaled.loaded.info["toy_gain"] == 2.0 and plain.loaded.info["toy_gain"] == 1.0
    assert torch.equal(scaled.loaded.model.joiner.linear.weight, 2 * tiny.model.joiner.linear.weight)
    assert torch.equal(plain.loaded.model.joiner.linear.weight, tiny.model.joiner.linear.weight)


def test_toy_knob_is_a_dashboard_column(toy_knob):
    pytest.importorskip("pandas")
    from dashboard import logic
    from dashboard_study import TrialSpec, write_study  # noqa: F811

    study = write_study(None, "toy", [TrialSpec(knobs={"toy_gain": 2.0}, wer=0.3, rtf=0.1)])
    rows = logic.trial_rows(study.get_trials(), "toy")
    assert rows["toy_gain"].tolist() == [2.0]
    assert "toy_gain" in logic.config_table(rows["config"][0], None)["knob"].tolist()


def test_unregistering_removes_the_knob(toy_knob):
    knobs.unregister("toy")
    assert "toy_gain" not in knobs.KNOBS
    with pytest.raises(ConfigError, match="unknown knob"):
        TrialConfig(toy_gain=2.0)
    knobs.register(knobs.Transform("toy", "architecture", scale_joiner, knobs=(toy_knob,)))
