"""Evaluation of a trained run: features, linear / attentive / k-NN probes, fine-tuning, pictures."""
