"""The names the augmentation flags offer (`--aug`, `--self-blend`, `--blend-mask`, `--blend-without`), torch-free
so the command lines can offer them without torch.

What each level does is in ``stage2.data.transforms``; self-blending in ``stage2.data.self_blend``.
"""

AUG_LEVELS = ("none", "light", "standard", "strong")
PAIRED = "paired"  # --self-blend paired: every real beside its own self-blended fake, in the same batch
# --blend-mask: auto takes the landmarks where the optional extra is installed and finds a face, else the ellipse
BLEND_MASKS = ("auto", "landmarks", "ellipse")
# --blend-without: the recipe's parts an ablation may leave out: the source/target colour and frequency transforms,
# the hull's shape variants (the plain hull only), blending on the crop at its own size (blended after the resize)
BLEND_PARTS = ("transforms", "shapes", "crop-size")
