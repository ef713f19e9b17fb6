"""mmlm: token-efficient vision-language models in JAX/Flax."""

__version__ = "0.1.0"

# LLaVA convention: the `<image>` placeholder is a negative id that is never
# embedded; the model replaces it by the image's vision tokens.
IMAGE_TOKEN_ID = -200
# Label value excluded from the loss (PyTorch's CrossEntropyLoss default).
IGNORE_INDEX = -100
