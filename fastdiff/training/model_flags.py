"""``model_flags.json``: the model and diffusion flags of a run, written beside its checkpoints.

fastdiff.train writes it into the log dir; fastdiff.sample and fastdiff.nll read it from the directory of
``--model_path`` and use its values for the model and diffusion flags not given on their command line, so
a model trained with the embedded profile samples without repeating its flags. Files written by
improved-diffusion have no such file: there every flag comes from the command line, as in its scripts.
"""

import json
import os
from typing import Any

FILENAME = "model_flags.json"


def write_model_flags(log_dir: str, flags: dict[str, Any], class_names: list[str]) -> str:
    """Write the flags and the dataset's class names into ``log_dir``; returns the path."""
    path = os.path.join(log_dir, FILENAME)
    os.makedirs(log_dir, exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump({"model_and_diffusion": flags, "class_names": list(class_names)}, handle, indent=2)
    os.replace(temporary, path)
    return path


def read_model_flags(model_path: str) -> dict[str, Any] | None:
    """The contents of ``model_flags.json`` beside ``model_path``, or None when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        try:
            content = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict) or not isinstance(content.get("model_and_diffusion"), dict):
        raise ValueError(f"{path} has no 'model_and_diffusion' object")
    return content


def apply_model_flags(args, given: set[str], model_path: str, keys) -> tuple[list[str], list[str]]:
    """Set the flags in ``keys`` not in ``given`` from the file beside ``model_path``.

    Returns (names of the flags taken from the file, the run's class names).
    """
    content = read_model_flags(model_path)
    if content is None:
        return [], []
    taken = []
    for name in keys:
        if name not in given and name in content["model_and_diffusion"]:
            setattr(args, name, content["model_and_diffusion"][name])
            taken.append(name)
    return taken, list(content.get("class_names", []))
