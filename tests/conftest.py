"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="module")
def imagenette_dir(tmp_path_factory):
    """A real TFDS imagenette/320px-v2 built by TFDS's builder from generated JPEGs."""
    pytest.importorskip("tensorflow_datasets")
    from resnet_flax.data.generated import build_fake_imagenette

    root = tmp_path_factory.mktemp("imagenette")
    return build_fake_imagenette(root, 8, 4, size=(36, 40), classes=3)
