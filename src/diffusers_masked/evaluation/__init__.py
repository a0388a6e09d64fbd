"""Sample quality, in one direction of imports: images (`images`) -> feature spaces (`features`: Inception-v3, the
offline digits classifier) -> FID and Inception Score against real data (`fid`) -> the digits evaluation (`digits`).

Every public name of those modules is importable from here, e.g. ``from diffusers_masked.evaluation import
compute_fid, evaluate_samples``. The sampling side of an evaluation at scale (seeded, sharded, resumable) is
`diffusers_masked.evaluation.sampling`.
"""

from .digits import eval_results_for_model_card, evaluate_digits_samples, evaluate_pipeline_on_digits
from .features import (
    DEFAULT_CACHE_DIR,
    DIGITS_HOLDOUT_FRACTION,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    DigitsClassifier,
    DigitsFeatureExtractor,
    InceptionFeatureExtractor,
    classification_accuracy,
    get_digits_classifier,
    get_feature_extractor,
    resolve_inception_weights,
)
from .fid import (
    FeatureStatistics,
    compute_fid,
    compute_statistics,
    evaluate_samples,
    frechet_distance,
    inception_score,
    reference_statistics,
)
from .images import image_batches, images_to_tensor, npz_image_count

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
