"""The ctypes declaration of the native step's structs against the layout the library was compiled with."""

from __future__ import annotations

from tests.kernels.test_quant import needs_native
from tp_ollama.kernels import native as native_kernels
from tp_ollama.models import native_structs

pytestmark = needs_native


def test_the_binding_declares_the_structs_as_the_library_was_compiled():
    """Every field of tpo_linear, tpo_layer and tpo_decoder at the offset the compiler gave it: a field
    added on one side only moves the ones after it, and the step refuses the model at load."""
    lib = native_kernels.library()
    layout = native_structs.library_layout(lib)
    assert layout == native_structs.binding_layout()
    assert len(layout) == 3 + len(native_structs.TpoLinear._fields_) + len(native_structs.TpoLayer._fields_) + len(
        native_structs.TpoDecoder._fields_
    )
