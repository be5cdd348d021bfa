"""deepgen: image GANs and VAEs trained with one Accelerate loop."""
__version__ = "0.1.0"


def load_generator(path, device="cpu", prior="auto", data=None):
    """A trained generator (or VAE) from a run dir, checkpoint or export folder: see
    gen.sample.load_generator. Imported lazily, so `import gen` stays free of torch."""
    from .sample import load_generator as load
    return load(path, device, prior, data)
