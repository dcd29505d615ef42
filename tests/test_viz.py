"""The official pictures: sign rule, scaling, RGB and the files written."""

import numpy as np

from capi_jax.evaluators import viz


def test_pca_scaling_and_signs():
  rng = np.random.default_rng(0)
  features = rng.gamma(2.0, size=(3, 4, 5, 16)).astype(np.float32)  # Skewed components.
  for projected, n in ((viz.separate_pca(features), viz.SEPARATE_COMPONENTS),
                       (viz.joint_pca(features), viz.JOINT_COMPONENTS)):
    assert projected.shape == (3, 20, n)
    x = projected.reshape(-1, n).astype(np.float64) if n == viz.JOINT_COMPONENTS else \
        projected[0].astype(np.float64)
    assert abs(np.std(x[:, 0]) - 1) < 1e-5
    assert (np.mean(x ** 3, 0) >= 0).all()  # Skewness made non-negative.


def test_build_rgb_maps_the_range_and_resizes():
  projected = np.array([[-2.3, 0.0, 2.3], [3.0, -3.0, 1.15]], np.float32)  # 1x2 patches.
  rgb = viz.build_rgb(1, 2, projected)
  assert rgb.shape == (viz.PICTURE_SIZE, viz.PICTURE_SIZE, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[0, 0], [0, 127, 255])  # 127.5 truncated.
  np.testing.assert_array_equal(rgb[0, -1], [255, 0, 191])


def test_save_pictures_writes_the_official_files(tmp_path):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  image = lambda i: np.full((12, 16, 3), i / 10, np.float32)
  written = viz.save_pictures(image, features, [0, 9], tmp_path)
  assert [p.name for p in written] == ['0000000_pca_sep.png', '0000009_pca_sep.png',
                                       '0000000_pca_joint.png', '0000009_pca_joint.png']
  assert len(list(tmp_path.iterdir())) == 4 * (1 + len(viz.FLIP_DIRECTIONS))
  assert viz.image_indices(2500, 1024) == list(range(0, 2500, 2))
  assert viz.image_indices(10, 1024) == list(range(10))
