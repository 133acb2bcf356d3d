"""The augmentation levels' names (`--aug`), torch-free so the command lines can offer them without torch.

What each level does is in ``stage2.data.transforms``.
"""

AUG_LEVELS = ("none", "light", "standard", "strong")
