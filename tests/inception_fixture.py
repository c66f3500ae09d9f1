"""Fixed images for the feature-network test, and the script that stored the network's output for them once.

``python tests/inception_fixture.py`` rewrites tests/data/inception_features.npz (do so only when the
preprocessing is changed on purpose).
"""

import os

import numpy as np

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "inception_features.npz")


def fixed_images() -> list[np.ndarray]:
    """Three uint8 ``[S, S, 3]`` images made from index arithmetic: 16 and 24 pixels (resized), 299 (not)."""
    images = []
    for size, period in ((16, 5), (24, 7), (299, 37)):
        y, x = np.indices((size, size))
        red = (x * 255) // max(size - 1, 1)
        green = ((x // period + y // period) % 2) * 200 + 20
        blue = (y * 7 + x * 3) % 256
        images.append(np.stack([red, green, blue], axis=-1).astype(np.uint8))
    return images


if __name__ == "__main__":
    from fastdiff.evaluation.inception import INCEPTION_SHA1, load_feature_network

    network = load_feature_network()
    features = [network.features(image[None])[0] for image in fixed_images()]
    np.savez(FIXTURE, features=np.stack(features).astype(np.float32), network_sha1=INCEPTION_SHA1)
    print(f"wrote {FIXTURE}")
