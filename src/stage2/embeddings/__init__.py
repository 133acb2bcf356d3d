"""Stage-two embeddings for stage three: extraction (``extract``), feature files (``store``), ``--example``."""

from .extract import FeatureBatch, FeatureExtractor, LoadedModel, check_model_name, load_model
from .store import FeatureFileError, FeatureSet, JoinedFeatures, NpzStreamWriter, join_features, load_features

__all__ = [
    "FeatureBatch",
    "FeatureExtractor",
    "FeatureFileError",
    "FeatureSet",
    "JoinedFeatures",
    "LoadedModel",
    "NpzStreamWriter",
    "check_model_name",
    "join_features",
    "load_model",
    "load_features",
]
