"""Fashion-MNIST: find the four IDX files, check them, and hand back tensors.

The IDX format (LeCun's MNIST format) is big-endian: a 4-byte magic number ``0x00000803`` for images (then the
count, rows and cols as 4-byte integers, then ``count*rows*cols`` uint8 pixels) or ``0x00000801`` for labels (the
count, then ``count`` uint8 labels). Files may be gzip-compressed (``name.gz``) or raw (``name``).

Every file is checked before it is used:

* the header must be readable and the payload exactly as long as the header says (a truncated download is named
  as such, with both lengths);
* the sha256 of the *decompressed* bytes must equal the published one (``CHECKSUMS``), so both the official
  gzip files and Debian's recompressed copies are accepted, and a corrupt file is never trained on.

Search order for the directory (the first one that holds all four files wins):

1. ``data_dir`` given explicitly (``--data-dir``); when given, nothing else is searched;
2. ``$NORMLAB_DATA``;
3. the repository's vendored copy ``data/fashion-mnist/``;
4. the user cache ``~/.cache/normlab/fashion-mnist`` (``$XDG_CACHE_HOME`` respected);
5. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

``download=True`` fetches missing files from the official mirror into the user cache, verifying them the same way.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# sha256 of the decompressed bytes.
CHECKSUMS = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801


class DataError(RuntimeError):
    """The dataset is missing, truncated or corrupt. The message says which file and what to do."""


@dataclass
class Split:
    """One split in memory: ``images`` uint8 (N, 28, 28), ``labels`` int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> "Split":
        """The first ``n`` examples (the files are already in random order); ``None`` keeps all."""
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])

    def float_images(self) -> torch.Tensor:
        """Images as float32 (N, 1, 28, 28) in [0, 1], as d2l's ``ToTensor`` gives them."""
        return self.images.unsqueeze(1).float().div_(255.0)


# --------------------------------------------------------------------------------------------- reading one file
def read_idx(path: str | os.PathLike, expected_sha256: str | None = None, *, gz: bool | None = None) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``) into a uint8 array of the shape its header declares.

    Raises ``DataError`` with the file name and the fix when the file is not gzip, has a bad magic number, is
    shorter or longer than its header says, or its decompressed sha256 differs from ``expected_sha256``.
    """
    path = Path(path)
    raw = _read_bytes(path, path.suffix == ".gz" if gz is None else gz)
    if len(raw) < 8:
        raise DataError(f"{path}: truncated: only {len(raw)} bytes, not even an IDX header. "
                        f"Delete it and fetch it again.")
    magic, count = struct.unpack(">II", raw[:8])
    if magic == IMAGE_MAGIC:
        if len(raw) < 16:
            raise DataError(f"{path}: truncated: image header needs 16 bytes, file has {len(raw)}.")
        rows, cols = struct.unpack(">II", raw[8:16])
        shape, offset = (count, rows, cols), 16
    elif magic == LABEL_MAGIC:
        shape, offset = (count,), 8
    else:
        raise DataError(f"{path}: not an IDX file of uint8 images or labels: magic number 0x{magic:08x}, "
                        f"expected 0x{IMAGE_MAGIC:08x} (images) or 0x{LABEL_MAGIC:08x} (labels).")
    want = offset + int(np.prod(shape))
    if len(raw) < want:
        raise DataError(f"{path}: truncated: the header declares {shape} -> {want} bytes, but the (decompressed) "
                        f"file has {len(raw)} ({len(raw) / want:.1%}). The download or copy was cut short; "
                        f"delete the file and fetch it again.")
    if len(raw) > want:
        raise DataError(f"{path}: {len(raw) - want} unexpected trailing bytes after the {want} bytes the header "
                        f"declares; the file is corrupt.")
    if expected_sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != expected_sha256:
            raise DataError(f"{path}: corrupt: sha256 of the decompressed bytes is {got}, expected "
                            f"{expected_sha256}. Delete the file and fetch it again (or pass verify=False / "
                            f"--no-verify for a dataset of your own).")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _read_bytes(path: Path, gz: bool) -> bytes:
    data = path.read_bytes()
    if not gz:
        return data
    try:
        return gzip.decompress(data)
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream ({len(data)} bytes on disk): the download or copy was "
                        f"cut short. Delete the file and fetch it again.") from None
    except (OSError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: not a valid gzip file ({err}). Delete it and fetch it again.") from None


# --------------------------------------------------------------------------------------------- finding the files
def vendored_dir() -> Path:
    """``data/fashion-mnist`` of the source checkout (``src/normlab/lab/data.py`` -> repo root)."""
    return Path(__file__).resolve().parents[3] / "data" / "fashion-mnist"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlab" / "fashion-mnist"


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched, in order (see the module docstring)."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("NORMLAB_DATA"):
        dirs.append(Path(os.environ["NORMLAB_DATA"]))
    dirs += [vendored_dir(), cache_dir(), Path("/usr/share/datasets/fashion-mnist")]
    return dirs


def _locate(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The first candidate directory holding all four files; ``DataError`` listing what each one lacks."""
    report = []
    for directory in candidate_dirs(data_dir):
        missing = [name for name in FILES.values() if _locate(directory, name) is None]
        if not missing:
            return directory
        state = "does not exist" if not directory.is_dir() else "lacks " + ", ".join(missing)
        report.append(f"  {directory}: {state}")
    raise DataError("Fashion-MNIST not found. Looked in:\n" + "\n".join(report) +
                    "\nEach directory needs the four IDX files (raw or .gz): " + ", ".join(FILES.values()) +
                    ".\nFix: pass --data-dir DIR, set NORMLAB_DATA=DIR, or run with --download "
                    f"(fetches from {MIRROR} into {cache_dir()}).")


