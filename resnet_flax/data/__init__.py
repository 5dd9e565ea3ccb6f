"""Data sources: in-memory sets, the tf.data stream, augmentation, prefetch, generated files."""
