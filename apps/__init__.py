"""Programs people run: the `accel` CLI, benchmarks, the Gradio app, the batch script."""

import logging


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' notes that `CLIPImageProcessor` / `SiglipImageProcessor` fall back to their PIL versions
    without torchvision: diffusers' pipeline modules import those names on every load, the PIL versions are what
    these programs use (torchvision is not a dependency), and the two lines on every command read as a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# transformers logs through Python logging under its module names; the logger exists before transformers loads.
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
