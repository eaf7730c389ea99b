"""Reliability of the pipeline: bad config values refused before any work.

Everything here runs on `configs/fashion_mnist_dna.py:tiny`; only the training-stage rerun
trains (the tiny teacher, a few steps).
"""

import os

import pytest

from dna_jax import config_files, pipeline, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_dna.py")
NAN, INF = float("nan"), float("inf")

def tiny_config(**overrides):
    return config_files.load_config(CONFIG, "tiny", **overrides)


# ---- config validation: every bad value named before any work ------------------------------

def _no_work(*args):
    raise AssertionError("a stage started: the bad value was not caught")


BAD_VALUES = [  # (overrides, the field named, a fragment of the fix)
    ({"search.budget": 1.0}, "config.search.budget=1.0", "raise it to at least 258,992"),
    ({"search.params_budget": 10.0}, "config.search.params_budget=10.0",
     "raise it to at least 6,869"),
    ({"search.budget_fraction": 0.0}, "config.search.budget_fraction=0.0", "must be > 0"),
    ({"search.budget_fraction": -0.5}, "config.search.budget_fraction=-0.5", "must be > 0"),
    ({"search.budget_fraction": 0.01}, "config.search.budget_fraction=0.01",
     "raise it to at least 0.452 (the teacher costs 573,472 macs)"),
    ({"data.image_size": 2}, "config.data.image_size=2", "use at least 4"),
    ({"teacher.train.data.image_size": 2}, "config.teacher.train.data.image_size=2",
     "total stride 4 of teacher 'tiny_teacher'"),
    ({"rate.cost_resolution": 3}, "config.rate.cost_resolution=3", "use at least 4"),
    ({"teacher.train.total_steps": 0, "teacher.train.num_epochs": 0.0},
     "config.teacher.train.num_epochs=0.0", "must be > 0 when teacher.train.total_steps is 0"),
    ({"retrain.total_steps": -1}, "config.retrain.total_steps=-1", "must be >= 0"),
    ({"retrain.num_epochs": -1.0}, "config.retrain.num_epochs=-1.0", "must be >= 0"),
    ({"data.batch_size": -4}, "config.data.batch_size=-4", "must be >= 1"),
    ({"teacher.train.data.batch_size": 0}, "config.teacher.train.data.batch_size=0",
     "must be >= 1"),
    ({"mesh.num_devices": 4, "data.batch_size": 18}, "config.data.batch_size=18",
     "divisible by the 4 devices of the mesh: use 16 or 20"),
    ({"mesh.num_devices": 4, "retrain.data.eval_batch_size": 10},
     "config.retrain.data.eval_batch_size=10", "use 12"),
    ({"mesh.num_devices": 64}, "config.mesh.num_devices=64", "devices exist"),
    ({"retrain.optimizer.learning_rate": NAN}, "config.retrain.optimizer.learning_rate=nan",
     "must be a finite number"),
    ({"teacher.train.optimizer.learning_rate": -0.1},
     "config.teacher.train.optimizer.learning_rate=-0.1", "must be > 0"),
    ({"distill.learning_rates": (NAN,)}, "config.distill.learning_rates[0]=nan",
     "must be a finite number"),
    ({"distill.weight_decay": INF}, "config.distill.weight_decay=inf", "finite"),
    ({"rate.num_batches": 0}, "config.rate.num_batches", ">= 1"),
    ({"search.top_k": 0}, "config.search.top_k=0", "must be >= 1"),
    ({"teacher.train.keep_checkpoints": 0}, "config.teacher.train.keep_checkpoints=0",
     "must be >= 1"),
]


@pytest.mark.parametrize("overrides, field, fix", BAD_VALUES,
                         ids=[",".join(o) for o, _, _ in BAD_VALUES])
def test_bad_values_are_named_before_any_work(tmp_path, monkeypatch, overrides, field, fix):
    workdir = tmp_path / "run"
    monkeypatch.setattr(pipeline, "run_stage", _no_work)
    with pytest.raises(validate.ConfigError) as error:
        pipeline.run_pipeline(tiny_config(**overrides), str(workdir))
    message = str(error.value)
    assert field in message and fix in message, message
    assert "nothing was run" in message
    assert not workdir.exists()  # no stage directory, not even the workdir


def test_every_problem_is_listed_at_once():
    config = tiny_config(**{"search.budget_fraction": 0.0, "data.batch_size": -1,
                            "retrain.optimizer.learning_rate": NAN})
    with pytest.raises(validate.ConfigError) as error:
        pipeline.check_config(config)
    assert len(error.value.problems) == 3, error.value.problems


def test_only_the_stages_that_run_are_checked():
    # A retraining typo does not stop a rating-only run; the search budget is not checked
    # when the search does not run.
    pipeline.check_config(tiny_config(stages="teacher,distill,rate",
                                      **{"retrain.num_epochs": 0.0, "search.budget": 1.0}))


def test_the_cost_range_brackets_every_network_of_the_space():
    import numpy as np

    from dna_jax import costs
    from dna_jax.space import get_space
    space = get_space("tiny")
    ranges = validate.space_cost_range(space, 16, 10)
    rng = np.random.default_rng(0)
    for _ in range(20):
        spec = space.to_network_spec(space.sample(rng))
        total = costs.network_costs(spec, 16, 10).total.as_dict()
        for name, (low, high) in ranges.items():
            assert low <= total[name] <= high, name
    assert validate.total_stride(space) == 4
