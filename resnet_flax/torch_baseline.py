"""The same CIFAR network trained in PyTorch eager: the baseline users would otherwise pick."""

from __future__ import annotations

import time

from resnet_flax.architecture import ModelSpec, resolve


def torch_available() -> bool:
    """Whether PyTorch can be imported here."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_torch_model(spec: ModelSpec):
    """A PyTorch CIFAR plain/residual net with option-A shortcuts, as our Flax one."""
    import torch
    from torch import nn

    arch = resolve(spec)
    if spec.family != "cifar" or arch.block != "basic" or spec.model == "preact":
        raise ValueError("the PyTorch baseline covers CIFAR plain/residual nets with basic blocks")

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
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

    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for plan in arch.stages:
        for b in range(plan.num_blocks):
            layers.append(BasicBlock(cin, plan.out_width, plan.stride if b == 0 else 1))
            cin = plan.out_width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, spec.num_classes)]
    return nn.Sequential(*layers)


def time_torch_step(
    spec: ModelSpec, batch_size: int, image_size: int, steps: int = 5, repeats: int = 3
) -> dict:
    """Median seconds per SGD training step in PyTorch eager on the CPU."""
    import torch

    torch.manual_seed(0)
    model = build_torch_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, spec.num_classes, (batch_size,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        times.append((time.perf_counter() - t0) / steps)
    times.sort()
    step_s = times[len(times) // 2]
    return {
        "framework": f"pytorch {torch.__version__} eager",
        "model": spec.model,
        "depth": spec.depth,
        "batch_size": batch_size,
        "precision": "float32",
        "conv_impl": "-",
        "step_s": step_s,
        "train_images_per_sec": batch_size / step_s,
        "threads": torch.get_num_threads(),
    }
