"""Helper scripts of the Polyp-Mamba polyp segmentation bundle (data preparation); the configs do not import them."""
