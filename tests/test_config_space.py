import argparse
import dataclasses

import optuna
import pytest
import yaml

from dse.core.config import DEFAULT_LM_WEIGHT, TrialConfig, add_config_arguments, config_from_args
from dse.core.errors import ConfigError
from dse.core.models import architecture
from dse.search.space import SPACES_DIR, canonical, load_space


def test_round_trip_json():
    cfg = TrialConfig(precision="int8", moe_experts=8, moe_top_k=2, moe_hidden=384, right_context_frames=8)
    assert TrialConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "fp8"}, "precision='fp8' is not one of fp32"),
    ({"beam_width": 0}, r"beam_width=0 must be an integer in \[1, 16\]"),
    ({"moe_experts": 2, "moe_top_k": 3}, "moe_top_k=3 cannot exceed moe_experts=2"),
    ({"hop_samples": 480, "window_samples": 400}, "hop_samples=480 must not exceed window_samples=400"),
    ({"precision": "amp-bf16", "compile": "default"}, "cannot be combined"),
    ({"temperature": 0}, r"temperature=0.0 must be a number in \[0.1, 10.0\]"),
])
def test_validator_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrialConfig(**kwargs)


def test_stride_errors_name_value_and_stride():
    with pytest.raises(ConfigError, match="right_context_frames=3 must be a multiple of the time-reduction stride 4"):
        TrialConfig(right_context_frames=3).validate_for(architecture("small"))


def test_newer_config_version_refused():
    with pytest.raises(ConfigError, match="newer than this dse"):
        TrialConfig.from_dict({"version": 99})


def test_version_1_configs_were_decoded_at_temperature_1():
    old = {k: v for k, v in TrialConfig().to_dict().items() if k != "temperature"}
    assert TrialConfig.from_dict(dict(old, version=1)).temperature == 1.0
    assert TrialConfig.from_dict(old).temperature == TrialConfig().temperature  # no version: the current one
    assert TrialConfig().to_dict()["version"] == 3


def test_accuracy_key_ignores_threads_and_compile_only():
    a = TrialConfig(threads=1, compile="off")
    assert a.accuracy_key() == TrialConfig(threads=2, compile="default").accuracy_key()
    for change in ({"precision": "int8"}, {"beam_width": 1}, {"right_context_frames": 0}, {"adapt_steps": 10},
                   {"moe_experts": 4}, {"hop_samples": 240}, {"temperature": 1.0}):
        assert a.accuracy_key() != TrialConfig(**change).accuracy_key(), change


def test_canonical_dense_drops_moe_subknobs():
    assert canonical({"moe_experts": 0, "moe_top_k": 1, "moe_hidden": 384}) == TrialConfig()


def fixed_trial(space, **values):
    """An Optuna trial that picks ``values`` (knob -> value) and each other knob's first choice."""
    params = {}
    for p in space.params:
        if p.choices is None:
            params[p.knob] = values.get(p.knob, p.low)
        elif p.ordered:
            params[p.level_name] = sorted(p.choices).index(values.get(p.knob, min(p.choices)))
        else:
            params[p.knob] = values.get(p.knob, p.choices[0])
    return optuna.trial.FixedTrial(params)


def test_an_unset_lm_weight_is_the_models_default_in_spaces():
    moe = load_space("moe")  # sets no lm_weight; beam 4
    assert "lm_weight" not in moe.fixed and not any(p.knob == "lm_weight" for p in moe.params)
    with_lm, without = moe.for_model(True), moe.for_model(False)
    assert with_lm.baseline_config().lm_weight == DEFAULT_LM_WEIGHT > 0 and without.baseline_config().lm_weight == 0.0
    trial = fixed_trial(moe)
    assert with_lm.suggest(trial).lm_weight == DEFAULT_LM_WEIGHT and without.suggest(trial).lm_weight == 0.0
    # greedy search decodes without it
    greedy = dataclasses.replace(moe, fixed=dict(moe.fixed, beam_width=1))
    assert greedy.for_model(True).suggest(trial).lm_weight == 0.0
    assert greedy.for_model(True).baseline_config().lm_weight == 0.0
    # a space that samples the weight keeps sampling it (its baseline: the default); one that fixes it keeps it
    sampled = load_space("full").for_model(True)
    assert sampled.suggest(fixed_trial(sampled, lm_weight=0.3)).lm_weight == 0.3
    assert sampled.baseline_config().lm_weight == DEFAULT_LM_WEIGHT
    fixed = dataclasses.replace(moe, fixed=dict(moe.fixed, lm_weight=0.3), baseline={"lm_weight": 0.0}).for_model(True)
    assert fixed.suggest(trial).lm_weight == 0.3 and fixed.baseline_config().lm_weight == 0.0


@pytest.mark.parametrize("argv,has_lm,expected", [
    ([], True, DEFAULT_LM_WEIGHT), ([], False, 0.0), (["--lm-weight", "0"], True, 0.0),
    (["--lm-weight", "0.45"], True, 0.45), (["--beam-width", "1"], True, 0.0),
    (["--beam-width", "1", "--lm-weight", "0.3"], True, 0.3), (["--beam-width", "8"], True, DEFAULT_LM_WEIGHT)])
