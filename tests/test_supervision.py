"""The supervision registry and the search-space presets: every entry works end to end."""

import dataclasses
import json
import os

import numpy as np
import pytest

from dna_jax import artifacts, config_files, costs, pipeline, supervision, validate
from dna_jax.space import PRESETS, get_space

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registry_names_every_kind_and_refuses_unknown_or_broken_ones():
    assert supervision.names() == ("teacher", "ssl")
    assert [k.label for k in supervision.all_kinds()] == ["DNA", "DNA++"]
    assert supervision.stage_order() == ("teacher", "distill", "ssl", "rate", "search",
                                         "retrain", "deploy", "report")
    with pytest.raises(ValueError, match=r"config.supervision must be one of \('teacher', "
                                         r"'ssl'\), got 'byol'"):
        supervision.get("byol")
    dna = supervision.get("teacher")
    with pytest.raises(ValueError, match="registered twice"):
        supervision.register(dataclasses.replace(dna))
    broken = dataclasses.replace(dna, name="broken", runners={"teacher": dna.runners["teacher"]})
    with pytest.raises(ValueError, match=r"no runner for \['distill', 'rate'\]"):
        supervision.register(broken)
    assert "broken" not in supervision.names()


def test_every_kind_has_its_sections_in_the_default_config_and_its_own_stages():
    config = pipeline.get_default_config()
    for kind in supervision.all_kinds():
        assert kind.stages[-len(supervision.COMMON_STAGES):] == supervision.COMMON_STAGES
        assert set(kind.upstream) == set(kind.stages)
        assert set(kind.sections) == {*kind.own_stages, "rate"}
        for sections in kind.sections.values():
            for dotted in sections:  # every hashed section exists in the default config
                node = config
                for part in dotted.split("."):
                    node = node[part]
        assert kind.space_name(config) in PRESETS
        other = next(s for s in supervision.stage_order() if s not in kind.stages)
        with pytest.raises(ValueError, match="do not belong to supervision"):
            pipeline.parse_stages(f"{other},rate", kind)


@pytest.mark.parametrize("name", supervision.names())
def test_every_kind_runs_its_tiny_pipeline_and_resumes(name, tmp_path):
    kind = supervision.get(name)
    path, _, arg = kind.example_config.partition(":")
    config = config_files.load_config(os.path.join(REPO, path), arg or None)
    assert supervision.of(config) is kind
    figures = pipeline.run_pipeline(config, str(tmp_path))
    assert figures["stages"] == {s: "ran" for s in kind.stages}
    for stage in kind.stages:
        assert artifacts.read_manifest(os.path.join(tmp_path, stage))["stage"] == stage
    space = get_space(kind.space_name(config))
    for block in space.blocks:  # the common search reads the kind's rating tables
        assert os.path.exists(os.path.join(tmp_path, "rate", f"{block.name}.npz"))
    summary = json.load(open(os.path.join(tmp_path, pipeline.SUMMARY_FILE)))
    assert summary["winner_macs"] > 0 and 0.0 <= summary["winner_accuracy"] <= 1.0
    assert set(summary["stage_wall_seconds"]) == set(kind.stages) - {"report"}
    # The retrained winner's deploy files (the tiny configs: StableHLO only), in the report.
    deployed = json.load(open(os.path.join(tmp_path, "deploy", "deploy.json")))
    assert [r["file"] for r in deployed["files"]] == ["model.stablehlo"]
    assert summary["winner_stablehlo_bytes"] == deployed["files"][0]["bytes"]
    budget = summary["budget"][config.search.cost]
    assert summary["winner_macs"] <= budget
    report = open(os.path.join(tmp_path, pipeline.REPORT_FILE)).read()
    assert report.startswith(f"# {kind.label} run: ")
    again = pipeline.run_pipeline(config, str(tmp_path))
    assert again["stages"] == {s: "skipped" for s in kind.stages}
    assert again["winner_accuracy"] == figures["winner_accuracy"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_space_preset_builds_enumerates_samples_and_costs(name):
    space = get_space(name)
    assert space.name == name and space.blocks
    counts = [len(space.block_candidates(b)) for b in range(len(space.blocks))]
    assert all(c >= 1 for c in counts)
    assert space.size() == int(np.prod(counts, dtype=object))
    num_classes = 10
    low, high = validate.space_cost_range(space, space.resolution, num_classes)["macs"]
    assert 0 < low <= high
    rng = np.random.default_rng(0)
    for _ in range(3):
        arch = space.sample(rng)
        spec = space.to_network_spec(arch)
        macs = costs.network_costs(spec, space.resolution, num_classes).total.macs
        assert low <= macs <= high  # the space's range bounds every member
