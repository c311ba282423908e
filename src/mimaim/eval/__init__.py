from . import attentive  # noqa: F401  (registers the "attentive" probe)
