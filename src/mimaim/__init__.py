"""mimaim: masked and autoregressive image modeling behind one training engine."""

__version__ = "0.1.0"
