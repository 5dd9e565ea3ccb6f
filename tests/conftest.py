"""Fixtures shared by the test modules."""

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the pytest process, shared by all its tests.

    Tests build the same tiny nets again and again; each new jit wrapper would recompile
    them. Reading the compiled program back from disk gives the same executable.
    """
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def imagenette_dir(tmp_path_factory):
    """A real TFDS imagenette/320px-v2 built by TFDS's builder from generated JPEGs."""
    pytest.importorskip("tensorflow_datasets")
    from resnet_flax.data.generated import build_fake_imagenette

    root = tmp_path_factory.mktemp("imagenette")
    return build_fake_imagenette(root, 8, 4, size=(36, 40), classes=3)
