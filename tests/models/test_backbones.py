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
