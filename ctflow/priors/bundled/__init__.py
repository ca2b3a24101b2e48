"""Bundled priors: ``<name>.safetensors`` + ``<name>.json`` files shipped as package data.

Load them with ``ctflow.load_prior("<name>")``; list them with ``ctflow.list_priors()``.
See ``PROVENANCE.md`` and ``LICENSE.md`` in this folder for the training data, its licences
and the citations.
"""
