"""Stage two of a deepfake-detection cascade: EfficientNetV2 and GenConViT experts and their embeddings.

    from stage2 import FeatureExtractor                  # also: from stage2.embeddings import FeatureExtractor

Torch loads when FeatureExtractor is first used, not at ``import stage2``: the commands import the package too.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stage2.embeddings import FeatureExtractor

__all__ = ["FeatureExtractor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stage2 import embeddings

        return getattr(embeddings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
