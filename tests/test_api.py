"""`mergebench.merge` as a PyTorch user calls it: without data for data-free methods (the spec check then runs on
seeded random inputs of a given or inferred shape), with data as a pair, a DataLoader or any iterable of batches
(all giving the same merge), and a one-line ConfigError for a method that needs data it did not get, for data of
the wrong form and for inputs the models do not take."""

from __future__ import annotations

import copy
import importlib
import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mergebench
from mergebench.errors import ConfigError
from mergebench.spec import apply_transforms
from mergebench.spec.trace import model_spec
from mergebench.spec.verify import moving_permutations
from tests.user_models import ResNet18Style

ALLOWED = r"pass data=\(inputs, labels\), a DataLoader or an iterable of \(inputs, labels\) batches"


def resnet(seed: int) -> ResNet18Style:
    """A tiny ResNet18Style on 1-channel images, BatchNorm running statistics moved off their initial 0 and 1."""
    torch.manual_seed(seed)
    model = ResNet18Style(in_channels=1, num_classes=10, width=4)
    with torch.no_grad():
        model.train()(torch.randn(8, 1, 8, 8) * 2 + 1)
    return model.eval()


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def lenet(seed: int) -> nn.Module:
    """A conv net flattened into a Linear sized for 28×28 images: a 32×32 input does not fit it."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def digits(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize(
    ("build", "shape"),
    [(resnet, "[4, 1, 32, 32] from conv1"), (mlp, "[4, 12] from 1"), (lenet, "[4, 1, 28, 28] from 0")],
    ids=["conv", "linear", "flatten-28"],
)
def test_weight_matching_merges_two_models_without_any_data(build: Callable[[int], nn.Module], shape: str) -> None:
    """The spec check runs on seeded random inputs of the shape the first conv/linear layer takes (a conv net's
    image side: the first the model runs on)."""
    model_a, model_b = build(0), build(1)
    before = copy.deepcopy(model_b.state_dict())
    merged, diagnostics = mergebench.merge([model_a, model_b], align="weight_matching")
    assert type(merged) is type(model_a) and not merged.training
    assert diagnostics["verify_inputs"] == f"random, shape {shape}" and diagnostics["verify_groups"] >= 1
    assert diagnostics["align_s"] >= 0 and diagnostics["alpha"] == 0.5
    assert all(torch.equal(v, model_b.state_dict()[k]) for k, v in before.items())  # the inputs are untouched
    assert not states_equal(merged, model_a)


@pytest.mark.parametrize(
    "options",
    [{"align": "weight_matching"}, {"align": "ot"}, {"align": "c2m3"}],
    ids=["weight_matching", "ot", "c2m3"],
)
def test_a_planted_permuted_copy_merges_back_exactly_without_data(options: dict[str, Any]) -> None:
    """B = A with every group moved: a data-free aligner undoes it, so averaging gives A's own weights (and BatchNorm
    statistics) back."""
    model = resnet(0)
    spec, _ = model_spec(model, torch.randn(4, 1, 8, 8))
    state = model.state_dict()
    planted = copy.deepcopy(model)
    planted.load_state_dict(apply_transforms(state, spec, moving_permutations(spec, state, seed=1)))
    assert not states_equal(planted, model)
    merged, _ = mergebench.merge([model, planted], **options)
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


class Versioned(nn.Module):
    """A module that reads its version while loading (as torchvision's MNASNet does): a state dict without the
    model's metadata is refused."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        if local_metadata.get("version") is None:
            raise ValueError("version should be set to 1 or 2 instead of None")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


@pytest.mark.parametrize("align", ["weight_matching", "permute"])
def test_models_that_read_their_version_while_loading_are_merged(align: str) -> None:
    """Merged and permuted states are built fresh, without the version metadata of a model's own state dict; they
    are loaded with the model's, so such a model merges (MNASNet refused every merge before)."""
    torch.manual_seed(0)
    model = Versioned()
    spec, _ = model_spec(model, torch.randn(4, 12))
    state = model.state_dict()
    planted = copy.deepcopy(model)
    planted.load_state_dict(apply_transforms(state, spec, moving_permutations(spec, state, seed=1)))
    data = (torch.randn(48, 12), torch.randint(0, 3, (48,))) if align == "permute" else None
    merged, _ = mergebench.merge([model, planted], align=align, data=data)
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=1e-6)


