"""The oracle sides of mistral-ref's parity tools, kept out of the library: mistral_ref never imports transformers
or mistral-common.  Installed with mistral-ref and found by entry point:

* ``transformers_side.run_transformers`` — the "transformers" side of ``mistral-ref parity`` (entry-point group
  ``mistral_ref.parity_sides``);
* ``pytest_plugin`` — ``pytest --mistral-checkpoint DIR`` (entry-point group ``pytest11``).

Both need the oracles installed (the ``test`` extra: transformers, mistral-common).
"""
