"""An offline fine-tuning task: summarise a Python function as its docstring's summary.

A supervised seq2seq task in the manner of T5's downstream tasks (Raffel et al. 2020), built from
the same standard-library files as the default corpus (moe_jax/data/corpus.py), so it needs no
download: `inputs` is a function's source without its docstring (ast.unparse, comments dropped),
`targets` the docstring's first paragraph, on one line. Functions whose summary has fewer than
MIN_WORDS words are left out. The files' split (5% validation by a hash of their path) and the
`max_files` subsets are the corpus's, so a model pre-trained on the corpus's train split never saw
the validation functions.
Prepared once as a TFDS dataset (array_record), like the corpus; select it with
data.dataset='stdlib_docstrings' and data.objective='seq2seq'.
"""
from __future__ import annotations

import ast
import copy
import os
import sysconfig
import tokenize

import tensorflow_datasets as tfds
from etils import epath

from moe_jax.data import corpus

NAME = "stdlib_docstrings"
MIN_WORDS = 3


def examples_of(text: str) -> list[tuple[str, str]]:
    """(function source without its docstring, the docstring's first paragraph) of each documented
    function in a module's source (nested ones too, in ast.walk's order)."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        summary = " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""  # first paragraph
        if len(summary.split()) < MIN_WORDS:
            continue
        stripped = copy.copy(node)  # the tree itself keeps its docstrings for the nested functions
        stripped.body = node.body[1:] or [ast.Pass()]
        found.append((ast.unparse(stripped), summary))
    return found


class StdlibDocstrings(tfds.core.GeneratorBasedBuilder):
    """Documented stdlib functions; features `inputs` (code), `targets` (summary) and `path`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [corpus.builder_config()]
    code_path = epath.Path(__file__)  # see corpus.StdlibCorpus.code_path

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                     features=tfds.features.FeaturesDict(
                                         {"inputs": text, "targets": text, "path": text}))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        root = sysconfig.get_paths()["stdlib"]
        files = corpus.select_files(corpus.stdlib_files(root), self.builder_config.max_files)
        return {"train": self._generate_examples(root, [f for f in files if not corpus.is_validation(f)]),
                "validation": self._generate_examples(root, [f for f in files if corpus.is_validation(f)])}

    def _generate_examples(self, root: str, files: list[str]):
        for relpath in files:
            try:
                with tokenize.open(os.path.join(root, relpath)) as f:
                    pairs = examples_of(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for i, (code, summary) in enumerate(pairs):
                yield f"{relpath}:{i}", {"inputs": code, "targets": summary, "path": relpath}


def prepare(data_dir: str | None, max_files: int = 0) -> StdlibDocstrings:
    """The prepared task builder, built on first use by process 0 (corpus.prepare_builder)."""
    return corpus.prepare_builder(StdlibDocstrings, data_dir, max_files)
