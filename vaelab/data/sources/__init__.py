"""Data sources, one module each: a `Source` record (`base.py`) that knows its image shape, the
size of each part it has, its classes and the data keys it honours, and reads its parts.

`vaelab.registry.DATASETS` names each record as a "module:attribute" string. Nothing here
imports torch at module level: spec checks and `--dry-run` read the records. Reading imports
what it needs; `vaelab.data.assemble` turns what a source read into train, val and test.

Adding a source: a module here with its `read` and its record, a line in the registry, and a
test in tests/test_data_sources.py (every data key is checked against every source there).
"""
