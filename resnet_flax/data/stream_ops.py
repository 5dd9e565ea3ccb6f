"""tf.data image ops of the stream: one encoded JPEG to a training or an evaluation view.

Every op takes the TensorFlow module as `tf`, so importing this module imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

# Inception-style random-resized crop (Szegedy et al. 2015; flax examples/imagenet).
RRC_AREA = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
# He et al. 2015 sec. 3.4: shorter side resized to a random size in [256, 480] for 224 crops.
SCALE_RANGE = (256, 480)
# Evaluation: shorter side resized to image_size / 0.875 (256 for 224), centre crop.
EVAL_CROP_FRACTION = 0.875


def resize(tf: Any, image: Any, size: int) -> Any:
    """Resize to size x size (bilinear) and round back to uint8.

    No antialiasing, as in big_vision and TF's official ResNet: it would triple the per-image
    cost, and crops shrink by under 2x on ImageNet, where bilinear aliasing is mild.
    """
    image = tf.image.resize(image, [size, size], method="bilinear")
    return tf.saturate_cast(tf.round(image), tf.uint8)


def random_resized_crop(tf: Any, jpeg: Any, seed: Any, size: int) -> Any:
    """Inception crop: area 8-100%, aspect 3/4-4/3, decoding only the crop window."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole,
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=RRC_RATIO,
        area_range=RRC_AREA,
        max_attempts=RRC_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    window = tf.stack([offset_y, offset_x, height, width])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return resize(tf, image, size)


def scale_crop(tf: Any, jpeg: Any, seed: Any, size: int) -> Any:
    """He et al. sec. 3.4: shorter side to a random s in [256, 480] (x size/224), random crop.

    Cropping the source window that maps onto the crop and then resizing it is the same
    image as resizing the whole picture and cropping, at a fraction of the cost.
    """
    shape = tf.image.extract_jpeg_shape(jpeg)
    height, width = shape[0], shape[1]
    lo, hi = (round(s * size / 224) for s in SCALE_RANGE)
    scale_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    shorter = tf.random.stateless_uniform([], scale_seed, lo, hi + 1, dtype=tf.int32)
    factor = tf.cast(tf.minimum(height, width), tf.float32) / tf.cast(shorter, tf.float32)
    crop = tf.cast(tf.round(size * factor), tf.int32)
    crop = tf.clip_by_value(crop, 1, tf.minimum(height, width))
    offset_y = tf.random.stateless_uniform([], y_seed, 0, height - crop + 1, dtype=tf.int32)
    offset_x = tf.random.stateless_uniform([], x_seed, 0, width - crop + 1, dtype=tf.int32)
    window = tf.stack([offset_y, offset_x, crop, crop])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return resize(tf, image, size)


def centre_crop(tf: Any, jpeg: Any, size: int) -> Any:
    """Evaluation view: the central 87.5% square (shorter side -> size/0.875, centre crop)."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    height, width = shape[0], shape[1]
    crop = tf.cast(
        tf.round(EVAL_CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32)), tf.int32
    )
    crop = tf.maximum(crop, 1)
    window = tf.stack([(height - crop) // 2, (width - crop) // 2, crop, crop])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return resize(tf, image, size)


def train_view(tf: Any, jpeg: Any, seed: Any, size: int, augmentation: str, flip: bool) -> Any:
    """One training image: the configured crop, then a random horizontal flip when asked."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if augmentation == "scale":
        image = scale_crop(tf, jpeg, crop_seed, size)
    else:
        image = random_resized_crop(tf, jpeg, crop_seed, size)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return tf.ensure_shape(image, (size, size, 3))


def eval_view(tf: Any, jpeg: Any, size: int) -> Any:
    """One evaluation image: the centre crop, its static shape set."""
    return tf.ensure_shape(centre_crop(tf, jpeg, size), (size, size, 3))
