"""Every config file loads with every variant, passes the pipeline's checks, and documents
the command that runs it (the first lines of its docstring)."""

import glob
import importlib.util
import os

import pytest

from dna_jax import (config_files, ground_truth, pipeline, progressive, ranking,
                     search_effectiveness, validate)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "fashion_mnist_dna.py": [None, "tiny"],
    "fashion_mnist_teacher.py": [None, "tiny"],
    "imagenet_dna.py": [None, "gpu1", "gpu8", "tpu_v4_32", "tpu_v4_32,space=released"],
    "cifar10_dna.py": [None],
    "fashion_mnist_dna_plus.py": [None, "tiny"],
    "imagenet_dna_plus.py": [None, "gpu1", "gpu8,space=released"],
    "fashion_mnist_dna_pp.py": [None, "tiny"],
    "imagenet_dna_pp.py": [None, "gpu1", "tpu_v4_32", "tpu_v4_32,space=released"],
    "fashion_mnist_ranking.py": [None, "tiny"],
    "imagenet_ranking.py": [None, "gpu1", "tpu_v4_32,space=released"],
    "fmnist28_dna.py": [None, "tiny"],
    "fmnist28_ground_truth.py": [None, "tiny"],
    "fmnist28_ground_truth_confirm.py": [None, "tiny"],
    "fmnist28_search_effectiveness.py": [None, "tiny"],
    "fmnist28_search_expansion.py": [None, "tiny"],
    "fmnist28_spos.py": [None, "tiny"],
    "fmnist28_dna_pp.py": [None, "tiny"],
}


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_file_is_listed():
    files = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
    assert files == set(VARIANTS), "add new config files (and their variants) to VARIANTS"


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_config_loads_locked_and_valid(name, arg):
    module = _load(os.path.join(REPO, "configs", name))
    config = module.get_config(arg)
    assert config.is_locked
    with pytest.raises((KeyError, AttributeError)):
        config.no_such_field = 1  # a misspelt override fails loudly
    for field in validate.required_fields(config):  # as the user gives them (--config.x=...)
        section, _, key = field.rpartition(".")
        node = config
        for part in filter(None, section.split(".")):
            node = node[part]
        node[key] = "/given/by/the/user"
    if "stages" in config:
        pipeline.check_config(config)
        pipeline.stage_digests(config)
    if progressive.is_progressive(config):  # every round's config passes the pipeline's checks
        progressive.check_config(config)
        for r in range(1, config.progressive.rounds + 1):
            round_config = progressive.round_config(config, r)
            pipeline.check_config(round_config)
            pipeline.stage_digests(round_config)
    if "ranking" in config:
        ranking.check_config(config)
        pipeline.stage_digests(config.dna)
    if "standalone" in config and "seeds" in config:
        ground_truth.check_config(config)
    if "standalone" in config and "contenders" in config:
        search_effectiveness.check_config(config)
    doc = module.__doc__.strip().splitlines()
    command = next(line for line in doc if line.strip())
    assert "python -m dna_jax" in module.__doc__ and name in module.__doc__, command


def test_a_required_field_left_unset_is_named_before_any_work():
    config = _load(os.path.join(REPO, "configs", "imagenet_dna.py")).get_config("tpu_v4_32")
    assert validate.required_fields(config) == ["teacher.checkpoint"]
    assert config.data.data_dir == ""  # $TFDS_DATA_DIR (set by launch/tpu.sh) is honoured
    with pytest.raises(validate.ConfigError, match=r"config.teacher.checkpoint=None: is "
                                                   r"required and has no default: pass "
                                                   r"--config.teacher.checkpoint=\.\.\."):
        pipeline.check_config(config)


def test_unknown_variant_is_an_error():
    module = _load(os.path.join(REPO, "configs", "fashion_mnist_dna.py"))
    with pytest.raises(ValueError, match="tiny"):
        module.get_config("huge")


def test_config_files_loader_applies_overrides_and_names_misspelt_keys(tmp_path):
    path = os.path.join(REPO, "configs", "fashion_mnist_dna.py")
    config = config_files.load_config(path, "tiny", **{"distill.num_steps": 7})
    assert config.is_locked and config.distill.num_steps == 7
    copy = config_files.load_config(path, "tiny", unlocked=True)
    assert not copy.is_locked and copy.distill.num_steps == 4
    with pytest.raises(KeyError, match="distill.num_stepz"):
        config_files.load_config(path, "tiny", **{"distill.num_stepz": 7})
    with pytest.raises(FileNotFoundError, match="no config file"):
        config_files.load_config(str(tmp_path / "missing.py"))
