"""The vLLM engine path (``seeright serve --engine vllm``, the ``[vllm]`` extra): the client in ``engine.py``,
the per-request head scaling inside vLLM's workers in ``worker.py``."""
