"""pab's engine: specs, stages, training, artifacts. `pab_framework.load(path)` reads a network back."""


def load(path):
    """The network in a model.pt, a stage directory or a file `pab export` wrote, as an `nn.Module`
    in eval mode (the architecture from the recorded spec, the masks applied); see
    `pab_framework.export.load`."""
    from .export import load as _load  # heavy: torch, only when a network is loaded

    return _load(path)
