"""Moved to ``mimaim.studies.scale`` (a study pre-trains, so it sits above ``eval``).

A thin re-export kept only until ``mimaim.eval.commands`` imports from ``mimaim.studies``;
new code imports ``mimaim.studies.scale``.
"""

from ..studies.scale import scale  # noqa: F401
