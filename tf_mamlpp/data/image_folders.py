"""Image data sets laid out as folders: which files make each class of each split.

`index_splits` finds the first of these layouts in `data_dir`:
1. pre-split folders: `train/`, `val/`, `test/`, each with one sub-folder of
   images per class (how mini-ImageNet is usually unpacked);
2. split files: `images/` with `train.csv`, `val.csv`, `test.csv` beside it,
   rows `filename,label` (the split of Ravi & Larochelle, 2017, that
   mini-ImageNet is known by);
3. one folder of classes, `<class>/<image>`, whose classes are shuffled with a
   fixed seed and split by fractions (`split_ratios`).
Only names are read here, no pixels: the index is quick to build, so flags that
ask for more classes or images than a split has fail before any decoding.
Hidden entries (starting with ".") are skipped; the decoded-image cache lives
in one.
"""

import csv
import dataclasses
import pathlib

import numpy as np

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.data.class_images import DataError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
MINI_IMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}  # Ravi and Larochelle's split
DEFAULT_SPLIT_RATIOS = "0.64,0.16,0.2"  # mini-ImageNet's 64/16/20 classes
SPLIT_SEED = 0  # a fixed seed: the split belongs to the data set, not to the run

PRE_SPLIT_LAYOUTS = ("train/, val/, test/ with one sub-folder of images (JPEG or PNG) per "
                     "class, or images/ with train.csv, val.csv, test.csv (filename,label)")
ALL_LAYOUTS = PRE_SPLIT_LAYOUTS + ", or one sub-folder of images per class (split by " \
                                  "the split ratios)"


@dataclasses.dataclass(frozen=True)
class ClassFiles:
    """The image files of each class of one split: the per-class index.

    Attributes:
      names: one name per class, e.g. "train/n01532829".
      files: per class, its image files sorted by name (at least one each).
      source: the folder or split file the split came from, for messages.
    """

    names: list[str]
    files: list[list[pathlib.Path]]
    source: pathlib.Path

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def class_counts(self) -> np.ndarray:
        return np.array([len(files) for files in self.files], dtype=np.int64)

    def select(self, class_indices) -> "ClassFiles":
        """The given classes, in the given order."""
        return ClassFiles([self.names[c] for c in class_indices],
                          [self.files[c] for c in class_indices], self.source)


def index_splits(data_dir, split_ratios=None, allow_unsplit=True) -> dict[str, ClassFiles]:
    """The train/val/test `ClassFiles` of the data set in `data_dir`.

    Args:
      data_dir: a folder in one of the three layouts of the module docstring.
      split_ratios: "train,val,test" fractions of the classes, for the third
        layout only; None means DEFAULT_SPLIT_RATIOS.
      allow_unsplit: accept the third layout (False for mini-ImageNet, which
        comes split).

    Raises:
      DataError: the folder is missing, in no known layout, or a class or
        file in it is missing or empty, naming the path and the expected layout.
      ConfigError: `split_ratios` is malformed or given for a pre-split layout.
    """
    data_dir = pathlib.Path(data_dir).expanduser()
    layouts = ALL_LAYOUTS if allow_unsplit else PRE_SPLIT_LAYOUTS
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such directory (expected {layouts})")
    present = [split for split in SPLITS if (data_dir / split).is_dir()]
    if present or (data_dir / "train.csv").is_file():
        if split_ratios is not None:
            raise ConfigError(f"split_ratios={split_ratios} conflicts with {data_dir}, which "
                              "is split already; leave it out", "split_ratios")
        if present:
            return _index_split_folders(data_dir, present)
        return _index_split_files(data_dir)
    if (data_dir / "images").is_dir():
        raise DataError(f"{data_dir}: images/ without train.csv, val.csv, test.csv beside it "
                        f"(expected {layouts})")
    if not allow_unsplit:
        raise DataError(f"{data_dir}: no train/, val/, test/ folders or split files "
                        f"(expected {layouts})")
    return _split_class_folders(data_dir, split_ratios or DEFAULT_SPLIT_RATIOS)


def _index_split_folders(data_dir, present):
    missing = [split for split in SPLITS if split not in present]
    if missing:
        raise DataError(f"{data_dir}: has {', '.join(s + '/' for s in present)} but no "
                        f"{missing[0]}/ (expected {PRE_SPLIT_LAYOUTS})")
    return {split: _index_class_folders(data_dir / split, prefix=f"{split}/")
            for split in SPLITS}


