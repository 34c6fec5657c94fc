"""torchvision and timm classifiers (random weights) for tests, tables and users: the one place mergebench imports
them, so that they import beside the CPU torch wheel too.

PyPI's Linux torchvision wheels are CUDA builds (torchvision 0.28.0+cu130 for torch 2.13.0): beside the CPU torch
their C extension `_C.so` does not load (it links libtorch_cuda.so). torchvision tolerates that for every C op but
two: `torchvision/_meta_registrations.py` calls `torch.library.register_fake` on `torchvision::nms` and
`torchvision::qnms` unconditionally, which raises "operator torchvision::nms does not exist" for an operator that
was never defined, so `import torchvision` (and `import timm`, which imports it) fails. Where exactly that happens
(torchvision's own `extension._has_ops()` is False), this module defines those two schemas, with no kernel, and
imports again. Classifiers need no C op; the C ops stay unusable and say so when called: `torchvision.ops.nms`,
`roi_pool`, `deform_conv2d`, … raise torchvision's "Couldn't load custom C++ ops" (`roi_align` runs torchvision's
own Python version, as it does wherever the extension is absent), and a direct `torch.ops.torchvision.nms` call
raises NotImplementedError (no CPU kernel). One ZooShimWarning names the reason.

With a CPU build of torchvision (where the internet is reachable: `pip install torchvision==0.28.0 --index-url
https://download.pytorch.org/whl/cpu`) the extension loads, the first import succeeds and nothing is defined here.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import nn

from mergebench.errors import ConfigError

INSTALL = "pip install 'mergebench[zoo]'"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# the operators torchvision/_meta_registrations.py registers fake kernels for whether or not its C extension loaded
# (their schemas as torchvision's csrc/ops define them)
UNGUARDED_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_library: torch.library.Library | None = None  # kept alive: a collected Library takes its definitions with it
_missing_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A zoo classifier at a small input size it takes (ViT-style models are built for it through `kwargs`), so
    tests and tables run one thread on a CPU."""

    name: str  # create()'s target
    side: int  # input images side × side
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build(self, num_classes: int = 10) -> nn.Module:
        return create(self.name, num_classes=num_classes, **self.kwargs)


# convnets, MobileNets, EfficientNet, RegNet, ShuffleNet, DenseNet, SqueezeNet, ConvNeXt, ViT, Swin; timm's own
# ResNet-D, GhostNet, Mixer, ResMLP, DeiT, LeViT: random weights, 32×32 where the model takes it
CLASSIFIERS = tuple(
    Classifier(name, side, kwargs)
    for name, side, kwargs in (
        ("torchvision.models:resnet18", 32, {}),
        ("torchvision.models:resnet50", 32, {}),
        ("torchvision.models:mobilenet_v2", 32, {}),
        ("torchvision.models:mobilenet_v3_small", 32, {}),
        ("torchvision.models:efficientnet_b0", 32, {}),
        ("torchvision.models:regnet_y_400mf", 32, {}),
        ("torchvision.models:shufflenet_v2_x0_5", 32, {}),
        ("torchvision.models:densenet121", 32, {}),
        ("torchvision.models:squeezenet1_0", 64, {}),
        ("torchvision.models:convnext_tiny", 32, {}),
        ("torchvision.models:vit_b_16", 32, {"image_size": 32}),
        ("torchvision.models:swin_t", 32, {}),
        ("timm:resnet26d", 32, {}),
        ("timm:mobilenetv3_small_050", 32, {}),
        ("timm:efficientnet_b0", 32, {}),
        ("timm:regnety_002", 32, {}),
        ("timm:ghostnet_100", 32, {}),
        ("timm:densenet121", 32, {}),
        ("timm:convnext_atto", 32, {}),
        ("timm:mixer_s16_224", 32, {"img_size": 32}),
        ("timm:resmlp_12_224", 32, {"img_size": 32}),
        ("timm:vit_tiny_patch16_224", 32, {"img_size": 32}),
        ("timm:deit_tiny_patch16_224", 32, {"img_size": 32}),
        ("timm:levit_128s", 64, {"img_size": 64}),
    )
)

