"""seeright's intervention library: the methods, their runtime and the model adapters.

It depends on torch, transformers, pydantic, and for CARVE's image refinement numpy, scipy and PIL; never on
the web service or the evaluation code (``service`` and ``eval`` import it, not the other way round).
"""
