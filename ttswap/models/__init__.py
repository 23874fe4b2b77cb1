"""Plain PyTorch reference models that ttswap converts."""
