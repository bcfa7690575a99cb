"""seeright: serve vision-language models with per-request interventions against hallucination.

One namespace, seven rooms (each a top-level folder of the repository, mapped here by ``pyproject.toml``):

* :mod:`seeright.interventions`: the methods and the runtime that hosts them (torch + transformers only);
* :mod:`seeright.service`: the engines, the scheduler and the OpenAI-compatible HTTP API;
* :mod:`seeright.eval`: POPE and CHAIR, their exact scorers and the evaluation runner;
* :mod:`seeright.configs`: per-model settings; :mod:`seeright.model_zoo`: models that load with no download;
* :mod:`seeright.testbed`: the shapes world and its trained models; :mod:`seeright.tools`: measurement commands.

The command line (:mod:`seeright.cli`) sits on top of them all.
"""

__version__ = "0.3.0"