def download(dest: str | os.PathLike | None = None) -> Path:
    """Fetch the four gzip files from the official mirror into ``dest`` (default: the user cache), verified."""
    dest = Path(dest) if dest is not None else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        target = dest / f"{name}.gz"
        if target.is_file():
            continue
        url = MIRROR + f"{name}.gz"
        print(f"downloading {url}", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
        except OSError as err:
            raise DataError(f"could not download {url}: {err}. Without a network, copy the files into "
                            f"{dest} or pass --data-dir.") from None
        part = dest / f"{name}.gz.part"
        part.write_bytes(payload)
        try:
            read_idx(part, CHECKSUMS[name], gz=True)
        except DataError:
            part.unlink()
            raise
        os.replace(part, target)
    return dest


# --------------------------------------------------------------------------------------------- the dataset
def load_fashion_mnist(data_dir: str | os.PathLike | None = None, *, verify: bool = True,
                       download_missing: bool = False) -> tuple[Split, Split]:
    """Return ``(train, test)`` splits, every file checked (see the module docstring).

    ``verify=False`` skips only the sha256 comparison (for a dataset of your own); the length checks stay, so a
    truncated file is never trained on.
    """
    try:
        directory = find_data_dir(data_dir)
    except DataError:
        if not download_missing:
            raise
        directory = download(data_dir)
    arrays = {}
    for key, name in FILES.items():
        arrays[key] = read_idx(_locate(directory, name), CHECKSUMS[name] if verify else None)
    splits = []
    for prefix in ("train", "test"):
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{directory}: {prefix} images must be an idx3 file and labels an idx1 file; got "
                            f"shapes {images.shape} and {labels.shape}.")
        if len(images) != len(labels):
            raise DataError(f"{directory}: {prefix} has {len(images)} images but {len(labels)} labels.")
        if labels.size and labels.max() > 9:
            raise DataError(f"{directory}: {prefix} labels must be 0..9; found {int(labels.max())}.")
        splits.append(Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))))
    return splits[0], splits[1]


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> str:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz); returns the sha256 of the raw bytes.

    Used by the tests to make small datasets; handy for a dataset of your own too.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        header = struct.pack(">IIII", IMAGE_MAGIC, *array.shape)
    elif array.ndim == 1:
        header = struct.pack(">II", LABEL_MAGIC, array.shape[0])
    else:
        raise ValueError(f"IDX writer takes (N, rows, cols) images or (N,) labels; got shape {array.shape}")
    raw = header + array.tobytes()
    path = Path(path)
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return hashlib.sha256(raw).hexdigest()


def write_synthetic(directory: str | os.PathLike, n_train: int = 300, n_test: int = 100, seed: int = 0,
                    compress: bool = True) -> dict[str, str]:
    """Write a tiny, learnable Fashion-MNIST look-alike (four IDX files) for smoke tests; returns name -> sha256.

    Class ``k`` is noise plus a bright 6x6 square whose position depends on ``k``, so a few SGD steps learn it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sums = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            r, c = 2 + 8 * (int(k) // 4), 2 + 6 * (int(k) % 4)
            images[i, r:r + 6, c:c + 6] = 230
        suffix = ".gz" if compress else ""
        sums[f"{prefix}-images-idx3-ubyte"] = write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        sums[f"{prefix}-labels-idx1-ubyte"] = write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return sums
