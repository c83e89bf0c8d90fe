"""Loaders named by the task YAMLs of this folder (``custom_dataset: !function utils.local_json``).

lm-eval imports this file by its path. Copy it next to your own task YAMLs to read data files relative to them.
"""

from pathlib import Path

from tuneforge.eval.lmeval import local_dataset


def local_json(data_files, **metadata):
    """The task's ``dataset_kwargs.data_files``, read from this folder."""
    return local_dataset(Path(__file__).parent, data_files, **metadata)