# more of the zoo, beyond the families CLASSIFIERS stands for (scripts/zoo_table.py --set unnamed): grouped ResNeXt,
# wide ResNet, MNASNet, VGG with BN, GoogLeNet, EfficientNetV2, RegNetX, MobileNetV3-Large; timm's CSPNet, DLA,
# ReXNet, RepVGG, PoolFormer, ResNeSt
UNNAMED = tuple(
    Classifier(name, side, kwargs)
    for name, side, kwargs in (
        ("torchvision.models:resnext50_32x4d", 32, {}),
        ("torchvision.models:wide_resnet50_2", 32, {}),
        ("torchvision.models:mnasnet0_5", 32, {}),
        ("torchvision.models:vgg11_bn", 32, {}),
        ("torchvision.models:googlenet", 32, {"aux_logits": False, "init_weights": True}),
        ("torchvision.models:efficientnet_v2_s", 32, {}),
        ("torchvision.models:regnet_x_400mf", 32, {}),
        ("torchvision.models:mobilenet_v3_large", 32, {}),
        ("timm:cspresnet50", 32, {}),
        ("timm:dla34", 32, {}),
        ("timm:rexnet_100", 32, {}),
        ("timm:repvgg_a0", 32, {}),
        ("timm:poolformer_s12", 32, {}),
        ("timm:resnest14d", 32, {}),
    )
)


class ZooUnavailable(ConfigError):
    """torchvision or timm cannot be imported here: the one-line message says why and what to install."""


class ZooShimWarning(UserWarning):
    """torchvision imported without its C extension (classifiers work; nms, roi_pool, … raise if called)."""


def torchvision() -> ModuleType:
    """The torchvision module; imported through the schema shim where its C extension does not load."""
    try:
        import torchvision as tv
    except ModuleNotFoundError:
        raise ZooUnavailable(f"torchvision is not installed: {INSTALL}") from None
    except RuntimeError as err:
        extension = sys.modules.get("torchvision.extension")
        if _library is not None or extension is None or extension._has_ops():
            raise ZooUnavailable(f"import torchvision failed: {_first_line(err)}") from None
        tv = _import_with_schemas(extension)
    return tv


def timm() -> ModuleType:
    """The timm module (it imports torchvision, so through the same shim)."""
    torchvision()
    try:
        import timm as tm
    except ModuleNotFoundError:
        raise ZooUnavailable(f"timm is not installed: {INSTALL}") from None
    return tm


def c_extension_missing() -> str | None:
    """Why torchvision's C extension did not load, where this module had to define its schemas; else None."""
    return _missing_reason


def create(name: str, **kwargs: Any) -> nn.Module:
    """A zoo classifier, randomly initialised: `timm:<model>` (timm.create_model) or `<torchvision module>:<fn>`
    (e.g. `torchvision.models:resnet18`); `kwargs` go to the builder (num_classes=10, img_size=32 for timm ViTs…).
    Usable as `model=custom model.target=mergebench.zoo:create 'model.kwargs={name: "timm:resnet18", ...}'`."""
    source, _, builder = name.partition(":")
    if not builder:
        raise ConfigError(f"zoo model {name!r}: expected 'timm:<model>' or 'torchvision.models:<fn>'")
    if source == "timm":
        tm = timm()
        if not tm.is_model(builder):
            raise ConfigError(f"zoo model {name!r}: timm has no model {builder!r} (timm.list_models() lists them)")
        return tm.create_model(builder, pretrained=False, **kwargs)
    if source != "torchvision" and not source.startswith("torchvision."):
        raise ConfigError(f"zoo model {name!r}: expected 'timm:<model>' or 'torchvision.models:<fn>'")
    torchvision()
    try:
        fn = getattr(importlib.import_module(source), builder, None)
    except ModuleNotFoundError:
        fn = None
    if not callable(fn):
        raise ConfigError(f"zoo model {name!r}: {source} has no builder {builder!r}")
    return fn(**kwargs)


def _import_with_schemas(extension: ModuleType) -> ModuleType:
    """Define the unguarded operators' schemas (no kernels) and import torchvision again from scratch."""
    global _library, _missing_reason
    _missing_reason = _load_error(extension)
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[module]
    try:
        _library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in UNGUARDED_SCHEMAS:
            _library.define(schema)
        import torchvision as tv
    except Exception as err:
        raise ZooUnavailable(f"import torchvision failed without its C extension: {_first_line(err)}") from None
    warnings.warn(
        f"torchvision {tv.__version__} imported without its C extension ({_missing_reason}): classifiers work, "
        f"its detection ops (nms, roi_pool, deform_conv2d, …) raise if called; a CPU build: "
        f"pip install torchvision=={tv.__version__.split('+')[0]} --index-url {CPU_INDEX}",
        ZooShimWarning,
        stacklevel=3,
    )
    return tv


def _load_error(extension: ModuleType) -> str:
    """The loader's own reason (e.g. 'libc10_cuda.so: cannot open shared object file'), not torch's wrapper."""
    try:
        torch.ops.load_library(extension._get_extension_path("_C"))
    except (ImportError, OSError) as err:
        return _first_line(err.__cause__ or err)
    return "it loads on a second try"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
