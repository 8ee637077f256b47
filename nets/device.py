"""Device selection.

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

import torch

from spectral.errors import argument_error

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> ``cuda`` when available, else ``cpu``; other strings as torch does.

    Parameters
    ----------
    device : str, torch.device or None
        ``"auto"`` (default), ``None``, ``"cpu"``, ``"cuda:0"``...

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    ValueError
        For a string torch does not understand, or a CUDA device when CUDA is
        unavailable.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto").type in ("cpu", "cuda")
    True
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as exc:
            raise argument_error(
                "device", "'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device", device
            ) from exc
    else:
        raise argument_error("device", "a str or torch.device", device, kind=TypeError)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise argument_error("device", "an available device (CUDA is not available)", device)
    return resolved
