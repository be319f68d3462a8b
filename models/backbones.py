"""Classifier backbones created by name: any timm model, plus the paper's small-image networks.

timm's networks downsample 32x32 inputs to 1x1 in their stems, so the paper's CIFAR-style
ResNet18 (3x3 stem, no max-pool) and the 9-layer BadGAN CNN are provided here. Every
backbone is wrapped in `Normalized`, so pipelines hand over plain [0, 1] images and the
augmenter's colour ops see real colours.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = act()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); ``width`` scales all stages."""

    def __init__(self, num_classes: int = 10, width: int = 64, act: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), act())
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [BasicBlock(cin, cout, stride, act), BasicBlock(cout, cout, 1, act)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _conv_bn(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)]


class BadGanCNN(nn.Module):
    """The 9-layer CNN of BadGAN / "conv-large" (Dai et al. 2017), as used by the paper on CIFAR."""

    def __init__(self, num_classes: int = 10, width: int = 96, dropout: float = 0.5) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            *_conv_bn(3, w1, 3), *_conv_bn(w1, w1, 3), *_conv_bn(w1, w1, 3),
            nn.MaxPool2d(2), nn.Dropout(dropout),
            *_conv_bn(w1, w2, 3), *_conv_bn(w2, w2, 3), *_conv_bn(w2, w2, 3),
            nn.MaxPool2d(2), nn.Dropout(dropout),
            *_conv_bn(w2, w2, 3), *_conv_bn(w2, w2, 1), *_conv_bn(w2, w2, 1),
        )
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


#: Local networks by name; the keyword arguments are fixed per name so sizes are reproducible.
LOCAL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": lambda num_classes: CifarResNet18(num_classes, width=64),
    "cifar_resnet18_w16": lambda num_classes: CifarResNet18(num_classes, width=16),
    "badgan_cnn": lambda num_classes: BadGanCNN(num_classes, width=96),
    "badgan_cnn_w32": lambda num_classes: BadGanCNN(num_classes, width=32),
}


class Normalized(nn.Module):
    """Standardise [0, 1] images with fixed mean and std before the backbone."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def available_models() -> list[str]:
    return sorted(LOCAL_MODELS) + timm.list_models()


def _timm_model(name: str, num_classes: int, image_size: int | None) -> nn.Module:
    """A timm model, told the image size when it takes one (ViTs, Swin, ...: their patch embedding and
    position embedding are built for it); convolutional models ignore the size and get none."""
    if image_size:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def check_runs_at(net: nn.Module, name: str, image_size: int) -> None:
    """One forward of a single image at ``image_size``, now, so a model that cannot take that size fails
    before training with one line naming the flag (not a traceback from inside timm)."""
    mode = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, image_size, image_size))
    except (AssertionError, RuntimeError, ValueError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--image-size {image_size}: --model {name} cannot run at this size ({detail})") from None
    finally:
        net.train(mode)


def create_backbone(name: str, num_classes: int, weights: str | Path | None = None, image_size: int | None = None,
                    fused_attention: bool = True) -> Normalized:
    """Build ``name`` (a local network or any timm model) without touching a model hub.

    ``weights`` is an optional local state dict (``.pt``/``.pth`` loaded with
    ``weights_only=True``, or ``.safetensors``) for the backbone, e.g. a timm checkpoint.
    ``image_size`` reaches timm models that take one, and is checked by one forward pass.
    ``fused_attention=False`` builds attention without fused SDPA, which has no double backward
    (the exact hypergradient needs one): timm reads the switch when a model is *built*, so it is set
    before, and every module's flag is checked after.
    """
    if name in LOCAL_MODELS:
        net = LOCAL_MODELS[name](num_classes)
    elif timm.is_model(name):
        if not fused_attention:
            timm.layers.set_fused_attn(False)
        net = _timm_model(name, num_classes, image_size)
        if not fused_attention:
            for m in net.modules():
                if getattr(m, "fused_attn", False):
                    m.fused_attn = False  # a module that read the switch another way
    else:
        close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ValueError(f"--model: unknown model name {name!r}{hint}")
    if weights is not None:
        net.load_state_dict(load_state_dict(weights))
    if image_size:
        check_runs_at(net, name, image_size)
    return Normalized(net)


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load tensors only: never unpickle arbitrary objects from a weights file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--weights: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
