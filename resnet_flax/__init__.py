"""resnet_flax: plain, residual and pre-activation nets and the degradation study."""
