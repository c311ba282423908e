"""Studies that pre-train as well as evaluate: ``compare`` (objectives side by side) and ``scale`` (model size x data);
they sit above ``engine`` and ``eval``, which never import them."""

#: named objective variants of a grid (``mimaim compare``/``scale``): the AIM paper's ablations (Table 3d, Table 5)
VARIANTS: dict[str, tuple[str, dict]] = {"aim-causal": ("aim", {"attention": "causal"}),
                                         "aim-masked50": ("aim", {"mode": "masked", "mask_ratio": 0.5})}
#: the RandomResizedCrop scale every ``mimaim compare`` cell shares unless --paper-augmentation (MAE's)
SAME_CROP_SCALE = (0.2, 1.0)
