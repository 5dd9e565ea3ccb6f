"""Data: config, in-memory sets, the tf.data stream, augmentation, prefetch, generated files."""
