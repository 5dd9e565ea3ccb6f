"""Training: the compiled steps, the state, the loop, optimiser, checkpoints and the runtime."""
