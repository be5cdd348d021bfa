"""deepgen: image GANs and VAEs trained with one Accelerate loop."""
__version__ = "0.1.0"
