"""Sample quality: FID and Inception Score against real data (`fid`), and the offline digits harness (`digits`).

Every public name of both modules is importable from here, e.g. ``from diffusers_masked.evaluation import
compute_fid, evaluate_samples``. The sampling side of an evaluation at scale (seeded, sharded, resumable) is
`diffusers_masked.evaluation.sampling`.
"""

from .digits import (
    DIGITS_HOLDOUT_FRACTION,
    DigitsClassifier,
    DigitsFeatureExtractor,
    classification_accuracy,
    eval_results_for_model_card,
    evaluate_digits_samples,
    evaluate_pipeline_on_digits,
    get_digits_classifier,
)
from .fid import (
    DEFAULT_CACHE_DIR,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    FeatureStatistics,
    InceptionFeatureExtractor,
    compute_fid,
    compute_statistics,
    evaluate_samples,
    frechet_distance,
    get_feature_extractor,
    image_batches,
    images_to_tensor,
    inception_score,
    npz_image_count,
    reference_statistics,
    resolve_inception_weights,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DIGITS_HOLDOUT_FRACTION",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "FeatureStatistics",
    "InceptionFeatureExtractor",
    "classification_accuracy",
    "compute_fid",
    "compute_statistics",
    "eval_results_for_model_card",
    "evaluate_digits_samples",
    "evaluate_pipeline_on_digits",
    "evaluate_samples",
    "frechet_distance",
    "get_digits_classifier",
    "get_feature_extractor",
    "image_batches",
    "images_to_tensor",
    "inception_score",
    "npz_image_count",
    "reference_statistics",
    "resolve_inception_weights",
]
