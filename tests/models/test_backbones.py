import pytest
import torch

from models.backbones import BadGanCNN, CifarResNet18, create_backbone


@pytest.mark.parametrize("name", ["cifar_resnet18_w16", "badgan_cnn_w32", "resnet18", "mobilenetv3_small_050"])
def test_create_by_name(name):
    m = create_backbone(name, num_classes=7).eval()
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"--model: unknown model name 'resnet181'.*resnet18"):
        create_backbone("resnet181", 10)


def test_local_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    a = create_backbone("cifar_resnet18_w16", 10)
    torch.save(a.backbone.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    b = create_backbone("cifar_resnet18_w16", 10, weights=tmp_path / "w.pt")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
    with pytest.raises(FileNotFoundError, match="--weights"):
        create_backbone("cifar_resnet18_w16", 10, weights=tmp_path / "missing.pt")


def test_paper_networks_shapes():
    r = CifarResNet18(10, width=64)
    assert r.stem[0].kernel_size == (3, 3) and r.stem[0].stride == (1, 1)
    assert sum(p.numel() for p in r.parameters()) == pytest.approx(11.17e6, rel=0.01)
    convs = [m for m in BadGanCNN(10).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9


def test_image_size_reaches_timm_models_that_take_one():
    vit = create_backbone("vit_tiny_patch16_224", 3, image_size=32).eval()
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 3)  # built for 32 px, not 224
    cnn = create_backbone("resnet18", 3, image_size=64).eval()  # takes no img_size: built as usual
    assert cnn(torch.rand(1, 3, 64, 64)).shape == (1, 3)


def test_a_model_that_cannot_run_at_the_size_fails_in_one_line():
    with pytest.raises(ValueError, match=r"^--image-size 8: --model vit_tiny_patch16_224 cannot run") as e:
        create_backbone("vit_tiny_patch16_224", 3, image_size=8)
    assert "\n" not in str(e.value)


def test_exact_mode_builds_attention_without_fused_sdpa():
    """timm reads the switch when a model is built: afterwards is too late (the old bug)."""
    from dali_bilevel.hypergrad import bilevel_step
    from models.augmenter import Augmenter

    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", 3, image_size=32, fused_attention=False)
    assert not any(getattr(m, "fused_attn", False) for m in vit.modules())
    aug = Augmenter("translation")
    torch.nn.init.normal_(aug.head.weight, std=0.05)
    opt = torch.optim.SGD(vit.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 3, (4,))
    out = bilevel_step(vit, aug, opt, x, y, x, y, mode="exact")  # a double backward through attention
    assert sum(h.abs().sum() for h in out.augmenter_grads) > 0
