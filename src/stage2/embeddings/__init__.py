"""Stage-two embeddings for stage three: extraction (``extract``), feature files (``store``), ``--example``.

Feature files load without torch (``load_features``, ``join_features``: numpy only), so that stage three and a
process that only writes or reads them start in a fraction of a second; the extractor's names load torch when
first used.
"""

from typing import TYPE_CHECKING, Any

from .store import FeatureFileError, FeatureSet, JoinedFeatures, NpzStreamWriter, join_features, load_features

if TYPE_CHECKING:
    from .extract import FeatureBatch, FeatureExtractor, LoadedModel, check_model_name, load_model

__all__ = ["FeatureBatch", "FeatureExtractor", "LoadedModel", "check_model_name", "load_model",  # from extract
           "FeatureFileError", "FeatureSet", "JoinedFeatures", "NpzStreamWriter", "join_features", "load_features"]
_FROM_EXTRACT = __all__[:5]


def __getattr__(name: str) -> Any:
    if name in _FROM_EXTRACT:
        from . import extract

        return getattr(extract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
