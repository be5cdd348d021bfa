"""Turn image data sets into WebDataset shards.

    python -m data_prep mnist --out data/mnist
    python -m data_prep fashion-mnist --source ~/Downloads/fashion --out data/fashion
    python -m data_prep pokemon --out data/pokemon --size 64
    python -m data_prep folder ~/pizzas.zip --out data/pizzas --size 64 --crop center
    python -m data_prep verify data/mnist
    python -m data_prep preview data/mnist --out grid.png
"""


from gen.shard_format import DataError


class PrepError(DataError):
    """A problem with the user's input: printed as one line, exit code 1 (or `code`)."""