def _index_class_folders(folder, prefix=""):
    """One class per sub-folder of `folder`, sorted by name."""
    classes = sorted(path for path in folder.iterdir()
                     if path.is_dir() and not path.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class folders in it")
    files = [image_files(path) for path in classes]
    for path, class_files in zip(classes, files):
        if not class_files:
            raise DataError(f"{path}: class folder with no images ({', '.join(IMAGE_SUFFIXES)})")
    return ClassFiles([prefix + path.name for path in classes], files, folder)


def image_files(folder) -> list[pathlib.Path]:
    """The image files directly in `folder`, sorted by name; other files are ignored."""
    return sorted(path for path in pathlib.Path(folder).iterdir()
                  if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."))


def _index_split_files(data_dir):
    """Classes of each split from its csv; files in data_dir/images, sorted within a class."""
    images = data_dir / "images"
    if not images.is_dir():
        raise DataError(f"{data_dir}: train.csv without an images/ folder beside it")
    available = {path.name for path in images.iterdir()}
    splits = {}
    for split in SPLITS:
        table = data_dir / f"{split}.csv"
        if not table.is_file():
            raise DataError(f"{table}: no such file (expected {PRE_SPLIT_LAYOUTS})")
        by_label = {}
        with open(table, newline="") as file:
            for line, row in enumerate(csv.reader(file), start=1):
                if line == 1 and [cell.strip().lower() for cell in row] == ["filename", "label"]:
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise DataError(f"{table} line {line}: expected filename,label, "
                                    f"got {','.join(row)!r}")
                name, label = row[0].strip(), row[1].strip()
                if name not in available:
                    raise DataError(f"{images / name}: no such file (listed in {table} line "
                                    f"{line})")
                by_label.setdefault(label, []).append(images / name)
        if not by_label:
            raise DataError(f"{table}: no rows (expected filename,label)")
        labels = sorted(by_label)
        splits[split] = ClassFiles(labels, [sorted(by_label[label]) for label in labels], table)
    return splits


def parse_split_ratios(text: str) -> tuple[float, float, float]:
    """"0.64,0.16,0.2" -> (0.64, 0.16, 0.2); three positive fractions that sum to 1.

    Raises:
      ConfigError: naming split_ratios.
    """
    try:
        ratios = tuple(float(part) for part in text.split(","))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise ConfigError(f"split_ratios={text}: expected three positive fractions "
                          "train,val,test that sum to 1, e.g. 0.64,0.16,0.2", "split_ratios")
    return ratios


def split_sizes(num_classes: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Classes per split: val and test rounded from their fractions, train the rest.

    Raises:
      ConfigError: a split would get no class, naming split_ratios.
    """
    val, test = (round(num_classes * ratio) for ratio in ratios[1:])
    sizes = (num_classes - val - test, val, test)
    if min(sizes) < 1:
        raise ConfigError(f"split_ratios={','.join(map(str, ratios))} gives "
                          f"{'/'.join(map(str, sizes))} train/val/test classes of "
                          f"{num_classes}; every split needs at least one", "split_ratios")
    return sizes


def split_by_ratios(num_classes: int, split_ratios: str | None = None) -> dict[str, list[int]]:
    """Classes 0..num_classes-1 shuffled with the fixed SPLIT_SEED and cut by `split_ratios`.

    Also how a TensorFlow Datasets set's classes are split (tfds_images.py).

    Returns:
      SPLITS to sorted class indices.

    Raises:
      ConfigError: as `parse_split_ratios` and `split_sizes`.
    """
    sizes = split_sizes(num_classes, parse_split_ratios(split_ratios or DEFAULT_SPLIT_RATIOS))
    order = np.random.RandomState(SPLIT_SEED).permutation(num_classes)
    ends = np.cumsum(sizes)
    return {split: sorted(int(c) for c in order[end - size:end])
            for split, size, end in zip(SPLITS, sizes, ends)}


def _split_class_folders(data_dir, split_ratios):
    everything = _index_class_folders(data_dir)
    return {split: everything.select(classes)
            for split, classes in split_by_ratios(everything.num_classes, split_ratios).items()}


def image_channels(path) -> int:
    """1 for a grayscale image file, 3 for colour, read from its header alone.

    PNG's colour type and JPEG's component count decide; palette PNGs, GIFs
    and BMPs count as colour.

    Raises:
      DataError: the file is neither a readable PNG, JPEG, GIF nor BMP.
    """
    with open(path, "rb") as file:
        header = file.read(65536)
    if header.startswith(b"\x89PNG\r\n\x1a\n") and len(header) > 25:
        return 1 if header[25] in (0, 4) else 3  # gray, gray + alpha
    if header.startswith(b"\xff\xd8"):
        components = _jpeg_components(header)
        if components is not None:
            return 1 if components == 1 else 3
    elif header.startswith((b"GIF8", b"BM")):
        return 3
    raise DataError(f"{path}: not a PNG, JPEG, GIF or BMP image")


def _jpeg_components(header):
    """The component count of a JPEG's frame header (SOFn), or None if not found."""
    position = 2
    while position + 9 < len(header):
        if header[position] != 0xFF:
            return None
        marker = header[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(header[position + 2:position + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return header[position + 9]
        position += 2 + length
    return None


def detect_channels(splits: dict[str, ClassFiles], sample: int = 20) -> int:
    """3 if the first image of any of the first `sample` training classes is colour, else 1."""
    train = splits["train"]
    return max(image_channels(files[0]) for files in train.files[:sample])
