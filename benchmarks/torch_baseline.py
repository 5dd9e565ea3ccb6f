"""The same CIFAR network trained in PyTorch eager: the baseline users would otherwise pick."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np

from resnet_flax.models.spec import Architecture, ModelSpec, check_bn_batch, resolve


def check_torch_spec(spec: ModelSpec) -> Architecture:
    """The resolved net; ValueError unless the PyTorch baseline builds it (no torch import)."""
    arch = resolve(spec)
    if spec.family != "cifar" or arch.block != "basic" or spec.model == "preact":
        raise ValueError(
            "the PyTorch baseline covers CIFAR plain/residual nets with basic blocks; "
            f"got {spec.model}-{spec.depth} ({spec.family}, {arch.block} blocks)"
        )
    return arch


def _group_batch_norm_class():
    """`nn.BatchNorm2d` with training statistics per group of images (ModelSpec.bn_batch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GroupBatchNorm2d(nn.BatchNorm2d):
        """Each group of `group` consecutive images normalised by its own mean and variance.

        As resnet_flax.models.batchnorm.GroupBatchNorm: the running averages move towards the mean
        over groups of each statistic (PyTorch's conventions: momentum 0.1, unbiased running
        variance). The whole batch, or evaluation, is `nn.BatchNorm2d` unchanged.
        """

        def __init__(self, num_features: int, group: int):
            super().__init__(num_features)
            self.group = group

        def forward(self, x):
            if not self.training or x.shape[0] == self.group:
                return super().forward(x)
            check_bn_batch(self.group, x.shape[0])  # as resnet_flax.models.batchnorm.GroupBatchNorm
            # PyTorch's own kernel per group, faster than a var_mean over a grouped view; fresh
            # buffers with momentum 1 receive each group's statistics, in PyTorch's conventions.
            outs, means, variances = [], [], []
            for chunk in x.split(self.group):
                mean = torch.zeros_like(self.running_mean)
                var = torch.ones_like(self.running_var)
                outs.append(
                    F.batch_norm(chunk, mean, var, self.weight, self.bias, True, 1.0, self.eps)
                )
                means.append(mean)
                variances.append(var)
            with torch.no_grad():
                self.running_mean.lerp_(torch.stack(means).mean(0), self.momentum)
                self.running_var.lerp_(torch.stack(variances).mean(0), self.momentum)
                self.num_batches_tracked += 1
            return torch.cat(outs)

    return GroupBatchNorm2d


def build_torch_model(spec: ModelSpec):
    """A PyTorch CIFAR plain/residual net with option-A shortcuts, as our Flax one."""
    import torch
    from torch import nn

    arch = check_torch_spec(spec)
    group_bn = _group_batch_norm_class() if spec.bn_batch is not None else None

    def batch_norm(channels: int) -> nn.Module:
        """The spec's BatchNorm: over the whole batch, or per group of bn_batch images."""
        if group_bn is None:
            return nn.BatchNorm2d(channels)
        return group_bn(channels, spec.bn_batch)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = batch_norm(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = batch_norm(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if spec.model == "residual":
                short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
                if self.extra:
                    short = nn.functional.pad(short, (0, 0, 0, 0, 0, self.extra))
                out = out + short
            return torch.relu(out)

    stem = nn.Conv2d(spec.in_channels, arch.stem_width, 3, 1, 1, bias=False)
    layers = [stem, batch_norm(arch.stem_width), nn.ReLU()]
    cin = arch.stem_width
    for plan in arch.stages:
        for b in range(plan.num_blocks):
            layers.append(BasicBlock(cin, plan.out_width, plan.stride if b == 0 else 1))
            cin = plan.out_width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, spec.num_classes)]
    return nn.Sequential(*layers)


def _serve(conn, spec: ModelSpec, batch_size: int, image_size: int, steps: int) -> None:
    """Child process: build the net, take one step, then time `steps` steps per request."""
    import torch

    # One thread per core this process may use: its affinity mask, which the benchmark's
    # --cores narrows (PyTorch's default counts the machine's cores).
    if hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    try:
        model = build_torch_model(spec)
    except ValueError as err:  # the parent raises it again
        conn.send({"error": str(err)})
        return
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, spec.num_classes, (batch_size,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # first call allocates
    framework = f"pytorch {torch.__version__} eager"
    conn.send({"framework": framework, "threads": torch.get_num_threads()})
    while (repeats := conn.recv()) is not None:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) / steps)
        conn.send(times)


class TorchStepTimer:
    """PyTorch eager SGD steps timed in a child process, in rounds that can alternate with JAX.

    A separate process keeps the two frameworks' thread pools apart (PyTorch's OpenMP threads
    keep spinning after its ops and slow JAX's step in the same process), and alternating
    rounds expose both to the same drift of a shared machine.
    """

    def __init__(self, spec: ModelSpec, batch_size: int, image_size: int, steps: int = 5):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX, no fork
        self._conn, child = ctx.Pipe()
        args = (child, spec, batch_size, image_size, steps)
        self._proc = ctx.Process(target=_serve, args=args, daemon=True)
        self._proc.start()
        child.close()  # the child's end lives in the child alone: its death ends our reads
        self.spec, self.batch_size, self.times = spec, batch_size, []
        self.info = self._receive()  # the net is built and has taken its first step
        if "error" in self.info:
            self._proc.join(timeout=60)
            raise ValueError(self.info["error"])

    def time(self, repeats: int) -> list[float]:
        """Seconds per step of `repeats` timings (each the mean of `steps` steps)."""
        self._conn.send(repeats)
        times = self._receive()
        self.times += times
        return times

    def _receive(self):
        """The child's next message; RuntimeError if it died (its traceback is on stderr)."""
        try:
            return self._conn.recv()
        except EOFError:
            self._proc.join(timeout=60)
            code = self._proc.exitcode
            raise RuntimeError(f"the PyTorch timing process exited with {code}") from None

    def row(self) -> dict:
        """The benchmark row: median seconds per step over every timing so far."""
        step_s = float(np.median(self.times))
        return {
            **self.info,
            "model": self.spec.model,
            "depth": self.spec.depth,
            "bn_batch": self.spec.bn_batch,
            "batch_size": self.batch_size,
            "precision": "float32",
            "conv_impl": "-",
            "step_s": step_s,
            "train_images_per_sec": self.batch_size / step_s,
        }

    def close(self) -> None:
        """Stop the child process."""
        self._conn.send(None)
        self._proc.join(timeout=60)
