"""Moved to ``mimaim.studies.compare`` (a study pre-trains, so it sits above ``eval``).

A thin re-export kept only until ``mimaim.eval.commands`` imports from ``mimaim.studies``;
new code imports ``mimaim.studies.compare``.
"""

from ..studies.compare import SAME_CROP_SCALE, VARIANTS, compare  # noqa: F401
