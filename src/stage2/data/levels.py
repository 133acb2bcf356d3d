"""The names the augmentation flags offer (`--aug`, `--self-blend`, `--blend-mask`), torch-free so the command lines
can offer them without torch.

What each level does is in ``stage2.data.transforms``; self-blending in ``stage2.data.self_blend``.
"""

AUG_LEVELS = ("none", "light", "standard", "strong")
PAIRED = "paired"  # --self-blend paired: every real beside its own self-blended fake, in the same batch
# --blend-mask: auto takes the landmarks where the optional extra is installed and finds a face, else the ellipse
BLEND_MASKS = ("auto", "landmarks", "ellipse")
