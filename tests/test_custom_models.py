"""User architectures and checkpoints: the CLI end to end on two files this test writes (.pt and .safetensors),
one-line refusals (a crafted pickle is never executed, mismatched keys/shapes), the Python API, and the README's
worked example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import save_file

import mergebench
from mergebench.checkpoints import CheckpointError, check_fits, read_state
from mergebench.config import validate
from mergebench.data.datasets import load_dataset
from mergebench.errors import ConfigError
from tests.conftest import REPO
from tests.user_models import ConvNeXtStyle, ResNet18Style

MERGEBENCH = str(Path(sys.executable).parent / "mergebench")
KWARGS = {"in_channels": 1, "num_classes": 10, "width": 8}


def digits_merge_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The embedded digits as the CLI feeds them (standard normalisation): train inputs, labels, test ones."""
    info, train, test = load_dataset("digits", "unused")
    (mean,), (std,) = info.input_stats()
    return (train.x.float() / 255 - mean) / std, train.y, (test.x.float() / 255 - mean) / std, test.y


def train_digits(seed: int, epochs: int = 4) -> ResNet18Style:
    """A small ResNet18Style trained on the embedded digits."""
    x, y, _, _ = digits_merge_data()
    torch.manual_seed(seed)
    model = ResNet18Style(**KWARGS)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.save(train_digits(0).state_dict(), folder / "a.pt")
    save_file(train_digits(1).state_dict(), str(folder / "b.safetensors"))
    return folder / "a.pt", folder / "b.safetensors"


def test_cli_merges_two_user_checkpoints_end_to_end(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = checkpoints
    args = [
        "model=custom",
        "model.target=tests.user_models:ResNet18Style",
        "model.kwargs={in_channels:1,num_classes:10,width:8}",
        f"checkpoints=[{a},{b}]",
        "align=weight_matching",
        "agg=avg",
        "repair=repair",
        "dataset=digits",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([MERGEBENCH, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Weight Matching + REPAIR" in proc.stdout and "trained in" not in proc.stdout
    df = pd.read_csv(tmp_path / "run" / "results.csv")
    top1 = df[(df.metric == "top1") & (df.subset == "test")].set_index("model_role").value
    assert top1["base_0"] > 0.8 and top1["base_1"] > 0.8  # the checkpoints' weights, not a fresh init
    assert top1["merged"] > 0.25  # well above chance (0.1); tiny nets merge far below their endpoints
    assert (df.num_models == 2).all() and (df.arch == "custom").all()
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    diagnostics = json.loads(next(r["diagnostics"] for r in rows if r["model_role"] == "merged"))
    assert diagnostics["spec"] == "traced" and diagnostics["verify_groups"] == 12
    assert diagnostics["verify_max_diff_eval"] <= 1e-4 * diagnostics["verify_scale"]


class Payload:
    """Unpickling this would create `marker`: what a malicious checkpoint does instead of holding tensors."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_crafted_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt refused: loading it would run code") as err:
        read_state(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_checkpoint_that_does_not_fit_is_one_line_listing_the_mismatches(tmp_path: Path) -> None:
    state = ResNet18Style(**{**KWARGS, "width": 16}).state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wide.safetensors"
    save_file(state, str(path))
    message = (
        r"wide.safetensors does not fit ResNet18Style: missing: fc.bias; unexpected: extra.weight; "
        r"shape: conv1.weight \[16, 1, 3, 3\] \(model: \[8, 1, 3, 3\]\), .* and \d+ more"
    )
    with pytest.raises(CheckpointError, match=message) as err:
        check_fits(read_state(path), ResNet18Style(**KWARGS), path)
    assert "\n" not in str(err.value)


def composed(overrides: list[str]) -> object:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("config", overrides=overrides)


def test_checkpoints_set_the_number_of_models_and_key_the_cache_on_content(
    checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = checkpoints
    cfg = validate(
        composed(["model=custom", "model.target=tests.user_models:ResNet18Style", f"checkpoints=[{a},{b},{a}]"])
    )
    assert cfg.data.num_models == 3 and cfg.checkpoints == [a, b, a]
    digests = [c["sha256"] for c in cfg.raw["checkpoints"]]
    assert digests[0] == digests[2] != digests[1]
    with pytest.raises(ConfigError, match=r"model=custom needs checkpoints="):
        validate(composed(["model=custom", "model.target=tests.user_models:ResNet18Style"]))
    with pytest.raises(ConfigError, match=r"must name at least two files"):
        validate(composed([f"checkpoints=[{a}]"]))
    with pytest.raises(ConfigError, match=r"model.target='tests.user_models:Nope': tests.user_models has no attribute"):
        validate(composed(["model=custom", "model.target=tests.user_models:Nope", f"checkpoints=[{a},{b}]"]))
    with pytest.raises(ConfigError, match=r"references.joint=true trains a model"):
        validate(composed([f"checkpoints=[{a},{b}]", "references.joint=true", "model=custom",
                           "model.target=tests.user_models:ResNet18Style"]))  # fmt: skip


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_python_api_merges_models_in_memory(checkpoints: tuple[Path, Path]) -> None:
    a, b = checkpoints
    model_a, model_b = ResNet18Style(**KWARGS), ResNet18Style(**KWARGS)
    model_a.load_state_dict(read_state(a))
    model_b.load_state_dict(read_state(b))
    before = {k: v.clone() for k, v in model_b.state_dict().items()}
    x, y, x_test, y_test = digits_merge_data()
    result = mergebench.merge([model_a, model_b], align="permute", agg="avg", repair="repair", data=(x, y))
    merged, diagnostics = result
    assert isinstance(merged, ResNet18Style) and not merged.training
    assert diagnostics["spec"] == "traced" and diagnostics["verify_groups"] == 12 and "align_mean_corr" in diagnostics
    assert accuracy(merged, x_test, y_test) > 0.5
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in before.items())  # inputs untouched
    with pytest.raises(ConfigError, match=r"align='nope' is not known"):
        mergebench.merge([model_a, model_b], align="nope", data=(x, y))


def readme_example() -> str:
    """The README's Python API example (the section's other python block writes the checkpoints it loads)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Merging your own models", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    (code,) = [c for c in blocks if "mergebench.merge(" in c and "b.safetensors" in c]
    return code


def test_readme_worked_example_runs(checkpoints: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    a, b = checkpoints
    (tmp_path / "a.pt").write_bytes(a.read_bytes())
    (tmp_path / "b.safetensors").write_bytes(b.read_bytes())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    *_, x_test, y_test = digits_merge_data()
    assert accuracy(namespace["merged"], x_test, y_test) > 0.5
    assert namespace["diagnostics"]["verify_groups"] == 12


def test_repair_on_channels_last_layers_is_refused_in_one_line() -> None:
    """REPAIR corrects units on dim 1; a ConvNeXt MLP's Linear outputs hold them last, so it stops before merging."""
    models = [ConvNeXtStyle(width=8, kernel=3), ConvNeXtStyle(width=8, kernel=3)]
    data = (torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    with pytest.raises(ConfigError, match=r"repair=repair .* but stage1.0.pwconv1, stage1.0.pwconv2, .* put them last"):
        mergebench.merge(models, align="weight_matching", repair="repair", data=data)
    merged, diagnostics = mergebench.merge(models, align="weight_matching", repair="reset_bn", data=data)
    assert len(diagnostics["spec_channels_last"]) == 8 and isinstance(merged, ConvNeXtStyle)
