"""Stage-two embeddings for stage three: extraction (``extract``), feature files (``store``), ``--example``."""

from .extract import FeatureBatch, FeatureExtractor, LoadedExpert, check_model_name, load_expert
from .store import FeatureFileError, FeatureSet, JoinedFeatures, NpzStreamWriter, join_features, load_features

__all__ = [
    "FeatureBatch",
    "FeatureExtractor",
    "FeatureFileError",
    "FeatureSet",
    "JoinedFeatures",
    "LoadedExpert",
    "NpzStreamWriter",
    "check_model_name",
    "join_features",
    "load_expert",
    "load_features",
]