def test_a_dataloader_and_batches_give_the_same_merge_as_the_pair() -> None:
    """The data is read once into two tensors, whatever form it comes in: same merge, to the bit."""
    x, y = digits()
    model_a, model_b = resnet(0), resnet(1)
    forms = {
        "loader": DataLoader(TensorDataset(x, y), batch_size=16),
        "generator": ((x[i : i + 7], y[i : i + 7]) for i in range(0, len(y), 7)),
        "list": [[x[:30], y[:30]], (x[30:], y[30:])],
    }
    options = {"align": "permute", "repair": "repair"}
    reference, diagnostics = mergebench.merge([model_a, model_b], data=(x, y), **options)
    assert diagnostics["verify_inputs"] == "data"
    for name, data in forms.items():
        merged, _ = mergebench.merge([model_a, model_b], data=data, **options)
        assert states_equal(merged, reference), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"align": "permute"}, "align=permute needs merge data"),
        ({"align": "cca"}, "align=cca needs merge data"),
        ({"align": "zipit"}, "align=zipit needs merge data"),
        ({"align": "ste"}, "align=ste needs merge data"),
        ({"align": "weight_matching", "agg": "np"}, "agg=np needs merge data"),
        ({"align": "weight_matching", "agg": "finetune"}, "agg=finetune needs merge data"),
        ({"align": "weight_matching", "agg": "fisher"}, "agg=fisher needs merge data"),
        ({"align": "weight_matching", "agg": "soup"}, "agg=soup needs merge data"),
        ({"align": "weight_matching", "repair": "repair"}, "repair=repair needs merge data"),
        ({"align": "weight_matching", "repair": "reset_bn"}, "repair=reset_bn needs merge data"),
        (  # data only with this setting: refused when the aligner asks for it
            {"align": "ot", "align_params": {"cost": "acts"}},
            "align=ot, agg=avg, repair=none, strategy=all_to_one reads merge data with these settings",
        ),
        (  # MergeMany resets BatchNorm statistics of the averages it aligns to
            {"align": "weight_matching", "strategy": "merge_many"},
            "align=weight_matching, agg=avg, repair=none, strategy=merge_many reads merge data with these settings",
        ),
    ],
    ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else "",
)
def test_a_method_that_needs_data_is_refused_without_it_in_one_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{message}: {ALLOWED}") as err:
        mergebench.merge([resnet(0), resnet(1)], **options)
    assert "\n" not in str(err.value)


def samples() -> Any:
    x, y = digits(4)
    return ((x[i], y[i]) for i in range(4))


BAD_DATA: list[tuple[str, Callable[[], Any], str]] = [
    ("dataset", lambda: TensorDataset(*digits()), rf"^data is a TensorDataset, which yields single samples; {ALLOWED}"),
    ("samples", samples, r"^data's batch 0 is one sample \(a label of shape \[\]\), not a batch: .*DataLoader\("),
    (
        "inputs-only-loader",
        lambda: DataLoader(TensorDataset(digits()[0]), batch_size=8),
        rf"^data's batch 0 is a list of 1 element \(Tensor\), not \(inputs, labels\); {ALLOWED}",
    ),
    (
        "three-element-batches",
        lambda: DataLoader(TensorDataset(*digits(), torch.arange(48)), batch_size=8),
        r"^data's batch 0 is a list of 3 elements \(Tensor, Tensor, Tensor\), not \(inputs, labels\)",
    ),
    (
        "dict-batches",
        lambda: [{"x": digits()[0], "y": digits()[1]}],
        r"^data's batch 0 is a dict with keys \['x', 'y'\]",
    ),
    (
        "one-hot-labels",
        lambda: (digits()[0], nn.functional.one_hot(digits()[1], 10)),
        r"^data has labels of shape \[48, 10\] for 48 inputs: labels are class indices, one per input",
    ),
    ("empty", lambda: [], rf"^data holds no batches; {ALLOWED}"),
    ("number", lambda: 5, rf"^data is of type int; {ALLOWED}"),
    (
        "mixed-shapes",
        lambda: [digits(), (torch.randn(3, 1, 9, 9), torch.zeros(3, dtype=torch.long))],
        r"^data's batch 1 has inputs of shape \[1, 9, 9\], batch 0 \[1, 8, 8\]",
    ),
    (
        "raw-uint8-images",
        lambda: ((digits()[0] * 50).to(torch.uint8), digits()[1]),
        r"^the models do not take the spec check's inputs \(data\) of shape \[4, 1, 8, 8\]: RuntimeError: ",
    ),
]


