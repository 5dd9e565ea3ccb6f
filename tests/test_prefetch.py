"""Host batches become global arrays sharded over the devices (8 simulated CPU devices)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from resnet_flax.data.prefetch import DevicePrefetcher
    from resnet_flax.training.runtime import make_mesh

    mesh = make_mesh()
    assert mesh.size == 8
    batches = [(np.full((16, 4, 4, 3), i, np.uint8), np.arange(16, dtype=np.int32) + 16 * i)
               for i in range(5)]
    prefetcher = DevicePrefetcher(iter(batches), NamedSharding(mesh, P("data")), size=2)
    seen = 0
    for i, (x, y) in enumerate(prefetcher):
        assert x.shape == (16, 4, 4, 3) and len(x.sharding.device_set) == 8
        # each device holds its own two consecutive rows of the global batch
        for shard in y.addressable_shards:
            rows = shard.index[0]
            np.testing.assert_array_equal(np.asarray(shard.data), np.arange(16)[rows] + 16 * i)
        assert int(np.asarray(x).max()) == i
        seen += 1
    assert seen == 5 and prefetcher.wait_s >= 0.0
    prefetcher.close()

    def broken():
        yield (np.zeros((16, 1), np.float32),)
        raise OSError("disk went away")

    failing = DevicePrefetcher(broken(), NamedSharding(mesh, P("data")), size=1)
    next(failing)
    try:
        next(failing)
    except OSError as err:
        assert "disk went away" in str(err)
    else:
        raise AssertionError("the producer's error must reach the consumer")
    print("ok")
    """
)


def test_prefetched_batches_are_sharded_over_eight_devices_and_errors_surface():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
