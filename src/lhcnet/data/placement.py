"""Where the uint8 training images live: on the training device when they fit, else pinned on the
host; and the memory check made before a 224-px training set is built.

FER2013's Training split is 66 MB at 48 px and 1.44 GB as the paper's 224-px JPEG set
(28,709 x 224 x 224 bytes). On a GPU either fits next to the model when it takes at most
``DEVICE_SHARE`` of the free memory: each batch is then gathered, resized and augmented on the
GPU and only indices cross the bus. Otherwise the images stay on the host in pinned memory and
each batch's uint8 pixels are copied over without blocking. On the CPU the host is the device.

Memory is shared wherever possible: a writable NumPy array or a tensor already in place is used
as is (every loader over the same images reads one array); only a read-only array (a memmap of
the data cache) is read into memory, once.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEVICE_SHARE", "fits_on_device", "place_images", "available_host_memory",
           "check_room_for_images"]

DEVICE_SHARE = 0.25  # the rest of a GPU's free memory is for the model, activations, optimizer
CONVERSION_HEADROOM = 256 * 2 ** 20  # paper_jpeg's working memory (a block of 128 float images) and more


def fits_on_device(nbytes: int, device: str | torch.device) -> bool:
    """True on the CPU; on CUDA when ``nbytes`` is at most ``DEVICE_SHARE`` of its free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


def as_uint8_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W)`` images as a tensor over the same memory (a read-only array is copied)."""
    if isinstance(images, torch.Tensor):
        tensor = images
    else:
        array = np.asarray(images)
        if not array.flags.writeable or any(s < 0 for s in array.strides):
            array = np.array(array)  # a read-only memmap (the data cache) or a flipped view
        tensor = torch.from_numpy(array)
    if tensor.ndim != 3 or tensor.dtype != torch.uint8 or len(tensor) == 0:
        raise ValueError(f"expected uint8 images (N, H, W), N > 0; got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor


def place_images(images: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """The images where ``BatchLoader`` reads them: on ``device`` when they fit, else pinned host
    memory. Images already in place (on the device, or pinned for it) are returned as they are."""
    device = torch.device(device)
    tensor = as_uint8_tensor(images)
    if tensor.device == device or (device.type == "cuda" and tensor.is_pinned()):
        return tensor
    if tensor.device.type == "cpu" and not fits_on_device(tensor.nbytes, device):
        return tensor.pin_memory()
    return tensor.to(device)


def available_host_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``); None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_room_for_images(count: int, size: int, device: str | torch.device, what: str) -> int:
    """Raise ``ValueError`` (before anything is trained) unless ``count`` uint8 images of
    ``size`` x ``size`` fit on ``device`` or, failing that, in host memory. Returns their bytes."""
    nbytes = count * size * size
    device = torch.device(device)
    if device.type == "cuda" and fits_on_device(nbytes, device):
        return nbytes
    available = available_host_memory()
    if available is not None and nbytes + CONVERSION_HEADROOM > available:
        raise ValueError(
            f"{what}: {count:,} images at {size} px need {nbytes / 1e9:.2f} GB of memory (+ "
            f"{CONVERSION_HEADROOM / 1e9:.2f} GB while they are converted), but only "
            f"{available / 1e9:.2f} GB is available; free memory, use a machine with more, "
            "or train a 48-px recipe (recipes/fer2013_compact.toml)")
    return nbytes
