"""The default offline corpus: the Python standard library's own source, as a TFDS dataset.

Why this corpus: it is present on every fresh machine that runs moe_jax (no download, no network),
and it mixes real English prose (docstrings and comments: the stdlib is documented in sentences)
with code, so a language model trained on it learns visibly in minutes on a CPU. It is small:
Python 3.11's stdlib holds 31.5 MB of .py source of which 19.4 MB are its test suite; without the
tests and a few generated files (below) 609 files and 9.9 MB of text remain, about 2.8M tokens with
the 8k vocabulary this package trains on it (3.6 characters per token). For real experiments use
a TFDS text dataset (C4, as T5 and Switch did: Raffel et al. 2020, Fedus et al. 2021).

It is prepared once as a real TFDS dataset (`tfds.core.GeneratorBasedBuilder`, array_record files,
read back without TensorFlow through `as_data_source`) under the TFDS data dir, then reused. An
example is a piece of one file (about 2,000 characters or more, cut at a blank line before a
statement indented at most one level, so pieces start at a def, class or method). A file goes
wholly to one split, chosen by a hash of its path (5% validation), so both splits are fixed for a
given Python version. `max_files` picks a small, deterministic subset (by a second hash) for tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import sys
import sysconfig
import tempfile
import tokenize

import jax
import tensorflow_datasets as tfds
from etils import epath
from jax.experimental import multihost_utils

VALIDATION_PERCENT = 5
PIECE_CHARS = 2000
# Parts of the stdlib tree left out: third-party packages, the test suites (19.4 MB of mostly
# repetitive assertions) and generated files: the codecs' character tables, pydoc's 0.76 MB copy
# of the reference manual (one string literal) and the build's _sysconfigdata (differs per machine).
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data",
                           "__pycache__"})
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def stdlib_files(root: str | None = None) -> list[str]:
    """Paths (relative to `root`, the stdlib by default) of the corpus's .py files, sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        found += [os.path.relpath(os.path.join(directory, f), root) for f in files
                  if f.endswith(".py") and not f.startswith(EXCLUDED_FILE_PREFIXES)]
    return sorted(found)


def is_validation(relpath: str) -> bool:
    return _hash(relpath) % 100 < VALIDATION_PERCENT


def select_files(files: list[str], max_files: int) -> list[str]:
    """All files (max_files 0), or the `max_files` first by a hash independent of the split's."""
    if not max_files:
        return files
    return sorted(sorted(files, key=lambda f: _hash("subset:" + f))[:max_files])


def split_source(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cuts a source file into pieces of at least `piece_chars` characters (the last may be shorter).

    A cut falls before a line that follows a blank line and is indented by at most 4 spaces, so
    pieces begin at top-level statements or methods. Joining the pieces gives back `text`.
    """
    pieces, current, size, after_blank = [], [], 0, False
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip(" ")
        if (size >= piece_chars and after_blank and stripped.strip()
                and len(line) - len(stripped) <= 4):
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
        after_blank = not line.strip()
    if current:
        pieces.append("".join(current))
    return pieces


@dataclasses.dataclass
class StdlibCorpusConfig(tfds.core.BuilderConfig):
    max_files: int = 0  # 0: every file of the stdlib; N > 0: a deterministic subset of N files


def builder_config(max_files: int = 0) -> StdlibCorpusConfig:
    """The config for the whole stdlib of this Python version, or for a subset of `max_files`."""
    if max_files:
        return StdlibCorpusConfig(name=f"{PYTHON_TAG}_files{max_files}", max_files=max_files,
                                  description=f"{max_files} files of the Python {sys.version_info.major}."
                                  f"{sys.version_info.minor} standard library")
    return StdlibCorpusConfig(name=PYTHON_TAG, description=f"The Python {sys.version_info.major}."
                              f"{sys.version_info.minor} standard library without its tests")


class StdlibCorpus(tfds.core.GeneratorBasedBuilder):
    """Pieces of the Python standard library's .py files; features `text` and `path`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [builder_config()]
    # TFDS 4.9's default `code_path` needs the `importlib_resources` backport on Python >= 3.9
    # (only declared as a dependency for Python < 3.9); this file is the answer it looks for.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            homepage="https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        root = sysconfig.get_paths()["stdlib"]
        files = select_files(stdlib_files(root), self.builder_config.max_files)
        validation = [f for f in files if is_validation(f)]
        train = [f for f in files if not is_validation(f)]
        if not validation or not train:
            raise ValueError(f"data.corpus_max_files={self.builder_config.max_files} leaves the "
                             f"{'validation' if not validation else 'train'} split empty: choose more files")
        return {"train": self._generate_examples(root, train),
                "validation": self._generate_examples(root, validation)}

    def _generate_examples(self, root: str, files: list[str]):
        for relpath in files:
            try:
                with tokenize.open(os.path.join(root, relpath)) as f:  # honours PEP 263 coding cookies
                    text = f.read()
            except (SyntaxError, UnicodeDecodeError):
                continue
            for i, piece in enumerate(split_source(text)):
                if piece.strip():
                    yield f"{relpath}:{i}", {"text": piece, "path": relpath}


def prepare(data_dir: str | None, max_files: int = 0) -> StdlibCorpus:
    """The prepared corpus builder: built on first use (array_record files), reused afterwards."""
    return prepare_builder(StdlibCorpus, data_dir, max_files)


@contextlib.contextmanager
def _one_builder_at_a_time(data_dir: str):
    """An exclusive lock per builder directory among this machine's processes (experiment runs
    launched together), so that the second waits for the first's files instead of racing it."""
    name = hashlib.sha1(str(data_dir).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"moe_jax-prepare-{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_builder(builder_class, data_dir: str | None, max_files: int = 0):
    """A prepared builder of the corpus or of a task made from it. In a multi-process job process 0
    builds it while the others wait, so that no two build one data_dir."""
    config = builder_config(max_files) if max_files else PYTHON_TAG  # a registered config goes by name

    def make():
        return builder_class(config=config, data_dir=data_dir or None, file_format="array_record")
    builder = make()
    if jax.process_index() == 0 and not builder.is_prepared():
        with _one_builder_at_a_time(builder.data_dir):  # jobs started together on one machine
            builder = make()
            if not builder.is_prepared():
                builder.download_and_prepare()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"moe_jax: {builder_class.__name__} prepared")
        builder = make()  # sees the files process 0 wrote
    return builder