def test_an_unset_lm_weight_flag_is_the_models_default(argv, has_lm, expected):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    loaded = argparse.Namespace(lm_path="m.lm.gz" if has_lm else None, arch=architecture("small"))
    assert config_from_args(p.parse_args(argv), loaded).lm_weight == expected


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_parse(path):
    space = load_space(str(path))
    assert space.objectives and space.params
    space.baseline_config()


def test_required_spaces_exist():
    names = {p.stem for p in SPACES_DIR.glob("*.yaml")}
    assert {"moe", "precision", "context", "frame", "full", "base-latency"} <= names


@pytest.mark.parametrize("data,match", [
    ({"objectives": [{"metric": "wer", "direction": "minimize"}], "params": {"warp_drive": {"choices": [1]}}},
     r"params.warp_drive: unknown knob; allowed knobs: precision"),
    ({"objectives": [{"metric": "wer", "direction": "minimize"}], "params": {"precision": {"choices": ["fp8"]}}},
     r"params.precision: 'fp8' is not one of fp32, bf16"),
    ({"objectives": [{"metric": "speed", "direction": "minimize"}]}, r"objectives\[0\].metric: 'speed' is not a metric"),
    ({"objectives": [{"metric": "wer", "direction": "down"}]}, "must be minimize or maximize"),
    ({"objectives": []}, "at least one objective"),
    ({"objectives": [{"metric": "wer", "direction": "minimize"}], "sampler": "cmaes"}, "sampler: 'cmaes' is not one of"),
    ({"objective": []}, "objective: unknown key"),
    ({"objectives": [{"metric": "wer", "direction": "minimize"}], "params": {"beam_width": {"low": 0, "high": 4}}},
     r"params.beam_width: 0 must be an integer in \[1, 16\]"),
])
def test_space_errors_name_file_key_and_allowed(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match) as err:
        load_space(str(path))
    assert str(path) in str(err.value)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("objectives: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(str(path))


def test_unknown_space_lists_known():
    with pytest.raises(ConfigError, match="known: .*moe"):
        load_space("nonexistent")


def test_numeric_choices_are_suggested_as_ordered_levels():
    import optuna

    space = load_space("base-latency")
    beam = next(p for p in space.params if p.knob == "beam_width")
    precision = next(p for p in space.params if p.knob == "precision")
    assert beam.ordered and not precision.ordered
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        cfg = space.suggest(trial)
        level = trial.params["beam_width_level"]
        assert cfg.beam_width == sorted(beam.choices)[level]
        assert "beam_width" not in trial.params and trial.params["precision"] == cfg.precision
        seen.add(cfg.beam_width)
        study.tell(trial, 0.0)
    assert seen == set(beam.choices)
    assert isinstance(study.trials[0].distributions["beam_width_level"], optuna.distributions.IntDistribution)


def test_grid_sampler_gets_plain_categories():
    import optuna

    space = load_space("base-latency")
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(space.grid(), seed=0))
    configs = set()

    def objective(trial):
        configs.add(space.suggest(trial, levels=False))
        assert "beam_width" in trial.params and "beam_width_level" not in trial.params
        return 0.0

    study.optimize(objective, n_trials=space.grid_size())
    assert len(configs) == space.grid_size() == len(study.trials)


@pytest.mark.parametrize("sampler", ["gp", "tpe", "nsga2", "random"])
def test_samplers_drive_a_constrained_study_past_their_start_up(sampler):
    import optuna

    from dse.search.study import make_sampler

    space = load_space("base-latency")
    study = optuna.create_study(directions=space.directions, sampler=make_sampler(sampler, space, 0))

    def objective(trial):
        cfg = space.suggest(trial)
        rtf = {"fp32": 1.0, "bf16": 0.8, "int8": 0.4}[cfg.precision] * (1 + 0.1 * cfg.beam_width)
        trial.set_constraint("ttft_s<=0.5", 0.05 * cfg.right_context_frames - 0.3)
        return [rtf * (1 + 0.02 * cfg.right_context_frames)] * len(space.directions)

    study.optimize(objective, n_trials=8)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials), \
        [t.state for t in study.trials]
    assert len(study.trials) == 8


def test_a_space_may_set_a_time_budget(tmp_path):
    moe = load_space("moe")
    assert moe.timeout == 360.0
    text = moe.path.read_text()
    for bad in ("0", "-5", "soon", "true"):
        path = tmp_path / f"bad{bad}.yaml"
        path.write_text(text.replace("timeout: 360", f"timeout: {bad}"))
        with pytest.raises(ConfigError, match="timeout: .* must be a positive number of seconds"):
            load_space(str(path))
    path = tmp_path / "none.yaml"
    path.write_text(text.replace("timeout: 360\n", ""))
    assert load_space(str(path)).timeout is None
