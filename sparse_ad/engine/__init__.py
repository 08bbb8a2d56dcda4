"""Training, evaluation and the demo pipeline."""
