"""Studies that pre-train as well as evaluate: ``compare`` (objectives side by side) and ``scale`` (model size x data).

They sit above ``engine`` (which trains each cell) and ``eval`` (which probes and
fine-tunes it); nothing in ``engine`` or ``eval`` imports them.
"""
