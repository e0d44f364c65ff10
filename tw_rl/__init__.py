"""tw-rl: Knowledge Distillation with Training Wheels on Ray."""
__version__ = "0.1.0"