@pytest.mark.parametrize(("make", "message"), [pytest.param(m, e, id=i) for i, m, e in BAD_DATA])
def test_bad_data_is_one_line(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        mergebench.merge([resnet(0), resnet(1)], align="permute", data=make())
    assert "\n" not in str(err.value)


def test_example_inputs_set_what_the_spec_check_runs_on() -> None:
    """A tensor is used as it is (its first VERIFY_BATCH samples), a shape gives seeded random inputs of it with the
    batch size replaced; without either, a model whose input shape cannot be told is refused in one line."""
    models = [resnet(0), resnet(1)]
    _, diagnostics = mergebench.merge(models, align="weight_matching", example_inputs=torch.randn(6, 1, 16, 16))
    assert diagnostics["verify_inputs"] == "example_inputs"
    _, diagnostics = mergebench.merge(models, align="weight_matching", example_inputs=(1, 1, 12, 12))
    assert diagnostics["verify_inputs"] == "random, example_inputs' shape"
    with pytest.raises(ConfigError, match=r"^the models do not take .* of shape \[4, 12, 12\]: .*batch dimension"):
        mergebench.merge(models, align="weight_matching", example_inputs=(1, 12, 12))
    with pytest.raises(ConfigError, match=r"^example_inputs='1x28x28' must be a tensor or a shape"):
        mergebench.merge(models, align="weight_matching", example_inputs="1x28x28")

    def fixed_40(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 38 * 38, 10))

    with pytest.raises(
        ConfigError, match=r"takes none of the shapes its first layer 0 suggests .*pass example_inputs="
    ):
        mergebench.merge([fixed_40(0), fixed_40(1)], align="weight_matching")
    _, diagnostics = mergebench.merge(
        [fixed_40(0), fixed_40(1)], align="weight_matching", example_inputs=(2, 3, 40, 40)
    )
    assert diagnostics["verify_input"] == [4, 3, 40, 40]

    def tokens(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, 16), nn.ReLU(), nn.Linear(16, 2))

    with pytest.raises(ConfigError, match=r"its first layer 0 is Embedding, so their shape is unknown: pass example"):
        mergebench.merge([tokens(0), tokens(1)], align="weight_matching")


def test_merge_is_the_function_and_its_methods_the_merging_subpackage() -> None:
    """`mergebench.merge` is the API's function itself (what IDEs and notebooks show is its signature), and the
    aggregators, repairs and strategies are the subpackage `mergebench.merging`: no module is named
    `mergebench.merge`, so no import of a submodule rebinds the function."""
    import mergebench.merging.avg
    from mergebench.api import merge
    from mergebench.merging import AGGREGATORS

    assert mergebench.merge is merge and inspect.isfunction(mergebench.merge)
    assert AGGREGATORS.get("avg").factory is mergebench.merging.avg.aggregate_avg
    parameters = inspect.signature(mergebench.merge).parameters
    assert {"models", "align", "agg", "repair", "data", "example_inputs"} <= parameters.keys()
    assert parameters["data"].default is None
    assert "merge" in dir(mergebench) and "merging" not in mergebench.__all__
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("mergebench.merge")


FRESH_IMPORTS = """
import sys
import mergebench
assert "torch" not in sys.modules and "mergebench.merging" not in sys.modules, "import mergebench stays light"
import mergebench.merging.avg  # a submodule first, as a plugin or a script does
import mergebench.merging as merging
from mergebench.merging.registry import AGGREGATORS
assert mergebench.merging is merging and AGGREGATORS.get("avg").factory is merging.avg.aggregate_avg
from mergebench import merge
import torch
from torch import nn
models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2)]
merged, diagnostics = mergebench.merge(models, align="weight_matching")
assert mergebench.merge is merge and isinstance(merged, nn.Sequential) and diagnostics["alpha"] == 0.5
import mergebench.merging.strategies  # and after a call, still the function
assert mergebench.merge is merge
print("ok")
"""


def test_submodule_imports_and_the_function_in_a_fresh_interpreter() -> None:
    """The order a user's program imports in cannot turn `mergebench.merge` into a module: a fresh interpreter
    imports the subpackage's modules, calls `mergebench.merge(...)`, imports more, and the name is still the
    function; a bare `import mergebench` loads neither torch nor the merge methods."""
    proc = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
