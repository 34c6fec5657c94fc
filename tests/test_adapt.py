"""Zoo models from the CLI: `data.dataset.channels`/`size` adapt the images once, a model that does not take the
dataset's inputs stops in one line naming those keys, and torchvision/timm classifiers run on the digits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mergebench import zoo
from mergebench.data.adapt import adapt_inputs
from mergebench.data.datasets import load_dataset
from mergebench.errors import ConfigError
from mergebench.run import check_model_input
from tests.user_models import ResNet18Style

MERGEBENCH = str(Path(sys.executable).parent / "mergebench")


def test_gray_images_become_three_channels_of_the_asked_size() -> None:
    info, train, test = load_dataset("digits", "unused")
    adapted, a_train, a_test = adapt_inputs(info, train, test, channels=3, size=32)
    assert a_train.x.shape[1:] == (3, 32, 32) and a_train.x.dtype == torch.uint8 and len(a_test) == len(test)
    assert torch.equal(a_train.x[:, 0], a_train.x[:, 2])  # the gray image in every channel
    assert (adapted.channels, adapted.size) == (3, 32) and adapted.mean == info.mean * 3
    # the resize keeps the image: its mean brightness moves by less than a grey level
    assert abs(a_train.x.float().mean() - train.x.float().mean()) < 1.0
    assert adapt_inputs(info, train, test, None, None) == (info, train, test)
    with pytest.raises(ConfigError, match=r"data.dataset.size=0 must be a positive integer"):
        adapt_inputs(info, train, test, None, 0)


def test_a_model_built_for_other_inputs_is_one_line_naming_the_keys() -> None:
    info, _, test = load_dataset("digits", "unused")
    with pytest.raises(ConfigError, match=r"data.dataset.channels=.* data.dataset.size=") as err:
        check_model_input(lambda: ResNet18Style(in_channels=3, num_classes=10, width=8), test, info)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"outputs 7 logits but digits has 10 classes"):
        check_model_input(lambda: ResNet18Style(in_channels=1, num_classes=7, width=8), test, info)
    check_model_input(lambda: ResNet18Style(in_channels=1, num_classes=10, width=8), test, info)


@pytest.mark.zoo
@pytest.mark.parametrize(
    ("zoo_name", "target", "kwargs"),
    [
        ("torchvision.models:resnet18", "torchvision.models:resnet18", "{num_classes:10}"),
        ("timm:mobilenetv3_small_050", "timm:create_model", "{model_name:mobilenetv3_small_050,num_classes:10}"),
    ],
)
def test_zoo_classifiers_merge_from_the_cli(tmp_path: Path, zoo_name: str, target: str, kwargs: str) -> None:
    """The README's zoo command: refused in one line on the 1×8×8 digits, merged once they are 3×32×32."""
    try:
        zoo.timm()
    except ConfigError as err:
        pytest.skip(str(err))
    for seed, name in enumerate(("a.pt", "b.pt")):
        torch.manual_seed(seed)
        torch.save(zoo.create(zoo_name, num_classes=10).state_dict(), tmp_path / name)
    base = [MERGEBENCH, "model=custom", f"model.target={target}", f"model.kwargs={kwargs}", "checkpoints=[a.pt,b.pt]",
            "align=weight_matching", "dataset=digits", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip

    def run(*extra: str) -> subprocess.CompletedProcess:
        args = [*base, *extra, f"hydra.run.dir={tmp_path / str(len(extra))}"]
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    refused = run()
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "data.dataset.channels" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr
    done = run("data.dataset.channels=3", "data.dataset.size=32")
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(tmp_path / "2" / "results.csv")
    assert "Weight Matching" in set(rows.method_label) and rows.value.notna().all()
