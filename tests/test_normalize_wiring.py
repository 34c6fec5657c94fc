"""data.dataset.normalize reaches the run: the scenario's inputs, and so every base model's cache key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import mergebench.run as pipeline
from mergebench.cli import CONF_DIR
from mergebench.config import validate
from mergebench.data.loader import Batches


def scenario(tmp_path: Path, normalize: str, loaded: dict | None = None):
    overrides = [f"data.dataset.normalize={normalize}", f"cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = validate(compose("config", overrides=overrides))
    return pipeline.build_scenario(cfg, loaded)


@pytest.mark.parametrize("normalize", ["unit", "standard"])
def test_the_configured_normalisation_is_the_scenarios(tmp_path: Path, normalize: str) -> None:
    s = scenario(tmp_path, normalize)
    assert s.info.normalize == normalize
    x, _ = next(iter(Batches(s.train, torch.arange(64), s.info, batch_size=64)))
    if normalize == "unit":  # x/255: in [0, 1]
        assert x.min() >= 0.0 and x.max() <= 1.0
    else:  # (x/255 - mean)/std: the background pixels are negative
        assert x.min() < 0.0


def test_jobs_sharing_loaded_datasets_keep_their_own_normalisation(tmp_path: Path) -> None:
    loaded: dict = {}  # the CLI checks every job of a sweep with one shared dict
    assert scenario(tmp_path, "unit", loaded).info.normalize == "unit"
    assert scenario(tmp_path, "standard", loaded).info.normalize == "standard"
