"""gguf-py's constants (GGUFValueType, GGMLQuantizationType, GGML_QUANT_SIZES, Keys, ...) without
`import gguf`.

`import gguf` runs the package's __init__, which pulls in numpy, the reader, the writer, the
quantizers and the tensor-name tables (~0.2 s); gguf/constants.py itself needs only enum and
typing. So the header-only readers load that one file on its own. When gguf is already imported
(the runtime, the converters, tests) its own module is reused, so the enum classes are the same.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "llmarch._gguf_constants"


def _load():
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.find_spec("gguf")  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise ImportError("the gguf package (gguf-py) is not installed")
    spec = importlib.util.spec_from_file_location(_NAME, Path(spec.origin).with_name("constants.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # a future gguf-py whose constants.py needs its package: the slow, sure way
        del sys.modules[_NAME]
        import gguf.constants

        return gguf.constants
    return module


_c = _load()
GGUFValueType = _c.GGUFValueType
GGMLQuantizationType = _c.GGMLQuantizationType
GGML_QUANT_SIZES = _c.GGML_QUANT_SIZES
Keys = _c.Keys
GGUF_MAGIC = _c.GGUF_MAGIC
GGUF_DEFAULT_ALIGNMENT = _c.GGUF_DEFAULT_ALIGNMENT

__all__ = ["GGUFValueType", "GGMLQuantizationType", "GGML_QUANT_SIZES", "Keys", "GGUF_MAGIC", "GGUF_DEFAULT_ALIGNMENT"]
