"""Networks: the spec and its resolution, the ResNet builder, BatchNorm, convolutions, sizes."""
